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


def transformer_rules(*, fsdp_axis: str | None = 'data', tensor_axis: str | None = 'model'
                      ) -> list[tuple[str, P]]:
  """Param rules for `models.TransformerLM`: FSDP over `fsdp_axis`, Megatron TP over `tensor_axis`.

  Tensor parallelism (Shoeybi et al. 2019, sec. 3): the query/key/value and
  MLP gate/up kernels are split by output column (heads, hidden units), the
  attention out and MLP down kernels by input row, so each block needs one
  reduction of its output; the output head is split by vocabulary column and
  the embedding table by its model dimension. FSDP (ZeRO-3, Rajbhandari et al.
  2020) additionally splits the other dimension of every matrix over the data
  axis; XLA gathers it where it is used. Norm scales stay replicated. Either
  axis may be None (pure FSDP: `tensor_axis=None`; pure TP: `fsdp_axis=None`).
  A dimension an axis does not divide makes `param_shardings` raise (choose
  a mesh that divides d_model, the head count and mlp_dim).
  """
  f, t = fsdp_axis, tensor_axis
  block = r'(.*/)?block_\d+'
  return [
      (rf'{block}/attn/(query|key|value)/kernel', P(f, t)),
      (rf'{block}/attn/out/kernel', P(t, f)),
      (rf'{block}/mlp/(gate|up)/kernel', P(f, t)),
      (rf'{block}/mlp/down/kernel', P(t, f)),
      (r'(.*/)?embed/embedding', P(f, t)),
      (r'(.*/)?head/kernel', P(f, t)),
  ]


def fsdp_rules(params, mesh: Mesh, *, axis: str = 'data', min_size: int = 2 ** 16
               ) -> list[tuple[str, P]]:
  """Rules that shard every param of at least `min_size` elements over `axis` (ZeRO-3/FSDP).

  Works for any model (a LOST or SLTrain layer's factors included): each such
  param is split along its largest dimension that `axis` divides; the rest
  (small or indivisible) stay replicated. The rules name the exact paths, so
  they can be appended after hand-written ones (first match wins) or saved in
  a config's `param_rules`.
  """
  size = mesh.shape[axis]
  rules = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    shape = tuple(leaf.shape)
    if math.prod(shape) < min_size or not shape:
      continue
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    dim = next((d for d in dims if shape[d] % size == 0), None)
    if dim is None:
      continue
    spec = [None] * len(shape)
    spec[dim] = axis
    rules.append((re.escape(path_name(path)), P(*spec)))
  return rules
