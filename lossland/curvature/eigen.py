"""The Kronecker eigenbasis of K-FAC factors, pair curvature mass, and EK-FAC.

Merullo et al. (2025), sec. 3.1, eqs. 4-5: with A = U_A diag(λ) U_Aᵀ and
G = U_G diag(μ) U_Gᵀ (eigenvalues clamped at 0, descending), a weight is
expressed in the Kronecker eigenbasis as C = U_Gᵀ W U_A; the pair (i, j) has
curvature mass Π_ij = λ_i μ_j, the K-FAC curvature of the direction
u_G,i u_A,jᵀ. Here every layer is a matrix K [rows_in, d_out] with outputs
rows(x) @ K (its kernel through `layer_views.MatrixView`, the bias as the last
row when homogeneous; the paper's W is Kᵀ), so C = U_Aᵀ K U_G [rows_in, d_out]
and Π = λ[:, None] μ[None, :].

EK-FAC (George et al. 2018, eq. 10) keeps the eigenbases and replaces λ_i μ_j
by the second moment of the per-sample gradient projected onto them,
S_ij = E[(U_Aᵀ a)_i² (U_Gᵀ g)_j²], with the samples of the factors (token or
output positions); this is the exact diagonal of the per-token Fisher in that basis.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lossland import taps
from lossland.curvature import factors as factors_lib
from lossland.curvature import layer_views
from lossland.curvature import likelihoods
from lossland.parallel import dispatch
from lossland.parallel import mesh as mesh_lib

HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class LayerBasis:
  """The Kronecker eigenbasis of one layer's factors, eigenvalues descending and >= 0.

  A pytree (the arrays are leaves; the view, which maps the layer's kernel to
  W [rows_in, d_out], is static).
  """
  UA: jax.Array  # [rows_in, rows_in], columns are eigenvectors of A
  lam: jax.Array  # [rows_in]
  UG: jax.Array  # [d_out, d_out]
  mu: jax.Array  # [d_out]
  view: layer_views.MatrixView = flax.struct.field(pytree_node=False)

  @property
  def shape(self) -> tuple[int, int]:
    """(rows_in, d_out): the shape of the layer's matrix and of its pair masses."""
    return (self.UA.shape[0], self.UG.shape[0])


# How `jax.lax.linalg.eigh` decomposes a factor: 'auto' is the platform's default (LAPACK's
# syevd on CPU, cuSOLVER on GPU, QDWH spectral divide and conquer on TPU); the others name
# `jax.lax.linalg.EighImplementation` ('qr': CPU/GPU, 'jacobi': GPU/TPU, 'qdwh': TPU).
EIGH_METHODS = ('auto', 'qr', 'jacobi', 'qdwh')


def check_eigh_method(method: str) -> str:
  """`method` if it is one of `EIGH_METHODS`, else one ValueError that lists them."""
  if method not in EIGH_METHODS:
    raise ValueError(f'eigh method {method!r} is not one of {EIGH_METHODS}: auto is the '
                     "platform's default; qr runs on CPU/GPU, jacobi on GPU/TPU, qdwh on TPU")
  return method


def _sorted_eigh(m: jax.Array, method: str = 'auto') -> tuple[jax.Array, jax.Array]:
  sym = (m + m.T) / 2
  if method == 'auto':
    values, vectors = jnp.linalg.eigh(sym)
  else:
    vectors, values = jax.lax.linalg.eigh(
        sym, symmetrize_input=False,
        implementation=jax.lax.linalg.EighImplementation(check_eigh_method(method)))
  return jnp.maximum(values[::-1], 0.0), vectors[:, ::-1]


@functools.partial(jax.jit, static_argnames='method')
def layer_eigenbasis(A: jax.Array, G: jax.Array, method: str = 'auto') -> tuple[jax.Array, ...]:
  """(UA, lam, UG, mu) of A [d_in, d_in] and G [d_out, d_out], descending. jit-safe.

  `method` picks the eigensolver (`EIGH_METHODS`). On TPU the default, QDWH,
  is a large program for libtpu to compile (on a 2-core host a 1024² matrix
  takes minutes and about 5 GB of host memory, a 4096² one ran out of 23 GB);
  'jacobi' is libtpu's own Jacobi kernel, which compiles in seconds at 11008²
  (docs/results/pod_compile.md).
  """
  lam, ua = _sorted_eigh(A, method)
  mu, ug = _sorted_eigh(G, method)
  return ua, lam, ug, mu


def eigenbasis(factors: Mapping[str, factors_lib.LayerFactors], method: str = 'auto'
               ) -> dict[str, LayerBasis]:
  """Eigenbasis of every layer's factors (from `factors.estimate_factors`); `method` as above."""
  check_eigh_method(method)
  return {name: LayerBasis(*dispatch.settle(layer_eigenbasis(f.A, f.G, method)), view=f.view)
          for name, f in factors.items()}


def coefficients(w: jax.Array, ua: jax.Array, ug: jax.Array) -> jax.Array:
  """C = U_Aᵀ W U_G, a layer matrix [rows_in, d_out] in the Kronecker eigenbasis. jit-safe."""
  return jnp.matmul(jnp.matmul(ua.T, w, precision=HIGHEST), ug, precision=HIGHEST)


