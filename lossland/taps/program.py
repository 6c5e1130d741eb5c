"""Layers of any JAX function, found and tapped in its traced program.

For a model that is not linen (an NNX module, Equinox, Haiku, a hand-written
`apply_fn(params, x)`) and for linen layers inside `nn.scan`/`nn.remat`,
there is no module call to intercept. Here a *layer* is what kfac-jax calls
a dense or conv layer: a `dot_general` or `conv_general_dilated` in the
traced program (the jaxpr) whose weight operand is a parameter leaf, reached
from the leaf only through layout operations (dtype casts, reshapes,
transposes, a leading index). Its input is the other operand; its output is
the product, or the product plus a bias when the product's only use is an
`add` of another parameter leaf broadcast along the output features (flax's
`Dense`, `Conv`, NNX's `Linear`, Equinox's `Linear`), so a layer's output is
the same array a linen tap records.

Names. A layer is named by its weight leaf's path, '/'-joined: a leading
'params' collection (linen variables), a trailing 'kernel' and NNX's
'.value' are dropped (and Equinox's or PyTorch-style 'weight'), so linen's
'block_0/mlp/up', NNX's 'blocks/0/mlp/up', Equinox's 'layers/0' and a plain
dict's 'w1' name the layers that own those weights. Stacked
weights read one slice at a time get the slice in brackets: a `lax.scan`
(`nn.scan`, `nnx.scan`) over a [L, d_in, d_out] leaf gives L layers
'blocks/mlp/up[0]' ... '[L-1]', one per step; `w[3]` in the program gives
'w[3]'. A weight read whole inside a scan (a shared layer) is one layer with
one call per step.

Calls. Every product that reads the same weight (slice) is a call of the
layer, in program order (the rules of `lossland.taps`: one sample per call).
A weight read by two products of different form, or by a product with
batch dimensions on the weight (a batched einsum), is not one matrix: such a
layer carries an error that names its parameter path, raised when it is
selected.

Everything is derived from the jaxpr's shapes (`Program`); `evaluate` then
runs the program with the chosen layers' outputs recorded, perturbed or
replaced. Scan bodies return their records as stacked outputs and take
their perturbations as scanned inputs; remat bodies keep their policy;
`jit` and custom-derivative calls that contain a layer are inlined (their
custom derivative rule is replaced by the derivative of their primal).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

# Operations that only move, cast or re-index values of a weight.
_LAYOUT = frozenset({'convert_element_type', 'reshape', 'transpose', 'copy', 'copy_p', 'squeeze',
                     'expand_dims'})
_CALLS = frozenset({'pjit', 'jit', 'closed_call', 'core_call', 'custom_jvp_call',
                    'custom_vjp_call', 'custom_vjp_call_jaxpr'})
_REMAT = frozenset({'remat', 'remat2', 'checkpoint'})


def _hashable(params: Mapping[str, Any]) -> tuple:
  return tuple(sorted((k, v) for k, v in params.items()))


@dataclasses.dataclass(frozen=True)
class Op:
  """One step from a parameter leaf to the array a product reads.

  kind: 'layout' (a primitive in `_LAYOUT`), 'broadcast' (bias only),
  'scan' (the slice a scan at nesting `level` gives its body) or 'index'
  (a static leading index `index`, from `slice` + `squeeze`).
  """
  kind: str
  primitive: Any = None
  params: tuple = ()
  in_shape: tuple[int, ...] = ()
  level: int = -1
  index: int = -1

  def apply(self, value, scan_index: Sequence[int]):
    if self.kind == 'scan':
      return value[scan_index[self.level]]
    if self.kind == 'index':
      return value[self.index]
    return self.primitive.bind(value, **dict(self.params))

  def invert(self, before, after, scan_index: Sequence[int]):
    """The value before this op once `after` replaces its result (casts drop out)."""
    if self.kind == 'scan':
      return before.at[scan_index[self.level]].set(after.astype(before.dtype))
    if self.kind == 'index':
      return before.at[self.index].set(after.astype(before.dtype))
    if self.primitive.name == 'transpose':
      perm = dict(self.params)['permutation']
      return jnp.transpose(after, np.argsort(perm))
    return jnp.reshape(after, self.in_shape).astype(before.dtype)


@dataclasses.dataclass(frozen=True)
class Origin:
  """A parameter leaf and the ops that turn it into an operand."""
  leaf: int  # position in the flattened params
  ops: tuple[Op, ...] = ()

  def then(self, op: Op) -> 'Origin':
    return Origin(self.leaf, self.ops + (op,))


def leaf_position(params, key: str) -> int:
  """The position among `params`' leaves of the leaf whose `jax.tree_util.keystr` is `key`."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if key not in paths:
    raise ValueError(f'the params have no leaf {key}; pass params of the model (and structure) '
                     f'the layers were found in (its leaves start {paths[:5]})')
  return paths.index(key)


