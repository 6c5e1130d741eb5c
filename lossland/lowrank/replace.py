"""Factorize the linear layers of any model, without editing its code.

Linen models swap modules (below); NNX modules and plain functions have their
matrix products factorized in the traced program
(`lossland.lowrank.replace_program`); `replace_dense` picks the way.

In the spirit of penzai's `loraify_linears_in_selection`: the selected layers
of a model are swapped for LOST, low-rank, CoLA or SLTrain layers through
`lossland.taps.swap_layers`, so the new parameters live at the original paths
(`params['Dense_1']['lowrank_a']`):

    fm = lowrank.replace_dense(model, 'lost', select=r'.*mlp/.*', param_fraction=0.5)
    variables = fm.init(jax.random.key(0), x, train=False)
    y = fm.apply(variables, x, train=True, rngs={'dropout': key})
    converted = fm.convert(trained_dense_variables, x, train=False)  # see `convert`
    lowrank.format_table(lowrank.cost_table(fm.plans(x, train=False)))

Layer types. `nn.Dense` is replaced directly. `nn.DenseGeneral` (without
`batch_dims`) is replaced through its matrix view: the contracted input axes,
in `axis` order, flattened to d_in and the features flattened to d_out, as
DenseGeneral's own `kernel_init` sees its kernel; the bias becomes [d_out].
`nn.Einsum` (no single input/output split of its kernel in general) and
`nn.Conv` are refused when a selector names them and kept when `select` is
None. Each replacement inherits the original's `features`, `use_bias`,
`dtype`, `param_dtype`, `kernel_init` and `bias_init`; keyword arguments of
`replace_dense` (the budget and fields of the layer class) override them.

A layer called more than once keeps one set of factors for every call, as
the dense layer kept one kernel. Layers inside `nn.scan` are swapped in every
step, so `nn.scan` stacks their factors as it stacked the kernels, and
`convert` factorizes each step's kernel; `nn.remat` bodies are swapped as
they are. A model that builds its linear maps through a factory field
(TransformerLM's `dense`, see `dense_factory`) can be factorized there too.

`init` and `apply` are jit-safe (the keyword arguments of the model, such as
`train`, static as for `model.apply`); `sites`, `plans` and `convert` run
eagerly. `swapped()` is the same swap as a context manager, for code that
calls `model.apply` itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lossland import taps
from lossland.lowrank import budget
from lossland.lowrank import convert as convert_lib
from lossland.lowrank import layers

SUPPORTED = (nn.Dense, nn.DenseGeneral)
_INHERITED = ('use_bias', 'dtype', 'param_dtype', 'kernel_init', 'bias_init')


def _tuple(v) -> tuple:
  return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _general_axes(module: nn.DenseGeneral, ndim: int, path: str) -> tuple[int, ...]:
  if _tuple(module.batch_dims):
    raise ValueError(f'layer {path!r}: DenseGeneral with batch_dims={module.batch_dims} holds '
                     'one kernel per batch index, not one matrix; leave it out of `select`')
  return tuple(a % ndim for a in _tuple(module.axis))


class _MatrixView(nn.Module):
  """A DenseGeneral's replacement: `layer` (d_out features) on x with the `axis` dims flattened.

  The contracted axes, in `axis` order, move last and flatten to d_in, as
  DenseGeneral contracts them; the output's last axis unflattens to `features`.
  `layer` shares this module's scope, so its params sit at the DenseGeneral's path.
  """
  layer: nn.Module
  axis: tuple[int, ...]
  features: tuple[int, ...]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    axes = tuple(a % x.ndim for a in self.axis)
    rest = tuple(a for a in range(x.ndim) if a not in axes)
    inner = self.layer.clone(parent=self, name='matrix')
    nn.share_scope(self, inner)
    lead = tuple(x.shape[a] for a in rest)
    flat = jnp.transpose(x, rest + axes).reshape(lead + (-1,))  # [..., d_in]
    return inner(flat).reshape(lead + self.features)  # [..., *features]


@dataclasses.dataclass(frozen=True)
class Site:
  """One replaced layer as a [d_in, d_out] matrix: its path, class name and shapes."""
  path: str
  layer_type: str  # 'Dense' or 'DenseGeneral'
  d_in: int
  d_out: int
  kernel_shape: tuple[int, ...]  # the dense layer's kernel shape


def _site(call: taps.Call, x) -> Site:
  module = call.module
  features = _tuple(module.features)
  if isinstance(module, nn.DenseGeneral):
    axes = _general_axes(module, x.ndim, call.path)
    in_shape = tuple(x.shape[a] for a in axes)
  else:
    in_shape = (x.shape[-1],)
  return Site(call.path, type(module).__name__, math.prod(in_shape), math.prod(features),
              in_shape + features)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity, so `apply` can be jitted
class FactorizedModel:
  """`model` with the selected Dense/DenseGeneral layers factorized as `kind` (see the module doc).

  Attributes:
    model: the user's linen module, unchanged.
    kind: 'lowrank', 'cola', 'lost' or 'sltrain'.
    select: None (every Dense and DenseGeneral layer), a regex matching whole
      paths, a list of paths or a callable `path -> bool` (see `lossland.taps`).
    layer_kwargs: fields of the layer class (budget, gamma, seed, ...).
  """
  model: nn.Module
  kind: str
  select: taps.Selector = None
  layer_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def _make_layer(self, call: taps.Call) -> nn.Module | None:
    module = call.module
    if not isinstance(module, SUPPORTED):
      if self.select is None:
        return None
      raise ValueError(f'layer {call.path!r} is an nn.{type(module).__name__}: replace_dense '
                       'factorizes nn.Dense and nn.DenseGeneral kernels only; leave it out of '
                       '`select`')
    fields = {name: getattr(module, name) for name in _INHERITED}
    features = _tuple(module.features)
    layer = layers.LAYERS[self.kind](math.prod(features), **{**fields, **self.layer_kwargs})
    if isinstance(module, nn.DenseGeneral):
      _general_axes(module, 1, call.path)  # refuses batch_dims
      return _MatrixView(layer, _tuple(module.axis), features)
    return layer

  @contextlib.contextmanager
  def swapped(self) -> Iterator[list[str]]:
    """The swap as a context, for code that calls `model.init`/`model.apply` itself.

    Yields the list of swapped paths, filled as the model runs inside the block.
    """
    paths: list[str] = []

    def make(call):
      layer = self._make_layer(call)
      if layer is not None and call.path not in paths:
        paths.append(call.path)
      return layer

    with taps.swap_layers(make, select=self.select, types=taps.LINEAR_TYPES):
      yield paths

  def _check_swapped(self, paths, rngs, args, kwargs) -> None:
    if paths:
      return
    found = taps.find_layers(self.model.init, rngs, *args, **kwargs)
    listed = {p: info.kind for p, info in found.items()}
    raise ValueError(f'replace_dense: select={self.select!r} matches none of the model\'s '
                     f'Dense/DenseGeneral layers; its linear layers are {listed}. Change `select` '
                     '(a regex must match the whole path, e.g. r".*mlp/.*").')

  def init(self, rngs, *args, **kwargs):
    """`model.init(rngs, *args, **kwargs)` with the selected layers factorized."""
    with self.swapped() as paths:
      variables = self.model.init(rngs, *args, **kwargs)
    self._check_swapped(paths, rngs, args, kwargs)
    return variables

  def apply(self, variables, *args, **kwargs):
    """`model.apply(variables, *args, **kwargs)` with the selected layers factorized."""
    with self.swapped() as paths:
      out = self.model.apply(variables, *args, **kwargs)
    self._check_swapped(paths, jax.random.key(0), args,
                        {k: v for k, v in kwargs.items() if k not in ('rngs', 'mutable')})
    return out

  def sites(self, *args, rngs=None, **kwargs) -> dict[str, Site]:
    """The layers this model factorizes (path -> `Site`), in call order. Nothing is computed."""
    rngs = jax.random.key(0) if rngs is None else rngs
    found: dict[str, Site] = {}

    def record(call, next_fun, call_args, call_kwargs):
      if self._make_layer(call) is not None and call.path not in found:
        found[call.path] = _site(call, taps.first_input(call_args, call_kwargs))
      return next_fun(*call_args, **call_kwargs)

    def run():
      with taps.intercept(record, select=self.select, types=taps.LINEAR_TYPES):
        self.model.init(rngs, *args, **kwargs)

    jax.eval_shape(run)
    self._check_swapped(list(found), rngs, args, kwargs)
    return found

  def plans(self, *args, rngs=None, **kwargs) -> dict[str, budget.LayerPlan]:
    """Path -> resolved `LayerPlan` of each factorized layer (for `cost_table`)."""
    return {path: self._plan(site)
            for path, site in self.sites(*args, rngs=rngs, **kwargs).items()}

  def _plan(self, site: Site) -> budget.LayerPlan:
    return plan_for(self.kind, self.layer_kwargs, site)

  def convert(self, dense_variables, *args, rngs=None, **kwargs):
    """The variables of this factorized model from `model`'s (trained) dense variables.

    Every selected layer's kernel (its matrix view) and bias become that
    layer's factors as `lossland.lowrank.convert` defines them (full rank
    reproduces the dense function for lowrank, LOST and SLTrain); every other
    variable is copied. `args`/`kwargs` are example inputs, as for `init`.
    A layer inside `nn.scan` has a stacked kernel [steps, ...]: each step is
    converted on its own and the factors are stacked the same way.

    Raises:
      ValueError: when a selected layer has no kernel in `dense_variables`, or
        its shape differs from the one the example inputs give.
    """
    sites = self.sites(*args, rngs=rngs, **kwargs)
    rngs = jax.random.key(0) if rngs is None else rngs
    target = jax.eval_shape(lambda: self.init(rngs, *args, **kwargs))
    out = flax.core.unfreeze(jax.tree.map(np.asarray, dict(dense_variables)))
    for path, site in sites.items():
      dense = taps.layer_params(dense_variables, path)
      shape = tuple(dense['kernel'].shape) if 'kernel' in dense else None
      steps = shape[:len(shape) - len(site.kernel_shape)] if shape else None
      if shape is None or shape[len(steps):] != site.kernel_shape:
        raise ValueError(f'layer {path!r}: dense_variables hold '
                         f'{ {k: tuple(v.shape) for k, v in dense.items()} } there, expected a '
                         f'kernel of shape {site.kernel_shape} (or stacked over scan steps); '
                         'pass the variables of the unfactorized model')
      kernels = np.asarray(dense['kernel']).reshape((-1, site.d_in, site.d_out))
      converted = [convert_matrix(self.kind, self.layer_kwargs, site, k) for k in kernels]
      params = {k: np.stack([c[0][k] for c in converted]).reshape(steps + v.shape)
                for k, v in converted[0][0].items()}
      constants = None if converted[0][1] is None else {
          k: np.stack([c[1][k] for c in converted]).reshape(steps + v.shape)
          for k, v in converted[0][1].items()}
      if 'bias' in dense:
        params['bias'] = np.asarray(dense['bias']).reshape(steps + (site.d_out,))
      want = _subtree(target['params'], path)
      dtype = next(iter(want.values())).dtype
      if set(params) != set(want):
        raise ValueError(f'layer {path!r}: the conversion gives {sorted(params)} but the '
                         f'{self.kind} layer has {sorted(want)}; use_bias must match the dense '
                         'layer')
      _set(out['params'], path, {k: v.astype(dtype) for k, v in params.items()})
      if constants is not None:
        _set(out.setdefault(layers.CONSTANTS, {}), path, constants)
    got = jax.tree.map(lambda v: (tuple(v.shape), v.dtype), out)
    want = jax.tree.map(lambda v: (tuple(v.shape), v.dtype), flax.core.unfreeze(target))
    if got != want:
      raise ValueError('the converted variables do not match the factorized model\'s '
                       f'(expected {want}, got {got}); pass the dense model\'s variables')
    return jax.tree.map(jnp.asarray, out)


def plan_for(kind: str, layer_kwargs: Mapping[str, Any], site: Site) -> budget.LayerPlan:
  """The resolved budget of a `kind` layer replacing `site`."""
  layer = layers.LAYERS[kind](site.d_out, **layer_kwargs)
  keys = ('rank', 'param_fraction', 'sparsity', 'residual_rank', 'density')
  plan_kwargs = {k: getattr(layer, k) for k in keys if hasattr(layer, k)}
  return budget.plan('lowrank' if kind == 'cola' else kind, site.d_in, site.d_out,
                     layer=site.path, **plan_kwargs)


def convert_matrix(kind: str, layer_kwargs: Mapping[str, Any], site: Site, kernel: np.ndarray):
  """(params, constants or None) of a `kind` layer from a dense matrix [d_in, d_out]."""
  bad = int(np.size(kernel) - np.isfinite(kernel).sum())
  if bad:
    raise ValueError(f'layer {site.path!r}: its dense kernel holds {bad} NaN or inf entries, which '
                     'no factorization can carry; convert a finite checkpoint')
  plan = plan_for(kind, layer_kwargs, site)
  layer = layers.LAYERS[kind](site.d_out, **layer_kwargs)
  if kind == 'lost':
    params, idx = convert_lib.lost_from_dense(
        kernel, plan.rank, plan.num_channels, gamma=layer.gamma,
        residual_rank=layer.residual_rank, layer=site.path)
    constants = {'channel_idx': idx.astype(np.float32)} if plan.num_channels else None
    return params, constants
  if kind == 'sltrain':
    support = layers.sltrain_layer_support(layer.seed, site.path, site.d_in, site.d_out,
                                           plan.nnz)
    return convert_lib.sltrain_from_dense(kernel, plan.rank, support, alpha=layer.alpha,
                                          layer=site.path), None
  return convert_lib.lowrank_from_dense(kernel, plan.rank, layer=site.path), None


def _subtree(tree, path: str):
  for part in path.split('/'):
    tree = tree[part]
  return tree


def _set(tree: dict, path: str, value: dict) -> None:
  *parents, last = path.split('/')
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[last] = value


def replace_dense(model, kind: str, *, select: taps.Selector = None, params=None,
                  **layer_kwargs):
  """`model` with its selected dense layers factorized as `kind`.

  Args:
    model: a linen module (its Dense/DenseGeneral layers are swapped, see the
      module docstring), or any other model form (an NNX module or graphdef,
      a plain `apply_fn(params, *args, **kwargs)`): its matrix products of a
      parameter are factorized (`lossland.lowrank.replace_program`).
    kind: 'lowrank', 'cola', 'lost' or 'sltrain'.
    select: which layers (None: every Dense and DenseGeneral layer, or every
      matrix product; a regex matching whole paths such as r'.*mlp/.*'; a
      list of paths; a callable).
    params: for a model that is not a linen or NNX module, its params (or
      their shapes): the program is traced with them. An NNX graphdef needs
      its state here.
    **layer_kwargs: fields of the layer class, e.g. `param_fraction=0.5,
      sparsity=0.05, gamma=0.5` (LOST) or `rank=8`; see `dense_factory`.

  Returns:
    A `FactorizedModel` (linen) or `FactorizedFunction` with `init`, `apply`,
    `plans`, `sites` and `convert`.

  Raises:
    ValueError: for an unknown kind or a field the layer class does not have;
      `init`/`apply` raise when `select` matches no layer.
  """
  if kind not in layers.LAYERS or kind == 'dense':
    raise ValueError(f'replace_dense: unknown kind {kind!r}; choose one of '
                     f'{sorted(k for k in layers.LAYERS if k != "dense")} (the dense model is '
                     '`model` itself)')
  layers.layer_class(kind, layer_kwargs)  # checks the field names
  if 'features' in layer_kwargs:
    raise ValueError('replace_dense: `features` comes from each replaced layer; remove it')
  if isinstance(model, nn.Module):
    if params is not None:
      raise ValueError('replace_dense: a linen model takes no `params` (fm.init makes them and '
                       'fm.convert(dense_variables, x) converts yours)')
    return FactorizedModel(model, kind, select, dict(layer_kwargs))
  from lossland.lowrank import replace_program  # pylint: disable=g-import-not-at-top
  taps.as_function(model)  # one error for what is not a model
  return replace_program.FactorizedFunction(model, params, kind, select, dict(layer_kwargs))
