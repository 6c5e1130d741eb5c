"""Pure functions from a full-rank initial weight W0 to low-rank (+ sparse) factors.

Conventions follow flax: a kernel is `[d_in, d_out]` and a layer computes
`y = x @ W`. An *input channel* i is therefore row i of the kernel (column i of
the `[d_out, d_in]` matrix in the papers' `y = W x` notation).

- `svd_factors`: W0 ≈ A B with A = U_r √Σ_r, B = √Σ_r V_rᵀ, the best rank-r
  approximation (Eckart–Young), √Σ split between the factors.
- `lost_factors`: LOST (Li et al. 2025, "LOST: Low-rank and Sparse
  Pre-training for LLMs", Sec. 3): the same top-r factors, plus a channel-wise
  sparse part: input channels are scored by the L2 norm of their row in the
  residual W_comp = Σ_{r<i≤r+k} σ_i u_i v_iᵀ and the top `num_channels` are
  kept as static indices with values taken from W0 (or W_comp).
- `xavier_factors`: random factors, each Glorot-uniform (Glorot & Bengio 2010).
- `sltrain_support`: SLTrain's fixed random unstructured support (Han et al.
  2024, "SLTrain", eq. 3: W = B A·α/r + S).

All functions take W0 explicitly: decompose the *full-rank* W0 drawn from the
dense layer's initializer. Taking the SVD of a weight rebuilt from low-rank
factors gives a residual of ≈ 0 and meaningless channel scores.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lossland.lowrank import budget


def _xp(w0):
  """numpy for host arrays (used eagerly by the layers' init, no compilation), else jax.numpy."""
  return np if isinstance(w0, np.ndarray) else jnp


def _check_rank(shape: tuple[int, int], rank: int, layer: str) -> None:
  full = min(shape)
  if rank < 1:
    raise ValueError(f'layer {layer!r}: rank {rank} must be at least 1 for a kernel of shape '
                     f'{tuple(shape)}; choose a rank in [1, {full}]')
  if rank > full:
    raise ValueError(f'layer {layer!r}: rank {rank} is outside [1, {full}] for a kernel of shape '
                     f'{tuple(shape)}; choose a rank of at most min(d_in, d_out) = {full} or a '
                     'smaller param_fraction')


def svd_factors(w0: jax.Array, rank: int, *, layer: str = '?') -> tuple[jax.Array, jax.Array]:
  """Top-`rank` SVD factors of `w0` with √Σ split evenly: `a @ b` is the best rank-r approx.

  Jit-safe with `rank` static; a numpy `w0` is decomposed in numpy on the host.

  Args:
    w0: [d_in, d_out] full-rank weight.
    rank: number of singular components kept, 1 ≤ rank ≤ min(d_in, d_out).
    layer: name used in error messages.

  Returns:
    a: [d_in, rank] = U_r √Σ_r; b: [rank, d_out] = √Σ_r V_rᵀ.
  """
  _check_rank(w0.shape, rank, layer)
  xp = _xp(w0)
  u, s, vt = xp.linalg.svd(w0, full_matrices=False)  # u [d_in, m], s [m], vt [m, d_out]
  root = xp.sqrt(s[:rank])
  return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


class LostFactors(NamedTuple):
  """LOST's initial factors of one layer."""
  a: jax.Array  # [d_in, rank]
  b: jax.Array  # [rank, d_out]
  sparse_values: jax.Array  # [num_channels, d_out]
  channel_idx: jax.Array  # [num_channels] int32, ascending: the kept input channels
  channel_scores: jax.Array  # [d_in] ‖W_comp[i, :]‖₂ for every input channel


def lost_factors(w0: jax.Array, rank: int, num_channels: int, *, residual_rank: int | None = None,
                 sparse_from: str = 'w0', layer: str = '?') -> LostFactors:
  """LOST initialization (Sec. 3): SVD low-rank factors + channel-wise sparse complement.

  Jit-safe with `rank`, `num_channels`, `residual_rank`, `sparse_from` static
  (the returned indices are then traced). Given a numpy `w0` it computes in
  numpy on the host, which is how the layers keep the indices static.

  Args:
    w0: [d_in, d_out] full-rank initial weight.
    rank: r, the number of top singular components that become the factors.
    num_channels: ⌊s·d_in⌋, how many input channels the sparse part keeps (0 allowed).
    residual_rank: k, the components r+1..r+k that form W_comp (default
      min(r, min(d_in, d_out) − r)).
    sparse_from: 'w0' (default) or 'residual': where the kept rows' initial values come from.
    layer: name used in error messages.
  """
  d_in, d_out = w0.shape
  full = min(d_in, d_out)
  _check_rank(w0.shape, rank, layer)
  if not 0 <= num_channels <= d_in:
    raise ValueError(f'layer {layer!r}: {num_channels} sparse channels requested but the layer '
                     f'has d_in = {d_in} input channels; lower the sparsity')
  if sparse_from not in ('w0', 'residual'):
    raise ValueError(f"sparse_from must be 'w0' or 'residual', got {sparse_from!r}")
  k = budget.lost_residual_rank(rank, full, residual_rank, num_channels, layer)
  xp = _xp(w0)
  u, s, vt = xp.linalg.svd(w0, full_matrices=False)
  root = xp.sqrt(s[:rank])
  a, b = u[:, :rank] * root[None, :], root[:, None] * vt[:rank]
  w_comp = (u[:, rank:rank + k] * s[None, rank:rank + k]) @ vt[rank:rank + k]  # [d_in, d_out]
  scores = xp.linalg.norm(w_comp, axis=1)  # [d_in]
  idx = xp.sort(xp.argsort(-scores, stable=True)[:num_channels]).astype(xp.int32)
  source = w0 if sparse_from == 'w0' else w_comp
  return LostFactors(a, b, source[idx], idx, scores)


def xavier_factors(key: jax.Array, d_in: int, d_out: int, rank: int,
                   dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """Independent Glorot-uniform factors a [d_in, rank], b [rank, d_out]. Jit-safe."""
  _check_rank((d_in, d_out), rank, '?')
  ka, kb = jax.random.split(key)
  init = jax.nn.initializers.glorot_uniform()
  return init(ka, (d_in, rank), dtype), init(kb, (rank, d_out), dtype)


def sltrain_support(rng: np.random.Generator, d_in: int, d_out: int, nnz: int) -> np.ndarray:
  """`nnz` distinct flat positions of a [d_in, d_out] kernel, uniformly at random, ascending.

  Host-side (numpy): the support is a static constant, not a traced value.
  """
  if not 0 <= nnz <= d_in * d_out:
    raise ValueError(f'{nnz} nonzeros do not fit a {d_in}x{d_out} kernel')
  return np.sort(rng.choice(d_in * d_out, size=nnz, replace=False)).astype(np.int32)