@dataclasses.dataclass(frozen=True)
class WeightRef:
  """How to read and write one layer's weight operand in a params pytree.

  Pure data (hashable, safe to close over in jit). The leaf is found by its
  key path, so params with more collections than the traced ones work too.
  Casts are skipped, so the weight comes back in the leaf's own dtype.
  """
  key: str  # `jax.tree_util.keystr` of the leaf's path
  name: str  # the layer name of the leaf
  ops: tuple[Op, ...]
  scan_index: tuple[int, ...]

  def position(self, params) -> int:
    return leaf_position(params, self.key)

  def _chain(self, value):
    values = [value]
    for op in self.ops:
      if op.kind == 'layout' and op.primitive.name == 'convert_element_type':
        values.append(values[-1])
      else:
        values.append(op.apply(values[-1], self.scan_index))
    return values

  def get(self, params) -> jax.Array:
    return self._chain(jax.tree.leaves(params)[self.position(params)])[-1]

  def set_leaf(self, leaf_value, operand) -> jax.Array:
    values = self._chain(leaf_value)
    new = operand
    for op, before in zip(reversed(self.ops), reversed(values[:-1])):
      if op.kind == 'layout' and op.primitive.name == 'convert_element_type':
        continue
      new = op.invert(before, new, self.scan_index)
    return new.astype(leaf_value.dtype)


@dataclasses.dataclass(frozen=True)
class BiasRef:
  """A layer's bias: `leaf.ravel()[positions]` is its row over the output features."""
  key: str  # `jax.tree_util.keystr` of the leaf's path
  name: str
  positions: tuple[int, ...]

  def position(self, params) -> int:
    return leaf_position(params, self.key)

  def get(self, params) -> jax.Array:
    leaf = jax.tree.leaves(params)[self.position(params)]
    return jnp.ravel(leaf)[np.asarray(self.positions)]

  def set_leaf(self, leaf_value, row) -> jax.Array:
    flat = jnp.ravel(leaf_value).at[np.asarray(self.positions)].set(row.astype(leaf_value.dtype))
    return flat.reshape(leaf_value.shape)


@dataclasses.dataclass(frozen=True)
class Site:
  """One product in the program that reads a parameter (maybe inside scans).

  `levels` lists the enclosing scans, outermost first: (length, whether the
  weight is sliced by that scan). Records and perturbations of a site carry
  one leading axis per level.
  """
  key: tuple[int, ...]  # equation indices from the top-level jaxpr down
  kind: str  # 'dot' or 'conv'
  weight: Origin
  weight_operand: int  # 0 or 1: which operand of the product is the weight
  params: tuple  # the product's parameters (dimension numbers, padding, ...)
  x_shape: tuple[int, ...]
  w_shape: tuple[int, ...]
  y_shape: tuple[int, ...]
  y_dtype: Any
  levels: tuple[tuple[int, bool], ...]
  bias: Origin | None = None
  x_source: bool = False  # the input is read before a dtype cast (as the layer received it)
  lifted: bool = False  # inside a scan or remat body (where linen's module taps cannot reach)
  scan_at: tuple[int, ...] = ()  # per level, the position in `key` of its scan equation
  # The layer's output is the product transposed by y_perm (then its bias added); y_shape is
  # that output's shape.
  y_perm: tuple[int, ...] | None = None

  def time(self, steps: Sequence[int]) -> tuple[int, ...]:
    """When the call at `steps` runs: equation indices with each scan's step after its scan."""
    out = []
    for i, e in enumerate(self.key):
      out.append(e)
      if i in self.scan_at:
        out.append(steps[self.scan_at.index(i)])
    return tuple(out)

  def problem(self) -> str | None:
    """Why the product is not one matrix, or None."""
    p = dict(self.params)
    if self.kind == 'dot':
      (_, _), (lb, rb) = p['dimension_numbers']
      if lb or rb:
        return 'a product with batch dimensions on the weight (a batched einsum)'
      return None
    if p['feature_group_count'] != 1 or p['batch_group_count'] != 1:
      return 'a grouped convolution'
    return None


