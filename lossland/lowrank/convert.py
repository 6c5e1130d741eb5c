"""From a trained dense kernel W [d_in, d_out] to the parameters of each factorized layer.

The conversions keep the dense layer's function wherever the parameterization
can, and otherwise take the best approximation its structure allows. W_r is
the best rank-r approximation of W (Eckart–Young: the top-r SVD components;
‖W − W_r‖_F² = Σ_{i>r} σ_i²), split as A = U_r √Σ_r, B = √Σ_r V_rᵀ.

| kind    | layer function after conversion                        | at full rank |
| ------- | ------------------------------------------------------ | ------------ |
| lowrank | x W_r                                                  | x W          |
| lost    | x (W_r + P_idx (W − W_r)): γ A B = W_r, (1 − γ) W_s =   | x W          |
|         | rows idx of W − W_r, idx chosen from W as LOST chooses |              |
|         | them from W0 (Li et al. 2025, Sec. 3: the largest rows  |              |
|         | of W_comp = Σ_{r<i≤r+k} σ_i u_i v_iᵀ)                   |              |
| sltrain | x (W_r + S): A B·α/r = W_r, S the entries of W − W_r on | x W          |
|         | the layer's fixed support (Han et al. 2024, eq. 3)      |              |
| cola    | SiLU(x A) B with A B = W_r (our CoLA layer's 'svd'      | not x W      |
|         | init; the SiLU makes no factor choice equal x W)        |              |

P_idx keeps rows idx and zeroes the others. Given W_r and the kept rows (LOST)
or the support (SLTrain), the sparse values above are the Frobenius-optimal
ones. LOST at full rank needs sparsity 0 (no residual is left to score
channels); LOST's and CoLA's `activation='silu'` likewise changes the function.

Host-side (numpy, float64, then cast): a conversion runs once, not in a step.
"""
from __future__ import annotations

import numpy as np

from lossland.lowrank import factorize


def _svd(kernel: np.ndarray, rank: int, layer: str):
  factorize._check_rank(kernel.shape, rank, layer)  # pylint: disable=protected-access
  u, s, vt = np.linalg.svd(kernel, full_matrices=False)
  root = np.sqrt(s[:rank])
  return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]  # A [d_in, r], B [r, d_out]


def lowrank_from_dense(kernel, rank: int, *, layer: str = '?') -> dict[str, np.ndarray]:
  """{'lowrank_a', 'lowrank_b'} with A B = W_r, the best rank-`rank` approximation of `kernel`."""
  a, b = _svd(np.asarray(kernel, np.float64), rank, layer)
  return {'lowrank_a': a, 'lowrank_b': b}


def lost_from_dense(kernel, rank: int, num_channels: int, *, gamma: float,
                    residual_rank: int | None = None, layer: str = '?'
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """LOST's params and kept channels such that the layer computes x (W_r + P_idx (W − W_r)).

  Args:
    kernel: [d_in, d_out] trained dense kernel W.
    rank, num_channels, residual_rank: the layer's plan (r, n_s, k).
    gamma: the layer's fixed mixing weight γ; the factors absorb 1/γ and the
      sparse rows 1/(1 − γ), so 0 < γ < 1 is needed (γ > 0 without channels).
    layer: name used in error messages.

  Returns:
    ({'lowrank_a', 'lowrank_b'[, 'sparse_values']}, channel_idx [n_s] int32 ascending).
  """
  w = np.asarray(kernel, np.float64)
  if not 0.0 < gamma <= 1.0 or (num_channels and gamma == 1.0):
    raise ValueError(f'layer {layer!r}: converting into LOST needs 0 < gamma < 1 (gamma > 0 '
                     f'when sparsity is 0), got gamma={gamma}: a path weighted 0 cannot carry '
                     'its part of the dense kernel')
  lost = factorize.lost_factors(w, rank, num_channels, residual_rank=residual_rank, layer=layer)
  params = {'lowrank_a': lost.a / np.sqrt(gamma), 'lowrank_b': lost.b / np.sqrt(gamma)}
  if num_channels:
    residual = w - lost.a @ lost.b  # W − W_r, [d_in, d_out]
    params['sparse_values'] = residual[lost.channel_idx] / (1.0 - gamma)
  return params, np.asarray(lost.channel_idx, np.int32)


def sltrain_from_dense(kernel, rank: int, support: np.ndarray, *, alpha: float,
                       layer: str = '?') -> dict[str, np.ndarray]:
  """SLTrain's params with A B·α/r = W_r and S = (W − W_r) on `support` (flat positions)."""
  w = np.asarray(kernel, np.float64)
  a, b = _svd(w, rank, layer)
  scale = np.sqrt(rank / alpha)  # split evenly, so that (A B)·α/r = W_r
  residual = w - a @ b
  return {'lowrank_a': a * scale, 'lowrank_b': b * scale,
          'sparse_values': residual.reshape(-1)[np.asarray(support)]}
