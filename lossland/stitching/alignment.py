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

Numerics (float32): every index is invariant to translating and scaling the
features, and the implementation keeps that in float32. Features are
column-centered first (the unbiased estimator is exactly invariant to it, per
minibatch, so nothing is approximated) and multiplied by an exact power of two
that brings their largest entry into [1, 2), so activation scales far outside
1e-3..1e3 neither overflow nor underflow. (Minibatch HSIC sums are kept in the
input's units, HSIC ∝ scale⁴, which float32 holds for scales of about 1e-8 to
1e7.) RBF distances are formed after centering.

Non-finite activations: called on concrete arrays (eagerly), every index raises
one ValueError naming the input and its count of NaN and inf entries. Under
`jax.jit` a Python error cannot depend on values, so a traced call returns NaN
instead (never a plausible number); call the function outside `jit`, or check
the activations first, to get the error. All functions are jit-safe; shape
checks raise at trace time.
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
  if x.shape[0] == 0 or x.shape[1] == 0 or y.shape[1] == 0:
    raise ValueError(f'x {tuple(x.shape)} and y {tuple(y.shape)} leave nothing to compare: a '
                     'similarity index needs at least one example and one feature on each '
                     'side (was a batch empty, or a layer selected with no features?)')


def _check_finite(where: str, **arrays) -> None:
  """Raises ValueError naming each concrete input that holds NaN or inf, with the counts.

  Traced inputs are skipped (a traced value cannot raise): `_nan_unless_finite`
  makes those results NaN.
  """
  for name, a in arrays.items():
    if isinstance(a, jax.core.Tracer):
      continue
    if isinstance(a, jax.Array):  # count on device: two scalars come back, not the array
      nan, inf = (int(v) for v in jax.device_get((jnp.isnan(a).sum(), jnp.isinf(a).sum())))
    else:
      a = np.asarray(a)
      nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    if nan or inf:
      raise ValueError(f'{where}: {name} has {nan + inf} non-finite entries ({nan} NaN, {inf} '
                       f'inf) among its {np.size(a)}; similarity indices need finite '
                       'activations. Find where the model produces them (a diverged checkpoint, '
                       'an overflowing dtype) or drop those examples')


@jax.jit
def _nan_unless_finite(value: jax.Array, *arrays: jax.Array) -> jax.Array:
  """value, or NaN if any input has a non-finite entry (the traced counterpart of the check)."""
  finite = jnp.all(jnp.stack([jnp.isfinite(a).all() for a in arrays]))
  return jnp.where(finite, value, jnp.nan)


