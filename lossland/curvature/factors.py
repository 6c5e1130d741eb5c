"""Streaming K-FAC factors A = E[a aᵀ] and G = E[g gᵀ] of selected linear layers.

Merullo et al. (2025), sec. 3.1, eq. 3: the Fisher block of a linear layer is
approximated by the Kronecker product of the uncentered second moments of its
input rows `a` and of the loss gradients `g` at its outputs (Martens & Grosse
2015, eq. 1), averaged over samples. What a sample is, per layer type, is in
`lossland.curvature.capture` (token positions; Conv output positions, KFC;
every call of a shared layer). `g` is the gradient of the summed negative
log-likelihood of the whole example, i.e. the per-example gradient (padding
positions are excluded by `batch['mask']`).

The likelihood (`lossland.curvature.likelihoods`) makes the Fisher fit the
model: 'categorical' (default) for classifiers and LMs, 'gaussian' for
regression, or a callable. Fisher type `true` samples targets from the
model's own predictive distribution (the paper's choice, the default);
`empirical` uses the dataset targets.

Accumulation is a jitted sum of outer products over the (data-sharded) batch:
XLA turns the contractions over the sharded batch dimension into one combined
(tuple) all-reduce inside the compiled step, so the per-device sums of all
layers meet in one collective and nothing goes back to the host per batch.
On multi-device CPU the host loop waits for each step (`parallel.settle`), so
the all-reduces of consecutive batches are never in flight together.

On a mesh of several devices `estimate_factors` keeps one partial sum per
device (`make_factor_accumulator(per_device=True)`) and adds them up once
after the last batch, so no collective runs per batch.

Compile once per shape. `estimate_factors` reuses, across calls, the layers it
found and the jitted accumulator, cached by the model function, the layer
selection and settings, and the shapes of params and inputs (the rule of
`jax.jit` itself: a function is traced once per argument shapes), so a second
call on batches of known shapes pays no tracing or compilation.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Collection, Hashable, Iterable, Mapping, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lossland import taps
from lossland.curvature import capture as capture_lib
from lossland.curvature import layer_views
from lossland.curvature import likelihoods
from lossland.parallel import dispatch
from lossland.parallel import mesh as mesh_lib

FISHER_TYPES = likelihoods.FISHER_TYPES
HIGHEST = jax.lax.Precision.HIGHEST


class FactorSums(NamedTuple):
  """Running sums of one layer: Σ m a aᵀ [rows_in, rows_in], Σ m g gᵀ [d_out, d_out], Σ m."""
  A: jax.Array
  G: jax.Array
  count: jax.Array


@flax.struct.dataclass
class LayerFactors:
  """K-FAC factors of one layer, averaged over its `count` samples.

  `A` is over the input rows (with the homogeneous 1 last when
  `view.homogeneous` and the layer has a bias), `G` over the outputs; `view`
  maps the layer's kernel to the matrix W [rows_in, d_out] they describe.
  A pytree (A, G, count are leaves; the view is static).
  """
  A: jax.Array  # [rows_in, rows_in]
  G: jax.Array  # [d_out, d_out]
  count: float
  view: layer_views.MatrixView = flax.struct.field(pytree_node=False)


def batch_loss(batch, rng: jax.Array, *, likelihood: likelihoods.Likelihood = 'categorical',
               fisher_type: str = 'true') -> Callable:
  """`outputs -> (Σ mask·NLL, mask)` of one batch (see `likelihoods`). jit-safe."""
  return likelihoods.loss_fn(likelihood, fisher_type, batch, rng)


def check_batch(batch) -> None:
  if not isinstance(batch, Mapping) or 'inputs' not in batch:
    keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise ValueError(f"each batch must be a dict with 'inputs' (and 'targets'/'labels', "
                     f"'mask' where used); got {keys}")
  rows = [np.shape(x)[0] for x in jax.tree.leaves(batch['inputs']) if np.ndim(x)]
  if rows and min(rows) == 0:
    raise ValueError("a batch has 0 rows in 'inputs'; give batches with at least one example "
                     '(drop empty batches before estimating factors)')


@jax.jit
def _finite_leaves(params):
  return jax.tree.map(lambda x: jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact)
                      else jnp.bool_(True), params)


def check_params_finite(params) -> None:
  """Raises a ValueError naming the parameters that hold NaN or inf (one reduction each)."""
  finite = jax.device_get(_finite_leaves(params))
  bad = [jax.tree_util.keystr(p) for p, ok in jax.tree_util.tree_flatten_with_path(finite)[0]
         if not ok]
  if bad:
    raise ValueError(f'the params hold NaN or inf in {len(bad)} leaves, e.g. {bad[:3]}; K-FAC '
                     'factors of such a model mean nothing. Load a finite checkpoint (did '
                     'training diverge?)')


def check_labels(batch, num_classes: int, index: int) -> None:
  """Empirical categorical Fisher: every unmasked label must be a class of the model's logits."""
  labels = next((batch[k] for k in ('targets', 'labels') if k in batch), None)
  if labels is None or not jnp.issubdtype(np.asarray(labels).dtype, np.integer):
    return  # the likelihood names what is missing or wrong
  labels = np.asarray(labels)
  mask = np.asarray(batch['mask']) > 0 if 'mask' in batch else np.ones(labels.shape, bool)
  used = labels[np.broadcast_to(mask, labels.shape)]
  if used.size and (used.min() < 0 or used.max() >= num_classes):
    raise ValueError(f'batch {index} has labels from {used.min()} to {used.max()} but the model '
                     f'has {num_classes} classes (its last output axis); labels must be in '
                     f'[0, {num_classes}) where batch["mask"] is set')


