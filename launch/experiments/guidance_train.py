"""Train the text-conditioned UNet of `lossland.guidance` on `shapes32` (DDPM, ε-prediction).

    python -m launch.analyze --config=configs/guidance/shapes_train.py --workdir=DIR

`lossland.train.fit` with a per-step EMA of the params (`ema_decay`) and an
optional time budget (`time_budget_s`; 0 = none): training stops at
`train.num_steps` or when the budget is spent, whichever comes first; with a
budget the learning rate is constant after warmup, so stopping early leaves a
consistent model. Writes `DIR/params.msgpack` (the EMA params) + `DIR/model.json`
(`lossland.guidance.checkpoints`) and `DIR/train_metrics.jsonl` (per-block mean loss).
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from launch import common
from lossland import data as data_lib
from lossland import guidance
from lossland import train as train_lib
from lossland.data import shapes
from lossland.guidance import checkpoints, training
from lossland.models import TextUNet


def load_train_data(config) -> dict:
  return training.shapes_train_data(
      config.data.source, num_examples=config.train.num_examples, seed=config.seed,
      two_object_fraction=config.data.get('two_object_fraction', shapes.TWO_OBJECT_FRACTION),
      data_dir=config.data.data_dir or None)


def run(config, workdir: str) -> dict:
  t, start = config.train, time.perf_counter()
  data = load_train_data(config)
  kwargs = checkpoints.model_kwargs(config.model)
  model = TextUNet(**kwargs)
  params = model.init(jax.random.key(config.seed), jnp.asarray(data['image'][:1], jnp.float32),
                      jnp.zeros((1,)), jnp.asarray(data['tokens'][:1]))
  loss_fn = guidance.diffusion_loss(model.apply, guidance.linear_schedule(t.num_timesteps),
                                    jnp.asarray(shapes.tokenize('')),
                                    caption_dropout=t.caption_dropout)
  lr = (train_lib.warmup_constant(t.learning_rate, t.warmup_steps) if t.time_budget_s else
        train_lib.warmup_cosine(t.learning_rate, t.warmup_steps, t.num_steps, t.final_lr))
  optimizer = train_lib.adamw(learning_rate=lr, b1=0.9, b2=0.99, weight_decay=t.weight_decay,
                              grad_clip=t.grad_clip)
  mesh = common.build_mesh(config.mesh, t.batch_size)
  n = len(data['image'])

  def batch_fn(step: int) -> dict:
    idx = data_lib.epoch_indices(step, batch_size=t.batch_size, num_examples=n, seed=config.seed)
    return {'image': data['image'][idx], 'tokens': data['tokens'][idx]}

  fit = train_lib.fit(params=params, loss_fn=loss_fn, optimizer=optimizer, batch_fn=batch_fn,
                      num_steps=t.num_steps, mesh=mesh, rng=jax.random.key(config.seed + 1),
                      data_seed=config.seed, steps_per_block=t.steps_per_block,
                      show_progress=config.get('progress', True), ema_decay=t.ema_decay,
                      time_budget_s=t.time_budget_s or None)
  checkpoints.save_trained(workdir, fit.ema_params, kwargs)
  k = t.steps_per_block
  blocks = [float(np.mean(fit.train_losses[i:i + k])) for i in range(0, len(fit.train_losses), k)]
  with open(os.path.join(workdir, 'train_metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps({'step': min(i * k + k, fit.step), 'loss': loss}) + '\n'
                 for i, loss in enumerate(blocks))
  return {'steps': fit.step, 'final_train_loss': float(np.mean(blocks[-5:])),
          'first_train_loss': blocks[0], 'stopped_by_time_budget': fit.stopped_by_time_budget,
          'train_seconds': fit.compile_seconds + fit.steady_seconds,
          'compile_seconds': fit.compile_seconds,
          'step_ms': 1e3 * fit.steady_seconds / max(fit.steady_steps, 1),
          'num_params': int(sum(x.size for x in jax.tree.leaves(params))),
          'devices': int(mesh.devices.size), 'wall_seconds': time.perf_counter() - start}
