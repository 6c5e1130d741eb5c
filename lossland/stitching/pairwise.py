"""Layer x layer stitching passes: DM statistics and stitch evaluation, each one jitted pass.

Balogh & Jelasity (AAAI 2025) compare stitching and similarity indices on
every (layer of A, layer of B) pair. Here every pass over the data handles all
pairs at once: one jitted function per pass, traced once (all batches the same
shape), with batches sharded on the mesh's `data` axis and results replicated.

* `make_dm_statistics`: the joint Gram of every layer's features -> all DM
  stitches (`solve_all`) and each target layer's Gaussian (OOD score).
* `make_evaluator`: accuracy of the stitched networks, structural score
  ‖T(a) − b‖²/‖b‖² and Mahalanobis OOD sums for any set of stitches (DM or TLM).

Similarity matrices (CKA, PWCCA, Procrustes) are in `alignment`, `streaming`
and `cca`.
"""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lossland.parallel import dispatch
from lossland.parallel import mesh as mesh_lib
from lossland.stitching import splice as capture_lib
from lossland.stitching import matching
from lossland.stitching import ood as ood_lib


def pair_key(source: str, target: str) -> str:
  return f'{source}->{target}'


def layer_shapes(model: nn.Module, params, x: jax.Array, layers: Sequence[str]) -> dict:
  """{layer: activation shape} for inputs like x (one eval_shape; raises on unknown layers)."""
  _, acts = jax.eval_shape(lambda p, x: capture_lib.capture(model, p, x, layers), params, x)
  return {name: acts[name].shape for name in layers}


def make_dm_statistics(model_a: nn.Module, model_b: nn.Module, *, layers_a: Sequence[str],
                       layers_b: Sequence[str], mesh: Mesh):
  """Returns `dm_statistics(params_a, params_b, batches) -> (stats, layout)`: one pass, all stitches.

  `batches` yields host inputs [batch, ...] (sharded on `data` here). The result
  gives `matching.solve_direct(stats, layout, a, b)` for every a in layers_a,
  b in layers_b, and `matching.target_moments` for the OOD Gaussian. The
  per-batch update is jitted once per batch shape and reused across calls.
  """
  layers_a, layers_b = list(layers_a), list(layers_b)
  rep = mesh_lib.replicated(mesh)

  def acts(params_a, params_b, x):
    _, acts_a = capture_lib.capture(model_a, params_a, x, layers_a)
    _, acts_b = capture_lib.capture(model_b, params_b, x, layers_b)
    return acts_a, acts_b

  def layout_for(params_a, params_b, x):
    shapes_a, shapes_b = jax.eval_shape(acts, params_a, params_b, x)
    return matching.make_layout({k: v.shape for k, v in shapes_a.items()},
                                {k: v.shape for k, v in shapes_b.items()})

  @jax.jit
  def first(params_a, params_b, x):
    layout = layout_for(params_a, params_b, x)
    return matching.init_stats(layout, *acts(params_a, params_b, x))

  @functools.partial(jax.jit, donate_argnums=0, out_shardings=rep)
  def update(stats, params_a, params_b, x):
    layout = layout_for(params_a, params_b, x)
    return matching.update_stats(stats, layout, *acts(params_a, params_b, x))

  def dm_statistics(params_a, params_b, batches: Iterable[np.ndarray]):
    stats = layout = None
    params_a, params_b = jax.device_put((params_a, params_b), rep)
    for x in batches:
      x = mesh_lib.shard_batch(np.asarray(x), mesh)
      if stats is None:
        layout = layout_for(params_a, params_b, x)
        stats = jax.device_put(first(params_a, params_b, x), rep)
      stats = dispatch.settle(update(stats, params_a, params_b, x))
    if stats is None:
      raise ValueError('dm_statistics got no batches')
    return stats, layout

  dm_statistics.update = update
  return dm_statistics


def dm_statistics(model_a: nn.Module, params_a, model_b: nn.Module, params_b,
                  batches: Iterable[np.ndarray], *, layers_a: Sequence[str],
                  layers_b: Sequence[str], mesh: Mesh):
  """One-off `make_dm_statistics(...)(params_a, params_b, batches)`."""
  return make_dm_statistics(model_a, model_b, layers_a=layers_a, layers_b=layers_b,
                            mesh=mesh)(params_a, params_b, batches)


