"""Layer x layer stitching passes: direct matching and stitch evaluation, each one jitted pass.

Balogh & Jelasity (AAAI 2025) compare stitching and similarity indices on
every (layer of A, layer of B) pair. Here every pass over the data handles all
pairs at once: one jitted function per pass, traced once (all batches the same
shape), with batches sharded on the mesh's `data` axis and results replicated.

* `DirectMatching` (one-off: `dm_statistics`): the joint Gram of every
  layer's features over the batches -> `DMStatistics`, whose `solve_all`
  gives every DM stitch (Sec. 3.2, least squares) and whose `gaussians` give
  each target layer's Gaussian for the OOD score.
* `StitchEvaluator` (one-off: `evaluate_stitches`): accuracy of the stitched
  networks, structural score ‖T(a) − b‖²/‖b‖² and Mahalanobis OOD ratio for
  any set of stitches (DM or TLM) -> `{Pair: StitchScores}`.

Calling convention (all of `lossland.stitching`): models are `nn.Module`s or
`apply_fn`s with `apply_kwargs` (`apply_kwargs_b` for B when it differs);
batches are dicts of host arrays, `{'inputs': [batch, ...]}` plus `'labels'`
where a loss or accuracy needs them; `mesh=None` uses all local devices on the
`data` axis; stitches are `{Pair: {'w', 'b'}}`.

`unit` (see `lossland.stitching.units`) says what a row of a layer with token
or spatial axes is, for the DM fit, the structural score and the OOD
Gaussian: 'tokens' (default; every position, the paper's convention: a stitch
is a per-position affine map, a 1x1 convolution on conv maps) or 'pooled' (the
per-input mean over positions: DM fits pooled A to pooled B, which for an
affine map equals fitting the mean of its per-position outputs). Either way
the stitch is applied per position inside the stitched network.

On multi-device CPU each call waits for its result (`parallel.settle`), so a
host loop never has two passes' all-reduces in flight. Similarity matrices
(CKA, PWCCA, Procrustes) are in `similarity`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lossland.parallel import dispatch
from lossland.parallel import mesh as mesh_lib
from lossland.stitching import matching
from lossland.stitching import ood as ood_lib
from lossland.stitching import splice as capture_lib
from lossland.stitching import units as units_lib
from lossland.stitching.pairs import Pair, StitchScores, all_pairs, as_pairs
from lossland.stitching.splice import Model


def check_batch(batch, keys: Sequence[str] = ('inputs',)) -> None:
  if not isinstance(batch, Mapping) or any(k not in batch for k in keys):
    got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise ValueError(f'each batch must be a dict with {list(keys)} (host arrays with the batch '
                     f'axis first); got {got}')


def _kwargs(apply_kwargs, apply_kwargs_b):
  a = dict(apply_kwargs or {})
  return a, dict(a if apply_kwargs_b is None else apply_kwargs_b)


def layer_shapes(model: Model, params, x: jax.Array, layers: Sequence[str], *,
                 apply_kwargs: Mapping[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
  """{layer: activation shape} for inputs like x (one eval_shape; raises on unknown layers)."""
  _, acts = jax.eval_shape(
      lambda p, x: capture_lib.capture(model, p, x, layers, apply_kwargs=apply_kwargs), params, x)
  return {name: tuple(acts[name].shape) for name in layers}


@dataclasses.dataclass(frozen=True)
class DMStatistics:
  """One pass's joint statistics of A's and B's layers: every DM stitch and target Gaussian.

  Attributes:
    stats: {group: {'shift', 'gram', 'rows'}} accumulated sums (`matching.update_stats`).
    layout: where each layer's features sit in the joint Gram (`matching.Layout`).
    layers_a, layers_b: the layers the pass saw.
    unit: 'tokens' or 'pooled', what a row is.
  """
  stats: dict
  layout: matching.Layout
  layers_a: tuple[str, ...]
  layers_b: tuple[str, ...]
  unit: str

  def solve(self, pair: Pair, *, ridge: float = 0.0, rcond: float = 1e-6) -> dict:
    """The DM stitch {'w', 'b'} of `pair` (host float64 pseudo-inverse; `matching.solve_direct`)."""
    source, target = pair
    return matching.solve_direct(self.stats, self.layout, source, target, ridge=ridge,
                                 rcond=rcond)

  def solve_all(self, pairs: Sequence[Pair] | None = None, *, ridge: float = 0.0
                ) -> dict[Pair, dict]:
    """{Pair: DM stitch} for `pairs` (default: every layers_a x layers_b pair)."""
    pairs = all_pairs(self.layers_a, self.layers_b) if pairs is None else as_pairs(pairs)
    return {p: self.solve(p, ridge=ridge) for p in pairs}

  def moments(self, target: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], covariance [d, d]) of B[target]'s rows (float64)."""
    return matching.target_moments(self.stats, self.layout, target)

  def gaussians(self, targets: Sequence[str] | None = None, *, eps: float = 1e-3
                ) -> dict[str, ood_lib.Gaussian]:
    """{target layer: Gaussian of its rows} for the OOD score (default: every layer of B)."""
    targets = self.layers_b if targets is None else targets
    return {b: ood_lib.gaussian(*self.moments(b), eps=eps) for b in targets}


