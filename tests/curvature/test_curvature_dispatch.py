"""Curvature loops over many batches (and many layers) on 8 fake CPU devices finish.

Each loop dispatches one collective-bearing call per batch or layer; without
`parallel.settle` tens of them are in flight at once and XLA:CPU aborts the
process in a rendezvous (see tests/test_dispatch.py). Every test also checks the
numbers against a single-pass reference, so a loop that skips work fails too.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lossland import models, parallel
from lossland.curvature import edit, eigen, evaluate, factors, layer_views, metrics

NUM_BATCHES = 64
BATCH = 8  # one row per device


@pytest.fixture(scope='module')
def mesh():
  return parallel.make_mesh({'data': 8}, jax.devices())


@pytest.fixture(scope='module')
def mlp_batches():
  model = models.MLP(features=(6,), num_classes=3)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4)))
  rng = np.random.default_rng(0)
  batches = [{'inputs': rng.normal(size=(BATCH, 4)).astype(np.float32),
              'labels': rng.integers(0, 3, size=(BATCH,)).astype(np.int32)}
             for _ in range(NUM_BATCHES)]
  return model, params, batches


def _concatenated(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_factors_and_eigencorrection_over_many_batches(mesh, mlp_batches):
  model, params, batches = mlp_batches
  kw = dict(mesh=mesh, rng=jax.random.key(1), fisher_type='empirical')
  f = factors.estimate_factors(model.apply, params, batches, select='.*', **kw)
  bases = eigen.eigenbasis(f)
  masses = eigen.estimate_eigencorrection(model.apply, params, bases, batches, **kw)
  # References: one pass over all rows at once, on one device.
  whole = _concatenated(batches)
  layers = ('dense_0', 'head')
  sums = jax.jit(lambda p, b: factors.factor_sums(model.apply, p, b, None, layers=layers,
                                                  fisher_type='empirical'))(params, whole)
  s = jax.jit(lambda p, b: eigen.eigencorrection_sums(model.apply, p, bases, b, None,
                                                      fisher_type='empirical'))(params, whole)
  assert f['dense_0'].count == NUM_BATCHES * BATCH
  for name in layers:  # the same sums added in another order: float32 rounding only
    for k in ('A', 'G'):
      np.testing.assert_allclose(getattr(f[name], k), getattr(sums[name], k) / sums[name].count,
                                 rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(masses[name], s[name][0] / s[name][1], rtol=1e-5, atol=1e-7)


def test_edits_of_many_model_sharded_layers():
  """40 layers whose kernels are sharded over 8 devices: each per-layer edit has collectives."""
  rng = np.random.default_rng(1)
  names = [f'dense_{i}' for i in range(40)]
  kernels = {n: rng.normal(size=(8, 8)).astype(np.float32) for n in names}
  spd = lambda: (lambda m: m @ m.T + 0.1 * np.eye(8))(rng.normal(size=(8, 8))).astype(np.float32)
  view = lambda n: layer_views.view_of(n, nn.Dense(8, use_bias=False), (1, 8))
  f = {n: factors.LayerFactors(spd(), spd(), 1.0, view(n)) for n in names}
  params = {'params': {n: {'kernel': k} for n, k in kernels.items()}}
  model_mesh = parallel.make_mesh({'data': 1, 'model': 8}, jax.devices())
  sharded = jax.device_put(params, parallel.param_shardings(
      params, model_mesh, [('.*/kernel', P(None, 'model'))]))
  bases = eigen.eigenbasis(jax.device_put(f, parallel.replicated(model_mesh)))
  host_bases = jax.device_get(bases)
  edited = edit.curvature_edit(sharded, bases, 0.7)
  reference = edit.curvature_edit(params, host_bases, 0.7)  # on one device
  for name in names:
    np.testing.assert_allclose(edited['params'][name]['kernel'],
                               reference['params'][name]['kernel'], rtol=1e-4, atol=1e-5)
  counts = {n: 10 for n in names}
  for kind in ('random', 'inverted'):
    masks = edit.control_masks(kind, bases, counts, rng=jax.random.key(3))
    assert all(int(m.sum()) == 10 for m in masks.values())
  truncated = jax.device_get(edit.svd_edit(sharded, {n: view(n) for n in names},
                                           {n: 2 for n in names}))
  for name in names:  # the best rank-2 approximation: its error is the third singular value on
    err = np.linalg.norm(truncated['params'][name]['kernel'] - kernels[name], 2)
    np.testing.assert_allclose(err, np.linalg.svd(kernels[name], compute_uv=False)[2],
                               rtol=1e-4)


def test_lm_evaluator_perplexity_over_many_batches(mesh):
  """The experiments' evaluator, whose per-batch loop aborted the full-size run."""
  model = models.TransformerLM(vocab_size=16, d_model=16, num_layers=1, num_heads=2, mlp_dim=24)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))
  tokens = np.random.default_rng(0).integers(0, 16, size=500).astype(np.int32)
  ev = evaluate.LMEvaluator(model.apply, evaluate.heldout_batches(tokens, NUM_BATCHES, BATCH, 6, 0),
                            mesh=mesh)
  nll, count = jax.jit(lambda p, b: metrics.nll_sum(model.apply, p, b))(
      params, _concatenated([jax.device_get(b) for b in ev.ppl_batches]))
  expected = metrics.perplexity(float(nll), float(count))
  np.testing.assert_allclose(ev.perplexity(params), expected, rtol=1e-5)
