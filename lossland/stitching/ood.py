"""Out-of-distribution score of stitched activations (Balogh & Jelasity 2025, Sec. 5).

The paper explains task-loss-matching's odd similarities by stitched
activations that lie far outside the receiving layer's distribution. We
measure that with a Gaussian fitted to the target layer's training activations
(rows as in `matching.target_rows`): the mean Mahalanobis distance
sqrt((t − μ)ᵀ Σ⁻¹ (t − μ)) of stitched activations t, divided by the same mean
for the real test activations of that layer. Near 1: in distribution.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Gaussian(NamedTuple):
  """A Gaussian fitted to a layer's rows: mean [d] and precision (Σ + eps·mean(diag Σ)·I)⁻¹ [d, d]."""
  mean: jax.Array
  precision: jax.Array


def gaussian(mean: np.ndarray, cov: np.ndarray, *, eps: float = 1e-3) -> Gaussian:
  """The `Gaussian` of (mean, cov); Σ + eps·mean(diag Σ)·I keeps it invertible."""
  cov = np.asarray(cov, np.float64)
  d = cov.shape[0]
  scale = max(np.trace(cov) / d, np.finfo(np.float64).tiny)
  precision = np.linalg.inv(cov + eps * scale * np.eye(d))
  precision = (precision + precision.T) / 2
  return Gaussian(jnp.asarray(mean, jnp.float32), jnp.asarray(precision, jnp.float32))


def mahalanobis_sum(rows: jax.Array, g: Gaussian) -> jax.Array:
  """Σ over rows of the Mahalanobis distance. rows: [m, d] -> scalar. Jit-safe."""
  z = rows.astype(jnp.float32) - g.mean
  q = jnp.einsum('md,de,me->m', z, g.precision, z, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(jnp.sqrt(jnp.maximum(q, 0.0)))
