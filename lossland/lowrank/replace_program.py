"""Factorize the matrix products of any JAX model: NNX modules, plain functions, scanned layers.

The counterpart of `lossland.lowrank.replace` for models without linen
modules to swap. The selected layers are found in the traced program
(`lossland.taps.program`: a matrix product whose weight is a parameter
leaf), and each product `x W` is computed instead by the chosen factorized
layer (LOST, low-rank, CoLA, SLTrain) on the matrix view of W: the
contracted input axes flattened to d_in, the weight's other axes to d_out.
Biases added to the product stay as they are (the factorized layers run
without one).

Variables. The factorized model's variables are a nested dict of the
model's params (NNX's `.value` dropped) in which every selected weight leaf
is replaced by its factors, e.g. `{'params': {'mlp': {'up': {'kernel':
{'lowrank_a', 'lowrank_b'}, 'bias': ...}}}, 'constants': {...}}`; LOST's
kept channels go to `constants` at the same path. Params that are already
linen-style variables (`{'params': ...}`) keep that layout. A weight stacked over
scan steps ([L, d_in, d_out] read by `lax.scan`/`nnx.scan`) gets factors
stacked the same way, one factorization per step; select every step of it
or none. SLTrain's fixed support is chosen per weight leaf (shared by the
steps of a scanned weight).

    fm = lowrank.replace_dense(nnx_model, 'lost', select=r'.*mlp/.*', param_fraction=0.5)
    variables = fm.init(jax.random.key(0), x)   # fresh factors
    variables = fm.convert(x)                    # or from the module's own (trained) weights
    y = fm.apply(variables, x)

`apply` is jit-safe (keyword arguments static); `init`, `convert`, `sites`
and `plans` run eagerly.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lossland import taps
from lossland.lowrank import layers
from lossland.lowrank import replace as replace_lib
from lossland.taps import program as program_lib


def _key(k) -> Any:
  return getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))


def _dict_path(path) -> tuple:
  """A leaf's key path as plain keys, without NNX's trailing '.value'."""
  keys = tuple(_key(k) for k in path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and keys[-1] == 'value':
    keys = keys[:-1]
  return keys


def _get(tree, keys: tuple):
  for k in keys:
    tree = tree[k]
  return tree


def _put(tree: dict, keys: tuple, value) -> None:
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


@dataclasses.dataclass(frozen=True)
class Target:
  """A selected weight leaf: its matrix form and the products that read it."""
  leaf: int
  name: str  # the layer name of its weight leaf
  site: replace_lib.Site  # d_in, d_out, the (per-step) operand shape
  steps: int | None  # scan steps the weight is stacked over, or None
  keys: tuple[tuple[int, ...], ...]  # the program sites that read it
  axes: program_lib.ProductAxes


def _targets(program: program_lib.Program, select) -> dict[int, Target]:
  chosen = program.chosen(select)
  by_leaf: dict[int, list] = {}
  for name, calls in chosen.items():
    for call in calls:
      by_leaf.setdefault(call.site.weight.leaf, []).append(call)
  out = {}
  for leaf, calls in by_leaf.items():
    name = program.leaf_names[leaf]
    site = calls[0].site
    if site.kind != 'dot':
      raise ValueError(f'layer {calls[0].name!r} is a convolution: replace_dense factorizes '
                       'matrix products only; leave it out of `select`')
    scans = [op for op in site.weight.ops if op.kind == 'scan']
    steps = None
    if scans:
      lead = site.weight.ops[:site.weight.ops.index(scans[0])]
      if len(scans) > 1 or len(site.levels) != 1 or any(
          op.kind != 'layout' or op.primitive.name != 'convert_element_type' for op in lead):
        raise ValueError(f'layer {calls[0].name!r}: replace_dense factorizes weights scanned '
                         'over their leading axis by one scan; leave it out of `select`')
      steps = site.levels[0][0]
      named = {c.name for c in program.calls_of_leaf(leaf)}
      missing = sorted(named - {c.name for c in calls})
      if missing:
        raise ValueError(f'select picks some steps of the scanned weight {name!r} but not '
                         f'{missing}; select every step of it or none')
    elif any(op.kind == 'index' for op in site.weight.ops):
      raise ValueError(f'layer {calls[0].name!r} reads one slice of {name!r}; replace_dense '
                       'factorizes whole weights (or scanned ones); leave it out of `select`')
    axes = program_lib.product_axes(site, tapped=False)  # the products are replaced
    d_in = math.prod(site.w_shape[a] for a in axes.w_contract)
    d_out = math.prod(site.w_shape[a] for a in axes.w_out)
    out[leaf] = Target(leaf, name, replace_lib.Site(name, 'dot', d_in, d_out, site.w_shape),
                       steps, tuple(sorted({c.site.key for c in calls})), axes)
  return out


def _factorized_product(x, y, variables, *, layer, axes: program_lib.ProductAxes, d_in: int):
  """`x W` computed by `layer` on the matrix view: rows of x in, the product's layout out."""
  samples = tuple(x.shape[a] for a in axes.x_samples)
  rows = jnp.transpose(x, axes.x_samples + axes.x_contract).reshape(-1, d_in)
  out = layer.apply(variables, rows)  # [samples, d_out]
  out = out.reshape(samples + tuple(y.shape[a] for a in axes.y_out))
  return jnp.transpose(out, np.argsort(axes.y_samples + axes.y_out)).astype(y.dtype)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity, so `apply` can be jitted