def layer_samples(apply_fn: Callable, params, batch, rng: jax.Array, *, layers: Sequence[str],
                  fisher_type: str = 'true', likelihood: likelihoods.Likelihood = 'categorical',
                  homogeneous: bool | Collection[str] = False,
                  apply_kwargs: Mapping[str, Any] | None = None):
  """{path: capture.Samples} of one batch: a, g and sample masks in float32. jit-safe.

  `apply_fn(params, batch['inputs'], **apply_kwargs)` is the model; all
  arguments but `params`, `batch` and `rng` are static.
  """
  check_batch(batch)
  return capture_lib.layer_samples(
      apply_fn, params, batch['inputs'],
      batch_loss(batch, rng, likelihood=likelihood, fisher_type=fisher_type),
      layers=layers, homogeneous=homogeneous, apply_kwargs=apply_kwargs)


def factor_sums(apply_fn: Callable, params, batch, rng: jax.Array, *, layers: Sequence[str],
                fisher_type: str = 'true', likelihood: likelihoods.Likelihood = 'categorical',
                homogeneous: bool | Collection[str] = False,
                apply_kwargs: Mapping[str, Any] | None = None,
                dtype=jnp.float32, parts: int = 1) -> dict[str, FactorSums]:
  """Σ m a aᵀ, Σ m g gᵀ and Σ m of one batch per layer. jit-safe (see `layer_samples`).

  `parts` > 1 splits each layer's samples into that many equal consecutive
  parts and returns the sums of each part stacked on a leading axis (for a
  batch sharded on `parts` devices, each device's own rows: see
  `make_factor_accumulator(per_device=True)`); their sum is the sums of the batch.
  """
  samples = layer_samples(apply_fn, params, batch, rng, layers=layers, fisher_type=fisher_type,
                          likelihood=likelihood, homogeneous=homogeneous,
                          apply_kwargs=apply_kwargs)
  out = {}
  for name, s in samples.items():
    a, g, m = s.a.astype(dtype), s.g.astype(dtype), s.mask.astype(dtype)
    if parts > 1:
      a, g = (x.reshape(parts, -1, x.shape[-1]) for x in (a, g))
      m = m.reshape(parts, -1)
    out[name] = FactorSums(weighted_gram(a, m), weighted_gram(g, m), m.sum(-1))
  return out