def _sub_jaxpr(eqn) -> tuple[jcore.Jaxpr, list] | None:
  """The body of a call-like equation as (jaxpr, consts)."""
  for name in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    body = eqn.params.get(name)
    if body is None:
      continue
    if isinstance(body, jcore.ClosedJaxpr):
      return body.jaxpr, list(body.consts)
    if isinstance(body, jcore.Jaxpr):
      return body, []
  return None


def _is_var(v) -> bool:
  return not isinstance(v, jcore.Literal)


class _Context:
  """What every walk of one program shares: leaf shapes and the sites (found, or to use)."""

  def __init__(self, leaf_shapes: Sequence[tuple[int, ...]], analyzing: bool, sites=None):
    self.leaf_shapes = list(leaf_shapes)
    self.analyzing = analyzing
    self.sites: dict[tuple[int, ...], Site] = {} if sites is None else sites


class _Frame:
  """Perturbations to add, outputs to replace and records to keep, for one (scan/remat) body.

  `replacements` (site key -> fn(x, y, extra) -> new y) replace a layer's
  output (with its bias); `products` (same form) replace the product alone,
  before its bias is added. Both may use `extras[key]`, a pytree stacked over
  the site's scan steps like its perturbation, which each scan body receives
  sliced to its step.
  """

  def __init__(self, perturbations, record_keys, replacements, extras, products=None):
    self.perturbations = perturbations
    self.record_keys = record_keys
    self.replacements = replacements
    self.extras = extras
    self.products = products or {}
    self.records: dict = {}

  def product(self, site: Site, x, y):
    if site.key in self.products:
      return self.products[site.key](x, y, self.extras.get(site.key))
    return y

  def tap(self, site: Site, x, y):
    if site.key in self.replacements:
      y = self.replacements[site.key](x, y, self.extras.get(site.key))
    p = self.perturbations.get(site.key)
    if p is not None:
      y = y + p.astype(y.dtype)
    if site.key in self.record_keys:
      self.records[site.key] = (x, y)
    return y

  def inside(self, key) -> tuple[dict, dict]:
    """The perturbations and extras of the sites nested under equation `key`."""
    def under(d):
      return {k: v for k, v in d.items() if len(k) > len(key) and k[:len(key)] == key}
    return under(self.perturbations), under(self.extras)

  def inner(self, perturbations, extras) -> '_Frame':
    return _Frame(perturbations, self.record_keys, self.replacements, extras, self.products)


def _bias_candidate(jaxpr, eqn, uses) -> tuple[Any, tuple[int, ...] | None] | None:
  """The var a bias may be added to after product `eqn`, and the transpose on the way.

  The product's output itself when its only use is one equation; through one
  `transpose` (as `jax.vmap` of `W @ x` leaves it) when that is its only use.
  """
  var = eqn.outvars[0]
  users = uses.get(var, [])
  if len(users) != 1 or users[0] < 0:
    return None
  user = jaxpr.eqns[users[0]]
  if user.primitive.name == 'transpose':
    out = user.outvars[0]
    then = uses.get(out, [])
    if len(then) == 1 and then[0] >= 0 and jaxpr.eqns[then[0]].primitive.name == 'add':
      return out, tuple(int(a) for a in user.params['permutation'])
  return var, None


def _is_weight(origin: Origin | None) -> bool:
  return origin is not None and all(op.kind != 'broadcast' for op in origin.ops)


