"""Train the text-conditioned UNet of `lossland.guidance` on `shapes32` (DDPM, ε-prediction).

    python -m launch.analyze --config=configs/guidance/shapes_train.py --workdir=DIR

Writes `DIR/params.msgpack` (EMA params, flax serialization), `DIR/model.json`
(the model's constructor arguments) and `DIR/train_metrics.jsonl`. Training
stops at `train.num_steps` or after `train.time_budget_s` seconds of training
(0 = no budget), whichever comes first; with a budget the learning rate is
constant after warmup (the EMA does the averaging), so stopping early leaves a
consistent model.
"""
from __future__ import annotations

import json
import os
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from launch import common
from lossland import data as data_lib
from lossland import guidance
from lossland import parallel
from lossland import train as train_lib
from lossland.data import shapes
from lossland.models import TextUNet
from lossland.train import steps as steps_lib

PARAMS_FILE = 'params.msgpack'
MODEL_FILE = 'model.json'


def model_kwargs(config) -> dict:
  m = config.model
  return dict(vocab_size=len(shapes.VOCAB), channels=tuple(m.channels),
              attention_resolutions=tuple(m.attention_resolutions), text_width=m.text_width,
              text_layers=m.text_layers, text_heads=m.text_heads, num_heads=m.num_heads,
              pad_id=shapes.VOCAB.index(shapes.PAD))


def load_trained(directory: str):
  """(model, params) from a directory holding `params.msgpack` and `model.json`."""
  with open(os.path.join(directory, MODEL_FILE)) as f:
    kwargs = json.load(f)
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  model = TextUNet(**kwargs)
  template = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)),
      jnp.zeros((1,)), jnp.zeros((1, shapes.MAX_TOKENS), jnp.int32)))
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
  with open(os.path.join(directory, PARAMS_FILE), 'rb') as f:
    params = flax.serialization.from_bytes(template, f.read())
  return model, params


def has_trained(directory: str) -> bool:
  return all(os.path.exists(os.path.join(directory, n)) for n in (PARAMS_FILE, MODEL_FILE))


def load_train_data(config) -> dict:
  """The training scenes: the `shapes32` builder's train split, or freshly rendered ones."""
  d, fraction = config.data, config.data.get('two_object_fraction', shapes.TWO_OBJECT_FRACTION)
  if d.source == 'generate':
    if not config.train.num_examples:
      raise ValueError("data.source='generate' renders train.num_examples scenes; set "
                       '--config.train.num_examples (e.g. 30000)')
    return shapes.render_dataset(config.train.num_examples, seed=config.seed,
                                 two_object_fraction=fraction)
  if d.source != 'shapes32':
    raise ValueError(f"unknown data.source {d.source!r}; use 'shapes32' or 'generate'")
  if fraction != shapes.TWO_OBJECT_FRACTION:
    raise ValueError(f'the shapes32 builder has two_object_fraction '
                     f'{shapes.TWO_OBJECT_FRACTION}; for {fraction} use '
                     "--config.data.source=generate --config.train.num_examples=30000")
  return data_lib.load_shapes('train', data_dir=d.data_dir or None)


def run(config, workdir: str) -> dict:
  t, start = config.train, time.perf_counter()
  train_data = load_train_data(config)
  kwargs = model_kwargs(config)
  model = TextUNet(**kwargs)
  params = model.init(jax.random.key(config.seed), jnp.asarray(train_data['image'][:1],
                                                                jnp.float32),
                      jnp.zeros((1,)), jnp.asarray(train_data['tokens'][:1]))
  schedule = guidance.linear_schedule(t.num_timesteps)
  null = jnp.asarray(shapes.tokenize(''))
  loss_fn = guidance.diffusion_loss(model.apply, schedule, null, caption_dropout=t.caption_dropout)
  if t.time_budget_s:
    lr = optax.join_schedules([optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps),
                               optax.constant_schedule(t.learning_rate)], [t.warmup_steps])
  else:
    lr = train_lib.warmup_cosine(t.learning_rate, t.warmup_steps, t.num_steps, t.final_lr)
  optimizer = train_lib.adamw(learning_rate=lr, b1=0.9, b2=0.99, weight_decay=t.weight_decay,
                              grad_clip=t.grad_clip)
  mesh = common.build_mesh(config.mesh, t.batch_size)
  state = train_lib.init_train_state(params, optimizer)
  sharding = steps_lib.state_shardings(state, mesh, parallel.param_shardings(params, mesh, []))
  state = jax.device_put(state, sharding)
  block = steps_lib.make_train_block(loss_fn, optimizer, state_sharding=sharding, mesh=mesh)
  k = t.steps_per_block
  ema_decay = jnp.float32(t.ema_decay ** k)
  ema_update = jax.jit(lambda e, p: jax.tree.map(lambda a, b: ema_decay * a + (1 - ema_decay) * b,
                                                 e, p))
  ema = jax.tree.map(jnp.copy, state.params)
  n = len(train_data['image'])
  rng = jax.random.key(config.seed + 1)
  log_path = os.path.join(workdir, 'train_metrics.jsonl')
  open(log_path, 'w').close()
  step, losses, train_start, first_block_s = 0, [], time.perf_counter(), None
  while step < t.num_steps:
    idx = [data_lib.epoch_indices(s, batch_size=t.batch_size, num_examples=n, seed=config.seed)
           for s in range(step, step + k)]
    host = {'image': np.stack([train_data['image'][i] for i in idx]),
            'tokens': np.stack([train_data['tokens'][i] for i in idx])}
    t0 = time.perf_counter()
    state, metrics = parallel.settle(
        block(state, parallel.shard_batch(host, mesh, leading_axes=1), rng))
    ema = parallel.settle(ema_update(ema, state.params))
    block_loss = np.asarray(jax.device_get(metrics['loss']))
    if first_block_s is None:
      first_block_s = time.perf_counter() - t0
    if not np.all(np.isfinite(block_loss)):
      raise FloatingPointError(f'diffusion loss became {block_loss} near step {step}; lower '
                               'train.learning_rate')
    step += k
    losses.append(float(block_loss.mean()))
    with open(log_path, 'a') as f:
      f.write(json.dumps({'step': step, 'loss': losses[-1],
                          'seconds': time.perf_counter() - train_start}) + '\n')
    if config.get('progress', True) and (step // k) % 20 == 0:
      print(f'step {step} loss {losses[-1]:.4f} {time.perf_counter() - train_start:.0f}s',
            flush=True)
    if t.time_budget_s and time.perf_counter() - train_start > t.time_budget_s:
      break
  train_seconds = time.perf_counter() - train_start
  with open(os.path.join(workdir, PARAMS_FILE), 'wb') as f:
    f.write(flax.serialization.to_bytes(jax.device_get(ema)))
  with open(os.path.join(workdir, MODEL_FILE), 'w') as f:
    json.dump({k_: list(v) if isinstance(v, tuple) else v for k_, v in kwargs.items()}, f)
  steady = (train_seconds - first_block_s) / max(step - k, 1)
  return {'steps': step, 'final_train_loss': float(np.mean(losses[-5:])),
          'first_train_loss': losses[0], 'train_seconds': train_seconds,
          'compile_seconds': first_block_s, 'step_ms': 1e3 * steady,
          'num_params': int(sum(x.size for x in jax.tree.leaves(params))),
          'devices': int(mesh.devices.size), 'wall_seconds': time.perf_counter() - start}
