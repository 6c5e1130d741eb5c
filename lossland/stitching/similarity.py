"""Layer x layer similarity matrices between two models (CKA, CCA family, Procrustes, k-NN).

The indices themselves are in `alignment` (CKA: Kornblith et al., ICML 2019),
`cca` (mean CCA, SVCCA, PWCCA, Procrustes) and `knn` (mutual k-NN); this
module applies them to every (layer of A, layer of B) pair:

* `similarity_matrices(acts_a, acts_b, ...)`: from captured activations
  ({layer: [N, ..., d]}), full batch, any of `INDICES`.
* `layer_similarity(model_a, params_a, model_b, params_b, batch, ...)`: the
  same, capturing the layers on one batch dict {'inputs'} first.
* `streamed_cka(model_a, params_a, model_b, params_b, batches, ...)`:
  minibatch linear CKA (Nguyen et al., ICLR 2021, Eq. 2) over any number of
  batches, sharded on the mesh's `data` axis; memory independent of the
  number of examples.

`unit` (`lossland.stitching.units`) chooses what an example is when a layer
has token or spatial axes: 'tokens' (default; every position is an example,
so both layers need the same token/spatial axes) or 'pooled' (the mean over
them, one example per input). Layers are lists of module paths or, for
`streamed_cka`, a selector (`lossland.taps`: regex, list or callable) over
every submodule path.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from lossland import taps
from lossland.parallel import mesh as mesh_lib
from lossland.stitching import alignment, cca, knn, streaming
from lossland.stitching import splice as capture_lib
from lossland.stitching import units as units_lib
from lossland.stitching.pairwise import _kwargs, check_batch
from lossland.stitching.splice import Model

INDICES: dict[str, Callable[[Any, Any], Any]] = {
    'linear_cka': alignment.linear_cka,
    'debiased_cka': functools.partial(alignment.cka, debiased=True),
    'rbf_cka': functools.partial(alignment.cka, kernel='rbf'),
    'mean_cca': cca.mean_cca,
    'svcca': cca.svcca,
    'pwcca': cca.pwcca,
    'procrustes': cca.procrustes,
    'mutual_knn': knn.mutual_knn,
}


@dataclasses.dataclass(frozen=True)
class SimilarityMatrix:
  """One index between every layer of A (rows) and of B (cols).

  Attributes:
    index: the index's name (a key of `INDICES`, or 'minibatch_cka').
    rows, cols: layer paths of A and of B.
    values: [len(rows), len(cols)] float64 NumPy array; values[i, j] compares
      rows[i] with cols[j].
    unit: 'tokens' or 'pooled', what an example was.
    examples: how many examples (rows of each feature matrix) entered.
  """
  index: str
  rows: tuple[str, ...]
  cols: tuple[str, ...]
  values: np.ndarray
  unit: str
  examples: int

  def to_dict(self) -> dict:
    """JSON-ready: {'index', 'rows', 'cols', 'values' (nested lists), 'unit', 'examples'}."""
    return {'index': self.index, 'rows': list(self.rows), 'cols': list(self.cols),
            'values': self.values.tolist(), 'unit': self.unit, 'examples': self.examples}


def _index(name: str) -> Callable:
  if name not in INDICES:
    raise ValueError(f'unknown similarity index {name!r}; choose from {sorted(INDICES)}')
  return INDICES[name]


def similarity_matrices(acts_a: Mapping[str, Any], acts_b: Mapping[str, Any], *,
                        layers_a: Sequence[str] | None = None,
                        layers_b: Sequence[str] | None = None,
                        indices: Sequence[str] = ('linear_cka',), unit: str = 'tokens'
                        ) -> dict[str, SimilarityMatrix]:
  """{index name: SimilarityMatrix} between captured activations of the same inputs.

  Args:
    acts_a, acts_b: {layer: [N, ..., d]} (e.g. from `capture`), jax or NumPy.
    layers_a, layers_b: rows and columns (default: every key, in order).
    indices: names from `INDICES`.
    unit: 'tokens' (default) or 'pooled' (see the module docstring).

  Runs on concrete arrays (NumPy on the host), so NaN or inf activations raise
  the index's named ValueError. Not jit-safe.

  Raises:
    ValueError: an unknown index or unit; two layers whose examples do not
      correspond under `unit` (a different number of inputs, or different
      token/spatial axes with unit='tokens').
  """
  layers_a = list(acts_a) if layers_a is None else list(layers_a)
  layers_b = list(acts_b) if layers_b is None else list(layers_b)
  units_lib.check_unit(unit)
  fns = {name: _index(name) for name in indices}
  for a in layers_a:
    for b in layers_b:
      units_lib.check_axes(np.shape(acts_a[a]), np.shape(acts_b[b]), unit,
                           (f'A layer {a!r}', f'B layer {b!r}'))
  rows_a = {a: units_lib.rows(np.asarray(acts_a[a]), unit) for a in layers_a}
  rows_b = {b: units_lib.rows(np.asarray(acts_b[b]), unit) for b in layers_b}
  examples = len(next(iter(rows_a.values()))) if rows_a else 0
  return {name: SimilarityMatrix(
      name, tuple(layers_a), tuple(layers_b),
      np.array([[float(fn(rows_a[a], rows_b[b])) for b in layers_b] for a in layers_a]),
      unit, examples) for name, fn in fns.items()}


def _capture_pair(params_a, params_b, x, *, model_a, model_b, layers_a, layers_b, kwargs_a,
                  kwargs_b):
  """Both models' activations in one program; kwargs_a/b are tuples of (name, value) items."""
  _, acts_a = capture_lib.capture(model_a, params_a, x, layers_a, apply_kwargs=dict(kwargs_a))
  _, acts_b = capture_lib.capture(model_b, params_b, x, layers_b, apply_kwargs=dict(kwargs_b))
  return acts_a, acts_b