@jax.jit  # one small program per shape, not a dozen eager ops
def _center_scaled(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(xs, p) with x = xs·p + column means: centered float32 x, largest |entry| in [1, 2).

  Two centering passes (the second removes the first one's rounding); constant
  columns (max == min) become exactly 0, so they carry no rounding noise that the
  scaling would blow up. p is the power of two at or below the largest |entry|
  (its exponent bits), so dividing by it is exact; 1 for an all-zero x.
  """
  x = x.astype(jnp.float32)
  const = x.max(axis=0) == x.min(axis=0)
  x = x - x.mean(axis=0, keepdims=True)
  x = jnp.where(const, 0.0, x - x.mean(axis=0, keepdims=True))
  bits = jax.lax.bitcast_convert_type(jnp.max(jnp.abs(x)), jnp.int32) & 0x7F800000
  p = jax.lax.bitcast_convert_type(bits, jnp.float32)
  p = jnp.where(p > 0, p, 1.0)
  return x * (1.0 / p), p


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

  Distances are formed from the centered, power-of-two-scaled x (both leave the
  kernel unchanged), so large offsets keep their precision. A zero median (e.g.
  constant inputs) falls back to σ = threshold so no NaN appears.
  """
  x, _ = _center_scaled(x)
  sq = jnp.sum(x * x, axis=1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2 * gram_linear(x), 0.0)
  n = x.shape[0]
  rows, cols = np.triu_indices(n, 1) if n > 1 else (np.zeros(1, int), np.zeros(1, int))
  median = jnp.median(d2[rows, cols])  # off-diagonal squared distances (static indices: jit-safe)
  sigma2 = jnp.where(median > 0, threshold ** 2 * median, threshold ** 2)
  return jnp.exp(-d2 / (2 * sigma2))


def center_gram(k: jax.Array) -> jax.Array:
  """H K H with H = I − 11ᵀ/n (over the last two axes, so a stack of Grams works too)."""
  k = k - k.mean(axis=-2, keepdims=True)
  return k - k.mean(axis=-1, keepdims=True)


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
  """All-pairs unbiased HSIC. ks: [a, n, n], ls: [b, n, n] -> [a, b].

  The Grams are double-centered first: the estimator is exactly invariant to
  K_ij -> K_ij + f(i) + f(j) + c, and centered Grams keep its sums from cancelling.
  """
  n = ks.shape[-1]
  ks, ls = center_gram(ks.astype(jnp.float32)), center_gram(ls.astype(jnp.float32))
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
  """kl / sqrt(kk·ll): 0 where a self-HSIC is not positive, NaN where any term is non-finite.

  The square roots are taken separately, so kk·ll is never formed (it overflows first).
  """
  denom = jnp.sqrt(jnp.maximum(kk, 0.0)) * jnp.sqrt(jnp.maximum(ll, 0.0))
  tiny = jnp.finfo(denom.dtype).tiny
  value = jnp.where(denom > tiny, kl / jnp.where(denom > tiny, denom, 1.0), 0.0)
  finite = jnp.isfinite(kl) & jnp.isfinite(kk) & jnp.isfinite(ll)
  return jnp.where(finite, value, jnp.nan)


def cka(x: jax.Array, y: jax.Array, *, kernel: str = 'linear', debiased: bool = False,
        rbf_threshold: float = 1.0) -> jax.Array:
  """CKA between representations x: [n, dx] and y: [n, dy] of the same n inputs.

  Args:
    kernel: 'linear' or 'rbf' (bandwidth `rbf_threshold` × median distance).
    debiased: use the unbiased HSIC estimator (needs n >= 4).

  Returns a scalar in [0, 1] for the biased estimator (the debiased one may dip
  below 0); 0 when either side has no variance. Raises ValueError on NaN or inf
  in concrete inputs; NaN under `jit` (see the module docstring). Jit-safe
  (`kernel`, `debiased` static).
  """
  _check_pair(x, y)
  if kernel not in ('linear', 'rbf'):
    raise ValueError(f"unknown kernel {kernel!r}; use 'linear' or 'rbf'")
  if debiased:
    _check_unbiased(x.shape[0])
  _check_finite('cka', x=x, y=y)
  if kernel == 'linear' and not debiased:
    return _linear_cka(x, y)
  return _gram_cka(x, y, rbf_threshold, kernel=kernel, debiased=debiased)


def _gram_cka(x, y, rbf_threshold, *, kernel: str, debiased: bool) -> jax.Array:
  if kernel == 'linear':
    (xc, _), (yc, _) = _center_scaled(x), _center_scaled(y)
    k, l = gram_linear(xc), gram_linear(yc)
  else:
    k, l = gram_rbf(x, rbf_threshold), gram_rbf(y, rbf_threshold)
  if debiased:
    h = _hsic_unbiased_many(jnp.stack([k, l]), jnp.stack([k, l]))
    value = _ratio(h[0, 1], h[0, 0], h[1, 1])
  else:
    value = _ratio(hsic_biased(k, l), hsic_biased(k, k), hsic_biased(l, l))
  # A constant side has no variance: 0 exactly, not the ratio of two rounding residues
  # (an all-ones RBF Gram centers to ~1e-8 under XLA's fused reductions, not to 0).
  value = jnp.where(_is_constant(x) | _is_constant(y), 0.0, value)
  return _nan_unless_finite(value, x, y)


def _is_constant(x: jax.Array) -> jax.Array:
  """True if every example has the same features (exact: each column's max equals its min)."""
  return jnp.all(x.max(axis=0) == x.min(axis=0))


def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
  """Biased linear CKA in feature space (Kornblith Eq. 5), O(n·d²), never forms n×n.

  ‖YcᵀXc‖²_F / (‖XcᵀXc‖_F ‖YcᵀYc‖_F), with Xc, Yc column-centered (and scaled by
  a power of two, so activations of any scale neither overflow nor underflow).
  Raises ValueError on NaN or inf in concrete inputs; NaN under `jit`.
  """
  _check_pair(x, y)
  _check_finite('linear_cka', x=x, y=y)
  return _linear_cka(x, y)


def _linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
  (xc, _), (yc, _) = _center_scaled(x), _center_scaled(y)
  xy = jnp.sum(jnp.matmul(xc.T, yc, precision=HIGHEST) ** 2)
  xx = jnp.linalg.norm(jnp.matmul(xc.T, xc, precision=HIGHEST))
  yy = jnp.linalg.norm(jnp.matmul(yc.T, yc, precision=HIGHEST))
  return _nan_unless_finite(_ratio(xy, xx ** 2, yy ** 2), x, y)


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

  Each feature is centered and power-of-two scaled within the minibatch (the
  unbiased HSIC is exactly invariant to the centering; the scale is multiplied
  back exactly), so offsets and activation scales cost no float32 precision.
  Raises ValueError naming `xs[i]` / `ys[j]` on NaN or inf in concrete inputs;
  under `jit`, the rows and columns of a non-finite feature are NaN.

  Jit-safe. Memory is O((a + b)·(n/blocks)²) for the minibatch, independent of the total n.
  """
  named = {f'xs[{i}]': f for i, f in enumerate(xs)} | {f'ys[{j}]': f for j, f in enumerate(ys)}
  feats = list(named.values())
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
  _check_finite('hsic_matrix_update', **named)
  return hsic + _minibatch_hsic(tuple(feats), blocks=blocks)


def _minibatch_hsic(feats: tuple[jax.Array, ...], *, blocks: int) -> jax.Array:
  """All-pairs unbiased HSIC of one minibatch in the input's units; NaN rows for non-finite."""
  scaled = [_center_scaled(f) for f in feats]
  out = _unbiased_hsic_from_features([f for f, _ in scaled], blocks)
  p = jnp.stack([p for _, p in scaled])
  out = out * (p[:, None] * p[None, :]) ** 2  # back to the input's units: powers of 2, exact
  bad = jnp.stack([~jnp.isfinite(f).all() for f in feats])
  return jnp.where(bad[:, None] | bad[None, :], jnp.nan, out)


def cka_from_hsic(hsic: jax.Array, num_x: int) -> jax.Array:
  """Minibatch CKA matrix [num_x, a + b − num_x] from accumulated all-pairs HSIC sums."""
  diag = jnp.diagonal(hsic)
  kl = hsic[:num_x, num_x:]
  return _ratio(kl, diag[:num_x, None], diag[None, num_x:])


def cka_matrix(xs, ys, *, debiased: bool = False) -> jax.Array:
  """Full-batch linear CKA between every x in xs and y in ys -> [len(xs), len(ys)].

  The biased form computes each layer's centered features and self term
  ‖XcᵀXc‖²_F once, and every cross term ‖XcᵢᵀYcⱼ‖²_F from one product of Xcᵢ
  with all the Yc side by side, in one compiled program: L_x + L_y + L_x
  products instead of 3 per pair. Each value equals `linear_cka(x, y)` to
  float32 rounding.

  Raises ValueError naming `xs[i]` / `ys[j]` on NaN or inf in concrete inputs.
  """
  if debiased:
    return cka_from_hsic(hsic_matrix_update(jnp.zeros((len(xs) + len(ys),) * 2), xs, ys), len(xs))
  for i, x in enumerate(xs):
    for j, y in enumerate(ys):
      _check_pair(x, y)
  out = _linear_cka_matrix(tuple(xs), tuple(ys))
  # Non-finite inputs give NaN rows/columns; only then are the inputs counted, to name them.
  if not isinstance(out, jax.core.Tracer) and not bool(jnp.isfinite(out).all()):
    _check_finite('cka_matrix', **{f'xs[{i}]': x for i, x in enumerate(xs)},
                  **{f'ys[{j}]': y for j, y in enumerate(ys)})
  return out


def _squared_norm_of_gram(x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.matmul(x.T, x, precision=HIGHEST) ** 2)


@jax.jit
def _linear_cka_matrix(xs: tuple[jax.Array, ...], ys: tuple[jax.Array, ...]) -> jax.Array:
  xcs = [_center_scaled(x)[0] for x in xs]
  ycs = [_center_scaled(y)[0] for y in ys]
  xx = jnp.stack([_squared_norm_of_gram(x) for x in xcs])  # [L_x] ‖XcᵀXc‖²_F
  yy = jnp.stack([_squared_norm_of_gram(y) for y in ycs])  # [L_y]
  ends = np.cumsum([y.shape[1] for y in ycs])
  side_by_side = jnp.concatenate(ycs, axis=1)  # [n, Σ d_y]
  rows = []
  for x in xcs:
    squares = jnp.sum(jnp.matmul(x.T, side_by_side, precision=HIGHEST) ** 2, axis=0)
    rows.append(jnp.stack([s.sum() for s in jnp.split(squares, ends[:-1])]))
  xy = jnp.stack(rows)  # [L_x, L_y] ‖XcᵢᵀYcⱼ‖²_F
  value = _ratio(xy, xx[:, None], yy[None, :])
  finite_x = jnp.stack([jnp.isfinite(x).all() for x in xs])
  finite_y = jnp.stack([jnp.isfinite(y).all() for y in ys])
  return jnp.where(finite_x[:, None] & finite_y[None, :], value, jnp.nan)
