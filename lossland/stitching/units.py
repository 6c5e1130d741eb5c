"""What an example is when an activation has token or spatial axes.

Similarity indices compare [examples, features] matrices, and a stitch's
direct-matching fit and scores are computed on rows too. An activation
[N, ..., d] with token axes ([N, T, d]) or spatial axes ([N, H, W, C]) gives
such rows in one of two ways, chosen by `unit=`:

* 'tokens': every token / position is an example: rows [N·T, d] (or
  [N·H·W, C]). The two activations compared must then have the same token or
  spatial axes, so that row r of one and row r of the other are the same
  position of the same input.
* 'pooled': the mean over the token / spatial axes, one row per input: [N, d].
  The two sides may have different token or spatial sizes (each input is one
  vector whatever its resolution).

For [N, d] activations both are the same matrix. On token or spatial
activations the two readings measure different things and give different
numbers, so each entry point takes `unit=` and states its default.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

UNITS = ('tokens', 'pooled')


def check_unit(unit: str) -> str:
  if unit not in UNITS:
    raise ValueError(f"unknown unit {unit!r}; use 'tokens' (every token or position is an "
                     "example) or 'pooled' (the mean over token/spatial axes, one row per input)")
  return unit


def check_axes(shape_x, shape_y, unit: str, names: tuple[str, str] = ('x', 'y')) -> None:
  """Raises ValueError unless activations of these shapes can be compared under `unit`."""
  check_unit(unit)
  sx, sy = tuple(shape_x), tuple(shape_y)
  nx, ny = names
  if len(sx) < 2 or len(sy) < 2:
    raise ValueError(f'{nx} has shape {sx} and {ny} {sy}; activations are [examples, ..., '
                     'features] with at least 2 axes')
  if sx[0] != sy[0]:
    raise ValueError(f'{nx} has {sx[0]} examples but {ny} has {sy[0]}; pass the activations of '
                     'the same inputs, in the same order')
  if unit == 'tokens' and sx[1:-1] != sy[1:-1]:
    raise ValueError(f"with unit='tokens' every position is an example, so {nx} and {ny} need "
                     f'the same token/spatial axes, but {nx} has {sx[1:-1]} and {ny} {sy[1:-1]} '
                     f"(shapes {sx} and {sy}); use unit='pooled' to compare one mean vector per "
                     'input')


def rows(act, unit: str):
  """[N, ..., d] -> [rows, d] under `unit` (jnp in, jnp out; NumPy in, NumPy out). Jit-safe.

  Pooling averages in float32 (float64 for float64 NumPy input).
  """
  check_unit(unit)
  if act.ndim < 2:
    raise ValueError(f'an activation is [examples, ..., features]; got shape {act.shape}')
  if act.ndim == 2:
    return act
  if unit == 'tokens':
    return act.reshape(-1, act.shape[-1])
  axes = tuple(range(1, act.ndim - 1))
  if isinstance(act, np.ndarray):
    return act.mean(axis=axes, dtype=np.float64 if act.dtype == np.float64 else np.float32)
  return jnp.mean(act.astype(jnp.float32), axis=axes)


def pair_rows(x, y, unit: str, names: tuple[str, str] = ('x', 'y')):
  """(rows(x), rows(y)) after `check_axes`."""
  check_axes(x.shape, y.shape, unit, names)
  return rows(x, unit), rows(y, unit)