_STATIC = ('model_a', 'model_b', 'layers_a', 'layers_b', 'kwargs_a', 'kwargs_b')
# Compiled once per (models, layers, keyword arguments, input shape), reused across calls.
_capture_both = jax.jit(_capture_pair, static_argnames=_STATIC)


def layer_similarity(model_a: Model, params_a, model_b: Model, params_b,
                     batch: Mapping[str, Any], *, layers_a: Sequence[str],
                     layers_b: Sequence[str], indices: Sequence[str] = ('linear_cka',),
                     unit: str = 'tokens', apply_kwargs: Mapping[str, Any] | None = None,
                     apply_kwargs_b: Mapping[str, Any] | None = None
                     ) -> dict[str, SimilarityMatrix]:
  """`similarity_matrices` of the layers captured on one batch {'inputs'} (full batch, one jit).

  The capture is compiled once per models, layers, keyword arguments and
  input shape, and reused by later calls (unhashable keyword values, such as
  rng dicts, compile per call).
  """
  check_batch(batch)
  kwargs_a, kwargs_b = _kwargs(apply_kwargs, apply_kwargs_b)
  static = dict(model_a=model_a, model_b=model_b, layers_a=tuple(layers_a),
                layers_b=tuple(layers_b), kwargs_a=tuple(sorted(kwargs_a.items())),
                kwargs_b=tuple(sorted(kwargs_b.items())))
  try:
    hash(tuple(static.values()))
    capture = functools.partial(_capture_both, **static)
  except TypeError:  # an unhashable model or keyword value (e.g. an rngs dict): compile here
    capture = jax.jit(functools.partial(_capture_pair, **static))
  acts_a, acts_b = capture(params_a, params_b, batch['inputs'])
  return similarity_matrices(acts_a, acts_b, layers_a=layers_a, layers_b=layers_b,
                             indices=indices, unit=unit)


def select_layers(model: Model, params, x, select: taps.Selector, *,
                  apply_kwargs: Mapping[str, Any] | None = None) -> list[str]:
  """Module paths chosen by `select` (a list of paths is kept as given), in call order."""
  if not isinstance(select, str) and isinstance(select, Sequence):
    return list(select)
  return capture_lib.called_paths(model, params, x, select=select, apply_kwargs=apply_kwargs)


