"""Stable Diffusion sampling for `launch.compile`: the whole guided scan, per-chip memory, seed batch.

    python -m launch.compile --config=configs/compile/sd15_astar.py --topology=v5e:2x2

The `sd_sample` program is what `lossland.guidance.sd` runs: the text encoder
once, then every step of the scheduler's scan with classifier-free guidance and,
for a guided arm, the guidance gradient through the UNet's conditional pass (and
Attend-and-Excite's refinement loops when the arm has them), lowered on abstract
params (replicated, `sd.param_dtype`) and an abstract seed batch sharded over
the mesh's `data` axis. The architecture comes from the diffusers configs in
`sd.unet`/`sd.text_encoder`/`sd.scheduler`, or from the config files of a local
folder `sd.path` (no weights are read). The scheduler is the one
`guidance.sd.load_stable_diffusion` samples with (`schedulers.folder_config`): an
outdated config is fixed up as diffusers' pipeline fixes it, and a class lossland
lacks (Euler ancestral, LMS, ...) falls back to DDIM, each with one warning.

It reports the per-chip memory at `sd.batch_per_chip` seeds per chip, then the
largest seed batch per chip that fits the chip's HBM (at most
`sd.max_batch_per_chip`; `_largest_fitting` says how it searches).
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from launch.isolated import run_isolated, signal_name
from lossland.errors import UserError
from lossland.guidance import sampler as sampler_lib
from lossland.guidance import schedulers as schedulers_lib
from lossland.guidance import sd as sd_lib
from lossland.interop import diffusers_text, diffusers_unet
from lossland.models.clip_text import ClipTextEncoder
from lossland.models.sd_unet import SDUNet

PROGRAM = 'sd_sample'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _configs(sd) -> tuple[dict, dict, dict]:
  """(unet, text_encoder, scheduler) diffusers config dicts: from `sd.path`'s files or inline."""
  if sd.get('path'):
    path = sd.path if os.path.isabs(sd.path) else os.path.join(REPO, sd.path)
    files = ('unet/config.json', 'text_encoder/config.json', 'scheduler/scheduler_config.json')
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
      raise UserError(f'sd.path={sd.path!r} lacks {missing} (launch.compile reads only the '
                      'configs of a diffusers folder)')
    out = []
    for f in files:
      with open(os.path.join(path, f)) as fh:
        try:
          out.append(json.load(fh))
        except ValueError as e:
          raise UserError(f'{os.path.join(sd.path, f)} is not valid JSON ({e}); restore it from '
                          'the diffusers folder it came from') from None
    return tuple(out)
  return sd.unet.to_dict(), sd.text_encoder.to_dict(), sd.scheduler.to_dict()


def _scheduler(sd, sched_cfg: dict):
  """The scheduler `load_stable_diffusion` would sample this folder (or inline config) with.

  `schedulers.folder_config` first, warning once with its notes. A config no lossland
  scheduler can sample is a UserError naming the file (or `sd.scheduler`), a step count
  the scheduler does not take one naming `sd.num_steps`.
  """
  where = (os.path.join(sd.path, 'scheduler', 'scheduler_config.json') if sd.get('path')
           else 'config key sd.scheduler')
  try:
    config, notes = schedulers_lib.folder_config(sched_cfg)
  except ValueError as e:
    raise UserError(f'{where}: {e}') from None
  if notes:
    warnings.warn(f'{where}: ' + '; '.join(notes), stacklevel=2)
  try:
    return schedulers_lib.scheduler_from_config(config, int(sd.num_steps))
  except ValueError as e:
    raise UserError(f'--config.sd.num_steps={sd.num_steps}: {e}') from None


def _abstract(tree, mesh: Mesh, spec: P, dtype=None):
  def one(x):
    d = dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    return jax.ShapeDtypeStruct(x.shape, d, sharding=NamedSharding(mesh, spec))
  return jax.tree.map(one, tree)


