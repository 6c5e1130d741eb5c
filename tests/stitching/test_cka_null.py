"""lossland.stitching.permutation_null: the permutation null of a layer x layer CKA matrix."""
import json

import jax
import numpy as np
import pytest

from lossland.stitching import alignment
from lossland.stitching import permutation_null as cka_null


def _features(rng, n, dims):
  return [rng.normal(size=(n, d)).astype(np.float32) for d in dims]


def _linear_cka(x, y):
  """Kornblith et al. (2019) Eq. 5 in float64 NumPy: the reference."""
  x, y = (np.asarray(v, np.float64) - np.mean(v, 0) for v in (x, y))
  return np.sum((x.T @ y) ** 2) / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


@pytest.mark.parametrize('dims_a,dims_b,block', [((5, 7, 3), (4, 6), 1), ((4,), (6, 3), 6)])
def test_null_equals_a_loop_over_permuted_rows(dims_a, dims_b, block):
  # Both orientations (the side with fewer layers is the one permuted inside) and block moves.
  rng = np.random.default_rng(0)
  xs, ys = _features(rng, 36, dims_a), _features(rng, 36, dims_b)
  ys[0] = ys[0] + 3 * xs[0][:, :1]  # a related pair, so the values are not all tiny
  perms = cka_null.permutations(jax.random.key(1), 36, 4, block=block)
  got = np.asarray(cka_null.permuted_cka(xs, ys, perms, group=2))
  want = np.array([[[_linear_cka(x, y[np.asarray(p)]) for y in ys] for x in xs]
                   for p in perms])
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_block_permutations_move_whole_windows():
  perms = np.asarray(cka_null.permutations(jax.random.key(0), 24, 50, block=4))
  assert perms.shape == (50, 24)
  assert all(sorted(p) == list(range(24)) for p in perms)
  blocks = perms.reshape(50, 6, 4)
  np.testing.assert_array_equal(blocks - blocks[:, :, :1],
                                np.broadcast_to(np.arange(4), (50, 6, 4)))
  assert np.all(blocks[:, :, 0] % 4 == 0)
  assert len({tuple(p) for p in perms}) > 40  # draws differ


def test_p_values_are_uniform_for_independent_features_and_tiny_for_identical_ones():
  rng = np.random.default_rng(0)
  xs, ys = _features(rng, 60, (3,) * 6), _features(rng, 60, (3,) * 6)
  for kind in ('units', 'windows'):  # iid rows are exchangeable under both nulls
    res = cka_null.cka_null(xs, ys, key=jax.random.key(2), draws=99, null=kind, block=6)
    p = res.p_values.ravel()
    assert 0.35 < p.mean() < 0.65 and np.mean(p <= 0.05) < 0.15, (kind, p)
    assert np.all(p >= 1 / 100)
  same = cka_null.cka_null(xs[:3], xs[:3], key=jax.random.key(3), draws=99, null='units')
  np.testing.assert_allclose(np.diag(same.observed), 1.0, atol=1e-6)
  np.testing.assert_array_equal(np.diag(same.p_values), 1 / 100)
  assert np.all(np.diag(same.null_p99) < 0.5)


def test_summary_matches_the_draws_and_the_existing_cka():
  rng = np.random.default_rng(1)
  xs, ys = _features(rng, 40, (4, 5)), _features(rng, 40, (6,))
  res = cka_null.cka_null(xs, ys, key=jax.random.key(0), draws=30, null='windows', block=8)
  np.testing.assert_allclose(res.observed, alignment.cka_matrix(xs, ys), atol=1e-7)
  np.testing.assert_allclose(res.null_mean, res.null.mean(0))
  np.testing.assert_allclose(res.null_p95, np.percentile(res.null, 95, axis=0))
  np.testing.assert_array_equal(res.p_values,
                                (1 + (res.null >= res.observed).sum(0)) / 31)
  assert res.null.shape == (30, 2, 1) and res.block == 8 and res.draws == 30
  d = json.loads(json.dumps(res.to_dict()))
  assert d['null'] == 'windows' and len(d['p_values']) == 2


def test_bad_arguments_are_named():
  x = [np.zeros((12, 2), np.float32)]
  with pytest.raises(ValueError, match="unknown null 'rows'"):
    cka_null.cka_null(x, x, key=jax.random.key(0), null='rows')
  with pytest.raises(ValueError, match='block=5 must be a positive divisor of the 12 rows'):
    cka_null.cka_null(x, x, key=jax.random.key(0), block=5)
  with pytest.raises(ValueError, match='ys\\[0\\] has shape \\(11, 2\\)'):
    cka_null.cka_null(x, [np.zeros((11, 2))], key=jax.random.key(0))
