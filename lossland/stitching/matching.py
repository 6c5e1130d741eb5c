"""Stitching layers and direct matching (DM) from streamed normal equations.

Balogh & Jelasity, "How not to Stitch Representations to Measure Similarity"
(AAAI 2025), Sec. 3: the stitching layer T is affine. Conventions (as in the
paper's code): dense features stay [N, d]; token features [N, T, d] become
(N·T, d); a conv map [N, H, W, C] is bilinearly resized to the target's H×W
and becomes (N·H·W, C), so T is a 1x1 convolution. Direct matching fits T in
closed form, min_W ‖[A 1] W − B‖² (+ ridge), the least-squares / pseudo-inverse
solution (Sec. 3.2); the structural score is ‖T(A) − B‖²_F / ‖B‖²_F.

Streaming: the normal equations need only the Gram matrix of [A, B, 1]. For
many layers at once we accumulate one *joint* Gram matrix of all layers'
features (per target resolution), so one pass over the data yields every
L_A × L_B stitch: XᵀX of source i and XᵀY of pair (i, j) are its sub-blocks.
Features are shifted by a fixed per-feature offset (the first batch's mean)
before accumulating, which keeps float32 sums well conditioned; the ones
column absorbs the shift exactly. The accumulation is jit-safe and runs with
the batch sharded on a mesh's `data` axis (XLA reduces the partial Grams);
the small solve runs on the host in float64.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- stitch layer
def stitch_inputs(a: jax.Array, target_shape: Sequence[int]) -> jax.Array:
  """Source activation -> [rows, d_in] features aligned with the target's rows.

  a: [N, d], [N, T, d] or [N, H, W, C]; target_shape the receiving layer's
  output shape (same rank). Conv maps are bilinearly resized to the target's H×W.
  """
  target_shape = tuple(target_shape)
  if a.ndim != len(target_shape) or a.shape[0] != target_shape[0]:
    raise ValueError(f'cannot stitch a layer of shape {a.shape} into one of shape '
                     f'{target_shape}: stitches connect dense->dense, tokens->tokens (same T) '
                     'or conv->conv layers of the same batch')
  if a.ndim == 4 and a.shape[1:3] != target_shape[1:3]:
    a = jax.image.resize(a, (a.shape[0], *target_shape[1:3], a.shape[3]), method='bilinear')
  if a.ndim == 3 and a.shape[1] != target_shape[1]:
    raise ValueError(f'token stitch needs the same number of tokens, got {a.shape[1]} -> '
                     f'{target_shape[1]}')
  return a.reshape(-1, a.shape[-1])


def target_rows(b: jax.Array) -> jax.Array:
  """Receiving activation -> [rows, d_out]."""
  return b.reshape(-1, b.shape[-1])


def apply_stitch(stitch: Mapping[str, jax.Array], a: jax.Array, target) -> jax.Array:
  """T(a) shaped like `target` (an array or ShapeDtypeStruct). stitch: {'w': [d_in, d_out], 'b': [d_out]}."""
  x = stitch_inputs(a, target.shape)
  y = jnp.matmul(x.astype(jnp.float32), stitch['w'], precision=HIGHEST) + stitch['b']
  return y.reshape(target.shape).astype(target.dtype)


def init_stitch(rng: jax.Array, d_in: int, d_out: int, kind: str = 'random') -> dict:
  """A stitch {'w', 'b'}: 'random' (LeCun normal, zero bias, like nn.Dense) or 'identity'.

  For the 'direct' init, use `solve_direct`'s result.
  """
  if kind == 'random':
    w = jax.random.normal(rng, (d_in, d_out)) / np.sqrt(d_in)
  elif kind == 'identity':
    w = jnp.eye(d_in, d_out)
  else:
    raise ValueError(f"unknown stitch init {kind!r}; use 'random', 'identity' or the "
                     "'direct' solution from solve_direct")
  return {'w': w.astype(jnp.float32), 'b': jnp.zeros((d_out,), jnp.float32)}


# ----------------------------------------------------------------------------- joint statistics
@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each layer's features sit in the joint Gram of one target resolution.

  groups: one entry per target row-shape: (row_shape, {('a', name) or ('b', name): (start, stop)}, dim).
  The last row/column of each group's Gram is the ones column.
  """
  groups: tuple

  def block(self, side: str, name: str):
    for g, (_, blocks, _) in enumerate(self.groups):
      if (side, name) in blocks:
        return g, blocks[(side, name)]
    raise KeyError(f'no {side} layer {name!r} in the layout')


def make_layout(shapes_a: Mapping[str, Sequence[int]], shapes_b: Mapping[str, Sequence[int]]
                ) -> Layout:
  """Layout of the joint Gram for all stitches from layers of A (shapes_a) to layers of B.

  Targets with the same row structure (spatial size / token count) share a group;
  every compatible source appears once in each group. Host function (shapes only).

  Raises:
    ValueError: two layers of one group have different leading (example) axes,
      e.g. a layer called twice per forward pass (its calls are joined along
      the leading axis) against a layer called once; it names both layers.
  """
  row_shapes = []
  for shape in shapes_b.values():
    key = tuple(shape[1:-1])
    if key not in row_shapes:
      row_shapes.append(key)
  groups = []
  for key in row_shapes:
    blocks, offset = {}, 0
    for name, shape in shapes_a.items():
      if len(shape) - 2 == len(key) and (len(key) != 1 or tuple(shape[1:-1]) == key):
        blocks[('a', name)] = (offset, offset + shape[-1])
        offset += shape[-1]
    for name, shape in shapes_b.items():
      if tuple(shape[1:-1]) == key:
        blocks[('b', name)] = (offset, offset + shape[-1])
        offset += shape[-1]
    _check_rows(blocks, shapes_a, shapes_b)
    groups.append((key, blocks, offset))
  return Layout(tuple(groups))


