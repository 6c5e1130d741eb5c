"""Wall time of A-STAR-guided vs unguided DDIM+CFG sampling for the same batch and steps.

    python -m launch.bench --config=configs/guidance/bench_sampling.py

Uses the committed `shapes32` UNet (or a random tiny one at `:runlocal`);
compile time is excluded, the median of `repeats` runs is reported. The
ratio is the speed target (issue: at most 2.0x).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from launch import common
from launch.experiments import guidance_eval, guidance_train
from lossland.data import shapes
from lossland.models import TextUNet


def run(config) -> dict:
  if config.model_dir:
    model, params = guidance_train.load_trained(os.path.join(guidance_eval.REPO, config.model_dir))
  else:
    model = TextUNet(vocab_size=len(shapes.VOCAB), channels=(8, 16, 16), text_width=16)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)),
                        jnp.zeros((1, shapes.MAX_TOKENS), jnp.int32))
  mesh = common.build_mesh(config.mesh, config.sampling.batch_size)
  runner = guidance_eval.Runner(model, params, config, mesh)
  guide = guidance_eval.make_guidance(config.arms.astar, config.eval.map_resolution)
  timing = runner.time_ratio(guide, config.sampling.cfg_grid[0], config.arms.astar.scales[0],
                             config.eval.timing_repeats)
  return {'guided_over_unguided_time': timing['ratio'], 'guided_seconds': timing['guided_seconds'],
          'unguided_seconds': timing['unguided_seconds'], 'batch': config.sampling.batch_size,
          'num_steps': config.sampling.num_steps,
          'guided_steps': config.arms.astar.num_guided_steps, 'devices': int(mesh.devices.size)}