def weighted_gram(x: jax.Array, m: jax.Array, *, min_block: int = 256,
                  max_blocks: int = 4) -> jax.Array:
  """Σ_n m_n x_n x_nᵀ = (m·x)ᵀ x [..., d, d] for x [..., N, d], m [..., N]. jit-safe.

  The result is symmetric, so for d of at least 2·`min_block` only its block
  upper triangle is computed: with the columns cut into k blocks (k at most
  `max_blocks`), row block i is (m·x_i)ᵀ x[:, i:] and the blocks below the
  diagonal are transposes of those above. That is (k+1)/2k of the products'
  work (5/8 for k = 4; XLA has no symmetric rank-k update); each entry is the
  same sum over N as in the full product.
  """
  lhs = x * m[..., None]
  d = x.shape[-1]
  k = min(max_blocks, d // min_block)
  t = lambda y: jnp.swapaxes(y, -1, -2)
  if k < 2:
    return jnp.matmul(t(lhs), x, precision=HIGHEST)
  edges = [round(i * d / k) for i in range(k + 1)]
  upper = [jnp.matmul(t(lhs[..., lo:hi]), x[..., lo:], precision=HIGHEST)  # [hi - lo, d - lo]
           for lo, hi in zip(edges, edges[1:])]
  rows = []
  for i in range(k):
    below = [t(upper[j][..., edges[i] - edges[j]:edges[i + 1] - edges[j]]) for j in range(i)]
    rows.append(jnp.concatenate(below + [upper[i]], axis=-1))
  return jnp.concatenate(rows, axis=-2)


def zero_sums(views: Mapping[str, Sequence[layer_views.MatrixView]],
              dtype=jnp.float32, parts: int = 1) -> dict[str, FactorSums]:
  """Zero `FactorSums` for the layers of `capture.find_layers` (`parts` > 1: stacked, per part)."""
  lead = (parts,) if parts > 1 else ()
  out = {}
  for name, calls in views.items():
    view = calls[0]
    out[name] = FactorSums(jnp.zeros(lead + (view.rows_in, view.rows_in), dtype),
                           jnp.zeros(lead + (view.d_out, view.d_out), dtype),
                           jnp.zeros(lead, dtype))
  return out


def make_factor_accumulator(apply_fn: Callable, layers: Sequence[str], *, mesh: Mesh,
                            fisher_type: str = 'true',
                            likelihood: likelihoods.Likelihood = 'categorical',
                            homogeneous: bool | Collection[str] = False,
                            apply_kwargs: Mapping[str, Any] | None = None,
                            dtype=jnp.float32, per_device: bool = False) -> Callable:
  """Returns `accumulate(sums, params, batch, rng) -> sums`, jitted once per shape.

  `sums` (from `zero_sums`) is donated and comes back replicated on `mesh`;
  `batch` should be sharded on `data` (`lossland.parallel.shard_batch`).
  `apply_kwargs` are closed over (arrays in it are constants of the step).

  `per_device=True` keeps one partial sum per device of the `data` axis
  instead (sums from `zero_sums(views, parts=mesh.shape['data'])`, sharded on
  `data`): each device adds the products of its own rows, so no collective
  runs per batch; `combine_parts` adds them up once at the end. The model's
  forward and backward pass (and the sampled targets) are the same.
  """
  likelihoods.check(likelihood, fisher_type)
  names = tuple(layers)
  kwargs = dict(apply_kwargs or {})
  parts = mesh.shape[mesh_lib.DATA_AXIS] if per_device else 1

  def accumulate(sums, params, batch, rng):
    new = factor_sums(apply_fn, params, batch, rng, layers=names, fisher_type=fisher_type,
                      likelihood=likelihood, homogeneous=homogeneous, apply_kwargs=kwargs,
                      dtype=dtype, parts=parts)
    return jax.tree.map(jnp.add, sums, new)

  out = (NamedSharding(mesh, P(mesh_lib.DATA_AXIS)) if parts > 1
         else mesh_lib.replicated(mesh))
  return jax.jit(accumulate, donate_argnums=0, out_shardings=out)


def combine_parts(sums: Mapping[str, FactorSums], mesh: Mesh) -> dict[str, FactorSums]:
  """The per-device sums of `make_factor_accumulator(per_device=True)` added up, replicated."""
  return _combine(dict(sums), mesh_lib.replicated(mesh))


@functools.partial(jax.jit, static_argnums=1)
def _combine(sums, sharding):
  return jax.lax.with_sharding_constraint(jax.tree.map(lambda x: x.sum(0), sums), sharding)


class _Unhashable(Exception):
  pass


def _frozen(value) -> Hashable:
  """`value` as a hashable cache key (lists as tuples, dicts as sorted item tuples).

  Raises _Unhashable for anything else that cannot be hashed (e.g. an array).
  """
  if isinstance(value, Mapping):
    return ('mapping',) + tuple(sorted(((str(k), _frozen(v)) for k, v in value.items()),
                                       key=lambda kv: kv[0]))
  if isinstance(value, (list, tuple)):
    return (type(value).__name__,) + tuple(_frozen(v) for v in value)
  try:
    hash(value)
  except TypeError as e:
    raise _Unhashable from e
  return value


def _layers_and_accumulator(apply_fn: Callable, params, inputs, *, select, mesh: Mesh,
                            fisher_type: str, likelihood, homogeneous: bool,
                            apply_kwargs: Mapping[str, Any] | None, dtype):
  """`capture.find_layers` and `make_factor_accumulator`, cached across calls when possible.

  The key is every static input: the model function, the selection and
  settings, and the shapes and dtypes of `params` and `inputs` (never their
  values). Arguments that cannot be hashed (e.g. arrays in `apply_kwargs`)
  bypass the cache.
  """
  args = (apply_fn, params, inputs, select, mesh, fisher_type, likelihood, homogeneous,
          apply_kwargs, dtype)
  leaves, structure = jax.tree.flatten((params, inputs))
  shapes = tuple((tuple(jnp.shape(x)), str(jnp.result_type(x))) for x in leaves)
  try:
    key = _frozen((apply_fn, select, mesh, fisher_type, likelihood, homogeneous,
                   dict(apply_kwargs or {}), str(jnp.dtype(dtype)), structure, shapes))
  except _Unhashable:
    return _build_layers_and_accumulator(*args)
  if key not in _CACHE:
    _CACHE[key] = _build_layers_and_accumulator(*args)
    while len(_CACHE) > _CACHE_SIZE:
      del _CACHE[next(iter(_CACHE))]  # the oldest entry
  return _CACHE[key]


# (find_layers views, jitted accumulator) by `_layers_and_accumulator`'s key, oldest first.
_CACHE: dict = {}
_CACHE_SIZE = 16


def _build_layers_and_accumulator(apply_fn, params, inputs, select, mesh, fisher_type,
                                  likelihood, homogeneous, apply_kwargs, dtype):
  views = capture_lib.find_layers(apply_fn, params, inputs, select=select,
                                  homogeneous=homogeneous, apply_kwargs=apply_kwargs)
  return views, make_factor_accumulator(
      apply_fn, list(views), mesh=mesh, fisher_type=fisher_type, likelihood=likelihood,
      homogeneous=homogeneous, apply_kwargs=apply_kwargs, dtype=dtype,
      per_device=mesh.shape[mesh_lib.DATA_AXIS] > 1)



def finalize(sums: Mapping[str, FactorSums],
             views: Mapping[str, Sequence[layer_views.MatrixView]]) -> dict[str, LayerFactors]:
  """Divides the sums by their sample counts: {path: LayerFactors}, in the order of `views`.

  Host function. Raises a ValueError naming the layer when a layer saw no
  samples, its factors are not finite, or its output gradients are all zero.
  """
  means, (counts, finite, g_trace) = _means_and_checks(dict(sums))
  counts, finite, g_trace = jax.device_get((counts, finite, g_trace))
  out = {}
  for name in views:
    if counts[name] <= 0:
      raise ValueError(f'layer {name!r} has 0 recorded tokens; did the batch mask out every '
                       'position (or, for an expert of a mixture-of-experts layer, was no token '
                       'routed to it)? Give batches with at least one unmasked position that '
                       'reaches the layer, or deselect it.')
    if not finite[name]:
      raise ValueError(f'the factors of layer {name!r} contain NaN or inf; check the model '
                       'outputs on these batches (or use dtype=float64)')
    if g_trace[name] <= 0:
      raise ValueError(f'the loss gradients at the outputs of layer {name!r} are all zero, so '
                       'its G factor is 0: the likelihood does not depend on this layer. Does '
                       "`likelihood` fit the model (e.g. likelihood='gaussian' for regression)?")
    view = views[name][0]
    out[name] = LayerFactors(*means[name], float(counts[name]), view)
  return out


@jax.jit
def _means_and_checks(sums: dict[str, FactorSums]):
  """({name: (A, G) / count}, ({name: count}, {name: all finite}, {name: trace G})), one program."""
  means = {n: (s.A / s.count, s.G / s.count) for n, s in sums.items()}
  finite = {n: jnp.isfinite(s.A).all() & jnp.isfinite(s.G).all() for n, s in sums.items()}
  return means, ({n: s.count for n, s in sums.items()}, finite,
                 {n: jnp.trace(s.G) for n, s in sums.items()})


def estimate_factors(apply_fn: Callable, params, batches: Iterable, *, rng: jax.Array,
                     select: taps.Selector = None, mesh: Mesh | None = None,
                     fisher_type: str = 'true',
                     likelihood: likelihoods.Likelihood = 'categorical',
                     homogeneous: bool = False, apply_kwargs: Mapping[str, Any] | None = None,
                     dtype=jnp.float32) -> dict[str, LayerFactors]:
  """K-FAC factors of the selected linear layers of any JAX model, over host batches.

  Args:
    apply_fn: the model: `(params, inputs, **apply_kwargs) -> outputs` (e.g. a
      linen `model.apply` or a plain function), a linen or NNX Module, or an
      NNX `(graphdef, state)` (`lossland.taps.models`).
    params: model variables (for an NNX module: None for its own state, or
      an `nnx.State`).
    batches: iterable of host batches, dicts {'inputs'[, 'targets'|'labels'][, 'mask']}.
    rng: base key; batch i samples its Fisher targets with `fold_in(rng, i)`.
    select: which layers: a regex over paths (whole-path match, e.g.
      r'block_\\d+/mlp/(gate|up)'), a list of paths, a callable `path -> bool`,
      or None for every Dense, DenseGeneral, Einsum and Conv layer (every
      matrix product of a parameter, for models tapped in their program;
      scanned layers are named 'blocks/mlp/up[3]', see `lossland.taps`).
    mesh: mesh with a `data` axis, each batch is sharded on it; None uses all
      local devices (the batch size must divide by their number).
    fisher_type: 'true' (sampled targets) or 'empirical' (dataset targets).
    likelihood: 'categorical', 'gaussian' or a callable
      `(outputs, batch, rng) -> per-example loss` (see `likelihoods`).
    homogeneous: treat biases through a homogeneous coordinate: A gets a
      trailing row/column for the constant input 1 (layers without a bias
      are unchanged), and the edit then covers the bias too.
    apply_kwargs: keyword arguments of `apply_fn`, e.g. `{'train': False}`.
    dtype: accumulation dtype (float64 needs `jax_enable_x64`).

  Returns:
    {path: LayerFactors} in the model's call order.
  """
  likelihoods.check(likelihood, fisher_type)
  apply_fn, params = taps.as_function(apply_fn, params)
  check_params_finite(params)
  mesh = mesh_lib.data_mesh(mesh)
  accumulate = sums = views = num_classes = None
  for i, batch in enumerate(batches):
    check_batch(batch)
    if likelihood == 'categorical' and fisher_type == 'empirical':
      if num_classes is None:
        out = jax.eval_shape(lambda p, x: apply_fn(p, x, **dict(apply_kwargs or {})), params,
                             batch['inputs'])
        num_classes = jax.tree.leaves(likelihoods.model_outputs(out))[0].shape[-1]
      check_labels(batch, num_classes, i)
    batch = mesh_lib.shard_batch(batch, mesh)
    if accumulate is None:
      views, accumulate = _layers_and_accumulator(
          apply_fn, params, batch['inputs'], select=select, mesh=mesh, fisher_type=fisher_type,
          likelihood=likelihood, homogeneous=homogeneous, apply_kwargs=apply_kwargs, dtype=dtype)
      parts = mesh.shape[mesh_lib.DATA_AXIS]
      sums = jax.device_put(zero_sums(views, dtype, parts=parts),
                            NamedSharding(mesh, P(mesh_lib.DATA_AXIS)) if parts > 1
                            else mesh_lib.replicated(mesh))
    sums = dispatch.settle(accumulate(sums, params, batch, jax.random.fold_in(rng, i)))
  if sums is None:
    raise ValueError('no batches were given; pass at least one batch to estimate factors')
  if mesh.shape[mesh_lib.DATA_AXIS] > 1:
    sums = combine_parts(sums, mesh)
  return finalize(sums, views)