class _Walk:
  """One pass over a jaxpr: which values come from parameters, the sites, optionally values."""

  def __init__(self, ctx: _Context, frame: _Frame | None, lifted: bool = False):
    self.ctx = ctx
    self.frame = frame  # None while analyzing
    self.lifted = lifted

  def run(self, jaxpr: jcore.Jaxpr, consts, args, origins, key, levels):
    ctx, frame = self.ctx, self.frame
    env: dict = {}
    org: dict = {}
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = c
    for v, a, o in zip(jaxpr.invars, args, origins):
      env[v] = a
      if o is not None:
        org[v] = o
    uses: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
      for v in eqn.invars:
        if _is_var(v):
          uses.setdefault(v, []).append(i)
    for v in jaxpr.outvars:
      if _is_var(v):
        uses.setdefault(v, []).append(-1)
    cast_source: dict = {}  # var -> the var it was cast from
    pending: dict = {}  # a product's output var waiting for its bias add -> (site, x)

    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env.get(v)

    for i, eqn in enumerate(jaxpr.eqns):
      name = eqn.primitive.name
      here = key + (i,)
      in_org = [org.get(v) if _is_var(v) else None for v in eqn.invars]
      ins = None if ctx.analyzing else [read(v) for v in eqn.invars]
      outs = None
      if name in ('dot_general', 'conv_general_dilated') and \
          _is_weight(in_org[0]) + _is_weight(in_org[1]) == 1:
        w = 0 if _is_weight(in_org[0]) else 1
        x_var = eqn.invars[1 - w]
        if ctx.analyzing:
          site = dataclasses.replace(
              self._site(eqn, here, in_org[w], w, levels, _is_var(x_var) and x_var in cast_source),
              lifted=self.lifted)
          ctx.sites[here] = site
          candidate = _bias_candidate(jaxpr, eqn, uses)
          if candidate is not None and not site.problem():
            pending[candidate[0]] = (site, candidate[1])  # a bias add may follow
        else:
          site = ctx.sites[here]
          x = read(cast_source[x_var]) if site.x_source else ins[1 - w]
          y = frame.product(site, ins[1 - w], self._bind(eqn, ins))
          if site.bias is not None:
            pending[_bias_candidate(jaxpr, eqn, uses)[0]] = (site, x)
            outs = [y]
          else:
            outs = [frame.tap(site, x, y)]
      elif name == 'add' and pending and any(_is_var(v) and v in pending for v in eqn.invars):
        v = next(v for v in eqn.invars if _is_var(v) and v in pending)
        site, x = pending.pop(v)
        if ctx.analyzing:  # x is the permutation of a transpose between product and add
          tapped = dataclasses.replace(site, y_perm=x, y_shape=tuple(v.aval.shape))
          bias = self._bias(eqn, v, org, tapped)
          if bias is not None:
            ctx.sites[site.key] = dataclasses.replace(tapped, bias=bias)
        else:
          outs = [frame.tap(site, x, self._bind(eqn, ins))]
      elif (name == 'scan' or name in _CALLS or name in _REMAT) and _sub_jaxpr(eqn) is not None:
        if ctx.analyzing:
          self._nested(eqn, None, in_org, here, levels)
        elif self._has_sites(here):
          outs = self._nested(eqn, ins, in_org, here, levels)
      if outs is None and not ctx.analyzing:
        outs = self._bind(eqn, ins)
        outs = outs if eqn.primitive.multiple_results else [outs]
      if outs is not None:
        for v, val in zip(eqn.outvars, outs):
          env[v] = val
      self._propagate(eqn, in_org, org, cast_source)
    return None if ctx.analyzing else [read(v) for v in jaxpr.outvars]

  # -- provenance ---------------------------------------------------------

  @staticmethod
  def _propagate(eqn, in_org, org, cast_source):
    name = eqn.primitive.name
    if not eqn.invars or len(eqn.outvars) != 1:
      return
    if name == 'convert_element_type' and _is_var(eqn.invars[0]) and in_org[0] is None:
      cast_source[eqn.outvars[0]] = cast_source.get(eqn.invars[0], eqn.invars[0])
    if in_org[0] is None:
      return
    aval = eqn.invars[0].aval
    op = None
    if name in _LAYOUT:
      op = Op('layout', eqn.primitive, _hashable(eqn.params), tuple(aval.shape))
    elif name == 'broadcast_in_dim':
      op = Op('broadcast', eqn.primitive, _hashable(eqn.params), tuple(aval.shape))
    elif name == 'slice':
      start, limit = eqn.params['start_indices'], eqn.params['limit_indices']
      strides = eqn.params.get('strides')
      if (not strides or all(s == 1 for s in strides)) and limit[0] - start[0] == 1 and \
          tuple(start[1:]) == (0,) * (len(start) - 1) and \
          tuple(limit[1:]) == tuple(aval.shape[1:]):
        op = Op('index', index=int(start[0]))
    if op is not None:
      origin = in_org[0].then(op)
      if op.kind == 'index':  # [i] drops the axis; the squeeze that follows expects [1, ...]
        origin = origin.then(_unsqueeze(eqn.outvars[0].aval))
      org[eqn.outvars[0]] = origin

  @staticmethod
  def _site(eqn, key, weight, w, levels, x_cast) -> Site:
    x_aval, w_aval = eqn.invars[1 - w].aval, eqn.invars[w].aval
    y_aval = eqn.outvars[0].aval
    sliced = {op.level for op in weight.ops if op.kind == 'scan'}
    lv = tuple((length, level in sliced) for level, (length, _) in enumerate(levels))
    return Site(key, 'dot' if eqn.primitive.name == 'dot_general' else 'conv', weight, w,
                _hashable(eqn.params), tuple(x_aval.shape), tuple(w_aval.shape),
                tuple(y_aval.shape), y_aval.dtype, lv, None, x_cast,
                scan_at=tuple(position for _, position in levels))

  def _bias(self, add, out, org, site) -> Origin | None:
    """The bias that `add` adds to the product's output `out` (its only use), or None."""
    if tuple(add.outvars[0].aval.shape) != site.y_shape:
      return None
    other = [v for v in add.invars if not (_is_var(v) and v is out)]
    if len(other) != 1 or not _is_var(other[0]) or other[0] not in org:
      return None
    bias = org[other[0]]
    steps = tuple(0 for _ in site.levels)
    if bias_positions(bias, self.ctx.leaf_shapes[bias.leaf], site, steps) is None:
      return None
    return bias

  # -- nested programs ----------------------------------------------------

  def _has_sites(self, key) -> bool:
    return any(len(k) > len(key) and k[:len(key)] == key for k in self.ctx.sites)

  def _nested(self, eqn, ins, in_org, key, levels):
    jaxpr, consts = _sub_jaxpr(eqn)
    name = eqn.primitive.name
    if name == 'scan':
      p = eqn.params
      n_consts, n_carry = p['num_consts'], p['num_carry']
      origins = list(in_org[:n_consts]) + [None] * n_carry + [
          None if o is None else o.then(Op('scan', level=len(levels)))
          for o in in_org[n_consts + n_carry:]]
      inner_levels = levels + ((int(p['length']), len(key) - 1),)
    else:
      origins, inner_levels = list(in_org), levels
    if self.ctx.analyzing:
      if any(o is not None for o in origins):
        lifted = self.lifted or name == 'scan' or name in _REMAT
        _Walk(self.ctx, None, lifted).run(jaxpr, consts, [None] * len(jaxpr.invars), origins,
                                          key, inner_levels)
      return None
    frame = self.frame
    if name not in _REMAT and name != 'scan':
      return _Walk(self.ctx, frame).run(jaxpr, consts, ins, origins, key, inner_levels)
    perts, extras = frame.inside(key)
    if name == 'scan':
      def body(carry, xs):
        xs_vals, pert, extra = xs
        inner = frame.inner(pert, extra)
        outs = _Walk(self.ctx, inner).run(
            jaxpr, consts, list(ins[:n_consts]) + list(carry) + list(xs_vals), origins, key,
            inner_levels)
        return outs[:n_carry], (outs[n_carry:], inner.records)

      carry, (ys, records) = jax.lax.scan(
          body, list(ins[n_consts:n_consts + n_carry]),
          (list(ins[n_consts + n_carry:]), perts, extras),
          length=p['length'], reverse=p['reverse'], unroll=p['unroll'])
      frame.records.update(records)
      return list(carry) + list(ys)

    def remat_body(args, pert, extra):
      inner = frame.inner(pert, extra)
      outs = _Walk(self.ctx, inner).run(jaxpr, consts, args, origins, key, inner_levels)
      return outs, inner.records

    remat_body = jax.checkpoint(remat_body, prevent_cse=eqn.params.get('prevent_cse', True),
                                policy=eqn.params.get('policy'))
    outs, records = remat_body(list(ins), perts, extras)
    frame.records.update(records)
    return outs

  @staticmethod
  def _bind(eqn, ins):
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # jax versions that return (subfuns, params)
      subfuns, params = params
      return eqn.primitive.bind(*subfuns, *ins, **params)
    return eqn.primitive.bind(*ins, **params)