class FactorizedFunction:
  """A model that is not linen, with its selected matrix products factorized as `kind`.

  Attributes:
    model: the user's NNX module (or graphdef), or plain `apply_fn(params, *args, **kwargs)`.
    params: the dense params (or their shapes) the model is traced with.
    kind, select, layer_kwargs: as for `replace_dense`.
  """
  model: Any
  params: Any
  kind: str
  select: taps.Selector = None
  layer_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @functools.cached_property
  def _fn_and_shapes(self):
    fn, params = taps.as_function(self.model, self.params)
    if params is None:
      raise ValueError('replace_dense of a plain function needs its params (or their shapes) '
                       'to find the layers: replace_dense(fn, kind, params=params, ...)')
    return fn, jax.eval_shape(lambda: params)

  def _program(self, args, kwargs) -> program_lib.Program:
    fn, shapes = self._fn_and_shapes
    return program_lib.Program(fn, shapes, tuple(args), kwargs)

  def _layer(self, target: Target):
    return layers.LAYERS[self.kind](target.site.d_out, use_bias=False, name=target.name,
                                    **self.layer_kwargs)

  def sites(self, *args, **kwargs) -> dict[str, replace_lib.Site]:
    """The weights this model factorizes (name -> `Site`), in program order."""
    return {t.name: t.site for t in _targets(self._program(args, kwargs), self.select).values()}

  def plans(self, *args, **kwargs):
    """Name -> resolved `LayerPlan` of each factorized weight (for `cost_table`)."""
    return {name: replace_lib.plan_for(self.kind, self.layer_kwargs, site)
            for name, site in self.sites(*args, **kwargs).items()}

  @property
  def _collections(self) -> bool:
    """Whether the params are linen-style variables ({'params': ..., ...}): kept as they are."""
    _, shapes = self._fn_and_shapes
    return isinstance(shapes, Mapping) and 'params' in shapes

  def _path_in_variables(self, path) -> tuple:
    keys = _dict_path(path)
    return keys if self._collections else ('params',) + keys

  def _variables(self, factors: Mapping[int, Mapping[str, Any]], source) -> dict:
    """`source`'s leaves as a nested dict with factors at the targets, constants aside.

    Linen-style variables keep their collections; any other tree goes under 'params'.
    """
    _, shapes = self._fn_and_shapes
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    leaves = jax.tree.leaves(source)
    out: dict = {}
    for i, path in enumerate(paths):
      keys = self._path_in_variables(path)
      if i in factors:
        _put(out, keys, factors[i]['params'])
        if layers.CONSTANTS in factors[i]:
          _put(out, (layers.CONSTANTS,) + keys[1:], factors[i][layers.CONSTANTS])
      else:
        _put(out, keys, leaves[i])
    return out

  def init(self, rng: jax.Array, *args, **kwargs) -> dict:
    """Variables with fresh factors (each layer's own init) and the model's other params."""
    program = self._program(args, kwargs)
    factors = {}
    for i, (leaf, target) in enumerate(_targets(program, self.select).items()):
      layer = self._layer(target)
      x = jnp.zeros((1, target.site.d_in), jnp.float32)
      key = jax.random.fold_in(rng, i)
      if target.steps is None:
        factors[leaf] = layer.init(key, x)
      else:
        factors[leaf] = jax.vmap(lambda k: layer.init(k, x))(jax.random.split(key, target.steps))
    return self._variables(factors, taps.as_function(self.model, self.params)[1])

  def convert(self, *args, dense_params=None, **kwargs) -> dict:
    """Variables whose factors come from the dense weights (`lossland.lowrank.convert`).

    `dense_params` defaults to the params the model was given (an NNX
    module's own state). Full rank reproduces the dense function for
    lowrank, LOST and SLTrain.
    """
    source = taps.as_function(self.model, self.params if dense_params is None
                              else dense_params)[1]
    program = self._program(args, kwargs)
    factors = {}
    for leaf, target in _targets(program, self.select).items():
      calls = program.calls_of_leaf(leaf)
      refs = [program.weight_ref(c) for c in calls] if target.steps else \
          [program.weight_ref(calls[0])]
      converted = []
      for ref in refs:
        operand = np.asarray(ref.get(source), np.float64)
        kernel = np.transpose(operand, target.axes.w_contract + target.axes.w_out).reshape(
            target.site.d_in, target.site.d_out)
        converted.append(replace_lib.convert_matrix(self.kind, self.layer_kwargs, target.site,
                                                    kernel))
      stack = (lambda vs: np.stack(vs)) if target.steps else (lambda vs: vs[0])
      variables = {'params': {k: jnp.asarray(stack([c[0][k] for c in converted]), jnp.float32)
                              for k in converted[0][0]}}
      if converted[0][1] is not None:
        variables[layers.CONSTANTS] = {k: jnp.asarray(stack([c[1][k] for c in converted]))
                                       for k in converted[0][1]}
      factors[leaf] = variables
    return self._variables(factors, source)

  def apply(self, variables, *args, **kwargs):
    """The model on `variables` (from `init` or `convert`) with the factorized products."""
    program = self._program(args, kwargs)
    targets = _targets(program, self.select)
    _, shapes = self._fn_and_shapes
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = []
    for i, (path, shape) in enumerate(flat):
      if i in targets:  # never read: the products that read it are replaced
        leaves.append(jnp.zeros(shape.shape, shape.dtype))
      else:
        leaves.append(_get(variables, self._path_in_variables(path)))
    dense = jax.tree.unflatten(treedef, leaves)
    products, extras = {}, {}
    for leaf, target in targets.items():
      keys = self._path_in_variables(flat[leaf][0])
      layer_vars = {'params': _get(variables, keys)}
      if layers.CONSTANTS in variables:
        try:
          layer_vars[layers.CONSTANTS] = _get(variables, (layers.CONSTANTS,) + keys[1:])
        except (KeyError, TypeError):
          pass
      product = functools.partial(_factorized_product, layer=self._layer(target),
                                  axes=target.axes, d_in=target.site.d_in)
      for key in target.keys:
        products[key] = product
        levels = program.ctx.sites[key].levels
        if target.steps is None and levels:  # a whole weight read in every step of a scan
          lead = tuple(n for n, _ in levels)
          extras[key] = jax.tree.map(lambda v, lead=lead: jnp.broadcast_to(v, lead + v.shape),
                                     layer_vars)
        else:
          extras[key] = layer_vars
    out, _ = program.evaluate(dense, args, products=products, extras=extras)
    return out
