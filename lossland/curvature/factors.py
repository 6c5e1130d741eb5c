"""Streaming K-FAC factors A = E[a aᵀ] and G = E[g gᵀ] of selected linear layers.

Merullo et al. (2025), sec. 3.1, eq. 3: the Fisher block of a linear layer is
approximated by the Kronecker product of the uncentered second moments of its
inputs `a` and of the loss gradients `g` at its outputs (Martens & Grosse
2015, eq. 1), averaged over token positions. Each token position is one
sample; `g` is the gradient of the summed NLL of the whole example, i.e. the
per-example gradient (padding positions are excluded by `batch['mask']`).

Fisher type `true` samples labels from the model's own predictive
distribution (the paper's choice, the default); `empirical` uses the dataset
labels (`targets` for an LM, `labels` for a classifier).

Accumulation is a jitted sum of outer products over the (data-sharded) batch:
XLA turns the contractions over the sharded batch dimension into one combined
(tuple) all-reduce inside the compiled step, so the per-device sums of all
layers meet in one collective and nothing goes back to the host per batch.
On multi-device CPU the host loop waits for each step (`parallel.settle`), so
the all-reduces of consecutive batches are never in flight together.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from lossland.curvature import capture as capture_lib
from lossland.parallel import dispatch
from lossland.parallel import mesh as mesh_lib

FISHER_TYPES = ('true', 'empirical')
HIGHEST = jax.lax.Precision.HIGHEST


def _labels(batch) -> jax.Array:
  for key in ('targets', 'labels'):
    if key in batch:
      return batch[key]
  raise ValueError(f"the batch has keys {sorted(batch)}; it needs 'targets' (LM) or 'labels' "
                   '(classifier) next to \'inputs\'')


def fisher_loss(logits: jax.Array, batch, rng: jax.Array, fisher_type: str):
  """(Σ mask·NLL, mask) with labels sampled from `logits` (`true`) or from the batch."""
  mask = batch.get('mask')
  if mask is None:
    mask = jnp.ones(logits.shape[:-1], jnp.float32)
  if fisher_type == 'true':
    labels = jax.random.categorical(rng, jax.lax.stop_gradient(logits).astype(jnp.float32))
  elif fisher_type == 'empirical':
    labels = _labels(batch)
  else:
    raise ValueError(f'fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}')
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return (nll * mask).sum(), mask.astype(jnp.float32)


def _position_mask(mask: jax.Array, positions: tuple[int, ...], name: str) -> jax.Array:
  """Broadcasts the loss mask [batch(, seq)] to a layer's leading shape."""
  if tuple(mask.shape) == tuple(positions):
    return mask
  if tuple(positions[:mask.ndim]) == tuple(mask.shape):
    return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (len(positions) - mask.ndim)),
                            positions)
  raise ValueError(f'layer {name!r} is applied at positions {tuple(positions)} but the loss mask '
                   f'has shape {tuple(mask.shape)}; factors need layers whose leading dims start '
                   'with the mask\'s (select other layers or give a matching batch["mask"])')


def layer_statistics(apply_fn: Callable, params, batch, rng: jax.Array, *,
                     layers: Sequence[str], fisher_type: str = 'true'):
  """Per-position inputs `a`, output gradients `g` and masks of the selected layers.

  One forward and one backward pass (gradients with respect to zero
  perturbations of the layer outputs only, no weight gradients). jit-safe;
  `apply_fn`, `layers` and `fisher_type` are static.

  Returns:
    {name: (a [N, d_in], g [N, d_out], mask [N])} in float32, N = positions.
  """
  names = tuple(layers)
  select = lambda n: n in names
  _, shapes = jax.eval_shape(
      lambda p, x: capture_lib.capture(apply_fn, p, x, select=select), params, batch['inputs'])
  missing = [n for n in names if n not in shapes]
  if missing:
    raise ValueError(f'layers {missing} were not called by the model; check the layer names')
  zeros = {n: jnp.zeros(s.shape[:-1] + (capture_lib.get_kernel(params, n).shape[1],),
                        jnp.float32) for n, s in shapes.items()}

  def loss_of(perturb):
    logits, inputs = capture_lib.capture(apply_fn, params, batch['inputs'], select=select,
                                         perturbations=perturb)
    loss, mask = fisher_loss(logits, batch, rng, fisher_type)
    return loss, (inputs, mask)

  grads, (inputs, mask) = jax.grad(loss_of, has_aux=True)(zeros)
  out = {}
  for name in names:
    a, g = inputs[name], grads[name]
    m = _position_mask(mask, a.shape[:-1], name)
    out[name] = (a.reshape(-1, a.shape[-1]).astype(jnp.float32),
                 g.reshape(-1, g.shape[-1]).astype(jnp.float32),
                 m.reshape(-1).astype(jnp.float32))
  return out


