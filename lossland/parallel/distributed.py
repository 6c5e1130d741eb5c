"""Multi-host start-up (called by launchers behind `--multihost`) and local multi-process runs.

`initialize_multihost` is what every host of a TPU pod or GPU cluster calls
first. `run_local_processes` starts the same program as N processes on this
machine, each with its own CPU devices and the coordinator on a free
localhost port: the multi-controller runtime of a pod (one JAX process per
host, collectives across processes over gloo on CPU) in miniature, which is how
the tests check that a method gives the same answer on 2 processes x 4 devices
as on 1 process x 8.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Mapping, Sequence

import jax

COORDINATOR_ENV = 'JAX_COORDINATOR_ADDRESS'
NUM_PROCESSES_ENV = 'JAX_NUM_PROCESSES'
PROCESS_ID_ENV = 'JAX_PROCESS_ID'


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == '':
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'environment variable {name}={value!r} must be an integer') from None


def initialize_multihost() -> None:
  """`jax.distributed.initialize()` with cluster auto-detection.

  TPU pods, SLURM and Open MPI are detected by JAX. Elsewhere set
  JAX_COORDINATOR_ADDRESS=host0:port, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i
  on every process: JAX itself reads only the address, so the process count and
  id are read here and passed on (unset, auto-detection fills them in).
  """
  jax.distributed.initialize(num_processes=_env_int(NUM_PROCESSES_ENV),
                             process_id=_env_int(PROCESS_ID_ENV))


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class ProcessResult:
  process_id: int
  returncode: int
  output: str  # stdout and stderr together


class LocalProcessError(RuntimeError):
  """A local multi-process run failed: a process exited non-zero or ran past the timeout."""


def local_process_env(process_id: int, num_processes: int, port: int, devices_per_process: int,
                      base: Mapping[str, str] | None = None) -> dict[str, str]:
  """The environment of local process `process_id`: coordinator, ids, its CPU devices.

  Any --xla_force_host_platform_device_count already in XLA_FLAGS is replaced.
  """
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  flags.append(f'--xla_force_host_platform_device_count={devices_per_process}')
  env.update({'XLA_FLAGS': ' '.join(flags), 'JAX_PLATFORMS': 'cpu',
              'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo',
              COORDINATOR_ENV: f'127.0.0.1:{port}', NUM_PROCESSES_ENV: str(num_processes),
              PROCESS_ID_ENV: str(process_id)})
  return env


def run_local_processes(argv: Sequence[str], *, num_processes: int, devices_per_process: int,
                        timeout: float = 300.0, cwd: str | None = None,
                        env: Mapping[str, str] | None = None) -> list[ProcessResult]:
  """Runs `argv` (e.g. `[sys.executable, 'worker.py', ...]`) as `num_processes` local processes.

  Each process gets JAX_COORDINATOR_ADDRESS (a free 127.0.0.1 port),
  JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_PLATFORMS=cpu and
  `devices_per_process` CPU devices, so a program that calls
  `initialize_multihost()` first sees `num_processes * devices_per_process`
  global devices. Output goes to temporary files (no pipe can fill up).

  Raises:
    ValueError: for counts below 1.
    LocalProcessError: when a process exits non-zero (the others are then
      killed) or the run exceeds `timeout` seconds; the message holds the end of
      every process's output, the failing one first.
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f'num_processes={num_processes} and devices_per_process='
                     f'{devices_per_process} must be at least 1')
  port = free_port()
  procs, logs = [], []
  try:
    for i in range(num_processes):
      log = tempfile.TemporaryFile(mode='w+')
      logs.append(log)
      procs.append(subprocess.Popen(
          list(argv), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
          env=local_process_env(i, num_processes, port, devices_per_process, env)))
    deadline = time.monotonic() + timeout
    failed = None
    while any(p.poll() is None for p in procs):
      failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
      if failed is not None or time.monotonic() > deadline:
        break
      time.sleep(0.05)
    if failed is None:
      failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
    timed_out = failed is None and any(p.poll() is None for p in procs)
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    results = []
    for i, (p, log) in enumerate(zip(procs, logs)):
      log.seek(0)
      results.append(ProcessResult(i, p.returncode, log.read()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  if failed is not None or timed_out:
    order = ([results[failed]] if failed is not None else []) + [
        r for r in results if r.process_id != failed]
    what = (f'process {failed} of {num_processes} exited with status {results[failed].returncode}'
            if failed is not None else
            f'the {num_processes} processes did not finish within {timeout:.0f} s')
    tails = '\n'.join(f'--- process {r.process_id} (status {r.returncode}), last lines:\n'
                      + '\n'.join(r.output.splitlines()[-40:]) for r in order)
    raise LocalProcessError(f'{what}: {" ".join(argv)}\n{tails}')
  return results


def python_argv(script: str, *args: str) -> list[str]:
  """`[sys.executable, script, *args]`: this interpreter running `script`."""
  return [sys.executable, script, *args]
