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
from lossland import guidance
from lossland.data import shapes
from lossland.guidance import runner as runner_lib
from lossland.models import TextUNet

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(config) -> dict:
  if config.model_dir:
    model, params = guidance.load_trained(os.path.join(REPO, config.model_dir))
  else:
    model = TextUNet(vocab_size=len(shapes.VOCAB), channels=(8, 16, 16), text_width=16)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)),
                        jnp.zeros((1, shapes.MAX_TOKENS), jnp.int32))
  s = config.sampling
  mesh = common.build_mesh(config.mesh, s.batch_size)
  runner = runner_lib.Runner(model.apply, params, schedule=guidance.linear_schedule(
      s.num_timesteps), num_steps=s.num_steps, batch_size=s.batch_size, mesh=mesh)
  guide = runner_lib.make_guidance(config.arms.astar, config.eval.map_resolution)
  timing = runner.time_ratio(guide, s.cfg_grid[0], config.arms.astar.scales[0],
                             config.eval.timing_repeats)
  return {'guided_over_unguided_time': timing.ratio, 'guided_seconds': timing.guided_seconds,
          'unguided_seconds': timing.unguided_seconds, 'batch': s.batch_size,
          'num_steps': s.num_steps, 'guided_steps': config.arms.astar.num_guided_steps,
          'devices': int(mesh.devices.size)}
