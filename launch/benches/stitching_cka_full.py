"""Benchmark: the full-batch L x L linear-CKA matrix against NumPy and its bare products.

    python -m launch.bench --config=configs/stitching/bench_cka_full.py

Features of n examples for L layers of two "models" (`stitching_cka`'s
synthetic ones). Three contenders, alternated round by round after a
warm-up: lossland's `cka_matrix`; the same formula in NumPy pair by pair
(each layer centered once, then ‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) per pair, as
similarity code computes one pair at a time), float32; and the bare
cross-covariance products XcᵢᵀYcⱼ of every pair in one jitted XLA program
on pre-centered inputs (the matmul work the matrix cannot avoid). Prints
each one's min and median, lossland's ratio to the bare products (target
<= 1.5) and NumPy's ratio to lossland (target >= 2), and the largest value
difference from NumPy.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from launch.benches import stitching_cka
from lossland.stitching import cka_matrix


def numpy_pairwise(xs, ys) -> np.ndarray:
  """Full-batch linear CKA pair by pair in NumPy: each side centered once, three products per pair."""
  xcs = [x - x.mean(0) for x in xs]
  ycs = [y - y.mean(0) for y in ys]
  out = np.zeros((len(xs), len(ys)))
  for i, x in enumerate(xcs):
    for j, y in enumerate(ycs):
      out[i, j] = np.sum((x.T @ y) ** 2) / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
  return out


@jax.jit
def _bare_products(xcs, ycs):
  return [[jnp.matmul(x.T, y, precision=jax.lax.Precision.HIGHEST) for y in ycs] for x in xcs]


def _timed(fn) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def run(config) -> dict:
  b = config.bench_args
  feats = stitching_cka.make_batches(b.n, b.n, b.layers, b.width)[0]  # one batch of all n
  xs, ys = feats[:b.layers], feats[b.layers:]
  xs_dev, ys_dev = [jnp.asarray(x) for x in xs], [jnp.asarray(y) for y in ys]
  centered = ([x - x.mean(0) for x in xs_dev], [y - y.mean(0) for y in ys_dev])
  contenders = {
      'lossland': lambda: cka_matrix(xs_dev, ys_dev),
      'numpy': lambda: numpy_pairwise(xs, ys),
      'bare_products': lambda: _bare_products(*centered),
  }
  for fn in contenders.values():  # warm-up: compiles
    jax.block_until_ready(fn())
  times = {name: [] for name in contenders}
  for _ in range(b.repeats):
    for name, fn in contenders.items():
      times[name].append(_timed(fn))
  ours = np.asarray(cka_matrix(xs_dev, ys_dev))
  diff = float(np.abs(ours - numpy_pairwise(xs, ys)).max())
  med = {name: float(np.median(t)) for name, t in times.items()}
  return {'n': b.n, 'width': b.width, 'layers': b.layers, 'rounds': b.repeats,
          **{f'{name}_median_s': m for name, m in med.items()},
          **{f'{name}_min_s': float(np.min(t)) for name, t in times.items()},
          'lossland_over_bare': med['lossland'] / med['bare_products'],
          'numpy_over_lossland': med['numpy'] / med['lossland'],
          'max_abs_diff_vs_numpy': diff}