def _unsqueeze(aval) -> Op:
  """Reshapes `w[i]` back to the [1, ...] that `slice` gave (the following `squeeze` undoes it)."""
  return Op('layout', jax.lax.reshape_p, (('dimensions', None), ('new_sizes', tuple(aval.shape)),
                                          ('sharding', None)),
            tuple(aval.shape[1:]))


# -- the matrix a product computes ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProductAxes:
  """The axes of a product's input, weight and output as `rows(x) @ W`.

  x axes: `x_samples` then `x_contract`; weight axes: `w_contract` (paired
  with `x_contract`) then `w_out`; output axes: `y_samples` then `y_out`.
  For a conv the spatial layout is in `conv_specs` instead.
  """
  x_samples: tuple[int, ...]
  x_contract: tuple[int, ...]
  w_contract: tuple[int, ...]
  w_out: tuple[int, ...]
  y_samples: tuple[int, ...]
  y_out: tuple[int, ...]


def product_axes(site: Site, *, tapped: bool = True) -> ProductAxes:
  """The site's axes; the output's in the tapped layout (after `y_perm`) unless `tapped=False`."""
  axes = _product_axes(site)
  if not tapped or site.y_perm is None:
    return axes
  where = np.argsort(site.y_perm)  # old output axis -> its position after the transpose
  return dataclasses.replace(axes, y_samples=tuple(int(where[a]) for a in axes.y_samples),
                             y_out=tuple(int(where[a]) for a in axes.y_out))


