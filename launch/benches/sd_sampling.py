"""Wall time of guided (A-STAR by default) vs unguided Stable Diffusion sampling, same batch.

    python -m launch.bench --config=configs/guidance/bench_sd_sampling.py

Loads a local diffusers folder (`config.model.path`; the tiny random SD 1.x
fixture by default), builds the baseline and the guided arm's samplers
(`lossland.guidance.sd`) on the same scheduler and steps, compiles both
(excluded), then reports the median of `repeats` runs of each on the same
prompts and seeds, decoding excluded. The ratio is the speed target (issue
16: at most 2.0x; A&E reports about 1.7x without refinement).
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from launch import common
from lossland.guidance import sd as sd_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn().latents)
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def run(config) -> dict:
  path = config.model.path if os.path.isabs(config.model.path) else os.path.join(
      REPO, config.model.path)
  model = sd_lib.load_stable_diffusion(path)
  s = config.sampling
  mesh = common.build_mesh(config.mesh, s.batch_size)
  prompts = [config.prompts[i % len(config.prompts)] for i in range(s.batch_size)]
  concepts = [list(config.concepts[i % len(config.concepts)]) for i in range(s.batch_size)]
  seeds = list(range(s.batch_size))
  plain = sd_lib.make_sd_sampler(model, 'baseline', num_steps=s.num_steps, mesh=mesh)
  guided = sd_lib.make_sd_sampler(model, config.arm, num_steps=s.num_steps, mesh=mesh)
  run_plain = lambda: plain(prompts, seeds=seeds, cfg_scale=s.cfg_scale, decode=False)
  run_guided = lambda: guided(prompts, concepts=concepts, seeds=seeds, cfg_scale=s.cfg_scale,
                              decode=False)
  t0 = time.perf_counter()
  jax.block_until_ready(run_plain().latents)
  jax.block_until_ready(run_guided().latents)
  compile_seconds = time.perf_counter() - t0
  unguided = _median_seconds(run_plain, s.repeats)
  guided_s = _median_seconds(run_guided, s.repeats)
  return {'guided_over_unguided_time': guided_s / unguided, 'guided_seconds': guided_s,
          'unguided_seconds': unguided, 'compile_seconds': compile_seconds, 'arm': config.arm,
          'batch': s.batch_size, 'num_steps': guided.num_steps,
          'guided_steps': guided.guidance.num_guided_steps, 'devices': int(mesh.devices.size)}
