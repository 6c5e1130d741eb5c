"""Linear-CKA matrices: lossland vs NumPy and vs the bare matrix products, side by side.

    python -m benchmarks.cka_vs_numpy [--n 10000] [--width 512] [--layers 12] \\
        [--batch 1000] [--rounds 3] [--devices N]

Features of n examples for L layers of two "models" (`launch.benches.stitching_cka`'s
synthetic ones, width 512). Needs only lossland (NumPy is its dependency);
NumPy's matrix products use OpenBLAS on all the process's cores
(OPENBLAS_NUM_THREADS unset), as a researcher's script would. About 3 minutes
on 2 cores.

Full batch (Kornblith et al. 2019, Eq. 5, in feature space):
- `lossland`: `stitching.cka_matrix` (each layer centered once, each self term
  once, every cross term from one product of a layer with the other side's
  layers side by side);
- `numpy_pairwise`: the same formula pair by pair, ‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)
  per pair on columns centered once, as similarity code computes one pair at a time;
- `numpy_grouped`: NumPy doing what lossland does (self terms once, one product
  per layer with the other side concatenated);
- `bare_products`: only the cross products Xcᵢᵀ[Yc₁ … Yc_L] in one jitted
  program on pre-centered inputs: the work no implementation of the index avoids.

Minibatch (Nguyen et al. 2021, Eq. 2, unbiased HSIC summed over minibatches of
`batch / devices` rows):
- `lossland`: `stitching.minibatch_cka_matrix` over the host batches (sharded
  over the `data` axis, one compiled update per batch);
- `numpy`: the same estimator with each layer's Gram formed once per minibatch
  and all pairs' ⟨K̃, L̃⟩ from one product of the stacked Grams;
- `bare_gram_products`: only lossland's Gram row blocks and their all-pairs
  inner products per minibatch, one jitted program each.

Targets (issue 28): the full matrix within 1.5x of `bare_products` and at
least 2x faster than NumPy; the minibatch matrix within 1.3x of its Gram products.
"""
from __future__ import annotations

import argparse
import os


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--n', type=int, default=10000)
  p.add_argument('--width', type=int, default=512)
  p.add_argument('--layers', type=int, default=12)
  p.add_argument('--batch', type=int, default=1000, help='host batch of the minibatch pass')
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--devices', type=int, default=None,
                 help='emulated CPU devices (default: what lossland\'s launchers use)')
  return p.parse_args()


ARGS = _parse() if __name__ == '__main__' else None
if ARGS is not None and ARGS.devices:
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={ARGS.devices}'

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import side_by_side  # noqa: E402
from launch.benches import stitching_cka  # noqa: E402
from launch.benches.stitching_cka_full import numpy_pairwise  # noqa: E402
from lossland.parallel import data_mesh  # noqa: E402
from lossland.stitching import cka_matrix, minibatch_cka_matrix  # noqa: E402

HIGHEST = jax.lax.Precision.HIGHEST


def numpy_grouped(xs, ys) -> np.ndarray:
  xcs = [x - x.mean(0) for x in xs]
  ycs = [y - y.mean(0) for y in ys]
  xx = np.array([np.linalg.norm(x.T @ x) for x in xcs])
  yy = np.array([np.linalg.norm(y.T @ y) for y in ycs])
  side_by_side_y = np.concatenate(ycs, axis=1)
  ends = np.cumsum([y.shape[1] for y in ycs])[:-1]
  xy = np.stack([[s.sum() for s in np.split(np.sum((x.T @ side_by_side_y) ** 2, axis=0), ends)]
                 for x in xcs])
  return xy / (xx[:, None] * yy[None, :])


@jax.jit
def bare_products(xcs, side_by_side_y):
  return [jnp.matmul(x.T, side_by_side_y, precision=HIGHEST) for x in xcs]