def solve_all(stats, layout, pairs: Sequence[tuple[str, str]], *, ridge: float = 0.0) -> dict:
  """{pair_key(a, b): DM stitch} for every pair (host solves)."""
  return {pair_key(a, b): matching.solve_direct(stats, layout, a, b, ridge=ridge)
          for a, b in pairs}


def make_evaluator(model_a: nn.Module, model_b: nn.Module, pairs: Sequence[tuple[str, str]],
                   *, mesh: Mesh):
  """Returns jitted `evaluate(totals, params_a, params_b, stitches, gaussians, x, labels)`.

  `stitches` maps pair_key -> {'w', 'b'}; `gaussians` maps each target layer ->
  `ood.gaussian(...)`. `totals` (start from `None`) accumulates per pair:
  correct, residual (‖T(a) − b‖²), norm (‖b‖²), mahal (stitched) and, per
  target, mahal_real and rows. Call `summarize(totals)` at the end.
  """
  pairs = list(pairs)
  sources = sorted({a for a, _ in pairs})
  targets = sorted({b for _, b in pairs})

  def batch_totals(params_a, params_b, stitches, gaussians, x, labels):
    _, acts_a = capture_lib.capture(model_a, params_a, x, sources)
    _, acts_b = capture_lib.capture(model_b, params_b, x, targets)
    out = {}
    for a, b in pairs:
      k = pair_key(a, b)
      holder = {}

      def make(original, a=a, k=k, holder=holder):
        holder['t'] = matching.apply_stitch(stitches[k], acts_a[a], original)
        return holder['t']

      logits = capture_lib.replace_layer(model_b, params_b, x, b, make)
      t, real = holder['t'], acts_b[b]
      out[k] = {'correct': jnp.sum(logits.argmax(-1) == labels).astype(jnp.float32),
                'residual': jnp.sum((t - real).astype(jnp.float32) ** 2),
                'norm': jnp.sum(real.astype(jnp.float32) ** 2),
                'mahal': ood_lib.mahalanobis_sum(matching.target_rows(t), gaussians[b])}
    for b in targets:
      rows = matching.target_rows(acts_b[b])
      out[f'real:{b}'] = {'mahal_real': ood_lib.mahalanobis_sum(rows, gaussians[b]),
                          'rows': jnp.asarray(rows.shape[0], jnp.float32)}
    out['examples'] = jnp.asarray(x.shape[0], jnp.float32)
    return out

  rep = mesh_lib.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=rep)
  def step(totals, params_a, params_b, stitches, gaussians, x, labels):
    new = batch_totals(params_a, params_b, stitches, gaussians, x, labels)
    if totals is None:
      return new
    return jax.tree.map(jnp.add, totals, new)

  def evaluate(totals, params_a, params_b, stitches, gaussians, x, labels):
    x, labels = mesh_lib.shard_batch((np.asarray(x), np.asarray(labels)), mesh)
    if totals is None:  # zeros of the right structure, so one trace serves every batch
      shapes = jax.eval_shape(batch_totals, params_a, params_b, stitches, gaussians, x, labels)
      totals = jax.device_put(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), rep)
    params_a, params_b, stitches, gaussians = jax.device_put(
        (params_a, params_b, stitches, gaussians), rep)
    return dispatch.settle(step(totals, params_a, params_b, stitches, gaussians, x, labels))

  def summarize(totals) -> dict:
    """{pair_key: {'accuracy', 'structural', 'ood_ratio'}} as Python floats."""
    t = jax.device_get(totals)
    result = {}
    for a, b in pairs:
      k = pair_key(a, b)
      real = t[f'real:{b}']
      result[k] = {'accuracy': float(t[k]['correct'] / t['examples']),
                   'structural': float(t[k]['residual'] / max(t[k]['norm'], 1e-30)),
                   'ood_ratio': float(t[k]['mahal'] / max(real['mahal_real'], 1e-30))}
    return result

  evaluate.summarize = summarize
  evaluate.jitted = step
  return evaluate