class SDProgram:
  """The abstract models, params and sampler of one SD config on one mesh."""

  def __init__(self, config, mesh: Mesh):
    sd = config.sd
    unet_cfg, text_cfg, sched_cfg = _configs(sd)
    scheduler = _scheduler(sd, sched_cfg)  # a bad scheduler or step count stops first
    compute = DTYPES[sd.get('dtype', 'bfloat16')]
    self.unet = SDUNet(diffusers_unet.config_from_diffusers(unet_cfg), dtype=compute)
    self.text = ClipTextEncoder(diffusers_text.text_config(text_cfg), dtype=compute)
    self.mesh = mesh
    self.latent = int(sd.get('latent_size', 0) or self.unet.config.sample_size)
    length = self.text.config.max_position_embeddings
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    params = {'unet': {'params': diffusers_unet.param_shapes(self.unet)},
              'text_encoder': jax.eval_shape(self.text.init, jax.random.key(0), ids)}
    self.params = _abstract(params, mesh, P(), DTYPES[sd.get('param_dtype', 'bfloat16')])
    self.param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))
    self.calls = len(scheduler.timesteps)
    guidance, _ = (sd_lib.arm_guidance(sd.arm, self.calls) if sd.arm != 'baseline'
                   else (None, 0.0))
    self.guidance = guidance
    self.length = length
    # CLIP's start / end ids of SD's tokenizer; their values do not change the program.
    self.null = np.zeros((length,), np.int32)
    self.sampler = sampler_lib.make_sampler(
        lambda p, x, t, c: self.unet.apply(p['unet'], x, t, c), scheduler,
        null_tokens=self.null, guidance=guidance, attention=sd_lib.CROSS_ATTENTION, mesh=mesh,
        encode_fn=lambda p, ids: self.text.apply(p['text_encoder'], ids))

  def lower(self, batch_per_chip: int):
    rows = batch_per_chip * self.mesh.shape['data']
    data = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=NamedSharding(self.mesh, P('data', *([None] * (len(shape) - 1)))))
    c = self.unet.config
    batch = {'noise': data((rows, self.latent, self.latent, c.in_channels), jnp.float32),
             'tokens': data((rows, self.length), jnp.int32)}
    if self.guidance is not None:
      batch['text_mask'] = data((rows, self.length), jnp.bool_)
      batch['token_indices'] = data((rows, 2), jnp.int32)
    replicated = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=NamedSharding(self.mesh, P()))
    return self.sampler.fn.lower(self.params, batch, replicated(self.null.shape, jnp.int32),
                                 replicated((), jnp.float32),
                                 replicated((self.calls,), jnp.float32))


def compile_one(program: SDProgram, per_chip: int, hbm: int) -> dict:
  """Memory and FLOPs of the program at `per_chip` seeds per chip, or the compiler's refusal."""
  from launch import compile as compile_lib  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  try:
    compiled = program.lower(per_chip).compile()
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    return {'error': str(e).strip().splitlines()[0], 'fits': False,
            'compile_seconds': time.perf_counter() - t0}
  entry = compile_lib.memory_report(compiled, hbm)
  entry.update(flops_per_device=compile_lib.flops(compiled),
               compile_seconds=time.perf_counter() - t0)
  entry['fits'] = entry['total_bytes'] <= hbm
  return entry


def _compile_in_child(config, topology: str, per_chip: int) -> dict:
  from launch import compile as compile_lib  # pylint: disable=g-import-not-at-top
  devices = compile_lib.topology_devices(topology)
  _, hbm = compile_lib.chip_hbm(devices)
  return compile_one(SDProgram(config, compile_lib.topology_mesh(config.mesh, devices)),
                     per_chip, hbm)


def compile_sd(config, topology: str) -> dict:
  """The `sd_sample` report on `topology`: memory at sd.batch_per_chip and the largest batch.

  With `sd.isolate_compiles` each batch size compiles in its own process
  (`run_isolated`); the search steps over sizes the compiler crashed on
  (`_bytes_past_crashes`), and the report lists them.
  """
  from launch import compile as compile_lib  # pylint: disable=g-import-not-at-top
  devices = compile_lib.topology_devices(topology)
  kind, hbm = compile_lib.chip_hbm(devices)
  mesh = compile_lib.topology_mesh(config.mesh, devices)
  program = SDProgram(config, mesh)
  sd = config.sd
  isolate = bool(sd.get('isolate_compiles', False))
  cache: dict[int, dict] = {}

  def measure(per_chip: int) -> dict:
    if per_chip not in cache:
      if isolate:
        t0 = time.perf_counter()
        entry, code = run_isolated(_compile_in_child, config, topology, per_chip)
        cache[per_chip] = entry if entry is not None else {
            'error': f'the TPU compiler crashed (exit code {code}: '
                     f'{signal_name(code)}) at {per_chip} seeds per chip',
            'fits': False, 'crashed': True, 'compile_seconds': time.perf_counter() - t0}
      else:
        cache[per_chip] = compile_one(program, per_chip, hbm)
      e = cache[per_chip]
      print(f'{topology} {PROGRAM} at {per_chip} seeds per chip: '
            + (f'{e["total_bytes"] / compile_lib.GiB:.2f} GiB' if 'total_bytes' in e
               else e['error']) + f' (compiled in {e["compile_seconds"]:.0f} s)',
            file=sys.stderr, flush=True)
    return cache[per_chip]

  at = measure(int(sd.batch_per_chip))
  limit = int(sd.get('max_batch_per_chip', 64))
  largest = _largest_fitting(lambda n: _bytes_past_crashes(measure, n, limit), hbm, limit)
  report = {'topology': topology, 'chip': kind, 'devices': len(devices),
            'hbm_bytes_per_chip': hbm, 'mesh': dict(mesh.shape),
            'param_count': int(sum(x.size for x in jax.tree.leaves(program.params))),
            'param_bytes_per_chip': int(program.param_bytes), 'arm': sd.arm,
            'latent_size': program.latent, 'image_size': 8 * program.latent,
            'model_calls': program.calls,
            'programs': {PROGRAM: dict(at, batch_size=int(sd.batch_per_chip) * mesh.shape['data'],
                                       batch_per_chip=int(sd.batch_per_chip))},
            'largest_batch_per_chip': largest,
            'batch_search': {str(n): {k: v for k, v in e.items() if k in (
                'total_bytes', 'fits', 'error', 'crashed')} for n, e in sorted(cache.items())}}
  if not at['fits']:
    raise compile_lib.DoesNotFit(
        f'{PROGRAM} at {sd.batch_per_chip} seeds per chip does not fit {topology} ({kind}, '
        f'{hbm:,} bytes of HBM per chip): ' + (at.get('error') or f'{at["total_bytes"]:,} bytes')
        + f'. The largest seed batch per chip that fits is {largest}; set --config.sd.'
        'batch_per_chip to it, or use a larger topology.', report)
  return report