def _check_rows(blocks, shapes_a, shapes_b) -> None:
  """Raises unless every layer of a group has the same leading axis (its rows pair up)."""
  sides = {'a': ('A', shapes_a), 'b': ('B', shapes_b)}
  first = None
  for side, name in blocks:
    model, shapes = sides[side]
    rows = int(shapes[name][0])
    if first is None:
      first = (model, name, rows)
    elif rows != first[2]:
      raise ValueError(
          f'layer {first[1]!r} of {first[0]} has {first[2]} rows on its leading axis but layer '
          f'{name!r} of {model} has {rows}: a layer called k times per forward pass gives k '
          'samples per example (its calls joined along the leading axis), and direct matching '
          'needs one activation per example on both sides; choose layers called once')


def _group_features(layout: Layout, g: int, acts_a, acts_b) -> jax.Array:
  key, blocks, _ = layout.groups[g]
  parts = []
  for (side, name), _ in sorted(blocks.items(), key=lambda kv: kv[1][0]):
    if side == 'a':
      a = acts_a[name]
      parts.append(stitch_inputs(a, (a.shape[0], *key, a.shape[-1])))
    else:
      parts.append(target_rows(acts_b[name]))
  return jnp.concatenate([p.astype(jnp.float32) for p in parts], axis=1)


def init_stats(layout: Layout, acts_a, acts_b) -> dict:
  """Zero statistics whose per-feature shift is the mean of this (first) batch."""
  out = {}
  for g, (_, _, dim) in enumerate(layout.groups):
    f = _group_features(layout, g, acts_a, acts_b)
    out[g] = {'shift': f.mean(axis=0), 'gram': jnp.zeros((dim + 1, dim + 1), jnp.float32),
              'rows': jnp.zeros((), jnp.float32)}
  return out


def update_stats(stats: dict, layout: Layout, acts_a, acts_b) -> dict:
  """Adds a batch's [F − shift, 1]ᵀ[F − shift, 1] to each group's Gram. Jit-safe."""
  out = {}
  for g in stats:
    f = _group_features(layout, g, acts_a, acts_b) - stats[g]['shift']
    f = jnp.concatenate([f, jnp.ones((f.shape[0], 1), f.dtype)], axis=1)
    out[g] = {'shift': stats[g]['shift'],
              'gram': stats[g]['gram'] + jnp.matmul(f.T, f, precision=HIGHEST),
              'rows': stats[g]['rows'] + f.shape[0]}
  return out


def solve_direct(stats: dict, layout: Layout, source: str, target: str, *,
                 ridge: float = 0.0, rcond: float = 1e-6) -> dict:
  """The DM stitch A[source] -> B[target] from accumulated statistics (host, float64).

  Solves (XᵀX + λ·mean(diag)·I) W = XᵀY with X = [A − s_a, 1] by pseudo-inverse
  (`rcond`: eigenvalues of XᵀX below rcond·max are dropped, i.e. singular values
  of X below sqrt(rcond)·max; the default 1e-6 sits above float32 accumulation
  noise, so rank-deficient inputs get the minimum-norm solution instead of
  amplified noise), then moves the shift into the bias. Not jit-safe (a tiny
  host solve).
  """
  g, (b0, b1) = layout.block('b', target)
  blocks = layout.groups[g][1]
  if ('a', source) not in blocks:
    raise KeyError(f'source layer {source!r} cannot be stitched into {target!r} (shape '
                   f'mismatch) or is not in the layout; sources here: '
                   f'{[n for s, n in blocks if s == "a"]}')
  a0, a1 = blocks[('a', source)]
  gram = np.asarray(jax.device_get(stats[g]['gram']), np.float64)
  shift = np.asarray(jax.device_get(stats[g]['shift']), np.float64)
  ones = gram.shape[0] - 1
  xi = np.r_[a0:a1, ones]
  xtx = gram[np.ix_(xi, xi)]
  xty = gram[np.ix_(xi, np.r_[b0:b1])]
  if ridge:
    d = a1 - a0
    xtx[:d, :d] += ridge * np.trace(xtx[:d, :d]) / d * np.eye(d)
  sol = np.linalg.pinv(xtx, rcond=rcond, hermitian=True) @ xty
  w, b = sol[:-1], sol[-1]
  b = b + shift[b0:b1] - shift[a0:a1] @ w
  return {'w': jnp.asarray(w, jnp.float32), 'b': jnp.asarray(b, jnp.float32)}


def target_moments(stats: dict, layout: Layout, target: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean [d], covariance [d, d]) of B[target]'s rows, from the same statistics (float64)."""
  g, (b0, b1) = layout.block('b', target)
  gram = np.asarray(jax.device_get(stats[g]['gram']), np.float64)
  shift = np.asarray(jax.device_get(stats[g]['shift']), np.float64)
  rows = float(stats[g]['rows'])
  s = gram[b0:b1, -1] / rows  # mean of (b − shift)
  cov = gram[b0:b1, b0:b1] / rows - np.outer(s, s)
  return s + shift[b0:b1], cov


def structural_residual(stitch, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(‖T(a) − b‖², ‖b‖²) summed over a batch; ratio of their sums is the structural score."""
  t = apply_stitch(stitch, a, b)
  return jnp.sum((t - b) ** 2), jnp.sum(b.astype(jnp.float32) ** 2)