def factor_sums(apply_fn: Callable, params, batch, rng: jax.Array, *, layers: Sequence[str],
                fisher_type: str = 'true', dtype=jnp.float32):
  """Σ m a aᵀ, Σ m g gᵀ and Σ m of one batch: {name: {'A', 'G', 'count'}}. jit-safe."""
  stats = layer_statistics(apply_fn, params, batch, rng, layers=layers, fisher_type=fisher_type)
  out = {}
  for name, (a, g, m) in stats.items():
    a, g, m = a.astype(dtype), g.astype(dtype), m.astype(dtype)
    out[name] = {'A': jnp.matmul((a * m[:, None]).T, a, precision=HIGHEST),  # [d_in, d_in]
                 'G': jnp.matmul((g * m[:, None]).T, g, precision=HIGHEST),  # [d_out, d_out]
                 'count': m.sum()}
  return out


def zero_sums(params, layers: Sequence[str], dtype=jnp.float32):
  out = {}
  for name in layers:
    d_in, d_out = capture_lib.get_kernel(params, name).shape
    out[name] = {'A': jnp.zeros((d_in, d_in), dtype), 'G': jnp.zeros((d_out, d_out), dtype),
                 'count': jnp.zeros((), dtype)}
  return out


def make_factor_accumulator(apply_fn: Callable, layers: Sequence[str], *, mesh: Mesh,
                            fisher_type: str = 'true', dtype=jnp.float32) -> Callable:
  """Returns `accumulate(sums, params, batch, rng) -> sums`, jitted once per shape.

  `sums` (from `zero_sums`) is donated and comes back replicated on `mesh`;
  `batch` should be sharded on `data` (`lossland.parallel.shard_batch`).
  """
  if fisher_type not in FISHER_TYPES:
    raise ValueError(f'fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}')
  names = tuple(layers)

  def accumulate(sums, params, batch, rng):
    new = factor_sums(apply_fn, params, batch, rng, layers=names, fisher_type=fisher_type,
                      dtype=dtype)
    return jax.tree.map(jnp.add, sums, new)

  return jax.jit(accumulate, donate_argnums=0, out_shardings=mesh_lib.replicated(mesh))


def finalize(sums) -> dict[str, dict[str, jax.Array]]:
  """Divides the sums by their token counts; {name: {'A', 'G', 'count'}}.

  Host function: raises a ValueError naming the layer when a layer saw no
  tokens or its factors are not finite.
  """
  counts = jax.device_get({n: s['count'] for n, s in sums.items()})
  finite = jax.device_get({n: jnp.isfinite(s['A']).all() & jnp.isfinite(s['G']).all()
                           for n, s in sums.items()})
  out = {}
  for name, s in sums.items():
    if counts[name] <= 0:
      raise ValueError(f'layer {name!r} has 0 recorded tokens; did the batch mask out every '
                       'position? Give batches with at least one unmasked position.')
    if not finite[name]:
      raise ValueError(f'the factors of layer {name!r} contain NaN or inf; check the model '
                       'outputs on these batches (or use dtype=float64)')
    out[name] = {'A': s['A'] / counts[name], 'G': s['G'] / counts[name],
                 'count': float(counts[name])}
  return out


def estimate_factors(apply_fn: Callable, params, batches: Iterable, *, pattern: str,
                     mesh: Mesh, rng: jax.Array, fisher_type: str = 'true',
                     dtype=jnp.float32) -> dict[str, dict[str, jax.Array]]:
  """K-FAC factors of every Dense layer whose name matches `pattern`, over host batches.

  Args:
    apply_fn: `(params, inputs) -> logits` (e.g. `model.apply`).
    params: model variables.
    batches: iterable of host batches {'inputs', 'targets'|'labels'[, 'mask']}.
    pattern: regex over layer names, e.g. r'block_\\d+/mlp/(gate|up)'.
    mesh: mesh with a `data` axis; each batch is sharded on it.
    rng: base key; batch i samples its Fisher labels with `fold_in(rng, i)`.
    fisher_type: 'true' (sampled labels) or 'empirical' (dataset labels).
    dtype: accumulation dtype (float64 needs `jax_enable_x64`).

  Returns:
    {name: {'A': [d_in, d_in], 'G': [d_out, d_out], 'count': tokens}}.
  """
  accumulate = None
  sums = None
  for i, batch in enumerate(batches):
    batch = mesh_lib.shard_batch(batch, mesh)
    if accumulate is None:
      layers = list(capture_lib.find_layers(apply_fn, params, batch['inputs'], pattern))
      accumulate = make_factor_accumulator(apply_fn, layers, mesh=mesh, fisher_type=fisher_type,
                                           dtype=dtype)
      sums = jax.device_put(zero_sums(params, layers, dtype), mesh_lib.replicated(mesh))
    sums = dispatch.settle(accumulate(sums, params, batch, jax.random.fold_in(rng, i)))
  if sums is None:
    raise ValueError('no batches were given; pass at least one batch to estimate factors')
  return finalize(sums)


def as_numpy(factors) -> dict:
  return jax.tree.map(np.asarray, jax.device_get(factors))
