"""Minibatch CKA streamed over batches and devices (Nguyen et al., ICLR 2021, Eq. 2).

CKA_mb(X, Y) = Σ_b HSIC₁(K_b, L_b) / sqrt(Σ_b HSIC₁(K_b, K_b) · Σ_b HSIC₁(L_b, L_b)),
with HSIC₁ the unbiased estimator (Song et al. 2012). Each device computes the
all-pairs HSIC of its own rows of the batch (`jax.shard_map` over `data`), the
per-device sums are `psum`-reduced, and a host loop adds batches. Memory is
O(layers · (batch/devices)²), independent of the number of examples n; each
device's rows form one minibatch, so a device needs at least 4 rows.
"""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from lossland.parallel import mesh as mesh_lib
from lossland.stitching import alignment as cka_lib


@functools.lru_cache(maxsize=32)
def make_hsic_update(mesh: Mesh, num_features: int):
  """Returns jitted `update(hsic [F, F], feats: tuple of F arrays [batch, d_f]) -> hsic`.

  The batch must be sharded on `data` (see `parallel.shard_batch`); the result
  is replicated. Jitted once per feature shapes; cached per (mesh, num_features),
  so repeated `minibatch_cka_matrix` calls reuse the compiled update.
  """
  def local(hsic, feats):
    part = cka_lib.hsic_matrix_update(jnp.zeros_like(hsic), feats, ())
    return hsic + jax.lax.psum(part, mesh_lib.DATA_AXIS)

  sharded = jax.shard_map(local, mesh=mesh,
                          in_specs=(P(), tuple(P(mesh_lib.DATA_AXIS) for _ in range(num_features))),
                          out_specs=P(), check_vma=False)
  return jax.jit(sharded, donate_argnums=0)


def minibatch_cka_matrix(batches: Iterable[Sequence], num_x: int, *, mesh: Mesh) -> jax.Array:
  """[num_x, F − num_x] minibatch linear CKA from host batches of F feature matrices.

  Args:
    batches: iterable of sequences (x_1..x_num_x, y_1..y_m) of [batch, d] arrays,
      the features of the same batch of inputs under each layer.
    num_x: how many of the F features are the rows of the result.
    mesh: a mesh with a `data` axis; batch/devices must be >= 4.
  """
  hsic = update = None
  for feats in batches:
    feats = tuple(feats)
    n_local = feats[0].shape[0] // mesh.shape[mesh_lib.DATA_AXIS]
    if n_local < 4:
      raise ValueError(f'each of the {mesh.shape[mesh_lib.DATA_AXIS]} devices gets {n_local} '
                       f'rows of a batch of size {feats[0].shape[0]}, but the unbiased HSIC '
                       'needs at least 4 per minibatch; use a larger batch')
    feats = mesh_lib.shard_batch(feats, mesh)
    if update is None:
      update = make_hsic_update(mesh, len(feats))
      hsic = jax.device_put(jnp.zeros((len(feats), len(feats)), jnp.float32),
                            mesh_lib.replicated(mesh))
    hsic = update(hsic, feats)
  if hsic is None:
    raise ValueError('minibatch_cka_matrix got no batches')
  return cka_lib.cka_from_hsic(hsic, num_x)