def from_coefficients(c: jax.Array, ua: jax.Array, ug: jax.Array) -> jax.Array:
  """W = U_A C U_Gᵀ, the inverse of `coefficients`. jit-safe."""
  return jnp.matmul(jnp.matmul(ua, c, precision=HIGHEST), ug.T, precision=HIGHEST)


def pair_mass(basis: LayerBasis) -> jax.Array:
  """K-FAC pair curvature mass Π_ij = λ_i μ_j, [rows_in, d_out]. jit-safe."""
  return basis.lam[:, None] * basis.mu[None, :]


def _homogeneous_paths(bases: Mapping[str, LayerBasis]) -> frozenset[str]:
  return frozenset(n for n, b in bases.items() if b.view.homogeneous)


def eigencorrection_sums(apply_fn: Callable, params, bases: Mapping[str, LayerBasis], batch,
                         rng: jax.Array, *, fisher_type: str = 'true',
                         likelihood: likelihoods.Likelihood = 'categorical',
                         apply_kwargs: Mapping[str, Any] | None = None):
  """Σ m (U_Aᵀa)² ⊗ (U_Gᵀg)² per layer of one batch: {name: (S [rows_in, d_out], count)}.

  jit-safe; the samples are those of `factors.layer_samples`, with each
  layer's homogeneous coordinate as in its basis.
  """
  samples = factors_lib.layer_samples(
      apply_fn, params, batch, rng, layers=tuple(bases), fisher_type=fisher_type,
      likelihood=likelihood, homogeneous=_homogeneous_paths(bases), apply_kwargs=apply_kwargs)
  out = {}
  for name, s in samples.items():
    at = jnp.matmul(s.a, bases[name].UA, precision=HIGHEST)  # [N, rows_in]
    gt = jnp.matmul(s.g, bases[name].UG, precision=HIGHEST)  # [N, d_out]
    out[name] = (jnp.matmul((at * at * s.mask[:, None]).T, gt * gt, precision=HIGHEST),
                 s.mask.sum())
  return out


def make_eigencorrection_accumulator(apply_fn: Callable, *, mesh: Mesh,
                                     fisher_type: str = 'true',
                                     likelihood: likelihoods.Likelihood = 'categorical',
                                     apply_kwargs: Mapping[str, Any] | None = None) -> Callable:
  """`accumulate(sums, params, bases, batch, rng) -> sums`, jitted once per shape."""
  likelihoods.check(likelihood, fisher_type)
  kwargs = dict(apply_kwargs or {})

  def accumulate(sums, params, bases, batch, rng):
    new = eigencorrection_sums(apply_fn, params, bases, batch, rng, fisher_type=fisher_type,
                               likelihood=likelihood, apply_kwargs=kwargs)
    return jax.tree.map(jnp.add, sums, new)

  return jax.jit(accumulate, donate_argnums=0, out_shardings=mesh_lib.replicated(mesh))


def zero_eigencorrection_sums(bases: Mapping[str, LayerBasis]):
  """Zero sums for `make_eigencorrection_accumulator`."""
  return {n: (jnp.zeros(b.shape, jnp.float32), jnp.zeros((), jnp.float32))
          for n, b in bases.items()}


def estimate_eigencorrection(apply_fn: Callable, params, bases: Mapping[str, LayerBasis],
                             batches: Iterable, *, rng: jax.Array, mesh: Mesh | None = None,
                             fisher_type: str = 'true',
                             likelihood: likelihoods.Likelihood = 'categorical',
                             apply_kwargs: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
  """EK-FAC pair mass S [rows_in, d_out] for each layer of `bases`, averaged over samples.

  The arguments are those of `factors.estimate_factors` (use the same
  likelihood and `apply_kwargs`); `mesh=None` uses all local devices.
  """
  likelihoods.check(likelihood, fisher_type)
  apply_fn, params = taps.as_function(apply_fn, params)
  mesh = mesh_lib.data_mesh(mesh)
  accumulate = make_eigencorrection_accumulator(apply_fn, mesh=mesh, fisher_type=fisher_type,
                                                likelihood=likelihood, apply_kwargs=apply_kwargs)
  sums = None
  for i, batch in enumerate(batches):
    factors_lib.check_batch(batch)
    batch = mesh_lib.shard_batch(batch, mesh)
    if sums is None:
      sums = jax.device_put(zero_eigencorrection_sums(bases), mesh_lib.replicated(mesh))
    sums = dispatch.settle(accumulate(sums, params, bases, batch, jax.random.fold_in(rng, i)))
  if sums is None:
    raise ValueError('no batches were given; pass at least one batch')
  counts = jax.device_get({n: s[1] for n, s in sums.items()})
  out = {}
  for name in bases:
    if counts[name] <= 0:
      raise ValueError(f'layer {name!r} has 0 recorded tokens; did the batch mask out every '
                       'position?')
    out[name] = sums[name][0] / counts[name]
  return out
