"""Cost of K-FAC factor accumulation relative to a plain forward+backward pass.

Both are jitted once and timed (median of `repeats`, compile excluded) on the
same sharded batch in one process: `fwd_bwd` is `jax.grad` of the mean
next-token loss with respect to all params; `factor_step` is
`lossland.curvature.factors.make_factor_accumulator` for the selected layers
(one forward, one backward to the layer outputs, and the outer-product sums).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from launch import common
from lossland import parallel
from lossland import train as train_lib
from lossland.curvature import capture, factors


def _median_ms(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times)) * 1e3


def run(config) -> dict:
  model = common.build_model(config.model)
  mesh = common.build_mesh(config.mesh, config.batch_size)
  rng = np.random.default_rng(config.seed)
  toks = rng.integers(0, config.model.vocab_size, size=(config.batch_size, config.seq_len + 1))
  batch = parallel.shard_batch({'inputs': toks[:, :-1].astype(np.int32),
                                'targets': toks[:, 1:].astype(np.int32)}, mesh)
  params = model.init(jax.random.key(config.seed), jnp.zeros((1, config.seq_len), jnp.int32))
  params = jax.device_put(params, parallel.replicated(mesh))
  loss_fn = train_lib.next_token_loss(model.apply)
  grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None)[0]))
  views = capture.find_layers(model.apply, params, batch['inputs'], select=config.pattern)
  layers = list(views)
  acc = factors.make_factor_accumulator(model.apply, layers, mesh=mesh,
                                        fisher_type=config.fisher_type)
  state = {'sums': jax.device_put(factors.zero_sums(views), parallel.replicated(mesh))}
  key = jax.random.key(1)

  def factor_step():
    state['sums'] = acc(state['sums'], params, batch, key)
    return state['sums']

  t0 = time.perf_counter()
  jax.block_until_ready(grad(params, batch))
  jax.block_until_ready(factor_step())
  compile_s = time.perf_counter() - t0
  # Interleave the two measurements so that load changes on a shared machine hit both.
  fb, fs = [], []
  for _ in range(config.repeats):
    fb.append(_median_ms(lambda: grad(params, batch), 1))
    fs.append(_median_ms(factor_step, 1))
  fwd_bwd, factor = float(np.median(fb)), float(np.median(fs))
  factor_bytes = sum(4 * (s.A.size + s.G.size) for s in state['sums'].values())
  return {'fwd_bwd_ms': fwd_bwd, 'factor_step_ms': factor, 'ratio': factor / fwd_bwd,
          'layers': len(layers), 'factor_bytes': int(factor_bytes),
          'param_bytes': int(sum(x.nbytes for x in jax.tree.leaves(params))),
          'tokens': config.batch_size * config.seq_len, 'devices': int(mesh.devices.size),
          'compile_seconds': compile_s}