def _product_axes(site: Site) -> ProductAxes:
  p = dict(site.params)
  if site.kind == 'conv':
    lhs, rhs, out = p['dimension_numbers']
    return ProductAxes((lhs[0],) + tuple(lhs[2:]), (lhs[1],), tuple(rhs[2:]) + (rhs[1],),
                       (rhs[0],), (out[0],) + tuple(out[2:]), (out[1],))
  (lc, rc), _ = p['dimension_numbers']
  x_c, w_c = (rc, lc) if site.weight_operand == 0 else (lc, rc)
  x_free = tuple(i for i in range(len(site.x_shape)) if i not in x_c)
  w_free = tuple(i for i in range(len(site.w_shape)) if i not in w_c)
  if site.weight_operand == 1:  # output: x free axes, then weight free axes
    y_samples = tuple(range(len(x_free)))
    y_out = tuple(range(len(x_free), len(x_free) + len(w_free)))
  else:
    y_out = tuple(range(len(w_free)))
    y_samples = tuple(range(len(w_free), len(w_free) + len(x_free)))
  return ProductAxes(x_free, tuple(x_c), tuple(w_c), w_free, y_samples, y_out)


def bias_positions(bias: Origin, leaf_shape, site: Site, steps) -> tuple[int, ...] | None:
  """Flat positions in the bias leaf of the bias row over the output features, or None.

  Found by pushing the leaf's flat indices through the ops that broadcast it
  onto the output: a bias is a leaf that adds the same row to every sample.
  """
  with jax.ensure_compile_time_eval():
    probe = jnp.arange(int(np.prod(leaf_shape)), dtype=jnp.int32).reshape(leaf_shape)
    for op in bias.ops:
      if op.kind == 'layout' and op.primitive.name == 'convert_element_type':
        continue
      probe = op.apply(probe, steps)
    try:
      probe = np.asarray(jnp.broadcast_to(probe, site.y_shape))
    except ValueError:
      return None
  axes = product_axes(site)
  rows = np.transpose(probe, axes.y_samples + axes.y_out).reshape(
      -1, int(np.prod([site.y_shape[a] for a in axes.y_out])))
  if not (rows == rows[:1]).all() or len(set(rows[0].tolist())) != rows.shape[1]:
    return None
  return tuple(int(i) for i in rows[0])


