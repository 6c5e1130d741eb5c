"""Reference models: shapes, causality, sown attention, interceptable linear maps."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import models
from lossland.models.transformer import rotary_embedding


def _lm(**kw):
  return models.TransformerLM(vocab_size=50, d_model=32, num_layers=2, num_heads=4, mlp_dim=48,
                              **kw)


def test_lm_logits_shape_and_causality():
  model = _lm()
  tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 50)
  params = model.init(jax.random.key(1), tokens)
  logits = model.apply(params, tokens)
  assert logits.shape == (2, 10, 50)
  changed = tokens.at[:, 6:].set((tokens[:, 6:] + 1) % 50)
  np.testing.assert_allclose(model.apply(params, changed)[:, :6], logits[:, :6], atol=1e-5)
  assert not np.allclose(model.apply(params, changed)[:, 6:], logits[:, 6:])


def test_lm_sows_causal_attention_weights():
  model = _lm()
  tokens = jnp.zeros((3, 7), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  _, state = model.apply(params, tokens, mutable=['intermediates'])
  probs = state['intermediates']['block_1']['attn']['attention_weights'][0]
  assert probs.shape == (3, 4, 7, 7)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  assert float(jnp.abs(jnp.triu(probs, k=1)).max()) == 0.0


def test_lm_linear_maps_are_interceptable_dense_layers():
  model = _lm()
  tokens = jnp.zeros((1, 5), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == '__call__':
      seen.append('/'.join(context.module.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(params, tokens)
  expected = {f'block_{i}/{part}' for i in range(2)
              for part in ('attn/query', 'attn/key', 'attn/value', 'attn/out', 'mlp/gate',
                           'mlp/up', 'mlp/down')}
  assert set(seen) == expected | {'head'}


def test_rotary_preserves_norms_and_encodes_relative_position():
  x = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
  y = rotary_embedding(x, jnp.arange(6))
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  q = jnp.broadcast_to(x[:, :1], x.shape)
  k = jnp.broadcast_to(x[:, 1:2], x.shape)
  rq, rk = rotary_embedding(q, jnp.arange(6)), rotary_embedding(k, jnp.arange(6))
  dots = jnp.einsum('bthd,bthd->bth', rq[:, 1:], rk[:, :-1])  # offset 1 everywhere
  np.testing.assert_allclose(dots, jnp.broadcast_to(dots[:, :1], dots.shape), rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize('model,shape', [
    (models.ViT(num_classes=10, patch_size=2, d_model=16, num_layers=2, num_heads=2,
                mlp_dim=32), (4, 8, 8, 1)),
    (models.MLP(features=(16, 8), num_classes=10), (4, 8, 8, 1)),
    (models.CNN(features=(8, 16), strides=(1, 2), num_classes=10), (4, 8, 8, 1)),
])
def test_classifiers_output_logits(model, shape):
  x = jnp.ones(shape)
  params = model.init(jax.random.key(0), x)
  assert model.apply(params, x).shape == (shape[0], 10)


def test_bad_shapes_are_clear_errors():
  with pytest.raises(ValueError, match='divisible by num_heads'):
    models.TransformerLM(vocab_size=5, d_model=30, num_layers=1, num_heads=4).init(
        jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match='patch_size'):
    models.ViT(num_classes=3, patch_size=3).init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