def numpy_minibatch(batches, num_x: int, minibatch: int) -> np.ndarray:
  """Unbiased HSIC (Song et al. 2012, Eq. 5) of all pairs, summed over minibatches."""
  total = 0.0
  for feats in batches:
    for start in range(0, feats[0].shape[0], minibatch):
      grams = []
      for f in feats:
        x = f[start:start + minibatch]
        k = x @ x.T
        np.fill_diagonal(k, 0.0)
        grams.append(k)
      m = minibatch
      flat = np.stack([k.reshape(-1) for k in grams])  # [F, m²]
      sums = flat.sum(axis=1)
      rows = np.stack([k.sum(axis=1) for k in grams])  # K̃1
      hsic = (flat @ flat.T + np.outer(sums, sums) / ((m - 1) * (m - 2))
              - 2.0 / (m - 2) * (rows @ rows.T)) / (m * (m - 3))
      total = total + hsic
  diag = np.sqrt(np.maximum(np.diagonal(total), 0.0))
  return total[:num_x, num_x:] / (diag[:num_x, None] * diag[None, num_x:])


def make_bare_gram_products(blocks: int):
  """Lossland's Gram row blocks (p <= q) of every feature and their all-pairs inner products."""

  @jax.jit
  def products(feats):
    b = feats[0].shape[0] // blocks
    inner = jnp.zeros((len(feats), len(feats)), jnp.float32)
    for p in range(blocks):
      for q in range(p, blocks):
        g = jnp.stack([jnp.matmul(f[p * b:(p + 1) * b], f[q * b:(q + 1) * b].T, precision=HIGHEST)
                       for f in feats]).reshape(len(feats), -1)
        inner = inner + jnp.matmul(g, g.T, precision=HIGHEST)
    return inner

  return products


def full_batch(args) -> dict:
  feats = stitching_cka.make_batches(args.n, args.n, args.layers, args.width)[0]
  xs, ys = feats[:args.layers], feats[args.layers:]
  xs_dev, ys_dev = [jnp.asarray(x) for x in xs], [jnp.asarray(y) for y in ys]
  xcs = [x - x.mean(0) for x in xs_dev]
  ys_side = jnp.concatenate([y - y.mean(0) for y in ys_dev], axis=1)
  times = side_by_side.alternate({
      'lossland': lambda: jax.block_until_ready(cka_matrix(xs_dev, ys_dev)),
      'numpy_pairwise': lambda: numpy_pairwise(xs, ys),
      'numpy_grouped': lambda: numpy_grouped(xs, ys),
      'bare_products': lambda: jax.block_until_ready(bare_products(xcs, ys_side)),
  }, rounds=args.rounds)
  ours = np.asarray(cka_matrix(xs_dev, ys_dev))
  diff = float(np.abs(ours - numpy_pairwise(xs, ys)).max())
  return side_by_side.report(
      f'full-batch linear CKA, {args.layers} x {args.layers} layers, n {args.n}, width {args.width}',
      times, max_abs_diff_vs_numpy=diff, devices=jax.device_count())


def minibatch(args) -> dict:
  mesh = data_mesh(None)
  devices = mesh.devices.size
  per_device = args.batch // devices
  batches = stitching_cka.make_batches(args.n, args.batch, args.layers, args.width)
  blocks = next(k for k in (4, 2, 1) if per_device % k == 0)  # as hsic_matrix_update picks
  gram_products = make_bare_gram_products(blocks)
  minibatches = [[jnp.asarray(f[start:start + per_device]) for f in feats]
                 for feats in batches for start in range(0, args.batch, per_device)]

  def bare():
    jax.block_until_ready([gram_products(feats) for feats in minibatches])

  times = side_by_side.alternate({
      'lossland': lambda: jax.block_until_ready(minibatch_cka_matrix(batches, args.layers,
                                                                     mesh=mesh)),
      'numpy': lambda: numpy_minibatch(batches, args.layers, per_device),
      'bare_gram_products': bare,
  }, rounds=args.rounds)
  ours = np.asarray(minibatch_cka_matrix(batches, args.layers, mesh=mesh))
  diff = float(np.abs(ours - numpy_minibatch(batches, args.layers, per_device)).max())
  return side_by_side.report(
      f'minibatch linear CKA, {args.layers} x {args.layers} layers, n {args.n}, batch '
      f'{args.batch} on {devices} devices ({per_device} rows each), width {args.width}',
      times, max_abs_diff_vs_numpy=diff, devices=devices)


def main(args) -> None:
  full_batch(args)
  minibatch(args)


if __name__ == '__main__':
  main(ARGS)
