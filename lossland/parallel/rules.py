"""Parameter shardings by regex rules over '/'-joined parameter paths.

A rule list such as `[('.*/mlp/(gate|up)/kernel', P(None, 'model')),
('.*/mlp/down/kernel', P('model', None))]` shards matching params (first match
wins); every other param is replicated.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def path_name(path) -> str:
  """'block_0/mlp/up/kernel' for a pytree key path."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))))
  return '/'.join(parts)


def param_shardings(params, mesh: Mesh, rules: Sequence[tuple[str, P]] = ()):
  """A pytree of `NamedSharding` matching `params` (arrays or ShapeDtypeStructs)."""
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

  def sharding(path, leaf):
    name = path_name(path)
    for pattern, spec in compiled:
      if pattern.fullmatch(name):
        if len(spec) > len(leaf.shape):
          raise ValueError(f'rule {pattern.pattern!r} gives {spec} to {name!r} of rank '
                           f'{len(leaf.shape)}')
        for dim, axis in zip(leaf.shape, spec):
          if axis is not None and dim % mesh.shape[axis]:
            raise ValueError(f'{name!r} dimension {dim} is not divisible by mesh axis '
                             f'{axis!r} of size {mesh.shape[axis]}; change the rule or the mesh')
        return NamedSharding(mesh, spec)
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(sharding, params)
