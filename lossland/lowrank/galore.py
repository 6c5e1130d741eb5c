"""GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient
Low-Rank Projection", Alg. 1) as an optax gradient transformation.

For a matrix gradient G [m, n] (m ≥ n: project on the right; else on the left),
every `update_proj_gap` steps the projector is refreshed from the SVD of the
current gradient: P = V_r [n, r] (right) or U_r [m, r] (left). Adam's moments
live in the projected space R = G P [m, r] (or Pᵀ G [r, n]); the Adam direction
N is projected back (N Pᵀ or P N) and scaled by `scale` (the paper's α, 0.25).
Leaves that are not projected (vectors, masked-out or small matrices) get
plain Adam. Moments are kept across projector refreshes, as in the reference.

Jit-safe; the SVD runs inside `lax.cond` only on refresh steps.

Why not `optax.contrib.galore` (optax >= 0.2.7; checked against 0.2.8): it
projects the *larger* side of a non-square gradient (left projector U[:, :r]
when m >= n, so its moments are [r, min(m, n)]), while Alg. 1 (m ≤ n: P =
U[:, :r], moments [r, n]) and the reference code project the smaller side
(moments [max(m, n), r]). Without Adam's elementwise normalization both give
the same rank-r truncation, but with it the updates differ
(`tests/lowrank/test_lowrank_galore.py::
test_optax_contrib_galore_projects_the_other_side_than_algorithm_1`). Its
default `scale` is 1.0 (the paper's α is 0.25), and it projects matrices
whose smaller side is at most the rank (a rotation that changes Adam's
normalization) where this module applies plain Adam.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class GaLoreState(NamedTuple):
  count: jax.Array  # int32 scalar: updates applied
  projectors: Any  # per leaf: [m, r] / [n, r] float, or a [0] placeholder when not projected
  mu: Any  # first moments (projected shape where projected)
  nu: Any  # second moments


def _side(shape) -> str:
  """'right' when the gradient has at least as many rows as columns (project columns away)."""
  return 'right' if shape[0] >= shape[1] else 'left'


def _projected_shape(shape, rank: int):
  return (shape[0], rank) if _side(shape) == 'right' else (rank, shape[1])


def _new_projector(g: jax.Array, rank: int) -> jax.Array:
  u, _, vt = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
  return vt[:rank].T if _side(g.shape) == 'right' else u[:, :rank]


def _project(g, p):
  return g @ p if _side(g.shape) == 'right' else p.T @ g


def _project_back(n, p, shape):
  return n @ p.T if _side(shape) == 'right' else p @ n


def scale_by_galore(rank: int, *, update_proj_gap: int = 200, scale: float = 0.25,
                    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                    mask: Any | Callable[[Any], Any] | None = None
                    ) -> optax.GradientTransformation:
  """Adam in a rank-`rank` projection of each selected matrix gradient (GaLore Alg. 1).

  Args:
    rank: projection rank r; a matrix is projected only if min(m, n) > r.
    update_proj_gap: T, steps between projector refreshes (step 0 refreshes).
    scale: α, multiplies the projected-back update.
    b1, b2, eps: Adam's constants.
    mask: pytree of bools (or a function params -> pytree) selecting the 2-D
      leaves to project; default: every 2-D leaf.

  Returns:
    A transformation whose output is the (un-negated) Adam direction; chain it
    with `optax.scale_by_learning_rate`.
  """
  if rank < 1:
    raise ValueError(f'GaLore rank must be at least 1, got {rank}')
  if update_proj_gap < 1:
    raise ValueError(f'update_proj_gap must be at least 1, got {update_proj_gap}')

  def selected(params):
    m = mask(params) if callable(mask) else mask
    if m is None:
      m = jax.tree.map(lambda _: True, params)
    return jax.tree.map(lambda p, s: bool(s) and p.ndim == 2 and min(p.shape) > rank, params, m)

  def init_fn(params):
    sel = selected(params)
    proj = jax.tree.map(
        lambda p, s: jnp.zeros((p.shape[1] if _side(p.shape) == 'right' else p.shape[0], rank),
                               jnp.float32) if s else jnp.zeros((0,), jnp.float32), params, sel)
    moment = jax.tree.map(
        lambda p, s: jnp.zeros(_projected_shape(p.shape, rank) if s else p.shape, jnp.float32),
        params, sel)
    return GaLoreState(jnp.zeros((), jnp.int32), proj, moment, jax.tree.map(jnp.copy, moment))

  def update_fn(updates, state, params=None):
    sel = selected(updates)
    count = state.count + 1
    refresh = state.count % update_proj_gap == 0
    c1 = 1.0 - b1 ** count.astype(jnp.float32)
    c2 = 1.0 - b2 ** count.astype(jnp.float32)

    def leaf(g, p, mu, nu, s):
      g32 = g.astype(jnp.float32)
      if s:
        p = jax.lax.cond(refresh, lambda: _new_projector(g32, rank), lambda: p)
        g32 = _project(g32, p)
      mu = b1 * mu + (1 - b1) * g32
      nu = b2 * nu + (1 - b2) * g32 * g32
      n = (mu / c1) / (jnp.sqrt(nu / c2) + eps)
      if s:
        n = scale * _project_back(n, p, g.shape)
      return n.astype(g.dtype), p, mu, nu

    flat_g, treedef = jax.tree.flatten(updates)
    flat = [leaf(*args) for args in zip(flat_g, treedef.flatten_up_to(state.projectors),
                                        treedef.flatten_up_to(state.mu),
                                        treedef.flatten_up_to(state.nu),
                                        treedef.flatten_up_to(sel))]
    out, proj, mu, nu = (treedef.unflatten(list(x)) for x in zip(*flat))
    return out, GaLoreState(count, proj, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def galore_adamw(learning_rate: float | optax.Schedule, *, rank: int, update_proj_gap: int = 200,
                 scale: float = 0.25, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0, grad_clip: float | None = 1.0,
                 mask: Any | Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
  """Clip by global norm, GaLore-Adam, decoupled weight decay on matrices, then −lr.

  Same conventions as `lossland.train.adamw` (decay on ≥2-D leaves only).
  """
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  parts += [scale_by_galore(rank, update_proj_gap=update_proj_gap, scale=scale, b1=b1, b2=b2,
                            eps=eps, mask=mask),
            optax.add_decayed_weights(weight_decay,
                                      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),
            optax.scale_by_learning_rate(learning_rate)]
  return optax.chain(*parts)
