"""FSDP + tensor parallelism of the transformer (`parallel.transformer_rules`) on 4 data x 2 model.

Training with every matrix split over both axes gives the losses and params
of training on one device: the sharding changes where each product is
computed and the order of its float32 reductions (partial sums over the
model axis, then over data), not the math. After 3 AdamW steps at lr 1e-2 the
params differ by a few float32 ulps of the update (atol 1e-5; the losses by
rtol 1e-5).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lossland import data, models, parallel, train

VOCAB, SEQ, BATCH = 32, 8, 8


def _fit(mesh, rules, residual_sharding=None):
  model = models.TransformerLM(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2,
                               mlp_dim=32, residual_sharding=residual_sharding)
  params = model.init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))
  tokens = np.random.default_rng(0).integers(0, VOCAB, 2048).astype(np.int32)
  return train.fit(params=jax.device_get(params), loss_fn=train.next_token_loss(model.apply),
                   optimizer=train.adamw(learning_rate=1e-2),
                   batch_fn=lambda s: data.lm_batch(tokens, s, batch_size=BATCH, seq_len=SEQ,
                                                    seed=1),
                   num_steps=3, mesh=mesh, rng=jax.random.key(1), data_seed=1,
                   param_rules=rules, steps_per_block=3, show_progress=False)


def test_fsdp_and_tensor_parallel_training_matches_one_device():
  rules = parallel.transformer_rules(fsdp_axis='data', tensor_axis='model')
  one = _fit(parallel.make_mesh({'data': 1, 'model': 1}, jax.devices()[:1]), rules)
  mesh = parallel.make_mesh({'data': 4, 'model': 2}, jax.devices())
  sharded = _fit(mesh, rules)
  p = sharded.state.params['params']
  assert p['block_0']['mlp']['up']['kernel'].sharding.spec == P('data', 'model')
  assert p['block_1']['attn']['out']['kernel'].sharding.spec == P('model', 'data')
  assert p['head']['kernel'].sharding.spec == P('data', 'model')
  assert p['final_norm']['scale'].sharding.spec == P()
  up = p['block_0']['mlp']['up']['kernel']
  assert {s.data.shape for s in up.addressable_shards} == {(4, 16)}  # [16, 32] / (4, 2)
  mu = sharded.state.opt_state
  assert any(getattr(x, 'sharding', None) is not None and x.shape == (16, 32)
             and x.sharding.spec == P('data', 'model') for x in jax.tree.leaves(mu))
  np.testing.assert_allclose(sharded.train_losses, one.train_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(sharded.state.params)),
                  jax.tree.leaves(jax.device_get(one.state.params))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_fsdp_rules_shard_large_params_of_any_model():
  mesh = parallel.make_mesh({'data': 4, 'model': 2}, jax.devices())
  params = {'w': jax.ShapeDtypeStruct((6, 512), jnp.float32),
            'odd': jax.ShapeDtypeStruct((255, 257), jnp.float32),
            'small': jax.ShapeDtypeStruct((2, 4), jnp.float32)}
  rules = parallel.fsdp_rules(params, mesh, min_size=16)
  shardings = parallel.param_shardings(params, mesh, rules)
  assert shardings['w'].spec == P(None, 'data')  # the largest dimension 4 divides
  assert shardings['odd'].spec == P()  # no dimension divisible by 4
  assert shardings['small'].spec == P()  # below min_size


def test_a_residual_constraint_shards_activations_and_changes_no_number():
  rules = parallel.transformer_rules(fsdp_axis='data', tensor_axis='model')
  mesh = parallel.make_mesh({'data': 4, 'model': 2}, jax.devices())
  residual = NamedSharding(mesh, P('data', None, None))
  model = models.TransformerLM(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2,
                               mlp_dim=32, residual_sharding=residual)
  params = model.init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))  # batch 1: unconstrained
  tokens = jnp.zeros((BATCH, SEQ), jnp.int32)
  hlo = jax.jit(model.apply).lower(params, tokens).as_text()
  assert hlo.count('sharding_constraint') == 3  # after the embedding and each of 2 blocks
  assert hlo.count('[{"data"}, {}, {}]') == 3
  bad = models.TransformerLM(vocab_size=VOCAB, d_model=16, num_layers=1, num_heads=2,
                             mlp_dim=32, residual_sharding=P('data'))
  with pytest.raises(ValueError, match='must be a jax.sharding.NamedSharding'):
    bad.init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))
  plain = _fit(mesh, rules)
  constrained = _fit(mesh, rules, residual)
  # The constraint moves where partial sums are reduced, so float32 rounding differs (measured
  # 1.2e-6 at most on params of the update's size 1e-2): the same bound as the 1-device test.
  np.testing.assert_allclose(constrained.train_losses, plain.train_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(constrained.state.params)),
                  jax.tree.leaves(jax.device_get(plain.state.params))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
