"""The Kronecker eigenbasis of K-FAC factors, pair curvature mass, and EK-FAC.

Merullo et al. (2025), sec. 3.1, eqs. 4-5: with A = U_A diag(λ) U_Aᵀ and
G = U_G diag(μ) U_Gᵀ (eigenvalues clamped at 0, descending), a weight is
expressed in the Kronecker eigenbasis as C = U_Gᵀ W U_A; the pair (i, j) has
curvature mass Π_ij = λ_i μ_j, the K-FAC curvature of the direction
u_G,i u_A,jᵀ. Flax kernels are stored as K = Wᵀ [d_in, d_out], so here
C = U_Aᵀ K U_G [d_in, d_out] and Π = λ[:, None] μ[None, :].

EK-FAC (George et al. 2018, eq. 10) keeps the eigenbases and replaces λ_i μ_j
by the second moment of the per-sample gradient projected onto them,
S_ij = E[(U_Aᵀ a)_i² (U_Gᵀ g)_j²], with one token position per sample, as for
the factors; this is the exact diagonal of the per-token Fisher in that basis.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lossland.curvature import capture as capture_lib
from lossland.curvature import factors as factors_lib
from lossland.parallel import dispatch
from lossland.parallel import mesh as mesh_lib

HIGHEST = jax.lax.Precision.HIGHEST


def _sorted_eigh(m: jax.Array) -> tuple[jax.Array, jax.Array]:
  values, vectors = jnp.linalg.eigh((m + m.T) / 2)
  return jnp.maximum(values[::-1], 0.0), vectors[:, ::-1]


def layer_eigenbasis(A: jax.Array, G: jax.Array) -> dict[str, jax.Array]:
  """{'UA' [d_in, d_in], 'lam' [d_in], 'UG' [d_out, d_out], 'mu' [d_out]}, descending. jit-safe."""
  lam, ua = _sorted_eigh(A)
  mu, ug = _sorted_eigh(G)
  return {'UA': ua, 'lam': lam, 'UG': ug, 'mu': mu}


_layer_eigenbasis = jax.jit(layer_eigenbasis)


def eigenbasis(factors) -> dict[str, dict[str, jax.Array]]:
  """Eigenbasis of every layer's factors (the output of `factors.finalize`)."""
  return {name: dispatch.settle(_layer_eigenbasis(f['A'], f['G']))
          for name, f in factors.items()}


def coefficients(kernel: jax.Array, basis) -> jax.Array:
  """C = U_Aᵀ K U_G, the kernel [d_in, d_out] in the Kronecker eigenbasis. jit-safe."""
  return jnp.matmul(jnp.matmul(basis['UA'].T, kernel, precision=HIGHEST), basis['UG'],
                    precision=HIGHEST)


def from_coefficients(c: jax.Array, basis) -> jax.Array:
  """K = U_A C U_Gᵀ, the inverse of `coefficients`. jit-safe."""
  return jnp.matmul(jnp.matmul(basis['UA'], c, precision=HIGHEST), basis['UG'].T,
                    precision=HIGHEST)


def pair_mass(basis) -> jax.Array:
  """K-FAC pair curvature mass Π_ij = λ_i μ_j, [d_in, d_out]. jit-safe."""
  return basis['lam'][:, None] * basis['mu'][None, :]


def eigencorrection_sums(apply_fn: Callable, params, bases, batch, rng: jax.Array, *,
                         fisher_type: str = 'true'):
  """Σ m (U_Aᵀa)² ⊗ (U_Gᵀg)² per layer of one batch: {name: {'S' [d_in, d_out], 'count'}}."""
  stats = factors_lib.layer_statistics(apply_fn, params, batch, rng, layers=tuple(bases),
                                       fisher_type=fisher_type)
  out = {}
  for name, (a, g, m) in stats.items():
    at = jnp.matmul(a, bases[name]['UA'], precision=HIGHEST)  # [N, d_in]
    gt = jnp.matmul(g, bases[name]['UG'], precision=HIGHEST)  # [N, d_out]
    out[name] = {'S': jnp.matmul((at * at * m[:, None]).T, gt * gt, precision=HIGHEST),
                 'count': m.sum()}
  return out


def make_eigencorrection_accumulator(apply_fn: Callable, *, mesh: Mesh,
                                     fisher_type: str = 'true') -> Callable:
  """`accumulate(sums, params, bases, batch, rng) -> sums`, jitted once per shape."""
  if fisher_type not in factors_lib.FISHER_TYPES:
    raise ValueError(f'fisher_type must be one of {factors_lib.FISHER_TYPES}, got {fisher_type!r}')

  def accumulate(sums, params, bases, batch, rng):
    new = eigencorrection_sums(apply_fn, params, bases, batch, rng, fisher_type=fisher_type)
    return jax.tree.map(jnp.add, sums, new)

  return jax.jit(accumulate, donate_argnums=0, out_shardings=mesh_lib.replicated(mesh))


def estimate_eigencorrection(apply_fn: Callable, params, bases, batches: Iterable, *, mesh: Mesh,
                             rng: jax.Array, fisher_type: str = 'true') -> dict[str, jax.Array]:
  """EK-FAC pair mass S [d_in, d_out] for each layer of `bases`, averaged over positions."""
  accumulate = make_eigencorrection_accumulator(apply_fn, mesh=mesh, fisher_type=fisher_type)
  sums = None
  for i, batch in enumerate(batches):
    batch = mesh_lib.shard_batch(batch, mesh)
    if sums is None:
      sums = jax.device_put(
          {n: {'S': jnp.zeros((b['UA'].shape[0], b['UG'].shape[0]), jnp.float32),
               'count': jnp.zeros((), jnp.float32)} for n, b in bases.items()},
          mesh_lib.replicated(mesh))
    sums = dispatch.settle(accumulate(sums, params, bases, batch, jax.random.fold_in(rng, i)))
  if sums is None:
    raise ValueError('no batches were given; pass at least one batch')
  counts = jax.device_get({n: s['count'] for n, s in sums.items()})
  out = {}
  for name, s in sums.items():
    if counts[name] <= 0:
      raise ValueError(f'layer {name!r} has 0 recorded tokens; did the batch mask out every '
                       'position?')
    out[name] = s['S'] / counts[name]
  return out


def layer_kernels(params, names: Sequence[str]) -> dict[str, jax.Array]:
  return {n: capture_lib.get_kernel(params, n) for n in names}
