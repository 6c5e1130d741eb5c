"""lossland.lowrank.factorize and budget: factors against exact float64 SVD references."""
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import lowrank


def _w0(d_in=12, d_out=9, seed=0):
  return jax.random.normal(jax.random.key(seed), (d_in, d_out)) / np.sqrt(d_in)


def _svd_tol(w, *cuts: int) -> float:
  """Float32 rounding allowance for products of truncated-SVD factors of `w`, any LAPACK.

  A float32 SVD is exact for some W + E with ‖E‖ about c·√n·eps·‖W‖₂
  (statistical rounding estimate, c = 4). Truncating at rank r amplifies E by
  about 1 + ‖W‖₂ / gap_r, gap_r = s_r − s_{r+1} (first-order perturbation of
  the singular subspace, Wedin), for each cut the quantity depends on.
  """
  s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
  tol = 4 * np.sqrt(max(np.shape(w))) * np.finfo(np.float32).eps * s[0]
  for r in cuts:
    if r < len(s):
      tol *= 1 + s[0] / (s[r - 1] - s[r])
  return tol


@pytest.mark.parametrize('shape', [(12, 9), (9, 12), (8, 8)])
def test_full_rank_svd_factors_reproduce_w0(shape):
  w0 = _w0(*shape)
  a, b = lowrank.svd_factors(w0, min(shape))
  assert a.shape == (shape[0], min(shape)) and b.shape == (min(shape), shape[1])
  np.testing.assert_allclose(a @ b, w0, atol=_svd_tol(w0))


def test_full_rank_lost_without_sparse_part_reproduces_w0():
  w0 = _w0()
  f = lowrank.lost_factors(w0, 9, 0)
  assert f.sparse_values.shape == (0, 9) and f.channel_idx.shape == (0,)
  np.testing.assert_allclose(f.a @ f.b, w0, atol=_svd_tol(w0))


@pytest.mark.parametrize('rank', [1, 3, 6])
def test_svd_factors_are_the_best_rank_r_approximation(rank):
  w0 = np.asarray(_w0(), np.float64)
  a, b = lowrank.svd_factors(jnp.asarray(w0, jnp.float32), rank)
  u, s, vt = np.linalg.svd(w0, full_matrices=False)
  exact = (u[:, :rank] * s[:rank]) @ vt[:rank]
  np.testing.assert_allclose(np.asarray(a @ b), exact, atol=_svd_tol(w0, rank))
  # √Σ split evenly: both factors carry the same singular values (each within ‖E‖ of exact).
  tol = _svd_tol(w0) / (2 * np.sqrt(s[rank - 1]))
  np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.sqrt(s[:rank]), atol=tol)
  np.testing.assert_allclose(np.linalg.norm(b, axis=1), np.sqrt(s[:rank]), atol=tol)


@pytest.mark.parametrize('sparse_from', ['w0', 'residual'])
def test_lost_channel_scores_match_exact_residual(sparse_from):
  w0 = np.asarray(_w0(16, 10), np.float64)
  rank, k, n_s = 3, 4, 5
  f = lowrank.lost_factors(jnp.asarray(w0, jnp.float32), rank, n_s, residual_rank=k,
                           sparse_from=sparse_from)
  u, s, vt = np.linalg.svd(w0, full_matrices=False)
  w_comp = (u[:, rank:rank + k] * s[rank:rank + k]) @ vt[rank:rank + k]
  scores = np.linalg.norm(w_comp, axis=1)  # one per input channel (kernel row)
  residual_tol = _svd_tol(w0, rank, rank + k)  # W_comp depends on both cuts
  np.testing.assert_allclose(f.channel_scores, scores, atol=residual_tol)
  expected = np.sort(np.argsort(-scores)[:n_s])
  np.testing.assert_array_equal(f.channel_idx, expected)
  if sparse_from == 'w0':
    np.testing.assert_array_equal(f.sparse_values, np.float32(w0)[expected])
  else:
    np.testing.assert_allclose(f.sparse_values, w_comp[expected], atol=residual_tol)
  np.testing.assert_allclose(f.a @ f.b, (u[:, :rank] * s[:rank]) @ vt[:rank],
                             atol=_svd_tol(w0, rank))


def test_lost_residual_of_full_rank_w0_is_not_degenerate():
  # The trap: decomposing a rebuilt low-rank weight gives a zero residual.
  w0 = _w0(16, 10)
  good = lowrank.lost_factors(w0, 3, 4)
  assert float(good.channel_scores.min()) > 1e-3
  a, b = lowrank.svd_factors(w0, 3)
  trap = lowrank.lost_factors(a @ b, 3, 4)
  assert float(trap.channel_scores.max()) < 1e-4


