"""Minibatch CKA streamed over batches and devices (Nguyen et al., ICLR 2021, Eq. 2).

CKA_mb(X, Y) = Σ_b HSIC₁(K_b, L_b) / sqrt(Σ_b HSIC₁(K_b, K_b) · Σ_b HSIC₁(L_b, L_b)),
with HSIC₁ the unbiased estimator (Song et al. 2012). Each device computes the
all-pairs HSIC of its own rows of the batch (`jax.shard_map` over `data`), the
per-device sums are `psum`-reduced, and a host loop adds batches. Memory is
O(layers · (batch/devices)²), independent of the number of examples n; each
device's rows form one minibatch, so a device needs at least 4 rows.

Each minibatch's features are centered and power-of-two scaled before its HSIC
(`alignment.hsic_matrix_update`: exact for the unbiased estimator), so offsets
and activation scales cost no float32 precision. NaN and inf entries are
counted on device per feature (psum-reduced, so every host sees the same
counts) and raise one ValueError at the end naming the feature and the first
batch that had them. On multi-device CPU each batch's update is waited for
(`parallel.settle`), so the psums of consecutive batches are never in flight
together.
"""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from lossland.parallel import dispatch
from lossland.parallel import mesh as mesh_lib
from lossland.stitching import alignment as cka_lib


@functools.lru_cache(maxsize=32)
def make_hsic_update(mesh: Mesh, num_features: int):
  """Returns jitted `update((hsic, bad, first), feats, index) -> (hsic, bad, first)`.

  hsic [F, F] is the running HSIC sum, bad [F] the running count of non-finite
  entries of each feature, first [F] the first batch `index` (int32) that had
  any (-1 if none); start from zeros, zeros, -1 (see `minibatch_cka_matrix`).
  `feats` is a tuple of F arrays [batch, d_f] sharded on `data` (see
  `parallel.shard_batch`); the results are replicated. Jitted once per feature
  shapes; cached per (mesh, num_features), so repeated `minibatch_cka_matrix`
  calls reuse the compiled update.
  """
  def local(state, feats, index):
    hsic, bad, first = state
    part = cka_lib.hsic_matrix_update(jnp.zeros_like(hsic), feats, ())
    count = jnp.stack([jnp.sum(~jnp.isfinite(f), dtype=jnp.int32) for f in feats])
    count = jax.lax.psum(count, mesh_lib.DATA_AXIS)
    first = jnp.where((first < 0) & (count > 0), index, first)
    return hsic + jax.lax.psum(part, mesh_lib.DATA_AXIS), bad + count, first

  sharded = jax.shard_map(local, mesh=mesh,
                          in_specs=((P(), P(), P()),
                                    tuple(P(mesh_lib.DATA_AXIS) for _ in range(num_features)),
                                    P()),
                          out_specs=(P(), P(), P()), check_vma=False)
  return jax.jit(sharded, donate_argnums=0)


def accumulate_hsic(batches: Iterable[Sequence], *, mesh: Mesh | None = None):
  """(hsic [F, F], bad [F], first [F]) summed over host batches of F feature matrices.

  The pass of `minibatch_cka_matrix` without the ratio: all-pairs unbiased
  HSIC summed over minibatches, each feature's count of non-finite entries and
  the first batch that had any (-1 if none), all replicated. `mesh=None` uses
  all local devices on the `data` axis.
  """
  mesh = mesh_lib.data_mesh(mesh)
  state = update = None
  for index, feats in enumerate(batches):
    feats = tuple(feats)
    global_rows = feats[0].shape[0] * jax.process_count()  # each process passes its own rows
    n_local = global_rows // mesh.shape[mesh_lib.DATA_AXIS]
    if n_local < 4:
      raise ValueError(f'each of the {mesh.shape[mesh_lib.DATA_AXIS]} devices gets {n_local} '
                       f'rows of a batch of size {global_rows}, but the unbiased HSIC '
                       'needs at least 4 per minibatch; use a larger batch')
    feats = mesh_lib.shard_batch(feats, mesh)
    if update is None:
      update = make_hsic_update(mesh, len(feats))
      num = len(feats)
      state = jax.device_put((jnp.zeros((num, num), jnp.float32), jnp.zeros(num, jnp.int32),
                              jnp.full(num, -1, jnp.int32)), mesh_lib.replicated(mesh))
    state = dispatch.settle(update(state, feats, jnp.int32(index)))
  if state is None:
    raise ValueError('minibatch CKA got no batches')
  return state


def minibatch_cka_matrix(batches: Iterable[Sequence], num_x: int, *,
                         mesh: Mesh | None = None) -> jax.Array:
  """[num_x, F − num_x] minibatch linear CKA from host batches of F feature matrices.

  Args:
    batches: iterable of sequences (x_1..x_num_x, y_1..y_m) of [batch, d] arrays,
      the features of the same batch of inputs under each layer.
    num_x: how many of the F features are the rows of the result.
    mesh: a mesh with a `data` axis; batch/devices must be >= 4. None: all
      local devices.

  Raises ValueError if any feature had NaN or inf entries (after the pass, so
  the loop never waits on a device-to-host check).
  """
  hsic, bad, first = accumulate_hsic(batches, mesh=mesh)
  name = lambda k: f'x_{k + 1}' if k < num_x else f'y_{k - num_x + 1}'
  raise_if_non_finite(jax.device_get(bad), jax.device_get(first),
                      [name(k) for k in range(len(bad))])
  return cka_lib.cka_from_hsic(hsic, num_x)


def raise_if_non_finite(bad, first, names: Sequence[str]) -> None:
  """One ValueError listing every feature (by `names[k]`) that had NaN or inf entries.

  `minibatch_cka_matrix` names features as in its docstring (x_1.., y_1..);
  batches count from 0.
  """
  found = [f'{names[k]} (index {k} of each batch): {int(bad[k])} non-finite entries, first in '
           f'batch {int(first[k])} (counting from 0)' for k in range(len(bad)) if bad[k] > 0]
  if found:
    raise ValueError('minibatch CKA: non-finite activations in ' + '; '.join(found) +
                     '. Similarity indices need finite activations: find where the model '
                     'produces them (a diverged checkpoint, an overflowing dtype) or drop those '
                     'examples')
