"""A permutation null for a layer x layer linear CKA matrix: is an entry above chance?

Linear CKA between two unrelated representations is not 0: for independent
features it is about sqrt(d_x·d_y)/n when n ≫ d (n examples; Murphy et al.,
"Correcting Biased Centered Kernel Alignment Measures in Biological and
Artificial Neural Networks", 2024), and representations that share only
low-frequency structure (position in a context, a common offset) score higher
still. The reference is a permutation test (Good, "Permutation, Parametric and
Bootstrap Tests of Hypotheses", 2005, Ch. 3): break the correspondence between
A's and B's rows by permuting B's rows (one permutation per draw, the same for
every layer of B, so the draws of different entries are comparable),
recompute every entry, and report per entry the null mean, its 95th and 99th
percentiles and the p-value (1 + #{null ≥ observed}) / (1 + K), never 0
(Phipson & Smyth, "Permutation P-values Should Never Be Zero", 2010).

Two nulls (`null=`):

* 'windows' (default): whole blocks of `block` consecutive rows move together
  (a block is one window of text, `token_alignment.Windows`), keeping their
  order. The rows of a window are not exchangeable: adjacent tokens share
  context, and the k-th unit of every window sits at the same depth in its
  context, a structure both models have whatever they compute. Block
  permutation keeps that structure in the null, so an entry passes only when
  A and B agree beyond it: the conservative choice, and the default.
* 'units': every row moves independently. Its null is typically lower (it
  also destroys the shared position-in-window structure), so more entries
  pass; use it to ask whether anything is shared at all.

Computation. With K = XcXcᵀ/‖XcXcᵀ‖_F the centered, normalized Gram of a layer
(Xc column-centered), linear CKA is ⟨K_x, K_y⟩_F (Kornblith et al., ICML 2019,
Eq. 3-4 with linear kernels), and permuting the rows of Y by π gives
⟨K_x, K_y[π][:, π]⟩_F: centering and the norm commute with the permutation.
Every layer's Gram is formed once; a draw gathers the permuted Grams of the
side with fewer layers (permuting A's rows by π⁻¹ is the same pairing as B's
by π) and takes all entries in one [L_a, n²] x [n², L_b] product. `jax.lax.map`
runs the draws `chunk` at a time, so memory is the Grams, (L_a + L_b)·n²
floats, plus `chunk` permuted stacks, and a draw costs L_a·L_b·n²
multiply-adds (n = 2400, 30 x 18 layers: 3e9).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lossland.stitching import alignment

HIGHEST = jax.lax.Precision.HIGHEST
NULLS = ('windows', 'units')


def permutations(key: jax.Array, n: int, draws: int, *, block: int = 1) -> jax.Array:
  """[draws, n] int32 row permutations: of all n rows (block=1), or of n/block whole blocks.

  With block > 1, rows r·block .. (r+1)·block − 1 move together and keep their order.
  """
  if block < 1 or n % block:
    raise ValueError(f'block={block} must be a positive divisor of the {n} rows (each block is '
                     'one window of text: pass Windows.units_per_window)')
  blocks = n // block
  if blocks < 2:
    raise ValueError(f'{n} rows in blocks of {block} leave {blocks} block to permute; a '
                     "'windows' null needs at least 2 windows (use more windows, or null='units')")
  order = jax.vmap(lambda k: jax.random.permutation(k, blocks))(jax.random.split(key, draws))
  return (order[:, :, None] * block + jnp.arange(block)[None, None, :]).reshape(draws, n).astype(
      jnp.int32)


@jax.jit
def normalized_grams(feats: tuple[jax.Array, ...]) -> jax.Array:
  """[L, n, n]: each layer's centered Gram XcXcᵀ divided by its Frobenius norm (0 if constant)."""
  out = []
  for f in feats:
    xc, _ = alignment._center_scaled(f)  # pylint: disable=protected-access
    g = jnp.matmul(xc, xc.T, precision=HIGHEST)
    norm = jnp.linalg.norm(g)
    out.append(jnp.where(norm > 0, g / jnp.where(norm > 0, norm, 1.0), 0.0))
  return jnp.stack(out)


@functools.partial(jax.jit, static_argnames=('chunk',))
def _permuted(g_fixed, g_moved, perms, *, chunk: int):
  """[K, L_fixed, L_moved] of ⟨g_fixed, g_moved[π][:, π]⟩ for each π in perms."""
  flat = g_fixed.reshape(g_fixed.shape[0], -1)

  def one(p):
    moved = g_moved[:, p][:, :, p]
    return jax.lax.dot_general(flat, moved.reshape(moved.shape[0], -1), (((1,), (1,)), ((), ())),
                               precision=HIGHEST)  # contracts n² without a transposed copy

  return jax.lax.map(one, perms, batch_size=chunk)


def permuted_cka(xs: Sequence[jax.Array], ys: Sequence[jax.Array], perms: jax.Array, *,
                 chunk: int = 1, group: int = 0,
                 log: Callable[[str], None] | None = None) -> jax.Array:
  """[K, len(xs), len(ys)]: linear CKA of xs[i] with ys[j][perms[k]] (B's rows permuted).

  Equal to `linear_cka(xs[i], ys[j][perms[k]])` for every entry, to float32
  rounding. `chunk` draws are computed at once (memory: chunk permuted Gram
  stacks of the side with fewer layers); `group` > 0 runs the draws in host
  calls of that many (one compiled program), calling `log` after each.
  """
  _check(xs, ys)
  gx, gy = normalized_grams(tuple(xs)), normalized_grams(tuple(ys))
  return _null(gx, gy, jnp.asarray(perms, jnp.int32), chunk=chunk, group=group, log=log)


