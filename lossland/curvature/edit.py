"""Curvature-mass weight edits and their controls.

Merullo et al. (2025), sec. 3.2: rank the pairs (i, j) of the Kronecker
eigenbasis by curvature mass Π_ij, keep them in descending order until a
fraction ρ of the layer's total mass ΣΠ = (Σλ)(Σμ) is kept, zero the other
coefficients and map back: W' = U_G (C ⊙ M) U_Aᵀ (for flax kernels
K' = U_A (C ⊙ M) U_Gᵀ). Individual coefficients are zeroed, not whole
eigenvectors. Memorized examples are mostly carried by the low-mass pairs
that the edit removes.

Controls (sec. 4): a random mask and the inverted mask (keep the *lowest*
mass pairs, i.e. drop the top mass) with a given kept count, and SVD
truncation of the weight to a given rank.

The per-layer loops pass each jitted call through `parallel.settle`: with kernels
sharded over several CPU devices the edits carry collectives.
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp

from lossland import taps
from lossland.curvature import capture as capture_lib
from lossland.curvature import eigen as eigen_lib
from lossland.curvature import layer_views
from lossland.parallel import dispatch


def check_rho(rho: float) -> float:
  rho = float(rho)
  if not 0.0 < rho <= 1.0:
    raise ValueError(f'rho={rho} is outside (0, 1]; it is the fraction of curvature mass to keep '
                     '(e.g. 0.6 removes the 40% of mass in the lowest-curvature pairs)')
  return rho


def keep_count(mass: jax.Array, rho) -> jax.Array:
  """Smallest number of top-mass pairs whose mass reaches ρ of the total (all pairs at ρ = 1).

  jit-safe; ρ may be traced.
  """
  flat = jnp.sort(mass.ravel())[::-1]
  cum = jnp.cumsum(flat)
  count = jnp.minimum(jnp.sum(cum < rho * cum[-1]) + 1, flat.size)
  return jnp.where(rho >= 1.0, flat.size, count)


def _ranks(scores: jax.Array) -> jax.Array:
  """Rank of each entry in descending order of `scores` (0 = largest), same shape."""
  flat = scores.ravel()
  order = jnp.argsort(-flat, stable=True)
  return jnp.zeros(flat.size, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32)
                                                      ).reshape(scores.shape)


@jax.jit
def mass_mask(mass: jax.Array, rho) -> jax.Array:
  """Boolean mask [d_in, d_out] of the top-mass pairs holding ρ of the total mass.

  ρ = 1 keeps every pair (also zero-mass ones), so the edit is the identity.
  jit-safe; ρ is traced (one compilation per shape).
  """
  return _ranks(mass) < keep_count(mass, rho)


@jax.jit
def inverted_mask(mass: jax.Array, count: jax.Array) -> jax.Array:
  """Keeps the `count` lowest-mass pairs (drops the top mass). jit-safe."""
  return _ranks(-mass) < count


@functools.partial(jax.jit, static_argnames='shape')
def random_mask(rng: jax.Array, shape: tuple[int, int], count: jax.Array) -> jax.Array:
  """Keeps `count` pairs chosen uniformly at random. jit-safe."""
  return _ranks(jax.random.uniform(rng, shape)) < count


@jax.jit
def apply_mask(w: jax.Array, ua: jax.Array, ug: jax.Array, mask: jax.Array) -> jax.Array:
  """K' = U_A (C ⊙ M) U_Gᵀ with C = U_Aᵀ K U_G, for a layer matrix K. jit-safe."""
  c = eigen_lib.coefficients(w.astype(jnp.float32), ua, ug)
  return eigen_lib.from_coefficients(c * mask, ua, ug).astype(w.dtype)


@functools.partial(jax.jit, static_argnames='rank')
def svd_truncate(kernel: jax.Array, rank: int) -> jax.Array:
  """Best rank-`rank` approximation of the kernel (the SVD control). jit-safe, rank static."""
  u, s, vt = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)
  return ((u[:, :rank] * s[:rank]) @ vt[:rank]).astype(kernel.dtype)


def _check_layers(params, bases: Mapping[str, eigen_lib.LayerBasis]) -> None:
  if not bases:
    raise ValueError('no layers to edit; give the eigenbases of at least one layer')
  for name, basis in bases.items():
    layer = capture_lib.layer_params_of(taps.params_tree(params), basis.view)
    shape = tuple(layer['kernel'].shape) if 'kernel' in layer else None
    if shape != tuple(basis.view.kernel_shape):
      raise ValueError(f'layer {name!r} has a kernel of shape {shape} but its eigenbasis is '
                       f'for {tuple(basis.view.kernel_shape)}; were the factors computed for '
                       'this model?')


def _matrix(params, view: layer_views.MatrixView) -> jax.Array:
  # Eager reshapes/transposes of possibly sharded kernels: one execution at a time.
  return dispatch.settle(capture_lib.layer_matrix(params, view))


