"""The K-FAC samples of the selected linear layers of any JAX model.

K-FAC (Martens & Grosse 2015, sec. 3) approximates the Fisher block of a
linear layer `y = a W` by `E[a aᵀ] ⊗ E[g gᵀ]`, with `a` an input row and
`g = ∂L/∂y` the loss gradient at the matching output row. Layers are reached
through `lossland.taps` (no model edits): `taps.capture` records the inputs
of the selected layers and adds zero perturbations to their outputs, so one
`jax.grad` with respect to the perturbations returns `g` for every selected
layer at once. No per-example Kronecker product is ever formed.

Each layer is put in the `rows(x) @ W` form by its `layer_views.MatrixView`:
`nn.Dense` and `nn.DenseGeneral` (contracted axes -> d_in), `nn.Einsum` (the
matrix it contracts) and `nn.Conv` (KFC, Grosse & Martens 2016: receptive
field patches as input rows, every output position a sample). With
`homogeneous=True` each input row gets a trailing 1 and W the bias as its
last row (Martens & Grosse 2015, sec. 3), so the factors cover the bias.

Samples. Every position of a layer's input other than the contracted axes is
a sample (tokens for an LM, output pixels for a Conv). A layer called several
times in one forward pass (shared weights, a loop) contributes the samples of
every call, concatenated in call order (`taps`' policy); its factors average
over all of them.

Sample masks. Each sample is weighted by the loss mask (`loss_fn`'s mask,
broadcast over the layer's sample axes) and, for a linen layer module with a
`sample_mask` attribute (an array of the layer's sample shape, e.g.
`lossland.models.moe.ExpertDense`), by that too: an expert applied at every
token position marks the tokens routed to it, so that its factors average
over those tokens only (the others are zero rows that would otherwise count
in the division). Layers tapped in the traced program have no such mask.

Layer names are the `taps` paths, e.g. 'block_0/mlp/gate' (a linen module,
whose parameters live there under `params['params']`) or 'blocks/mlp/up[3]'
(step 3 of a scanned weight, found in the traced program, whose view holds
the `WeightRef` and `BiasRef` that read and write it in the params pytree).
"""
from __future__ import annotations

from typing import Any, Callable, Collection, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lossland import taps
from lossland.curvature import layer_views
from lossland.taps import linen as linen_taps

Views = dict[str, tuple[layer_views.MatrixView, ...]]
# The attribute of a layer module that weights its samples (see "Sample masks" above).
SAMPLE_MASK = 'sample_mask'


def _homogeneous_of(homogeneous: bool | Collection[str]) -> Callable[[str], bool]:
  if isinstance(homogeneous, bool):
    return lambda path: homogeneous
  chosen = frozenset(homogeneous)
  return lambda path: path in chosen


def _call_view(call: taps.Call, args: tuple, kwargs: dict, homogeneous: bool):
  einsum_str = None
  if isinstance(call.module, nn.Einsum):
    einsum_str = kwargs.get('einsum_str', args[1] if len(args) > 1 else None)
  return layer_views.view_of(call.path, call.module, jnp.shape(taps.first_input(args, kwargs)),
                             einsum_str=einsum_str, homogeneous=homogeneous)


def _trace_layers(apply_fn: Callable, params, inputs, *, select, homogeneous,
                 apply_kwargs: Mapping[str, Any]):
  """Every selected call's MatrixView and output shape, under `jax.eval_shape` (no compute).

  Returns:
    ({path: views per call}, {path: output ShapeDtypeStructs per call}, whether the layers
    are tapped at linen module calls (else in the traced program)).
  """
  is_homogeneous = _homogeneous_of(homogeneous)
  program = taps.program_for(apply_fn, params, (inputs,), apply_kwargs)
  if program is not None:
    chosen = program.chosen(select)
    return ({n: tuple(layer_views.view_of_product(n, program, c, is_homogeneous(n)) for c in cs)
             for n, cs in chosen.items()},
            {n: tuple(jax.ShapeDtypeStruct(c.site.y_shape, c.site.y_dtype) for c in cs)
             for n, cs in chosen.items()}, False)
  views: dict[str, list] = {}
  outputs: dict[str, list] = {}

  def handler(call, next_fun, args, kwargs):
    views.setdefault(call.path, []).append(_call_view(call, args, kwargs,
                                                      is_homogeneous(call.path)))
    out = next_fun(*args, **kwargs)
    outputs.setdefault(call.path, []).append(jax.ShapeDtypeStruct(jnp.shape(out), out.dtype))
    return out

  def run(p, x):
    with taps.intercept(handler, select=select):
      apply_fn(p, x, **apply_kwargs)

  jax.eval_shape(run, params, inputs)
  for path, calls in views.items():
    first = calls[0]
    for view in calls[1:]:
      if (view.kind, view.d_in, view.d_out, view.kernel_perm) != \
          (first.kind, first.d_in, first.d_out, first.kernel_perm):
        raise ValueError(f'layer {path!r} is called as different matrices ({first.d_in}x'
                         f'{first.d_out} and {view.d_in}x{view.d_out}); select other layers')
  return ({p: tuple(v) for p, v in views.items()}, {p: tuple(o) for p, o in outputs.items()},
          True)


