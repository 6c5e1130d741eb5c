"""Test-time losses on the cross-attention maps of a prompt's concept tokens.

Every loss takes one sample's maps `[H, W, M]` (M concept tokens, from
`lossland.guidance.maps.token_maps`) and returns a scalar; all are pure and
jit-safe. `batched(loss)` maps one over a batch and sums, so the gradient of
the sum w.r.t. a batch of latents is each sample's own gradient.

* A-STAR (Agarwal et al., "A-STAR: Test-time Attention Segregation and
  Retention for Text-to-image Synthesis", ICCV 2023, sec. 3.1-3.2):
  segregation L_seg = Σ_{m>n} Σ_ij min(A^m, A^n) / Σ_ij (A^m + A^n) (eq. 2),
  retention L_ret = Σ_m [1 − Σ_ij min(A_t^m, B^m) / Σ_ij (A_t^m + B^m)]
  (eq. 4) with B^m the binarized map of concept m at the previous step. The
  paper does not state the binarization; `binarize` offers Otsu's threshold
  (Otsu 1979) or the top-q fraction of pixels.
* Attend-and-Excite (Chefer et al. 2023, eq. 1-2): L = max_m (1 − max_ij A^m)
  on Gaussian-smoothed maps.
* Divide & Bind (Li et al. 2023, sec. 3.2-3.3): attendance
  L_att = −min_m TV(A^m) with TV the total variation (sum of absolute
  differences of neighbouring pixels), and binding as the Jensen-Shannon
  divergence between an attribute's and its object's normalized maps.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_EPS = 1e-8


def _pairwise_overlap(maps: jax.Array) -> jax.Array:
  """[M, M] matrix of Σ min(A^m, A^n) / Σ (A^m + A^n)."""
  a = maps[..., :, None]  # [H, W, M, 1]
  b = maps[..., None, :]  # [H, W, 1, M]
  inter = jnp.minimum(a, b).sum((0, 1))
  total = (a + b).sum((0, 1))
  return inter / (total + _EPS)


def segregation_loss(maps: jax.Array) -> jax.Array:
  """A-STAR L_seg (eq. 2): summed soft-IoU overlap over pairs m > n of [H, W, M] maps."""
  m = maps.shape[-1]
  overlap = _pairwise_overlap(maps)
  upper = jnp.triu(jnp.ones((m, m), bool), k=1)
  return jnp.sum(jnp.where(upper, overlap, 0.0))


def retention_loss(maps: jax.Array, masks: jax.Array) -> jax.Array:
  """A-STAR L_ret (eq. 4): Σ_m [1 − Σ min(A^m, B^m) / Σ (A^m + B^m)].

  Args:
    maps: [H, W, M] current maps A_t.
    masks: [H, W, M] binary masks B from the previous step (no gradient flows
      into them).
  """
  masks = jax.lax.stop_gradient(masks.astype(maps.dtype))
  inter = jnp.minimum(maps, masks).sum((0, 1))
  total = (maps + masks).sum((0, 1))
  return jnp.sum(1.0 - inter / (total + _EPS))


def otsu_threshold(values: jax.Array, num_bins: int = 64) -> jax.Array:
  """Otsu's threshold (max between-class variance) of a 1-D array, searched on a grid."""
  lo, hi = values.min(), values.max()
  x = (values - lo) / jnp.maximum(hi - lo, _EPS)
  cuts = jnp.arange(1, num_bins, dtype=x.dtype) / num_bins  # [K]
  below = x[:, None] < cuts[None, :]  # [N, K]
  w0 = below.mean(0)
  w1 = 1.0 - w0
  mu0 = jnp.where(below, x[:, None], 0.0).sum(0) / jnp.maximum(below.sum(0), 1)
  mu1 = jnp.where(below, 0.0, x[:, None]).sum(0) / jnp.maximum((~below).sum(0), 1)
  between = w0 * w1 * (mu0 - mu1) ** 2
  return lo + cuts[jnp.argmax(between)] * (hi - lo)


def binarize(maps: jax.Array, method: str = 'otsu', q: float = 0.2) -> jax.Array:
  """High-attention masks [H, W, M] (float 0/1) of [H, W, M] maps.

  Args:
    method: 'otsu' (Otsu's threshold per map) or 'topq' (the top `q` fraction
      of pixels per map). Static.
  """
  h, w, m = maps.shape
  flat = maps.reshape(h * w, m).T  # [M, HW]
  if method == 'otsu':
    thresholds = jax.vmap(otsu_threshold)(flat)
  elif method == 'topq':
    if not 0.0 < q < 1.0:
      raise ValueError(f'top-q binarization needs 0 < q < 1, got q={q}')
    thresholds = jnp.quantile(flat, 1.0 - q, axis=-1)
  else:
    raise ValueError(f'unknown binarization {method!r}; available: otsu, topq')
  return (maps >= thresholds[None, None, :]).astype(maps.dtype)


def attend_excite_loss(maps: jax.Array) -> jax.Array:
  """Attend-and-Excite (eq. 2): max_m (1 − max_ij A^m) of (smoothed) [H, W, M] maps."""
  return jnp.max(1.0 - maps.max((0, 1)))


def total_variation(maps: jax.Array) -> jax.Array:
  """[M] total variation Σ|A_{i+1,j} − A_ij| + Σ|A_{i,j+1} − A_ij| of [H, W, M] maps."""
  return (jnp.abs(jnp.diff(maps, axis=0)).sum((0, 1)) + jnp.abs(jnp.diff(maps, axis=1)).sum((0, 1)))


def divide_bind_attendance(maps: jax.Array) -> jax.Array:
  """Divide & Bind attendance: −min_m TV(A^m), so the weakest map gets a salient region."""
  return -jnp.min(total_variation(maps))


def jensen_shannon(p: jax.Array, q: jax.Array) -> jax.Array:
  """JSD between two [H, W] maps, each normalized to sum to one (natural log)."""
  p = p / (p.sum() + _EPS)
  q = q / (q.sum() + _EPS)
  mid = 0.5 * (p + q)
  kl = lambda a, b: jnp.sum(jnp.where(a > 0, a * (jnp.log(a + _EPS) - jnp.log(b + _EPS)), 0.0))
  return 0.5 * kl(p, mid) + 0.5 * kl(q, mid)


def divide_bind_binding(attribute_maps: jax.Array, object_maps: jax.Array) -> jax.Array:
  """Divide & Bind binding: Σ_m JSD(attribute map m, object map m); inputs [H, W, M]."""
  return jnp.sum(jax.vmap(jensen_shannon, in_axes=(2, 2))(attribute_maps, object_maps))


def astar_loss(maps: jax.Array, masks: jax.Array, *, retention_weight: float = 1.0) -> jax.Array:
  """A-STAR objective L_seg + λ L_ret (sec. 3.3; λ = 1 in the paper)."""
  return segregation_loss(maps) + retention_weight * retention_loss(maps, masks)


def batched(loss: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """Sum over a leading batch axis of a per-sample loss (each sample's gradient is its own)."""
  return lambda *args: jnp.sum(jax.vmap(loss)(*args))