class DirectMatching:
  """Accumulates the joint statistics of every DM stitch from A's layers into B's in one pass.

  Build once, call for any params of the same architectures: the per-batch
  update is jitted once per batch shape and reused (`self.update`).
  `__call__(params_a, params_b, batches) -> DMStatistics`, where `batches`
  yields dicts {'inputs': [batch, ...]} (sharded on `data` here).

  Rows of a source and a target pair up, so the layers need one activation per
  example: a layer called k times per forward pass (k rows per example) against
  one called once is refused with a ValueError naming both, from the shapes
  alone (`matching.make_layout`), before anything is computed.
  """

  def __init__(self, model_a: Model, model_b: Model, *, layers_a: Sequence[str],
               layers_b: Sequence[str], unit: str = 'tokens', mesh: Mesh | None = None,
               apply_kwargs: Mapping[str, Any] | None = None,
               apply_kwargs_b: Mapping[str, Any] | None = None):
    self.layers_a, self.layers_b = tuple(layers_a), tuple(layers_b)
    self.unit = units_lib.check_unit(unit)
    self.mesh = mesh_lib.data_mesh(mesh)
    kwargs_a, kwargs_b = _kwargs(apply_kwargs, apply_kwargs_b)
    rep = mesh_lib.replicated(self.mesh)

    def acts(params_a, params_b, x):
      _, acts_a = capture_lib.capture(model_a, params_a, x, self.layers_a, apply_kwargs=kwargs_a)
      _, acts_b = capture_lib.capture(model_b, params_b, x, self.layers_b, apply_kwargs=kwargs_b)
      if self.unit == 'pooled':
        acts_a = {k: units_lib.rows(v, 'pooled') for k, v in acts_a.items()}
        acts_b = {k: units_lib.rows(v, 'pooled') for k, v in acts_b.items()}
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

    self._layout_for, self._first, self.update = layout_for, first, update

  def __call__(self, params_a, params_b, batches: Iterable[Mapping[str, np.ndarray]]
               ) -> DMStatistics:
    stats = layout = None
    rep = mesh_lib.replicated(self.mesh)
    params_a, params_b = jax.device_put((params_a, params_b), rep)
    for batch in batches:
      check_batch(batch)
      x = mesh_lib.shard_batch(np.asarray(batch['inputs']), self.mesh)
      if stats is None:
        layout = self._layout_for(params_a, params_b, x)
        stats = jax.device_put(self._first(params_a, params_b, x), rep)
      stats = dispatch.settle(self.update(stats, params_a, params_b, x))
    if stats is None:
      raise ValueError('DirectMatching got no batches')
    return DMStatistics(stats, layout, self.layers_a, self.layers_b, self.unit)


def dm_statistics(model_a: Model, params_a, model_b: Model, params_b,
                  batches: Iterable[Mapping[str, np.ndarray]], *, layers_a: Sequence[str],
                  layers_b: Sequence[str], unit: str = 'tokens', mesh: Mesh | None = None,
                  apply_kwargs: Mapping[str, Any] | None = None,
                  apply_kwargs_b: Mapping[str, Any] | None = None) -> DMStatistics:
  """One-off `DirectMatching(...)(params_a, params_b, batches)`."""
  return DirectMatching(model_a, model_b, layers_a=layers_a, layers_b=layers_b, unit=unit,
                        mesh=mesh, apply_kwargs=apply_kwargs,
                        apply_kwargs_b=apply_kwargs_b)(params_a, params_b, batches)