def masked_edit(params, bases: Mapping[str, eigen_lib.LayerBasis],
                masks: Mapping[str, jax.Array]):
  """params -> params with each named layer's matrix K replaced by U_A (C ⊙ M) U_Gᵀ."""
  _check_layers(params, bases)
  new = {n: dispatch.settle(apply_mask(_matrix(params, b.view), b.UA, b.UG, masks[n]))
         for n, b in bases.items()}
  return capture_lib.replace_matrices(params, new, {n: b.view for n, b in bases.items()})


def rho_of_layers(bases: Mapping[str, eigen_lib.LayerBasis], rho) -> dict[str, float]:
  """{layer: ρ} from one ρ for every layer or a {layer: ρ} mapping that names each of them.

  The official code keeps mass per layer; a per-layer ρ lets late layers,
  whose mass sits in few pairs, keep more (`selection.rho_by_layer`).
  """
  if isinstance(rho, Mapping):
    missing = sorted(set(bases) - set(rho))
    if missing:
      raise ValueError(f'the per-layer rho names no value for layers {missing[:4]}; give one for '
                       'every edited layer')
    return {n: check_rho(rho[n]) for n in bases}
  rho = check_rho(rho)
  return {n: rho for n in bases}


def curvature_masks(bases: Mapping[str, eigen_lib.LayerBasis], rho,
                    masses: Mapping[str, jax.Array] | None = None):
  """Top-mass masks per layer; `masses` overrides λ_i μ_j (e.g. with EK-FAC's S).

  `rho`: one fraction for every layer, or {layer: fraction} (`rho_of_layers`).
  """
  rhos = rho_of_layers(bases, rho)
  out = {}
  for name, basis in bases.items():
    rho = rhos[name]
    mass = eigen_lib.pair_mass(basis) if masses is None else masses[name]
    bad = ~jnp.isfinite(mass).all() | (mass.sum() <= 0)
    if bool(bad):
      raise ValueError(f'the curvature mass of layer {name!r} is not finite or sums to 0; '
                       'recompute its factors on batches where the layer sees unmasked samples '
                       'and with a likelihood that fits the model')
    out[name] = dispatch.settle(mass_mask(mass, rho))
  return out


def curvature_edit(params, bases: Mapping[str, eigen_lib.LayerBasis], rho,
                   masses: Mapping[str, jax.Array] | None = None):
  """The edit of Merullo et al. (2025): keep ρ of each layer's curvature mass.

  Args:
    params: model variables.
    bases: {layer path: LayerBasis} from `eigen.eigenbasis` (the layers to edit).
    rho: fraction of mass to keep, in (0, 1], or {layer: fraction}; 1 (for
      every layer) keeps every pair, so the params come back unchanged, bit for
      bit (no round trip through the eigenbasis).
    masses: optional {path: [rows_in, d_out]} pair masses replacing λ_i μ_j (EK-FAC).

  Returns:
    New params (pure: the input is not modified). Each kernel (and, when the
    basis is homogeneous, bias) is edited in its layer's matrix form.
  """
  masks = curvature_masks(bases, rho, masses)
  if all(r == 1.0 for r in rho_of_layers(bases, rho).values()):
    _check_layers(params, bases)
    return params
  return masked_edit(params, bases, masks)


def control_masks(kind: str, bases: Mapping[str, eigen_lib.LayerBasis], counts: Mapping[str, int],
                  *, rng: jax.Array | None = None, masses: Mapping | None = None):
  """Masks keeping `counts[name]` pairs: kind 'random' or 'inverted' (lowest mass)."""
  out = {}
  for i, (name, basis) in enumerate(bases.items()):
    if kind == 'random':
      if rng is None:
        raise ValueError("the 'random' control needs an rng")
      out[name] = dispatch.settle(random_mask(jax.random.fold_in(rng, i), basis.shape,
                                              counts[name]))
    elif kind == 'inverted':
      mass = eigen_lib.pair_mass(basis) if masses is None else masses[name]
      out[name] = dispatch.settle(inverted_mask(mass, counts[name]))
    else:
      raise ValueError(f"control kind must be 'random' or 'inverted', got {kind!r}")
  return out


def svd_edit(params, views: Mapping[str, layer_views.MatrixView], ranks: Mapping[str, int]):
  """params -> params with each named layer's matrix truncated to `ranks[name]`.

  `views` maps each path to its MatrixView (e.g. `{n: b.view for n, b in bases.items()}`).
  """
  new = {}
  for name, view in views.items():
    w = _matrix(params, view)
    rank = int(ranks[name])
    if not 0 < rank <= min(w.shape):
      raise ValueError(f'SVD rank {rank} for layer {name!r} must be in [1, {min(w.shape)}]')
    new[name] = dispatch.settle(svd_truncate(w, rank))
  return capture_lib.replace_matrices(params, new, views)
