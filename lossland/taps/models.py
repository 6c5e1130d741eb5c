"""Any model lossland takes, as one pure `apply_fn(params, *args, **kwargs)`.

A model is a Flax linen `Module` (or its bound `apply`), a Flax NNX `Module`
(or its `GraphDef`, or a `(graphdef, state)` pair), or a plain function of a
parameter pytree (hand-written JAX, Equinox through `eqx.partition`, Haiku's
`transform(...).apply`). NNX modules run functionally as
`nnx.merge(graphdef, state)(*args)`; their state is the params pytree, so
results (edited weights) come back as an `nnx.State` of the same structure.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
from flax import nnx


@functools.lru_cache(maxsize=None)
def nnx_apply(graphdef: nnx.GraphDef) -> Callable[..., Any]:
  """`(state, *args, **kwargs) -> nnx.merge(graphdef, state)(*args, **kwargs)`, one per graphdef.

  Cached, so the same module structure gives the same function (and jit cache hits).
  """
  def apply(state, *args, **kwargs):
    return nnx.merge(graphdef, state)(*args, **kwargs)

  apply.__qualname__ = f'nnx_apply[{type(graphdef).__name__}]'
  return apply


@functools.lru_cache(maxsize=None)
def _linen_apply(module: nn.Module) -> Callable[..., Any]:
  """The `apply` of the first module equal to `module` (linen modules compare by their fields)."""
  return module.apply


def linen_apply(module: nn.Module) -> Callable[..., Any]:
  """`module.apply`, the same function object for every equal module, as `nnx_apply` per graphdef.

  A bound method compares by the identity of its module, so `MyModel().apply` of two
  equal modules would miss every cache keyed by the function (jit's static arguments,
  `curvature.estimate_factors`' compiled accumulator). Modules with unhashable fields
  get their own `apply`.
  """
  try:
    return _linen_apply(module)
  except TypeError:  # an unhashable field
    return module.apply


def as_function(model, params=None) -> tuple[Callable[..., Any], Any]:
  """`(apply_fn, params)` for any model form (see the module docstring).

  For an NNX module `params` may be None (its own state) or an `nnx.State`
  of the same structure; for every other form it is the params pytree.
  """
  if isinstance(model, nn.Module):
    return linen_apply(model), params
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    if isinstance(params, nnx.Module):
      params = nnx.split(params)[1]
    return nnx_apply(graphdef), state if params is None else params
  if isinstance(model, nnx.GraphDef):
    return nnx_apply(model), params
  if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nnx.GraphDef):
    return nnx_apply(model[0]), model[1] if params is None else params
  if callable(model):
    return model, params
  raise TypeError(f'expected a flax linen Module, an NNX Module (or graphdef, state), or an '
                  f'apply_fn(params, *args, **kwargs); got {type(model).__name__}')


def params_tree(params):
  """`params` as a pytree of arrays: an NNX module's state, anything else as given."""
  if isinstance(params, nnx.Module):
    return nnx.split(params)[1]
  return params


def like_input(original, new_tree):
  """`new_tree` in the form `original` came in: a new NNX module for a module, else the tree."""
  if isinstance(original, nnx.Module):
    graphdef, _ = nnx.split(original)
    return nnx.merge(graphdef, new_tree)
  return new_tree
