"""Benchmark: an L x L minibatch linear-CKA matrix, streamed and sharded vs straightforward NumPy.

    python -m launch.bench --config=configs/stitching/bench_cka.py

Features of n examples for L layers of two "models" (width d, synthetic, with
shared latent structure so CKA values are not trivial) arrive in batches.
lossland: `minibatch_cka_matrix` (one jitted, shard_map'ed update per batch:
each layer's Gram matrix computed once, in symmetric row blocks, all (2L)²
unbiased HSICs from one contraction, psum over `data`). NumPy: the same formula (Nguyen et al. 2021,
Eq. 2, unbiased HSIC per device-sized minibatch) computed pair by pair, as
similarity libraries do, in float32. To keep the run short on small machines,
NumPy is timed on `numpy_pairs` pairs and scaled linearly to all L² pairs
(every pair costs the same); its values are checked against ours.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from launch import common
from lossland.parallel import DATA_AXIS
from lossland.stitching import minibatch_cka_matrix


def make_batches(n: int, batch: int, layers: int, width: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  latent_dim = 64
  proj = [rng.normal(size=(latent_dim, width)).astype(np.float32) / 8 for _ in range(2 * layers)]
  batches = []
  for start in range(0, n, batch):
    z = rng.normal(size=(batch, latent_dim)).astype(np.float32)
    feats = []
    for i, p in enumerate(proj):
      noise = rng.normal(size=(batch, width)).astype(np.float32) * (0.2 + 0.1 * (i % layers))
      feats.append(np.maximum(z @ p, 0) + noise)
    batches.append(feats)
  return batches


def numpy_hsic_u(k: np.ndarray, l: np.ndarray) -> float:
  n = k.shape[0]
  k = k.copy(); l = l.copy()
  np.fill_diagonal(k, 0); np.fill_diagonal(l, 0)
  one_k, one_l = k.sum(), l.sum()
  return float((np.sum(k * l) + one_k * one_l / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (k.sum(0) @ l.sum(1))) / (n * (n - 3)))


def numpy_cka_pair(batches, i: int, j: int, minibatch: int) -> float:
  kl = kk = ll = 0.0
  for feats in batches:
    x, y = feats[i], feats[j]
    for s in range(0, len(x), minibatch):
      xs, ys = x[s:s + minibatch], y[s:s + minibatch]
      k, l = xs @ xs.T, ys @ ys.T
      kl += numpy_hsic_u(k, l); kk += numpy_hsic_u(k, k); ll += numpy_hsic_u(l, l)
  return kl / np.sqrt(kk * ll)


def run(config) -> dict:
  b = config.bench_args
  mesh = common.build_mesh(config.mesh, b.batch_size)
  devices = mesh.shape[DATA_AXIS]
  minibatch = b.batch_size // devices
  batches = make_batches(b.n, b.batch_size, b.layers, b.width)
  L = b.layers
  # Warm-up (compile) on one batch, then time the full stream.
  t0 = time.perf_counter()
  jax.block_until_ready(minibatch_cka_matrix(batches[:1], L, mesh=mesh))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(b.repeats):
    t0 = time.perf_counter()
    ours = np.asarray(jax.block_until_ready(minibatch_cka_matrix(batches, L, mesh=mesh)))
    times.append(time.perf_counter() - t0)
  ours_s = float(np.median(times))
  rng = np.random.default_rng(1)
  pairs = [(int(rng.integers(L)), int(rng.integers(L))) for _ in range(b.numpy_pairs)]
  t0 = time.perf_counter()
  ref = [numpy_cka_pair(batches, i, L + j, minibatch) for i, j in pairs]
  numpy_pairs_s = time.perf_counter() - t0
  numpy_s = numpy_pairs_s * (L * L) / len(pairs)
  diff = max(abs(ours[i, j] - r) for (i, j), r in zip(pairs, ref))
  blocks = next(k for k in (4, 2, 1) if minibatch % k == 0)  # as hsic_matrix_update picks
  per_device_bytes = (2 * L) * (minibatch // blocks) ** 2 * 4 + minibatch * b.width * 2 * L * 4
  return {'n': b.n, 'width': b.width, 'layers': L, 'batch_size': b.batch_size,
          'devices': devices, 'minibatch_per_device': minibatch,
          'lossland_seconds': ours_s, 'compile_seconds': compile_s,
          'numpy_seconds_extrapolated': numpy_s, 'numpy_pairs_timed': len(pairs),
          'numpy_seconds_for_timed_pairs': numpy_pairs_s,
          'speedup': numpy_s / ours_s, 'max_abs_diff_vs_numpy': float(diff),
          'working_set_bytes_per_device': int(per_device_bytes),
          'full_gram_bytes_n2': int(b.n ** 2 * 4)}