# -- the program ---------------------------------------------------------------------------


def leaf_name(path) -> str:
  """A weight leaf's layer name: '/'-joined keys without 'params' first and without a last
  'kernel' or 'weight' (flax, Equinox, PyTorch-style) or NNX's '.value'."""
  parts = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == 'value':
    parts = parts[:-1]
  if len(parts) > 1 and parts[0] == 'params' and isinstance(path[0], jax.tree_util.DictKey):
    parts = parts[1:]
  if len(parts) > 1 and parts[-1] in ('kernel', 'weight'):
    parts = parts[:-1]
  return '/'.join(parts)


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of a layer: its site and the step of every enclosing scan."""
  name: str
  index: int  # call number within the layer
  site: Site
  steps: tuple[int, ...]

  @property
  def path(self) -> str:
    return self.name


class Program:
  """The traced program of `fn(params, *args, **kwargs)` and the layers in it.

  `kwargs` are static (closed over); `params` and `args` only give shapes.
  """

  def __init__(self, fn: Callable, params, args: tuple, kwargs: Mapping[str, Any]):
    self.fn = fn
    self.kwargs = dict(kwargs)
    leaves_with_paths, self.params_def = jax.tree_util.tree_flatten_with_path(params)
    self.leaf_paths = [p for p, _ in leaves_with_paths]
    self.leaf_names = [leaf_name(p) for p in self.leaf_paths]
    leaves = [v for _, v in leaves_with_paths]
    arg_leaves, self.args_def = jax.tree.flatten(tuple(args))
    self.n_params = len(leaves)
    self.closed, self.out_shape = jax.make_jaxpr(self._flat, return_shape=True)(
        [_abstract(v) for v in leaves], [_abstract(v) for v in arg_leaves])
    self.ctx = _Context([tuple(np.shape(v)) for v in leaves], analyzing=True)
    origins = [Origin(i) for i in range(self.n_params)] + [None] * len(arg_leaves)
    _Walk(self.ctx, None).run(self.closed.jaxpr, self.closed.consts,
                              [None] * len(origins), origins, (), ())
    self.ctx.analyzing = False
    self.calls = self._calls()

  def _flat(self, param_leaves, arg_leaves):
    params = jax.tree.unflatten(self.params_def, param_leaves)
    args = jax.tree.unflatten(self.args_def, arg_leaves)
    return self.fn(params, *args, **self.kwargs)

  def _calls(self) -> dict[str, list[LayerCall]]:
    """Every layer's calls; layers in the order of their first call, calls in run order."""
    timed = []
    for site in self.ctx.sites.values():
      for steps in itertools.product(*(range(n) for n, _ in site.levels)):
        name = self.leaf_names[site.weight.leaf]
        for op in site.weight.ops:
          if op.kind == 'scan':
            name += f'[{steps[op.level]}]'
          elif op.kind == 'index':
            name += f'[{op.index}]'
        timed.append((site.time(steps), name, site, steps))
    calls: dict[str, list[LayerCall]] = {}
    for _, name, site, steps in sorted(timed, key=lambda t: t[0]):
      found = calls.setdefault(name, [])
      found.append(LayerCall(name, len(found), site, steps))
    return calls

  def chosen(self, select) -> dict[str, list[LayerCall]]:
    """The calls of the layers `select` picks (a `taps` selector), in program order.

    Raises a ValueError listing every layer when it picks none, or naming the
    parameter of a picked layer that is not one matrix.
    """
    from lossland.taps.linen import make_selector
    pick = make_selector(select)
    out = {name: calls for name, calls in self.calls.items() if pick(name)}
    if not out:
      raise ValueError(f'the selection {select!r} matches none of the model\'s layers (matrix '
                       f'products and convolutions of a parameter): {list(self.calls)}. Change '
                       'the selection (a regex must match the whole name).')
    for name in out:
      problem = self.problem(name)
      if problem:
        raise ValueError(problem)
    return out

  def problem(self, name: str) -> str | None:
    """Why the layer `name` is not one matrix, naming its parameter path; or None."""
    calls = self.calls[name]
    path = self.leaf_names[calls[0].site.weight.leaf]
    for call in calls:
      why = call.site.problem()
      if why:
        return (f'layer {name!r} (parameter {path!r}) is {why}, not one matrix; select other '
                'layers')
    forms = {(c.site.kind, c.site.params, c.site.weight_operand, c.site.w_shape,
              _ops_key(c.site.weight.ops), c.site.bias is None) for c in calls}
    if len(forms) > 1:
      return (f'layer {name!r} (parameter {path!r}) is used in {len(forms)} different products '
              '(e.g. both as W and as Wᵀ), not one matrix; select other layers')
    return None

  def calls_of_leaf(self, leaf: int) -> list[LayerCall]:
    """The first call of every layer whose weight is the parameter leaf `leaf`, in order."""
    return [calls[0] for calls in self.calls.values() if calls[0].site.weight.leaf == leaf]

  def weight_ref(self, call: LayerCall) -> WeightRef:
    w = call.site.weight
    return WeightRef(jax.tree_util.keystr(self.leaf_paths[w.leaf]), self.leaf_names[w.leaf],
                     w.ops, call.steps)

  def bias_ref(self, call: LayerCall) -> BiasRef | None:
    b = call.site.bias
    if b is None:
      return None
    positions = bias_positions(b, self.ctx.leaf_shapes[b.leaf], call.site, call.steps)
    return BiasRef(jax.tree_util.keystr(self.leaf_paths[b.leaf]), self.leaf_names[b.leaf],
                   positions)

  def evaluate(self, params, args: tuple, *, record: Sequence[tuple] = (),
               perturbations: Mapping[tuple, jax.Array] | None = None,
               replacements: Mapping[tuple, Callable] | None = None,
               products: Mapping[tuple, Callable] | None = None,
               extras: Mapping[tuple, Any] | None = None):
    """Runs the program: (outputs, {site key: (x, y) stacked over the site's scan steps}).

    `perturbations` (site key -> array of the stacked output's shape) are
    added to the outputs of those sites; `replacements` (site key ->
    fn(x, y, extra)) replace them, `products` (the same form) replace the
    product before its bias is added, with `extras[key]` (a pytree stacked
    over the site's scan steps) sliced to the step. jit-safe.
    """
    leaves = jax.tree.leaves(params)
    if len(leaves) != self.n_params:
      raise ValueError(f'params have {len(leaves)} leaves but the model was traced with '
                       f'{self.n_params}; pass params of the same structure')
    arg_leaves = jax.tree.leaves(tuple(args))
    frame = _Frame(dict(perturbations or {}), frozenset(record), dict(replacements or {}),
                   dict(extras or {}), dict(products or {}))
    outs = _Walk(self.ctx, frame).run(self.closed.jaxpr, self.closed.consts,
                                      list(leaves) + list(arg_leaves),
                                      [Origin(i) for i in range(self.n_params)] +
                                      [None] * len(arg_leaves), (), ())
    return jax.tree.unflatten(jax.tree.structure(self.out_shape), outs), frame.records


def _ops_key(ops: tuple[Op, ...]) -> tuple:
  """The ops that change how a weight's values are arranged (not casts, slices or unit axes)."""
  key = []
  for op in ops:
    name = getattr(op.primitive, 'name', None)
    if name == 'transpose':
      key.append(('transpose', dict(op.params)['permutation']))
    elif name == 'reshape':
      before = tuple(d for d in op.in_shape if d != 1)
      after = tuple(d for d in dict(op.params)['new_sizes'] if d != 1)
      if before != after:
        key.append(('reshape', before, after))
  return tuple(key)


def _abstract(value):
  if isinstance(value, jax.ShapeDtypeStruct):
    return value
  return jax.ShapeDtypeStruct(np.shape(value), jnp.result_type(value))


def call_record(records, call: LayerCall):
  """One call's (x, y) from the stacked records of its site."""
  x, y = records[call.site.key]
  return x[call.steps] if call.steps else x, y[call.steps] if call.steps else y