def streamed_cka(model_a: Model, params_a, model_b: Model, params_b,
                 batches: Iterable[Mapping[str, Any]], *, layers_a: taps.Selector,
                 layers_b: taps.Selector, unit: str = 'tokens', mesh: Mesh | None = None,
                 apply_kwargs: Mapping[str, Any] | None = None,
                 apply_kwargs_b: Mapping[str, Any] | None = None) -> SimilarityMatrix:
  """Minibatch linear CKA between every selected layer of A and of B, over host batches.

  Args:
    model_a, params_a, model_b, params_b: the two models (modules or apply_fns).
    batches: dicts {'inputs': [batch, ...]}, every batch the same shape (one trace).
    layers_a, layers_b: lists of module paths or selectors (resolved on the first batch).
    unit: 'tokens' (default: every token/position of each input is an example) or
      'pooled' (the per-input mean over token/spatial axes).
    mesh: batches are sharded on its `data` axis and each device's share of a
      batch is one minibatch (Nguyen et al. Eq. 2 sums the unbiased HSIC over
      minibatches); it needs at least 4 rows. None: all local devices.
    apply_kwargs, apply_kwargs_b: keyword arguments of A's (and B's) apply.

  Returns:
    SimilarityMatrix('minibatch_cka', ...), values[i, j] in [-small, 1].

  Raises:
    ValueError: shapes that do not correspond under `unit`, fewer than 4 rows
      per device, non-finite activations (named, with the first batch), no batches.
  """
  units_lib.check_unit(unit)
  mesh = mesh_lib.data_mesh(mesh)
  kwargs_a, kwargs_b = _kwargs(apply_kwargs, apply_kwargs_b)
  state = {}

  def features(params_a, params_b, x):
    _, acts_a = capture_lib.capture(model_a, params_a, x, state['a'], apply_kwargs=kwargs_a)
    _, acts_b = capture_lib.capture(model_b, params_b, x, state['b'], apply_kwargs=kwargs_b)
    return ([units_lib.rows(acts_a[k], unit) for k in state['a']] +
            [units_lib.rows(acts_b[k], unit) for k in state['b']])

  def feature_batches():
    for batch in batches:
      check_batch(batch)
      x = mesh_lib.shard_batch(np.asarray(batch['inputs']), mesh)
      if not state:
        state['a'] = select_layers(model_a, params_a, x, layers_a, apply_kwargs=kwargs_a)
        state['b'] = select_layers(model_b, params_b, x, layers_b, apply_kwargs=kwargs_b)
        shapes = jax.eval_shape(
            lambda pa, pb, x: (capture_lib.capture(model_a, pa, x, state['a'],
                                                   apply_kwargs=kwargs_a)[1],
                               capture_lib.capture(model_b, pb, x, state['b'],
                                                   apply_kwargs=kwargs_b)[1]),
            params_a, params_b, x)
        for a in state['a']:
          for b in state['b']:
            units_lib.check_axes(shapes[0][a].shape, shapes[1][b].shape, unit,
                                 (f'A layer {a!r}', f'B layer {b!r}'))
        state['fn'] = jax.jit(features)  # one trace: every batch has the same shape
        state['params'] = jax.device_put((params_a, params_b), mesh_lib.replicated(mesh))
      feats = state['fn'](*state['params'], x)
      state['examples'] = state.get('examples', 0) + int(feats[0].shape[0])
      yield feats

  hsic, bad, first = streaming.accumulate_hsic(feature_batches(), mesh=mesh)
  names = [f'A layer {k!r}' for k in state['a']] + [f'B layer {k!r}' for k in state['b']]
  streaming.raise_if_non_finite(jax.device_get(bad), jax.device_get(first), names)
  values = alignment.cka_from_hsic(hsic, len(state['a']))
  return SimilarityMatrix('minibatch_cka', tuple(state['a']), tuple(state['b']),
                          np.asarray(values, np.float64), unit, state['examples'])
