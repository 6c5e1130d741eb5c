"""Device meshes from config and data-parallel batch placement.

Library code never calls `jax.devices()`: launchers build the mesh once
(`make_mesh(axes, jax.devices())`) and pass it down.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
MODEL_AXIS = 'model'


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device]) -> Mesh:
  """A mesh with the given axis sizes; at most one size may be -1 (inferred).

  Example: `make_mesh({'data': -1, 'model': 1}, jax.devices())`.
  """
  names, sizes = list(axes), [int(s) for s in axes.values()]
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {dict(axes)}')
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
    raise ValueError(f'mesh axes {dict(axes)} do not fit {len(devices)} devices; '
                     'use sizes whose product divides the device count, one of them -1')
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(f'mesh axes {dict(zip(names, sizes))} use {math.prod(sizes)} devices but '
                     f'{len(devices)} are available; set one axis to -1 to infer it')
  return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_sharding(mesh: Mesh, ndim: int, *, leading_axes: int = 0) -> NamedSharding:
  """Shards dimension `leading_axes` (the batch) over `data`, the rest replicated."""
  spec = [None] * ndim
  spec[leading_axes] = DATA_AXIS
  return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch, mesh: Mesh, *, leading_axes: int = 0):
  """Places this process's rows of a host batch (a pytree of numpy arrays) on the mesh.

  The batch dimension (`leading_axes`, e.g. 1 for a [steps, batch, ...] block)
  is split over the `data` axis; on several hosts each process passes its own
  rows and the result is one global array.
  """
  data_size = mesh.shape[DATA_AXIS]
  def put(x):
    x = np.asarray(x)
    global_rows = x.shape[leading_axes] * jax.process_count()
    if global_rows % data_size:
      raise ValueError(f'global batch size {global_rows} is not divisible by the data axis '
                       f'({data_size} devices); choose a batch size that is a multiple of '
                       f'{data_size} or change mesh.data')
    sharding = batch_sharding(mesh, x.ndim, leading_axes=leading_axes)
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(put, batch)


def data_mesh(mesh: Mesh | None = None) -> Mesh:
  """`mesh`, or all local devices on one `data` axis when it is None (the methods' default)."""
  return make_mesh({DATA_AXIS: -1}, jax.local_devices()) if mesh is None else mesh


def put_replicated(tree, mesh: Mesh):
  """`jax.device_put(tree, replicated(mesh))` that also works when `mesh` spans processes.

  Every process must pass the same values. On several processes jax refuses
  to device_put typed PRNG key arrays (`jax.random.key`) and arrays committed to
  one local device onto a sharding over other processes' devices; keys go
  through their raw key data here and local arrays through the host.
  """
  sharding = replicated(mesh)
  spans_processes = len({d.process_index for d in mesh.devices.flat}) > 1

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=impl)
    if spans_processes and isinstance(x, jax.Array) and x.is_fully_addressable:
      x = np.asarray(x)
    return jax.device_put(x, sharding)

  return jax.tree.map(put, tree)