def _bytes_past_crashes(measure, n: int, limit: int, max_steps: int = 2) -> int | None:
  """Per-chip bytes at n seeds for the search; at a size the compiler crashed on, those at n + 1.

  Memory grows with n, so the next size's bytes bound a crashed size's from
  above: the search steps over a crash instead of stopping at it, and the
  size it returns always compiled (a crashed n can only be largest if n + 1
  fits, which makes n + 1 larger). After `max_steps` sizes in a row crash
  (each costs a compile of minutes) the size counts as not fitting. None:
  refused, or crashed up to `limit` or `max_steps` times in a row.
  """
  for _ in range(max_steps + 1):
    if not measure(n).get('crashed'):
      return measure(n).get('total_bytes')
    if n >= limit:
      return None
    n += 1
  return None


def _largest_fitting(total_bytes, hbm: int, limit: int) -> int:
  """The largest n in [1, limit] whose program fits `hbm` (0 when even 1 does not).

  `total_bytes(n)` is the per-chip bytes at n seeds per chip, or None when the
  compiler refused it. Per-chip memory grows about linearly in n, so the line
  through n = 1 and 2 predicts the answer; the prediction is then checked
  (n fits, n + 1 does not) by galloping up or bisecting down, so the result
  is exact for any memory that grows with n. A compile of SD 1.5 takes
  minutes: this needs about four.
  """
  fits = lambda n: (b := total_bytes(n)) is not None and b <= hbm
  if not fits(1):
    return 0
  if limit == 1 or not fits(2):
    return 1
  slope = max(total_bytes(2) - total_bytes(1), 1)
  guess = int(min(limit, max(2, 1 + (hbm - total_bytes(1)) // slope)))
  if fits(guess):
    low, step = guess, 1
    high = min(low + step, limit + 1)
    while high <= limit and fits(high):
      low, step = high, 2 * step
      high = min(low + step, limit + 1)
  else:
    low, high = 2, guess
  while high - low > 1:  # fits(low); high does not fit or is past the limit
    mid = (low + high) // 2
    low, high = (mid, high) if fits(mid) else (low, mid)
  return low


def format_report(report: dict) -> str:
  GiB = 2 ** 30
  e = report['programs'][PROGRAM]
  lines = [f'{report["topology"]} ({report["chip"]}, {report["devices"]} chips, '
           f'{report["hbm_bytes_per_chip"] / GiB:.0f} GiB HBM each), mesh {report["mesh"]}, '
           f'{report["param_count"]:,} params ({report["param_bytes_per_chip"] / GiB:.2f} GiB '
           f'per chip), arm {report["arm"]}, {report["image_size"]}x{report["image_size"]}, '
           f'{report["model_calls"]} UNet calls']
  if 'total_bytes' in e:
    lines.append(f'{PROGRAM} at {e["batch_per_chip"]} seeds per chip: args '
                 f'{e["argument_bytes"] / GiB:.3f} GiB, outputs {e["output_bytes"] / GiB:.3f}, '
                 f'temporaries {e["temp_bytes"] / GiB:.3f}, code '
                 f'{e["generated_code_bytes"] / 2 ** 20:.1f} MiB, total '
                 f'{e["total_bytes"] / GiB:.3f} GiB ({e["hbm_fraction"]:.1%} of HBM), '
                 f'{e["flops_per_device"] / 1e12:.2f} TFLOP per chip')
  crashed = sorted(int(n) for n, e in report['batch_search'].items() if e.get('crashed'))
  lines.append(f'largest seed batch per chip: {report["largest_batch_per_chip"]} '
               f'(searched {sorted(int(n) for n in report["batch_search"])}'
               + (f'; the compiler crashed at {crashed}: use another size' if crashed
                  else '') + ')')
  return '\n'.join(lines)

