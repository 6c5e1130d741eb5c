"""Compiled training and evaluation steps.

`make_train_block` runs several optimizer steps inside one `jax.jit` with a
`lax.scan`, donating the train state, so the host dispatches and syncs once per
block instead of once per step. `make_evaluate` averages metrics over a stack
of evaluation batches in one compiled call.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from lossland.parallel import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any


class EmaState(NamedTuple):
  """The state of `with_ema`: the wrapped optimizer's state and the EMA of the params."""
  inner: Any
  ema: Any


def with_ema(optimizer: optax.GradientTransformation,
             decay: float) -> optax.GradientTransformation:
  """`optimizer` that also keeps an exponential moving average of the params in its state.

  After each update, `ema <- decay * ema + (1 - decay) * (params + updates)`, the
  params after that optimizer step (Polyak averaging, as DDPM's sampling weights;
  Ho et al. 2020, Appendix B). The EMA starts at the initial params and is kept in
  at least float32. Because it lives in the optimizer state, it is updated inside
  the compiled block on every step, sharded like the params, and saved and
  restored with every checkpoint. `update` needs `params`.
  """
  if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0.0 <= decay < 1.0:
    raise ValueError(f'ema_decay={decay!r} must be a number in [0, 1) (e.g. 0.999)')

  def as_ema(p):
    return jnp.asarray(p, jnp.promote_types(jnp.asarray(p).dtype, jnp.float32))

  def init(params):
    return EmaState(optimizer.init(params), jax.tree.map(as_ema, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('with_ema needs params in update(updates, state, params)')
    updates, inner = optimizer.update(updates, state.inner, params)
    new_params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * as_ema(p), state.ema, new_params)
    return updates, EmaState(inner, ema)

  return optax.GradientTransformation(init, update)


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params))


def state_shardings(state: TrainState, mesh: Mesh, param_shardings) -> TrainState:
  """Optimizer moments follow their parameter's sharding; everything else is replicated."""
  params_struct = jax.tree.structure(state.params)

  def opt_sharding(subtree):
    if jax.tree.structure(subtree) == params_struct:
      return param_shardings
    return None

  replicated = mesh_lib.replicated(mesh)
  opt = jax.tree.map(
      lambda s: opt_sharding(s), state.opt_state,
      is_leaf=lambda s: jax.tree.structure(s) == params_struct)
  opt = jax.tree.map(lambda s: replicated if s is None else s, opt,
                     is_leaf=lambda s: s is None or isinstance(s, NamedSharding))
  return TrainState(step=replicated, params=param_shardings, opt_state=opt)


def all_finite(tree) -> jax.Array:
  """Scalar bool: every inexact (float or complex) leaf of `tree` is finite; jit-safe."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def make_train_block(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                     state_sharding: TrainState, mesh: Mesh) -> Callable:
  """Returns `train_block(state, batches, rng) -> (state, metrics)`, jitted once per shape.

  `batches` is a pytree of arrays [steps, batch, ...] sharded on `data` along
  axis 1; `metrics` are per-step arrays [steps], plus `state_finite`, a scalar
  bool: whether every float of the returned state (what a checkpoint would
  save) is finite. The rng of step s is `fold_in(rng, s)`, so a resumed run
  sees the same randomness.
  """
  def one_step(state: TrainState, batch, rng):
    step_rng = jax.random.fold_in(rng, state.step)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, step_rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    return TrainState(state.step + 1, params, opt_state), metrics

  def train_block(state: TrainState, batches, rng):
    state, metrics = jax.lax.scan(lambda s, b: one_step(s, b, rng), state, batches)
    return state, dict(metrics, state_finite=all_finite(state))

  replicated = mesh_lib.replicated(mesh)
  return jax.jit(train_block, donate_argnums=0,
                 out_shardings=(state_sharding, replicated))


def make_evaluate(loss_fn: Callable, *, mesh: Mesh) -> Callable:
  """Returns `evaluate(params, batches, rng) -> metrics`, the mean over [n, batch, ...] batches."""
  def evaluate(params, batches, rng):
    def body(total, batch):
      _, metrics = loss_fn(params, batch, rng)
      return jax.tree.map(jnp.add, total, metrics), None
    first = jax.tree.map(lambda x: x[0], batches)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: loss_fn(params, first, rng)[1]))
    total, _ = jax.lax.scan(body, zeros, batches)
    count = jax.tree.leaves(batches)[0].shape[0]
    return jax.tree.map(lambda t: t / count, total)
  return jax.jit(evaluate, out_shardings=mesh_lib.replicated(mesh))
