"""Parameterize a model by config: `dense` factories, the linear-layer census, cost tables.

    model = TransformerLM(vocab_size=256, dense=lowrank.dense_factory('lost', param_fraction=0.5))

`linear_layers(model, tokens)` lists every linear map a model builds through its
`dense` field (not its embedding or head), so budgets and parameter counts are
computed per layer and checked against the formulas of `lossland.lowrank.budget`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from lossland.lowrank import budget
from lossland.lowrank import layers


def dense_factory(kind: str, **kwargs) -> Callable[..., nn.Module]:
  """A `dense(features, use_bias=..., dtype=..., name=..., kernel_init=...)` factory.

  Args:
    kind: 'dense', 'lowrank', 'cola', 'lost' or 'sltrain'.
    **kwargs: fields of the layer class (e.g. `param_fraction=0.5, sparsity=0.05,
      gamma=0.5, activation='silu', factor_init='xavier', seed=0`).

  Raises:
    ValueError: for an unknown kind or a field the layer does not have.
  """
  if kind not in layers.LAYERS:
    raise ValueError(f'unknown low-rank kind {kind!r}; choose one of {sorted(layers.LAYERS)}')
  cls = layers.LAYERS[kind]
  if kind == 'dense':
    kwargs = {k: v for k, v in kwargs.items() if k not in ('seed', 'param_fraction')}
  fields = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f'{cls.__name__} has no field(s) {unknown}; available: {sorted(fields)}')
  return functools.partial(cls, **kwargs) if kwargs else cls


class LinearLayer(NamedTuple):
  path: str  # 'block_0/attn/query'
  d_in: int
  d_out: int


class _Tagged(nn.Dense):
  """An `nn.Dense` whose calls `linear_layers` records (the model's own head stays untagged)."""


def linear_layers(model: nn.Module, *example_inputs: Any) -> list[LinearLayer]:
  """Every linear map `model` creates through its `dense` factory, in call order.

  Uses `jax.eval_shape` (no FLOPs, no memory) and `nn.intercept_methods`.

  Raises:
    ValueError: when the model has no `dense` field.
  """
  if not hasattr(model, 'dense'):
    raise ValueError(f'{type(model).__name__} has no `dense` factory field; lossland.lowrank '
                     'parameterizes models that build their linear maps through one')
  found: list[LinearLayer] = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, _Tagged) and context.method_name == '__call__':
      path = '/'.join(str(p) for p in module.path)
      if all(f.path != path for f in found):
        found.append(LinearLayer(path, int(args[0].shape[-1]), int(module.features)))
    return next_fun(*args, **kwargs)

  tagged = model.clone(dense=_Tagged)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: tagged.init(jax.random.key(0), *example_inputs))
  return found


def layer_plans(model: nn.Module, *example_inputs: Any, kind: str,
                **kwargs) -> dict[str, budget.LayerPlan]:
  """Resolved `LayerPlan` of every linear map of `model` under `kind` (path -> plan).

  `kwargs` are the budget arguments of `budget.plan` (rank, param_fraction,
  sparsity, residual_rank, density); other layer fields are ignored here.
  """
  keys = ('rank', 'param_fraction', 'sparsity', 'residual_rank', 'density')
  plan_kwargs = {k: v for k, v in kwargs.items() if k in keys}
  if kind == 'cola':
    kind = 'lowrank'
  return {l.path: budget.plan(kind, l.d_in, l.d_out, layer=l.path, **plan_kwargs)
          for l in linear_layers(model, *example_inputs)}


def cost_table(plans: dict[str, budget.LayerPlan]) -> list[dict]:
  """Rows {layer, shape, rank, k, n_s, nnz, params, fraction, flops_per_token} plus a total row."""
  rows = []
  for path, p in plans.items():
    rows.append({'layer': path, 'shape': f'{p.d_in}x{p.d_out}', 'rank': p.rank,
                 'k': p.residual_rank, 'n_s': p.num_channels, 'nnz': p.nnz, 'params': p.params,
                 'fraction': p.param_fraction, 'flops_per_token': p.flops_per_token})
  dense = sum(p.dense_params for p in plans.values())
  total = sum(p.params for p in plans.values())
  rows.append({'layer': 'total', 'shape': '', 'rank': '', 'k': '', 'n_s': '', 'nnz': '',
               'params': total, 'fraction': total / dense,
               'flops_per_token': sum(p.flops_per_token for p in plans.values())})
  return rows


def format_table(rows: list[dict]) -> str:
  """A fixed-width text table of `cost_table` rows."""
  cols = ['layer', 'shape', 'rank', 'k', 'n_s', 'nnz', 'params', 'fraction', 'flops_per_token']
  cells = [[f'{r[c]:.3f}' if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
  lines = ['  '.join(c.ljust(w) for c, w in zip(cols, widths))]
  lines += ['  '.join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
  return '\n'.join(lines)


def linear_param_count(params: Any, layer_paths: list[str]) -> int:
  """Number of parameters under the given layer paths (the factorized linear maps)."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    if name.startswith('params/'):
      name = name[len('params/'):]
    if any(name.startswith(p + '/') for p in layer_paths):
      total += int(np.prod(leaf.shape))
  return total
