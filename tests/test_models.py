"""Reference models: shapes, causality, sown attention, interceptable linear maps."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import models
from lossland.models import precision
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


def test_residual_mlp_blocks_add_an_identity_shortcut_where_the_width_is_unchanged():
  from lossland import stitching
  model = models.MLP(features=(6, 6, 4), num_classes=3, residual=True)
  x = jax.random.normal(jax.random.key(0), (5, 2, 4))
  params = model.init(jax.random.key(1), x)
  assert model.hidden_layers == ['block_0', 'block_1', 'block_2']
  _, acts = stitching.capture(model, params, x, model.hidden_layers)
  p = params['params']
  dense = lambda name, h: h @ p[name]['dense']['kernel'] + p[name]['dense']['bias']
  h0 = jax.nn.relu(dense('block_0', x.reshape(5, 8)))  # 8 -> 6: no shortcut
  np.testing.assert_allclose(acts['block_0'], h0, rtol=1e-5, atol=1e-6)  # float32 dots
  h1 = h0 + jax.nn.relu(dense('block_1', h0))  # 6 -> 6: shortcut
  np.testing.assert_allclose(acts['block_1'], h1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(acts['block_2'], jax.nn.relu(dense('block_2', h1)), rtol=1e-5,
                             atol=1e-6)
  assert models.MLP(features=(6,), num_classes=3).hidden_layers == ['dense_0']


def test_bad_shapes_are_clear_errors():
  with pytest.raises(ValueError, match='divisible by num_heads'):
    models.TransformerLM(vocab_size=5, d_model=30, num_layers=1, num_heads=4).init(
        jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match='patch_size'):
    models.ViT(num_classes=3, patch_size=3).init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))


def _rel_err(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.mark.parametrize('shape', [(12, 16), (3, 4, 16)])
def test_mixed_matmul_matches_float32_forward_and_backward(shape):
  from lossland.models.transformer import mixed_matmul
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (16, 24)) * 0.2
  ct = jax.random.normal(jax.random.key(2), shape[:-1] + (24,))
  f = lambda x, w: jnp.sum(jnp.sin(mixed_matmul(x, w)) * ct)
  g = lambda x, w: jnp.sum(jnp.sin(x @ w) * ct)
  assert mixed_matmul(x, w).dtype == jnp.float32
  assert _rel_err(mixed_matmul(x, w), x @ w) < 1e-2
  for got, want in zip(jax.jit(jax.grad(f, (0, 1)))(x, w), jax.grad(g, (0, 1))(x, w)):
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert _rel_err(got, want) < 2e-2


def test_mixed_attention_products_match_float32():
  from lossland.models.transformer import mixed_bmm, mixed_bmm_nt
  a, b, v = (jax.random.normal(jax.random.key(i), (2, 3, 5, 8)) for i in range(3))
  f = lambda a, b, v: jnp.sum(jnp.tanh(mixed_bmm(jax.nn.softmax(mixed_bmm_nt(a, b)), v)))
  g = lambda a, b, v: jnp.sum(jnp.tanh(jnp.einsum(
      'bhmn,bhnd->bhmd', jax.nn.softmax(jnp.einsum('bhmk,bhnk->bhmn', a, b)), v)))
  assert _rel_err(mixed_bmm_nt(a, b), jnp.einsum('bhmk,bhnk->bhmn', a, b)) < 1e-2
  for got, want in zip(jax.jit(jax.grad(f, (0, 1, 2)))(a, b, v), jax.grad(g, (0, 1, 2))(a, b, v)):
    assert got.shape == want.shape
    assert _rel_err(got, want) < 3e-2


def test_lm_bf16_matmuls_keep_params_names_and_sown_weights():
  ref, mixed = _lm(), _lm(matmul_dtype=jnp.bfloat16)
  tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 50)
  params = ref.init(jax.random.key(1), tokens)
  assert (jax.tree.map(jnp.shape, mixed.init(jax.random.key(1), tokens))
          == jax.tree.map(jnp.shape, params))
  logits, state = mixed.apply(params, tokens, mutable=['intermediates'])
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, ref.apply(params, tokens), atol=3e-2)
  probs = state['intermediates']['block_0']['attn']['attention_weights'][0]
  assert probs.shape == (2, 4, 10, 10)
  assert float(jnp.abs(jnp.triu(probs, k=1)).max()) == 0.0
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == '__call__':
      seen.append(context.module.name)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    mixed.apply(params, tokens)
  assert sorted(set(seen)) == ['down', 'gate', 'head', 'key', 'out', 'query', 'up', 'value']


def _dot_operand_types(hlo_text: str) -> list[tuple[str, str]]:
  """(lhs, rhs) element types of every dot in an optimized HLO module."""
  import re
  types, pairs = {}, []
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = (\w+)\[', line)
    if m:
      types[m.group(1)] = m.group(2)
    d = re.search(r' dot\(%([^,\s]+), %([^,\s)]+)\)', line)
    if d:
      pairs.append((types.get(d.group(1)), types.get(d.group(2))))
  return pairs


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='checks XLA:CPU dot lowering')
def test_lm_bf16_training_step_keeps_every_block_dot_in_bfloat16():
  # Left to autodiff, XLA:CPU upcasts the weight-gradient dots to float32; the
  # custom VJPs must keep forward and backward dots of the blocks in bfloat16.
  model = _lm(matmul_dtype=jnp.bfloat16, tie_embeddings=True)
  tokens = jnp.zeros((2, 16), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  loss = lambda p: jnp.mean(model.apply(p, tokens) ** 2)
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  pairs = _dot_operand_types(hlo)
  bf16 = [p for p in pairs if p == ('bf16', 'bf16')]
  # 2 layers x (7 linear maps x 3 dots + 2 attention products x 3 dots); the head is float32.
  assert len(bf16) == 2 * (7 * 3 + 2 * 3), pairs
  assert len(pairs) - len(bf16) <= 3, pairs


def test_matmul_precision_follows_the_cpu_flags():
  avx2_only = 'processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\n'
  sapphire = 'flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n'
  graviton3 = 'Features\t: fp asimd sve bf16 i8mm\n'
  assert precision.bf16_dot_flags(avx2_only) == ()
  assert precision.bf16_dot_flags(sapphire) == ('avx512_bf16', 'amx_bf16')
  assert precision.bf16_dot_flags(graviton3) == ('bf16',)
  assert precision.bf16_dot_flags('flags : avx512bf16x\n') == ()  # whole names only
  for accelerator in ('gpu', 'tpu'):
    assert models.preferred_matmul_dtype(accelerator) == jnp.bfloat16
  want = jnp.bfloat16 if precision.cpu_has_bf16_dots() else jnp.float32
  assert models.preferred_matmul_dtype('cpu') == want
