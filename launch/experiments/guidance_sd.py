"""Guidance arms on a local Stable Diffusion folder, paired seeds (configs/guidance/sd_guided.py).

Writes results.json (by launch.analyze), images.npz and sd_grid.png into the workdir.
"""
from __future__ import annotations

import os
import time

import jax.numpy as jnp
import numpy as np

from launch import common
from lossland.guidance import sd as sd_lib
from lossland.guidance import sd_runs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _path(p: str) -> str:
  return p if os.path.isabs(p) else os.path.join(REPO, p)


def run(config, workdir: str) -> dict:
  start, s = time.perf_counter(), config.sampling
  if not config.model.path:
    raise ValueError('set --config.model.path to a local diffusers Stable Diffusion folder '
                     '(unet/, text_encoder/, vae/, tokenizer/, scheduler/)')
  sd = sd_lib.load_stable_diffusion(_path(config.model.path), jnp.dtype(config.model.dtype))
  specs = (sd_runs.read_prompts(_path(config.prompts_file)) if config.prompts_file
           else sd_runs.parse_prompts(list(config.prompts), 'config.prompts'))
  seeds = list(range(s.first_seed, s.first_seed + s.num_seeds))
  batch = len(specs) * len(seeds)
  runs = sd_runs.compare_arms(sd, specs, seeds, tuple(config.arms), num_steps=s.num_steps,
                              cfg_scale=s.cfg_scale, mesh=common.build_mesh(config.mesh, batch),
                              repeats=s.repeats, multi_token=s.multi_token)
  arrays = {}
  for arm, r in runs.items():
    arrays[f'{arm}/images'] = sd_runs.to_uint8(r.samples.images)
    if r.samples.maps is not None:
      arrays[f'{arm}/maps'] = np.asarray(r.samples.maps, np.float32)
  np.savez_compressed(os.path.join(workdir, 'images.npz'), **arrays)
  sd_runs.save_grid(os.path.join(workdir, 'sd_grid.png'), runs, specs, seeds)
  base = runs.get('baseline')
  arms = {}
  for arm, r in runs.items():
    entry = {'sampling_seconds': r.seconds, 'compile_seconds': r.compile_seconds}
    if r.samples.loss is not None:
      loss = np.asarray(r.samples.loss)
      entry['first_step_loss'] = float(loss[0].mean())
      entry['last_guided_step_loss'] = float(loss[sd_lib.arm_guidance(
          arm, loss.shape[0])[0].num_guided_steps - 1].mean())
    if base is not None and arm != 'baseline':
      entry['guided_over_unguided_time'] = r.seconds / base.seconds
    arms[arm] = entry
  return {'arms': arms, 'prompts': [f'{p.prompt} | {", ".join(p.concepts)}' for p in specs],
          'seeds': seeds, 'samples_per_arm': batch,
          'num_model_calls': len(sd.scheduler(s.num_steps).timesteps),
          'model': config.model.path, 'wall_seconds': time.perf_counter() - start}