@hypothesis.settings(deadline=None, max_examples=8)
@hypothesis.given(seed=st.integers(0, 10_000), rank=st.integers(1, 5))
def test_lowrank_approx_is_rotation_equivariant(seed, rank):
  """approx_r(Q W) = Q approx_r(W) for orthogonal Q; channel scores permute with the rows."""
  w0 = _w0(8, 6, seed)
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(seed + 1), (8, 8)))
  a, b = lowrank.svd_factors(w0, rank)
  qa, qb = lowrank.svd_factors(q @ w0, rank)
  # Two independent float32 SVDs (W and QW), each within the truncation bound.
  np.testing.assert_allclose(qa @ qb, q @ (a @ b), atol=2 * _svd_tol(w0, rank))
  perm = np.random.default_rng(seed).permutation(8)
  f = lowrank.lost_factors(w0, rank, 2, residual_rank=1)
  fp = lowrank.lost_factors(w0[perm], rank, 2, residual_rank=1)
  np.testing.assert_allclose(fp.channel_scores, f.channel_scores[perm],
                             atol=2 * _svd_tol(w0, rank, rank + 1))


def test_factor_errors_name_the_layer():
  w0 = _w0(6, 4)
  with pytest.raises(ValueError, match="layer 'blk/q'.*rank 5"):
    lowrank.svd_factors(w0, 5, layer='blk/q')
  with pytest.raises(ValueError, match="layer 'blk/q'.*7 sparse channels"):
    lowrank.lost_factors(w0, 2, 7, layer='blk/q')
  with pytest.raises(ValueError, match='residual_rank 3'):
    lowrank.lost_factors(w0, 2, 1, residual_rank=3, layer='blk/q')
  with pytest.raises(ValueError, match='no residual subspace'):
    lowrank.lost_factors(w0, 4, 1, layer='blk/q')


def test_sltrain_support_is_distinct_sorted_and_sized():
  s = lowrank.sltrain_support(np.random.default_rng(0), 10, 7, 20)
  assert len(np.unique(s)) == 20 and np.all(np.diff(s) > 0) and s.max() < 70


@pytest.mark.parametrize('d_in,d_out', [(256, 256), (256, 688), (688, 256), (512, 1376)])
def test_budget_formulas(d_in, d_out):
  dense = d_in * d_out
  lost = lowrank.plan('lost', d_in, d_out, param_fraction=0.5, sparsity=0.05)
  n_s = int(0.05 * d_in)
  assert lost.num_channels == n_s
  assert lost.params == lost.rank * (d_in + d_out) + n_s * d_out <= 0.5 * dense
  assert lost.params + d_in + d_out > 0.5 * dense  # the largest rank within budget
  assert lost.residual_rank == min(lost.rank, min(d_in, d_out) - lost.rank)
  assert lost.flops_per_token == 2 * lost.rank * (d_in + d_out) + 2 * n_s * d_out
  r = lowrank.equal_param_rank(lost)
  assert r * (d_in + d_out) <= lost.params < (r + 1) * (d_in + d_out)
  sl = lowrank.plan('sltrain', d_in, d_out, param_fraction=0.5, density=0.03)
  assert sl.nnz == round(0.03 * dense) and sl.params <= 0.5 * dense
  assert sl.flops_per_token == 2 * dense
  assert lowrank.plan('dense', d_in, d_out).params == dense


def test_budget_errors_name_the_layer():
  with pytest.raises(ValueError, match="layer 'b0/mlp/up'.*rank 300"):
    lowrank.plan('lowrank', 256, 688, rank=300, layer='b0/mlp/up')
  with pytest.raises(ValueError, match="layer 'b0/attn/out'.*no room"):
    lowrank.plan('lost', 64, 64, param_fraction=0.3, sparsity=0.5, layer='b0/attn/out')
  with pytest.raises(ValueError, match="layer 'x'.*sparsity 1.5"):
    lowrank.plan('lost', 64, 64, param_fraction=0.5, sparsity=1.5, layer='x')
  with pytest.raises(ValueError, match='unknown low-rank kind'):
    lowrank.plan('butterfly', 4, 4)


@pytest.mark.parametrize('rank', [0, -1])
def test_rank_below_one_is_a_clear_error(rank):
  w0 = _w0(6, 4)
  needle = f"layer 'blk/q': rank {rank} must be at least 1"
  with pytest.raises(ValueError, match=needle):
    lowrank.svd_factors(w0, rank, layer='blk/q')
  with pytest.raises(ValueError, match=needle):
    lowrank.lost_factors(w0, rank, 1, layer='blk/q')
  with pytest.raises(ValueError, match=needle):
    lowrank.plan('lowrank', 6, 4, rank=rank, layer='blk/q')
  with pytest.raises(ValueError, match=f'rank {rank} must be at least 1'):  # was ZeroDivisionError
    lowrank.xavier_factors(jax.random.key(0), 6, 4, rank)