def _null(gx, gy, perms, *, chunk, group, log):
  flip = gy.shape[0] > gx.shape[0]  # permute the side with fewer layers
  if flip:  # X[π⁻¹] with Y pairs the rows as X with Y[π]
    gx, gy, perms = gy, gx, jnp.argsort(perms, axis=1).astype(jnp.int32)
  k = perms.shape[0]
  group = group or k
  padded = jnp.concatenate([perms, jnp.broadcast_to(perms[:1], (-k % group, perms.shape[1]))])
  out = []
  for start in range(0, k, group):
    out.append(_permuted(gx, gy, padded[start:start + group], chunk=chunk))
    if log:
      out[-1].block_until_ready()
      log(f'{min(start + group, k)}/{k} draws')
  out = jnp.concatenate(out)[:k]
  return out.transpose(0, 2, 1) if flip else out


@jax.jit
def _inner(gx, gy):
  """[L_x, L_y] ⟨gx_i, gy_j⟩_F: the CKA matrix from normalized Grams."""
  return jax.lax.dot_general(gx.reshape(gx.shape[0], -1), gy.reshape(gy.shape[0], -1),
                             (((1,), (1,)), ((), ())), precision=HIGHEST)


def _check(xs, ys) -> None:
  if not xs or not ys:
    raise ValueError('pass at least one feature matrix on each side')
  n = xs[0].shape[0]
  for name, f in [(f'xs[{i}]', x) for i, x in enumerate(xs)] + [
      (f'ys[{j}]', y) for j, y in enumerate(ys)]:
    if f.ndim != 2 or f.shape[0] != n:
      raise ValueError(f'{name} has shape {tuple(f.shape)}; every feature matrix must be '
                       f'[n={n}, d] rows of the same units in the same order')
  if n < 3:
    raise ValueError(f'{n} rows are too few for a permutation null; use more units')


@dataclasses.dataclass(frozen=True)
class CKANull:
  """Observed linear CKA [L_a, L_b] and its permutation null [K, L_a, L_b].

  Attributes:
    observed: [L_a, L_b] float64 linear CKA of the rows as paired.
    null: [K, L_a, L_b] float64, the CKA of each draw (B's rows permuted).
    kind: 'windows' or 'units'; block: rows per permuted block (1 for 'units').
  """
  observed: np.ndarray
  null: np.ndarray
  kind: str
  block: int

  @property
  def draws(self) -> int:
    return self.null.shape[0]

  @property
  def null_mean(self) -> np.ndarray:
    return self.null.mean(axis=0)

  @property
  def null_p95(self) -> np.ndarray:
    return np.percentile(self.null, 95, axis=0)

  @property
  def null_p99(self) -> np.ndarray:
    return np.percentile(self.null, 99, axis=0)

  @property
  def p_values(self) -> np.ndarray:
    """(1 + #{null ≥ observed}) / (1 + K) per entry, in [1/(K+1), 1]."""
    return (1 + (self.null >= self.observed[None]).sum(axis=0)) / (1 + self.draws)

  def above_chance(self, alpha: float = 0.01) -> np.ndarray:
    """[L_a, L_b] bool: p-value ≤ alpha (per entry, no correction for the L_a·L_b tests)."""
    return self.p_values <= alpha

  def to_dict(self) -> dict:
    """JSON-ready summary (the draws themselves are left out)."""
    return {'observed': self.observed.tolist(), 'null_mean': self.null_mean.tolist(),
            'null_p95': self.null_p95.tolist(), 'null_p99': self.null_p99.tolist(),
            'p_values': self.p_values.tolist(), 'null': self.kind, 'block': self.block,
            'draws': self.draws}


def cka_null(xs: Sequence[jax.Array], ys: Sequence[jax.Array], *, key: jax.Array,
             draws: int = 200, null: str = 'windows', block: int = 1,
             chunk: int = 1, group: int = 0,
             log: Callable[[str], None] | None = None) -> CKANull:
  """Linear CKA between every xs[i] and ys[j] and its permutation null (see the module docstring).

  Args:
    xs, ys: [n, d] features of the same n units, in the same order (e.g.
      `token_alignment.aligned_features` of A and of B).
    key: the PRNG key of the draws.
    draws: K, the number of permutations (p-values are multiples of 1/(K+1)).
    null: 'windows' (default; blocks of `block` rows move whole) or 'units'.
    block: rows per window (`Windows.units_per_window`); ignored for 'units'.
    chunk: draws computed at once (memory vs speed).
    group, log: draws per host call, and a progress callback after each (`permuted_cka`).

  The observed matrix is ⟨K_x, K_y⟩ of the same Grams as the draws (equal to
  `alignment.cka_matrix` to float32 rounding, for L_a·L_b·n² multiply-adds
  instead of its L_a·n·d_a·Σd_b). Raises ValueError naming a feature with NaN or inf.
  """
  if null not in NULLS:
    raise ValueError(f"unknown null {null!r}; use 'windows' (whole windows move, the default) "
                     "or 'units' (every unit moves)")
  if draws < 1:
    raise ValueError(f'draws={draws}; a permutation null needs at least one draw (e.g. 200)')
  _check(xs, ys)
  block = block if null == 'windows' else 1
  check_finite = alignment._check_finite  # pylint: disable=protected-access
  check_finite('cka_null', **{f'xs[{i}]': x for i, x in enumerate(xs)},
               **{f'ys[{j}]': y for j, y in enumerate(ys)})
  gx, gy = normalized_grams(tuple(xs)), normalized_grams(tuple(ys))
  observed = np.asarray(_inner(gx, gy), np.float64)
  perms = permutations(key, xs[0].shape[0], draws, block=block)
  values = np.asarray(_null(gx, gy, perms, chunk=chunk, group=group, log=log), np.float64)
  return CKANull(observed, values, null, block)
