"""Timing lossland against a peer library in one process, rounds alternated.

Every comparison script in `benchmarks/` uses these three pieces:

- `machine()`: what the numbers were measured on — the CPU model, the `lscpu`
  flags that decide which kernels run (AVX2, AVX-512, bfloat16 dot units, AMX),
  the cores this process may use and the load average before and after;
- `alternate(contenders, rounds)`: one warm-up call of each contender (compiles,
  caches), then `rounds` rounds in which every contender runs once in turn, so
  a tenant that slows the shared machine for a minute slows every contender of
  that round rather than one of them;
- `report(name, times, ...)`: each contender's min and median, the ratios of
  lossland's median to each peer's, printed as a table and as one JSON line.

Run a comparison on fewer cores by restricting the process, for both sides at
once: `taskset -c 0 python benchmarks/...` (XLA:CPU and PyTorch both size their
thread pools from the cores the process may use; `threads()` is that number).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

# Flags that change which matrix-product kernels XLA, OpenBLAS and PyTorch pick.
KERNEL_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16', 'amx_tile')


def threads() -> int:
  """The cores this process may run on (its affinity mask), as thread pools count them."""
  return len(os.sched_getaffinity(0))


def machine() -> dict:
  model, flags = platform.processor() or '?', set()
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    for line in lscpu.splitlines():
      key, _, value = line.partition(':')
      if key.strip() == 'Model name':
        model = value.strip()
      elif key.strip() == 'Flags':
        flags = set(value.split())
  except (OSError, subprocess.CalledProcessError):
    pass
  return {'cpu': model, 'kernel_flags': [f for f in KERNEL_FLAGS if f in flags],
          'cores_usable': threads(), 'cores_total': os.cpu_count(),
          'load_average_1m': round(os.getloadavg()[0], 2)}


def alternate(contenders: dict[str, Callable[[], object]], rounds: int = 3,
              warmup: int = 1) -> dict[str, list[float]]:
  """Seconds of each call, contenders alternated round by round after `warmup` calls each.

  Every callable must return only once its work is done (block on JAX arrays,
  read back a tensor), so that the wall time is the work's.
  """
  for fn in contenders.values():
    for _ in range(warmup):
      fn()
  times: dict[str, list[float]] = {name: [] for name in contenders}
  for _ in range(rounds):
    for name, fn in contenders.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def summary(times: dict[str, list[float]], ours: str = 'lossland') -> dict:
  """min and median per contender, and `ours`' median over each other contender's median."""
  out = {}
  for name, values in times.items():
    out[f'{name}_min_s'] = round(min(values), 4)
    out[f'{name}_median_s'] = round(statistics.median(values), 4)
  for name in times:
    if name != ours and ours in times:
      out[f'{ours}_over_{name}'] = round(statistics.median(times[ours]) / statistics.median(times[name]), 3)
  return out


def report(name: str, times: dict[str, list[float]], ours: str = 'lossland',
           **extra) -> dict:
  """Prints a table of the contenders and one JSON line (`name`, machine, times, ratios, extra)."""
  load_before = extra.pop('load_before', None)
  record = {'benchmark': name, **summary(times, ours), **extra, 'rounds': len(next(iter(times.values()))),
            'machine': machine()}
  if load_before is not None:
    record['machine']['load_average_1m_before'] = load_before
  width = max(len(n) for n in times)
  print(f'\n{name}  ({record["machine"]["cpu"]}, {record["machine"]["cores_usable"]} cores, '
        f'flags {" ".join(record["machine"]["kernel_flags"])}, load {record["machine"]["load_average_1m"]})')
  for contender, values in times.items():
    ratio = '' if contender == ours else f'   {ours} / this = {statistics.median(times[ours]) / statistics.median(values):.2f}'
    print(f'  {contender:<{width}}  min {min(values):8.3f} s  median {statistics.median(values):8.3f} s{ratio}')
  print(json.dumps(record, sort_keys=True))
  return record
