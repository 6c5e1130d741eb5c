"""Inputs at the edges of the library's entry points: each is refused by name, or exact.

Empty batches and feature matrices, NaN/inf params, kernels, noise and
settings, labels outside the model's classes, and ρ = 1 (the edit keeps the
params bit for bit).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import twin_models as tm
from lossland import curvature, lowrank
from lossland import guidance as G
from lossland import parallel
from lossland import stitching as st
from lossland.data import shapes


@pytest.fixture(scope='module')
def token_model():
  model = tm.TokenClassifier()
  x = jax.random.randint(jax.random.key(0), (8, tm.SEQ), 0, tm.VOCAB)
  return model, model.init(jax.random.key(1), x), x


def _factors(model, params, batch, **kw):
  return curvature.estimate_factors(model.apply, params, [batch], rng=jax.random.key(2),
                                    select=['Dense_1'], **kw)


def test_factors_refuse_an_empty_batch_nan_params_and_labels_outside_the_classes(token_model):
  model, params, x = token_model
  with pytest.raises(ValueError, match='0 rows'):
    _factors(model, params, {'inputs': x[:0]})
  poisoned = jax.tree_util.tree_map_with_path(
      lambda p, v: v * jnp.nan if 'Dense_0' in jax.tree_util.keystr(p) else v, params)
  with pytest.raises(ValueError, match=r"NaN or inf in 2 leaves.*Dense_0"):
    _factors(model, poisoned, {'inputs': x})
  labels = jnp.full((8,), tm.CLASSES)  # one past the last class
  with pytest.raises(ValueError, match=rf'labels from {tm.CLASSES} to {tm.CLASSES}.*'
                                       rf'{tm.CLASSES} classes'):
    _factors(model, params, {'inputs': x, 'labels': labels}, fisher_type='empirical')
  masked = {'inputs': x, 'labels': labels.at[:4].set(0),
            'mask': jnp.arange(8) < 4}  # the bad labels are masked out: fine
  assert np.isfinite(_factors(model, params, masked, fisher_type='empirical')['Dense_1'].G).all()


def test_the_edit_at_rho_one_returns_the_params_bit_for_bit(token_model):
  model, params, x = token_model
  f = curvature.estimate_factors(model.apply, params, [{'inputs': x}], rng=jax.random.key(2),
                                 select=['Dense_0', 'Einsum_0'], homogeneous=True)
  kept = curvature.curvature_edit(params, curvature.eigenbasis(f), rho=1.0)
  for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('index', sorted(st.INDICES))
def test_every_similarity_index_refuses_empty_inputs(index):
  x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
  for a, b in ((x[:0], x[:0]), (x[:, :0], x), (x, x[:, :0])):
    with pytest.raises(ValueError, match='nothing to compare'):
      st.similarity_matrices({'a': a}, {'b': b}, indices=[index])


def test_replace_dense_names_a_layer_whose_kernel_is_not_finite(token_model):
  model, params, x = token_model
  bad = jax.tree_util.tree_map_with_path(
      lambda p, v: v.at[0, 0].set(jnp.inf) if 'Dense_0' in jax.tree_util.keystr(p)
      and v.ndim == 2 else v, params)
  fm = lowrank.replace_dense(model, 'lowrank', select='Dense_0', rank=2)
  with pytest.raises(ValueError, match=r"layer 'Dense_0'.*1 NaN or inf"):
    fm.convert(bad, x)
  plain = lowrank.replace_dense(tm.plain_token_classifier, 'lowrank', select='Dense_0', rank=2,
                                params=bad)
  with pytest.raises(ValueError, match=r"layer 'Dense_0'.*1 NaN or inf"):
    plain.convert(x)


@pytest.fixture(scope='module')
def sampler():
  tokens = np.stack([shapes.tokenize('a red circle')] * 2)
  model = tm.LinenDenoiser()
  params = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,)), tokens)
  fn = G.make_sampler(model.apply, G.linear_schedule(), num_steps=2,
                      null_tokens=jnp.asarray(shapes.tokenize('')),
                      mesh=parallel.make_mesh({'data': 2}, jax.devices()[:2]))
  batch = {'noise': jax.random.normal(jax.random.key(1), (2, 8, 8, 3)), 'tokens': tokens}
  return fn, params, batch


def test_samplers_refuse_nan_inputs_and_zero_seeds(sampler):
  fn, params, batch = sampler
  assert np.isfinite(fn(params, batch, cfg_scale=3.0).images).all()
  cases = [
      (params, {**batch, 'noise': batch['noise'][:0], 'tokens': batch['tokens'][:0]}, 3.0,
       '0 seeds'),
      (params, {**batch, 'noise': batch['noise'].at[0, 0, 0, 0].set(jnp.nan)}, 3.0,
       r"batch\['noise'\] holds NaN"),
      (params, batch, float('nan'), 'cfg_scale=nan is not finite'),
      (jax.tree.map(lambda v: v * jnp.inf, params), batch, 3.0, 'params hold NaN or inf'),
  ]
  for p, b, cfg, message in cases:
    with pytest.raises(ValueError, match=message):
      fn(p, b, cfg_scale=cfg)
