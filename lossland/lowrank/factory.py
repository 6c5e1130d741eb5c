"""Parameterize a model by config: `dense` factories, the linear-layer census, cost tables.

    model = TransformerLM(vocab_size=256, dense=lowrank.dense_factory('lost', param_fraction=0.5))

`linear_layers(model, tokens)` lists every linear map a model builds through its
`dense` field (not its embedding or head), or, for any other linen model, its
selected Dense/DenseGeneral layers, so budgets and parameter counts are
computed per layer and checked against the formulas of `lossland.lowrank.budget`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from lossland import taps
from lossland.parallel import rules as rules_lib
from lossland.lowrank import budget
from lossland.lowrank import layers
from lossland.lowrank import replace


def dense_factory(kind: str, **kwargs) -> Callable[..., nn.Module]:
  """A `dense(features, use_bias=..., dtype=..., name=..., kernel_init=...)` factory.

  Args:
    kind: 'dense', 'lowrank', 'cola', 'lost' or 'sltrain'.
    **kwargs: fields of the layer class (e.g. `param_fraction=0.5, sparsity=0.05,
      gamma=0.5, activation='silu', factor_init='xavier', seed=0`).

  Raises:
    ValueError: for an unknown kind or a field the layer does not have.
  """
  if kind == 'dense':
    kwargs = {k: v for k, v in kwargs.items() if k not in ('seed', 'param_fraction')}
  cls = layers.layer_class(kind, kwargs)
  return functools.partial(cls, **kwargs) if kwargs else cls


class LinearLayer(NamedTuple):
  path: str  # 'block_0/attn/query'
  d_in: int
  d_out: int


class _Tagged(nn.Dense):
  """An `nn.Dense` whose calls `linear_layers` records (the model's own head stays untagged)."""


def linear_layers(model: nn.Module, *example_inputs: Any, select: taps.Selector = None,
                  **apply_kwargs) -> list[LinearLayer]:
  """The linear maps `replace_dense` / `dense_factory` would factorize, in call order.

  A model with a `dense` factory field (lossland's TransformerLM) and no
  `select` lists the maps built through that field (not its embedding or
  head). Any other model, or any `select`, lists the selected nn.Dense and
  nn.DenseGeneral layers (the latter as their [d_in, d_out] matrix view; see
  `lossland.lowrank.replace`). Uses `jax.eval_shape`: no FLOPs, no memory.

  Args:
    model: a linen module.
    *example_inputs, **apply_kwargs: what `model.init(rng, ...)` takes (e.g. `train=False`).
    select: None, a regex matching whole paths, a list of paths or a callable.

  Raises:
    ValueError: when the selection matches no Dense/DenseGeneral layer.
  """
  if select is not None or not hasattr(model, 'dense'):
    sites = replace.FactorizedModel(model, 'lowrank', select).sites(*example_inputs,
                                                                    **apply_kwargs)
    return [LinearLayer(s.path, s.d_in, s.d_out) for s in sites.values()]
  found: list[LinearLayer] = []

  def record(call, next_fun, args, kwargs):
    if isinstance(call.module, _Tagged) and call.path not in (f.path for f in found):
      found.append(LinearLayer(call.path, int(args[0].shape[-1]), int(call.module.features)))
    return next_fun(*args, **kwargs)

  tagged = model.clone(dense=_Tagged)
  with taps.intercept(record, types=(_Tagged,)):
    jax.eval_shape(lambda: tagged.init(jax.random.key(0), *example_inputs, **apply_kwargs))
  return found


def layer_plans(model: nn.Module, *example_inputs: Any, kind: str, select: taps.Selector = None,
                apply_kwargs: Mapping[str, Any] | None = None,
                **kwargs) -> dict[str, budget.LayerPlan]:
  """Resolved `LayerPlan` of every linear map of `model` under `kind` (path -> plan).

  `kwargs` are the budget arguments of `budget.plan` (rank, param_fraction,
  sparsity, residual_rank, density); other layer fields are ignored here.
  `select` and `apply_kwargs` are those of `linear_layers`.
  """
  keys = ('rank', 'param_fraction', 'sparsity', 'residual_rank', 'density')
  plan_kwargs = {k: v for k, v in kwargs.items() if k in keys}
  if kind == 'cola':
    kind = 'lowrank'
  found = linear_layers(model, *example_inputs, select=select, **(apply_kwargs or {}))
  return {l.path: budget.plan(kind, l.d_in, l.d_out, layer=l.path, **plan_kwargs)
          for l in found}


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
    name = rules_lib.path_name(path)
    if name.startswith('params/'):
      name = name[len('params/'):]
    if any(name.startswith(p + '/') for p in layer_paths):
      total += int(np.prod(leaf.shape))
  return total