def find_layers(apply_fn: Callable, params, inputs, *, select: taps.Selector = None,
                homogeneous: bool | Collection[str] = False,
                apply_kwargs: Mapping[str, Any] | None = None) -> Views:
  """The selected linear layers that `apply_fn(params, inputs, **apply_kwargs)` calls.

  Runs under `jax.eval_shape`: nothing is computed.

  Args:
    apply_fn: `(params, inputs, **apply_kwargs) -> outputs`, e.g. `model.apply`.
    params: the model's variables.
    inputs: one batch of model inputs (only shapes matter).
    select: a regex over layer paths (must match the whole path), a list of
      paths, a callable `path -> bool`, or None for every Dense, DenseGeneral,
      Einsum and Conv layer.
    homogeneous: add the bias row (True), or a collection of the paths that get it.
    apply_kwargs: keyword arguments of `apply_fn`, e.g. `{'train': False}`.

  Returns:
    {path: one MatrixView per call, in call order}, layers in first-call order.

  Raises:
    ValueError: listing every linear layer of the model when `select` matches
      none, or naming a selected layer K-FAC cannot treat as one matrix.
  """
  apply_kwargs = dict(apply_kwargs or {})
  apply_fn, params = taps.as_function(apply_fn, params)
  paths = list(taps.find_layers(apply_fn, params, inputs, select=select, **apply_kwargs))
  views, _, _ = _trace_layers(apply_fn, params, inputs, select=paths, homogeneous=homogeneous,
                              apply_kwargs=apply_kwargs)
  return {path: views[path] for path in paths}


@flax.struct.dataclass
class Samples:
  """A layer's K-FAC samples from one batch, every call's rows concatenated in call order.

  A pytree (the arrays are leaves, the view of the first call is static).
  """
  a: jax.Array  # [N, rows_in] input rows (trailing 1 when homogeneous)
  g: jax.Array  # [N, d_out] output gradients
  mask: jax.Array  # [N] weight of each sample (the loss mask, broadcast, x the layer's own)
  view: layer_views.MatrixView = flax.struct.field(pytree_node=False)


def _sample_mask(mask: jax.Array, sample_shape: tuple[int, ...], path: str) -> jax.Array:
  """Broadcasts the loss mask (e.g. [batch(, seq)]) over a layer's sample axes."""
  if tuple(mask.shape) == tuple(sample_shape):
    return mask
  if tuple(sample_shape[:mask.ndim]) == tuple(mask.shape):
    return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (len(sample_shape) - mask.ndim)),
                            sample_shape)
  raise ValueError(f'layer {path!r} has samples of shape {tuple(sample_shape)} but the loss mask '
                   f'has shape {tuple(mask.shape)}; factors need layers whose sample axes start '
                   'with the mask\'s (select other layers or give a matching batch["mask"])')


def _layer_mark(mark: jax.Array, sample_shape: tuple[int, ...], path: str) -> jax.Array:
  """A layer's own `sample_mask` as float32 weights; it must have the layer's sample shape."""
  if tuple(jnp.shape(mark)) != tuple(sample_shape):
    raise ValueError(f'layer {path!r} has {SAMPLE_MASK} of shape {tuple(jnp.shape(mark))} but '
                     f'samples of shape {tuple(sample_shape)}; the model must mark each sample '
                     '(input row) of the layer')
  return jnp.asarray(mark).astype(jnp.float32)


