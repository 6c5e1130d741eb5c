"""Parameter shardings by regex rules over '/'-joined parameter paths.

A rule list such as `[('.*/mlp/(gate|up)/kernel', P(None, 'model')),
('.*/mlp/down/kernel', P('model', None))]` shards matching params (first match
wins); every other param is replicated.
"""
from __future__ import annotations

import math
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
  """A pytree of `NamedSharding` matching `params` (arrays or ShapeDtypeStructs).

  Raises:
    ValueError: for a rule that is not a (regex, PartitionSpec) pair, a pattern
      that is not a regex, a spec naming an axis `mesh` does not have, or a
      sharded dimension the mesh axis does not divide.
  """
  compiled = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f'sharding rule {rule!r} is not a (regex, PartitionSpec) pair, e.g. '
                       "('.*/mlp/up/kernel', P(None, 'model'))")
    pattern, spec = rule[0], P(*rule[1])
    try:
      compiled.append((re.compile(pattern), spec))
    except re.error as e:
      raise ValueError(f'sharding rule pattern {pattern!r} is not a valid regex: {e}') from e
    for axis in spec:
      for name in axis if isinstance(axis, tuple) else (axis,):
        if name is not None and name not in mesh.axis_names:
          raise ValueError(f'sharding rule {pattern!r} names mesh axis {name!r}; the mesh has '
                           f'axes {tuple(mesh.axis_names)}')

  def sharding(path, leaf):
    name = path_name(path)
    for pattern, spec in compiled:
      if pattern.fullmatch(name):
        if len(spec) > len(leaf.shape):
          raise ValueError(f'rule {pattern.pattern!r} gives {spec} to {name!r} of rank '
                           f'{len(leaf.shape)}')
        for dim, axis in zip(leaf.shape, spec):
          size = math.prod(mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))
                           if a is not None)
          if dim % size:
            raise ValueError(f'{name!r} dimension {dim} is not divisible by mesh axis '
                             f'{axis!r} of size {size}; change the rule or the mesh')
        return NamedSharding(mesh, spec)
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(sharding, params)