class StitchEvaluator:
  """Scores every stitched network of `pairs` in one jitted pass per batch (Sec. 3-5).

  `__call__(params_a, params_b, stitches, gaussians, batches) -> {Pair: StitchScores}`
  with `stitches` {Pair: {'w', 'b'}}, `gaussians` {target layer: Gaussian}
  (`DMStatistics.gaussians()`), and batches dicts {'inputs', 'labels'}
  (integer labels, compared with the argmax of B's output). For a streamed
  loop, `totals = update(totals, ...)` from `totals=None`, then
  `summarize(totals)`. The step is jitted once per batch shape (`self.step`).
  """

  def __init__(self, model_a: Model, model_b: Model, pairs: Sequence[Pair], *,
               unit: str = 'tokens', mesh: Mesh | None = None,
               apply_kwargs: Mapping[str, Any] | None = None,
               apply_kwargs_b: Mapping[str, Any] | None = None):
    self.pairs = as_pairs(pairs)
    self.unit = units_lib.check_unit(unit)
    self.mesh = mesh_lib.data_mesh(mesh)
    kwargs_a, kwargs_b = _kwargs(apply_kwargs, apply_kwargs_b)
    sources = sorted({p.source for p in self.pairs})
    targets = sorted({p.target for p in self.pairs})
    pooled = self.unit == 'pooled'

    def batch_totals(params_a, params_b, stitches, gaussians, x, labels):
      _, acts_a = capture_lib.capture(model_a, params_a, x, sources, apply_kwargs=kwargs_a)
      _, acts_b = capture_lib.capture(model_b, params_b, x, targets, apply_kwargs=kwargs_b)
      per_pair = {}
      for pair in self.pairs:
        holder = {}

        def make(original, pair=pair, holder=holder):
          holder['t'] = matching.apply_stitch(stitches[pair], acts_a[pair.source], original)
          return holder['t']

        logits = capture_lib.replace_layer(model_b, params_b, x, pair.target, make,
                                           apply_kwargs=kwargs_b)
        t, real = holder['t'], acts_b[pair.target]
        if pooled:
          t, real = units_lib.rows(t, 'pooled'), units_lib.rows(real, 'pooled')
        per_pair[pair] = {
            'correct': jnp.sum(logits.argmax(-1) == labels).astype(jnp.float32),
            'residual': jnp.sum((t - real).astype(jnp.float32) ** 2),
            'norm': jnp.sum(real.astype(jnp.float32) ** 2),
            'mahal': ood_lib.mahalanobis_sum(matching.target_rows(t), gaussians[pair.target])}
      per_target = {}
      for b in targets:
        rows = matching.target_rows(units_lib.rows(acts_b[b], 'pooled') if pooled else acts_b[b])
        per_target[b] = {'mahal_real': ood_lib.mahalanobis_sum(rows, gaussians[b]),
                         'rows': jnp.asarray(rows.shape[0], jnp.float32)}
      return {'pairs': per_pair, 'targets': per_target,
              'examples': jnp.asarray(labels.size, jnp.float32)}

    rep = mesh_lib.replicated(self.mesh)

    @functools.partial(jax.jit, out_shardings=rep)
    def step(totals, params_a, params_b, stitches, gaussians, x, labels):
      return jax.tree.map(jnp.add, totals,
                          batch_totals(params_a, params_b, stitches, gaussians, x, labels))

    self._batch_totals, self.step = batch_totals, step

  def update(self, totals, params_a, params_b, stitches: Mapping[Pair, dict],
             gaussians: Mapping[str, ood_lib.Gaussian], batch: Mapping[str, np.ndarray]):
    """Adds one batch's sums to `totals` (None to start); returns the new totals."""
    check_batch(batch, ('inputs', 'labels'))
    x, labels = mesh_lib.shard_batch((np.asarray(batch['inputs']), np.asarray(batch['labels'])),
                                     self.mesh)
    stitches = {Pair(*k): v for k, v in stitches.items()}
    missing = [p for p in self.pairs if p not in stitches]
    if missing:
      raise KeyError(f'no stitch for {[str(p) for p in missing]}; pass {{Pair: stitch}} for '
                     'every pair the evaluator was built with')
    stitches = {p: stitches[p] for p in self.pairs}
    rep = mesh_lib.replicated(self.mesh)
    if totals is None:  # zeros of the right structure, so one trace serves every batch
      shapes = jax.eval_shape(self._batch_totals, params_a, params_b, stitches, gaussians, x,
                              labels)
      totals = jax.device_put(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), rep)
    params_a, params_b, stitches, gaussians = jax.device_put(
        (params_a, params_b, stitches, dict(gaussians)), rep)
    return dispatch.settle(self.step(totals, params_a, params_b, stitches, gaussians, x, labels))

  def summarize(self, totals) -> dict[Pair, StitchScores]:
    """{Pair: StitchScores} as Python floats (one device_get)."""
    t = jax.device_get(totals)
    out = {}
    for pair in self.pairs:
      p, real = t['pairs'][pair], t['targets'][pair.target]
      out[pair] = StitchScores(
          accuracy=float(p['correct'] / t['examples']),
          structural=float(p['residual'] / max(p['norm'], 1e-30)),
          ood_ratio=float(p['mahal'] / max(real['mahal_real'], 1e-30)))
    return out

  def __call__(self, params_a, params_b, stitches: Mapping[Pair, dict],
               gaussians: Mapping[str, ood_lib.Gaussian],
               batches: Iterable[Mapping[str, np.ndarray]]) -> dict[Pair, StitchScores]:
    totals = None
    for batch in batches:
      totals = self.update(totals, params_a, params_b, stitches, gaussians, batch)
    if totals is None:
      raise ValueError('StitchEvaluator got no batches')
    return self.summarize(totals)


def evaluate_stitches(model_a: Model, params_a, model_b: Model, params_b,
                      stitches: Mapping[Pair, dict], gaussians: Mapping[str, ood_lib.Gaussian],
                      batches: Iterable[Mapping[str, np.ndarray]], *, unit: str = 'tokens',
                      mesh: Mesh | None = None, apply_kwargs: Mapping[str, Any] | None = None,
                      apply_kwargs_b: Mapping[str, Any] | None = None
                      ) -> dict[Pair, StitchScores]:
  """One-off `StitchEvaluator(model_a, model_b, list(stitches), ...)(...)`."""
  return StitchEvaluator(model_a, model_b, list(stitches), unit=unit, mesh=mesh,
                         apply_kwargs=apply_kwargs, apply_kwargs_b=apply_kwargs_b)(
                             params_a, params_b, stitches, gaussians, batches)