def layer_samples(apply_fn: Callable, params, inputs, loss_fn: Callable, *,
                  layers: Sequence[str], homogeneous: bool | Collection[str] = False,
                  apply_kwargs: Mapping[str, Any] | None = None) -> dict[str, Samples]:
  """Input rows `a`, output gradients `g` and sample masks of the selected layers.

  One forward and one backward pass (gradients with respect to zero
  perturbations of the layer outputs only, no weight gradients). jit-safe;
  `apply_fn`, `loss_fn`, `layers`, `homogeneous` and `apply_kwargs` are static.

  Args:
    apply_fn, params, inputs, apply_kwargs: the model call, as in `find_layers`.
    loss_fn: `outputs -> (scalar loss, mask)`; `mask` weights the loss terms and
      is broadcast over each layer's sample axes (its shape must prefix them),
      times a layer's own `sample_mask` where it has one.
    layers: the paths of the layers (each must be called at least once).
    homogeneous: add the bias row (True), or a collection of the paths that get it.

  Returns:
    {path: Samples} in float32.
  """
  names = list(layers)
  apply_kwargs = dict(apply_kwargs or {})
  apply_fn, params = taps.as_function(apply_fn, params)  # every entry point below comes here
  views, shapes, module_taps = _trace_layers(apply_fn, params, inputs, select=names,
                                             homogeneous=homogeneous, apply_kwargs=apply_kwargs)
  missing = [n for n in names if n not in shapes]
  if missing:
    raise ValueError(f'layers {missing} were not called by the model; check the layer names')
  zeros = {n: tuple(jnp.zeros(s.shape, jnp.float32) for s in calls) for n, calls in shapes.items()}

  def loss_of(perturbations):
    marks: dict[str, dict[int, jax.Array]] = {}

    def note_marks(call, next_fun, args, kwargs):
      mark = getattr(call.module, SAMPLE_MASK, None)
      if mark is not None:
        marks.setdefault(call.path, {})[call.index] = mark
      return next_fun(*args, **kwargs)

    if module_taps:  # linen taps directly (taps.capture would trace the model once more first)
      with taps.intercept(note_marks, select=names):
        outputs, captured = linen_taps.capture(apply_fn, params, inputs, select=names,
                                               perturbations=perturbations, **apply_kwargs)
    else:
      outputs, captured = taps.capture(apply_fn, params, inputs, select=names,
                                       perturbations=perturbations, **apply_kwargs)
    loss, mask = loss_fn(outputs)
    return loss, (captured.inputs, mask, marks)

  grads, (inputs_by_call, mask, marks) = jax.grad(loss_of, has_aux=True)(zeros)
  out = {}
  for name in names:
    a, g, m = [], [], []
    for i, (view, x, dy) in enumerate(zip(views[name], inputs_by_call[name], grads[name])):
      a.append(layer_views.input_rows(view, x).astype(jnp.float32))
      g.append(layer_views.output_rows(view, dy).astype(jnp.float32))
      weight = _sample_mask(mask, view.sample_shape, name).astype(jnp.float32)
      mark = marks.get(name, {}).get(i)
      if mark is not None:
        weight = weight * _layer_mark(mark, view.sample_shape, name)
      m.append(weight.reshape(-1))
    out[name] = Samples(taps.join_calls(a), taps.join_calls(g), taps.join_calls(m),
                        view=views[name][0])
  return out


def layer_params_of(params, view: layer_views.MatrixView) -> dict[str, jax.Array]:
  """{'kernel', 'bias'} of a layer: its module's params, or the weight (and bias row) it reads."""
  if view.kernel_ref is None:
    return dict(taps.layer_params(params, view.path))
  layer = {'kernel': view.kernel_ref.get(params)}
  if view.bias_ref is not None:
    layer['bias'] = view.bias_ref.get(params)
  return layer


def layer_matrix(params, view: layer_views.MatrixView) -> jax.Array:
  """The layer's W [rows_in, d_out] (bias as the last row when homogeneous)."""
  return layer_views.kernel_matrix(view, layer_params_of(taps.params_tree(params), view))


def replace_matrices(params, matrices: Mapping[str, jax.Array],
                     views: Mapping[str, layer_views.MatrixView]):
  """A copy of `params` with each named layer's kernel (and bias row) taken from its W.

  Pure; jit-safe. `views[path]` says how W maps back to the layer's params.
  `params` may be a linen variables dict, any pytree (an `nnx.State`), or an
  NNX module (a new module comes back).
  """
  tree = taps.params_tree(params)
  new_layers, new_leaves = {}, {}
  leaves, treedef = jax.tree.flatten(tree)
  for path, w in matrices.items():
    view = views[path]
    expected = (view.rows_in, view.d_out)
    if tuple(w.shape) != expected:
      raise ValueError(f'the new matrix of layer {path!r} has shape {tuple(w.shape)}, expected '
                       f'{expected}')
    layer = layer_views.params_from_matrix(view, w, layer_params_of(tree, view))
    if view.kernel_ref is None:
      new_layers[path] = layer
      continue
    for ref, value in ((view.kernel_ref, layer['kernel']), (view.bias_ref, layer.get('bias'))):
      if ref is not None and value is not None:
        position = ref.position(tree)
        current = new_leaves.get(position, leaves[position])
        new_leaves[position] = ref.set_leaf(current, value)
  if new_leaves:
    tree = jax.tree.unflatten(treedef, [new_leaves.get(i, v) for i, v in enumerate(leaves)])
  if new_layers:
    tree = _replace_module_params(tree, new_layers)
  return taps.like_input(params, tree)


def _replace_module_params(params, new_layers: Mapping[str, Mapping[str, jax.Array]]):
  wrapped = isinstance(params, Mapping) and 'params' in params

  def rebuild(node, prefix):
    if not isinstance(node, Mapping):
      return node
    out = {}
    for key, value in node.items():
      path = f'{prefix}/{key}' if prefix else str(key)
      out[key] = dict(new_layers[path]) if path in new_layers else rebuild(value, path)
    return out

  if wrapped:
    return {**params, 'params': rebuild(params['params'], '')}
  return rebuild(params, '')
