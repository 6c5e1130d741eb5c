"""Centered kernel alignment (CKA): linear, RBF, debiased and minibatch.

Kornblith et al., "Similarity of Neural Network Representations Revisited"
(ICML 2019), Eq. 3-4: CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),
with K = X Xᵀ (linear) or an RBF kernel whose bandwidth is a multiple of the
median pairwise distance (Sec. 4). The debiased variant replaces HSIC by the
unbiased estimator of Song et al. (JMLR 2012, Eq. 5), which needs n >= 4
examples (denominators n-2 and n-3). Minibatch CKA (Nguyen et al., ICLR 2021,
Eq. 2) sums unbiased HSIC over minibatches before taking the ratio, so memory
is O(batch²), independent of n.

The unbiased HSIC can be zero or negative on small or degenerate inputs; the
ratio then has no meaning, and every function here returns 0 instead of NaN.
All functions are jit-safe; shape checks raise at trace time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def _check_pair(x: jax.Array, y: jax.Array) -> None:
  if x.ndim != 2 or y.ndim != 2:
    raise ValueError(f'expected [examples, features] matrices, got shapes {x.shape} and '
                     f'{y.shape}; flatten each example first (x.reshape(len(x), -1))')
  if x.shape[0] != y.shape[0]:
    raise ValueError(f'x has {x.shape[0]} examples but y has {y.shape[0]}; pass the '
                     'activations of the same inputs, in the same order')


def _check_unbiased(n: int) -> None:
  if n < 4:
    raise ValueError(f'the unbiased HSIC estimator needs at least 4 examples (its '
                     f'denominators are n-2 and n-3) but got n={n}; use a larger batch, or '
                     'debiased=False')


def gram_linear(x: jax.Array) -> jax.Array:
  """K = X Xᵀ. x: [n, d] -> [n, n]."""
  return jnp.matmul(x, x.T, precision=HIGHEST)


def gram_rbf(x: jax.Array, threshold: float = 1.0) -> jax.Array:
  """RBF kernel exp(-‖xi − xj‖² / (2σ²)), σ = threshold · median distance (Kornblith Sec. 4).

  A zero median (e.g. constant inputs) falls back to σ = threshold so no NaN appears.
  """
  sq = jnp.sum(x * x, axis=1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2 * gram_linear(x), 0.0)
  n = x.shape[0]
  rows, cols = np.triu_indices(n, 1) if n > 1 else (np.zeros(1, int), np.zeros(1, int))
  median = jnp.median(d2[rows, cols])  # off-diagonal squared distances (static indices: jit-safe)
  sigma2 = jnp.where(median > 0, threshold ** 2 * median, threshold ** 2)
  return jnp.exp(-d2 / (2 * sigma2))


def center_gram(k: jax.Array) -> jax.Array:
  """H K H with H = I − 11ᵀ/n."""
  k = k - k.mean(axis=0, keepdims=True)
  return k - k.mean(axis=1, keepdims=True)


def hsic_biased(k: jax.Array, l: jax.Array) -> jax.Array:
  """tr(K H L H) / (n−1)² (Gretton et al. 2005). k, l: [n, n] -> scalar."""
  n = k.shape[0]
  return jnp.sum(center_gram(k) * l) / (n - 1) ** 2


def hsic_unbiased(k: jax.Array, l: jax.Array) -> jax.Array:
  """Unbiased HSIC (Song et al. 2012, Eq. 5). k, l: [n, n], n >= 4 -> scalar.

  HSIC₁ = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)),
  where K̃, L̃ are K, L with zeroed diagonals.
  """
  n = k.shape[0]
  _check_unbiased(n)
  return _hsic_unbiased_many(k[None], l[None])[0, 0]


def _hsic_unbiased_many(ks: jax.Array, ls: jax.Array) -> jax.Array:
  """All-pairs unbiased HSIC. ks: [a, n, n], ls: [b, n, n] -> [a, b]."""
  n = ks.shape[-1]
  eye = jnp.eye(n, dtype=bool)
  ks = jnp.where(eye, 0.0, ks)
  ls = jnp.where(eye, 0.0, ls)
  trace = jnp.einsum('aij,bij->ab', ks, ls, precision=HIGHEST)  # K̃, L̃ symmetric
  ksum = ks.sum(axis=(1, 2))
  lsum = ls.sum(axis=(1, 2))
  krow = ks.sum(axis=2)  # [a, n]
  lrow = ls.sum(axis=2)  # [b, n]
  cross = jnp.matmul(krow, lrow.T, precision=HIGHEST)  # 1ᵀK̃L̃1
  out = trace + ksum[:, None] * lsum[None, :] / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross
  return out / (n * (n - 3))


def _ratio(kl: jax.Array, kk: jax.Array, ll: jax.Array) -> jax.Array:
  """kl / sqrt(kk·ll) with non-positive self-HSIC clamped: 0 where the ratio is undefined."""
  denom = jnp.sqrt(jnp.maximum(kk, 0.0) * jnp.maximum(ll, 0.0))
  tiny = jnp.finfo(denom.dtype).tiny
  return jnp.where(denom > tiny, kl / jnp.where(denom > tiny, denom, 1.0), 0.0)


def cka(x: jax.Array, y: jax.Array, *, kernel: str = 'linear', debiased: bool = False,
        rbf_threshold: float = 1.0) -> jax.Array:
  """CKA between representations x: [n, dx] and y: [n, dy] of the same n inputs.

  Args:
    kernel: 'linear' or 'rbf' (bandwidth `rbf_threshold` × median distance).
    debiased: use the unbiased HSIC estimator (needs n >= 4).

  Returns a scalar in [0, 1] for the biased estimator (the debiased one may dip
  below 0); 0 when either side has no variance. Jit-safe (`kernel`, `debiased` static).
  """
  _check_pair(x, y)
  if debiased:
    _check_unbiased(x.shape[0])
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  if kernel == 'linear' and not debiased:
    return linear_cka(x, y)
  if kernel == 'linear':
    k, l = gram_linear(x), gram_linear(y)
  elif kernel == 'rbf':
    k, l = gram_rbf(x, rbf_threshold), gram_rbf(y, rbf_threshold)
  else:
    raise ValueError(f"unknown kernel {kernel!r}; use 'linear' or 'rbf'")
  if debiased:
    h = _hsic_unbiased_many(jnp.stack([k, l]), jnp.stack([k, l]))
    return _ratio(h[0, 1], h[0, 0], h[1, 1])
  return _ratio(hsic_biased(k, l), hsic_biased(k, k), hsic_biased(l, l))


def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
  """Biased linear CKA in feature space (Kornblith Eq. 5), O(n·d²), never forms n×n.

  ‖YcᵀXc‖²_F / (‖XcᵀXc‖_F ‖YcᵀYc‖_F), with Xc, Yc column-centered.
  """
  _check_pair(x, y)
  x = x - x.mean(axis=0, keepdims=True)
  y = y - y.mean(axis=0, keepdims=True)
  xy = jnp.sum(jnp.matmul(x.T, y, precision=HIGHEST) ** 2)
  xx = jnp.linalg.norm(jnp.matmul(x.T, x, precision=HIGHEST))
  yy = jnp.linalg.norm(jnp.matmul(y.T, y, precision=HIGHEST))
  return _ratio(xy, xx ** 2, yy ** 2)


def _unbiased_hsic_from_features(feats: list[jax.Array], blocks: int) -> jax.Array:
  """All-pairs unbiased linear HSIC from features, never holding more than a Gram block.

  With K = X Xᵀ, the Song et al. (2012) terms need only: tr(K̃L̃) = ⟨K, L⟩ − Σᵢ KᵢᵢLᵢᵢ,
  1ᵀK̃1 = ‖Σᵢxᵢ‖² − Σᵢ‖xᵢ‖², and K̃1 = X(Σᵢxᵢ) − diag K. Only ⟨K, L⟩ needs Gram
  entries; K is symmetric, so we form its row blocks (p, q) with p <= q only and
  weight off-diagonal blocks by 2, which skips (blocks − 1)/(2·blocks) of the work.
  """
  n = feats[0].shape[0]
  b = n // blocks
  sq = jnp.stack([jnp.sum(f * f, axis=1) for f in feats])  # [F, n] = diag K
  sums = [jnp.sum(f, axis=0) for f in feats]
  total = jnp.stack([jnp.sum(s * s) for s in sums]) - sq.sum(axis=1)  # [F] 1ᵀK̃1
  rows = jnp.stack([jnp.matmul(f, s, precision=HIGHEST) for f, s in zip(feats, sums)]) - sq
  inner = jnp.zeros((len(feats), len(feats)), jnp.float32)
  for p in range(blocks):
    for q in range(p, blocks):
      g = jnp.stack([jnp.matmul(f[p * b:(p + 1) * b], f[q * b:(q + 1) * b].T, precision=HIGHEST)
                     for f in feats]).reshape(len(feats), -1)  # [F, b*b]
      inner = inner + (1.0 if p == q else 2.0) * jnp.matmul(g, g.T, precision=HIGHEST)
  trace = inner - jnp.matmul(sq, sq.T, precision=HIGHEST)  # tr(K̃L̃)
  cross = jnp.matmul(rows, rows.T, precision=HIGHEST)  # 1ᵀK̃L̃1
  out = trace + total[:, None] * total[None, :] / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross
  return out / (n * (n - 3))


def hsic_matrix_update(hsic: jax.Array, xs: list[jax.Array] | tuple[jax.Array, ...],
                       ys: list[jax.Array] | tuple[jax.Array, ...], *,
                       blocks: int | None = None) -> jax.Array:
  """Adds one minibatch's all-pairs unbiased linear HSIC to the running sums.

  Args:
    hsic: [a + b, a + b] running sum over minibatches (start from zeros); rows and
      columns index xs then ys, so the self-HSIC terms sit on the diagonal.
    xs: a list of [n, dx_i] minibatch features (e.g. the layers of model A).
    ys: a list of [n, dy_j] features of the same n inputs (e.g. the layers of B).
    blocks: row blocks for the symmetric Gram (default: 4, 2 or 1, whichever divides n).

  Jit-safe. Memory is O((a + b)·(n/blocks)²) for the minibatch, independent of the total n.
  """
  feats = list(xs) + list(ys)
  n = feats[0].shape[0]
  for f in feats:
    if f.ndim != 2 or f.shape[0] != n:
      raise ValueError(f'every feature matrix must be [n={n}, d]; got {f.shape}. Flatten each '
                       'example and pass the same inputs to every layer')
  _check_unbiased(n)
  if blocks is None:
    blocks = next(k for k in (4, 2, 1) if n % k == 0 and n // k >= 1)
  if n % blocks:
    raise ValueError(f'blocks={blocks} does not divide the minibatch size n={n}')
  feats = [f.astype(jnp.float32) for f in feats]
  return hsic + _unbiased_hsic_from_features(feats, blocks)


def cka_from_hsic(hsic: jax.Array, num_x: int) -> jax.Array:
  """Minibatch CKA matrix [num_x, a + b − num_x] from accumulated all-pairs HSIC sums."""
  diag = jnp.diagonal(hsic)
  kl = hsic[:num_x, num_x:]
  return _ratio(kl, diag[:num_x, None], diag[None, num_x:])


def cka_matrix(xs, ys, *, debiased: bool = False) -> jax.Array:
  """Full-batch linear CKA between every x in xs and y in ys -> [len(xs), len(ys)]."""
  if debiased:
    return cka_from_hsic(hsic_matrix_update(jnp.zeros((len(xs) + len(ys),) * 2), xs, ys), len(xs))
  return jnp.array([[linear_cka(x, y) for y in ys] for x in xs])
