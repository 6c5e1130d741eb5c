"""Mutual k-nearest-neighbour alignment.

Huh et al., "The Platonic Representation Hypothesis" (ICML 2024, Sec. 2.2,
Appendix A): for each input, the fraction of its k nearest neighbours (cosine
similarity, itself excluded) that the two representations share, averaged over
inputs. Forms an n×n similarity matrix: use it on a subsample of a few
thousand inputs. Jit-safe (`k` static).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lossland.stitching import alignment as cka_lib


def _neighbours(x: jax.Array, k: int) -> jax.Array:
  x = x.astype(jnp.float32)
  norm = jnp.linalg.norm(x, axis=1, keepdims=True)
  x = x / jnp.where(norm > 0, norm, 1.0)
  sim = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
  sim = jnp.where(jnp.eye(x.shape[0], dtype=bool), -jnp.inf, sim)
  return jax.lax.top_k(sim, k)[1]  # [n, k]


def mutual_knn(x: jax.Array, y: jax.Array, *, k: int = 10) -> jax.Array:
  """Mean |N_k^x(i) ∩ N_k^y(i)| / k over inputs i. x: [n, dx], y: [n, dy] -> scalar in [0, 1]."""
  cka_lib._check_pair(x, y)  # pylint: disable=protected-access
  cka_lib._check_finite('mutual_knn', x=x, y=y)  # pylint: disable=protected-access
  n = x.shape[0]
  if not 1 <= k < n:
    raise ValueError(f'mutual_knn needs 1 <= k < n (self is excluded); got k={k}, n={n}')
  nx, ny = _neighbours(x, k), _neighbours(y, k)
  shared = (nx[:, :, None] == ny[:, None, :]).any(axis=2).sum(axis=1)
  return jnp.mean(shared / k)
