"""The models of test_any_model.py written three ways: linen, NNX and plain JAX, same weights.

`nnx_token_classifier(linen_variables)` and `nnx_conv_regressor(...)` build
NNX modules whose weights are copied from the linen models'; the plain
functions run on the linen variables dict itself, so their layers get the
linen names (a leading 'params' and trailing 'kernel' are dropped from leaf
paths). `NNX_NAMES` maps each NNX layer name to the linen one.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lossland.data import shapes

VOCAB, WIDTH, CLASSES, SEQ = 11, 8, 4, 5
HEADS = 2


class Attention(nn.Module):
  """Multi-head self-attention with DenseGeneral projections, as in flax's examples."""
  heads: int = HEADS

  @nn.compact
  def __call__(self, x):
    head_dim = x.shape[-1] // self.heads
    q = nn.DenseGeneral((self.heads, head_dim))(x)
    k = nn.DenseGeneral((self.heads, head_dim))(x)
    v = nn.DenseGeneral((self.heads, head_dim))(x)
    w = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(head_dim))
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1))(jnp.einsum('bhqk,bkhd->bqhd', w, v))


class TokenClassifier(nn.Module):
  """tokens [b, t] -> class logits [b, classes]."""

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    h = nn.Embed(VOCAB, WIDTH)(tokens)
    h = h + Attention()(h)
    h = nn.Dropout(0.2, deterministic=not train)(h)
    h = h + nn.Einsum((2 * WIDTH, WIDTH), 'btf,fd->btd')(nn.gelu(nn.Dense(2 * WIDTH)(h)))
    return nn.Dense(CLASSES)(h.mean(axis=1))


class ConvRegressor(nn.Module):
  """images [b, 6, 6, 1] -> one real value per image."""

  @nn.compact
  def __call__(self, images, train: bool = False):
    h = nn.relu(nn.Conv(4, (3, 3))(images))
    h = nn.avg_pool(h, (2, 2), strides=(2, 2))
    h = nn.Dropout(0.2, deterministic=not train)(h)
    h = nn.relu(nn.Dense(6)(h.reshape(h.shape[0], -1)))
    return nn.Dense(1)(h)


# -- NNX ----------------------------------------------------------------------------------


class NNXAttention(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    head_dim = WIDTH // HEADS
    self.query = nnx.LinearGeneral(WIDTH, (HEADS, head_dim), rngs=rngs)
    self.key = nnx.LinearGeneral(WIDTH, (HEADS, head_dim), rngs=rngs)
    self.value = nnx.LinearGeneral(WIDTH, (HEADS, head_dim), rngs=rngs)
    self.out = nnx.LinearGeneral((HEADS, head_dim), WIDTH, axis=(-2, -1), rngs=rngs)

  def __call__(self, x):
    q, k, v = self.query(x), self.key(x), self.value(x)
    w = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(WIDTH // HEADS))
    return self.out(jnp.einsum('bhqk,bkhd->bqhd', w, v))


class NNXTokenClassifier(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.attention = NNXAttention(rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.up = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
    self.down = nnx.Einsum('btf,fd->btd', (2 * WIDTH, WIDTH), (WIDTH,), rngs=rngs)
    self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

  def __call__(self, tokens, train: bool = False):
    h = self.embed(tokens)
    h = h + self.attention(h)
    h = self.dropout(h, deterministic=not train)
    h = h + self.down(nn.gelu(self.up(h)))
    return self.head(h.mean(axis=1))


class NNXConvRegressor(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.hidden = nnx.Linear(36, 6, rngs=rngs)
    self.head = nnx.Linear(6, 1, rngs=rngs)

  def __call__(self, images, train: bool = False):
    h = nn.relu(self.conv(images))
    h = nn.avg_pool(h, (2, 2), strides=(2, 2))
    h = self.dropout(h, deterministic=not train)
    h = nn.relu(self.hidden(h.reshape(h.shape[0], -1)))
    return self.head(h)


TOKEN_NNX_NAMES = {
    'attention/query': 'Attention_0/DenseGeneral_0', 'attention/key': 'Attention_0/DenseGeneral_1',
    'attention/value': 'Attention_0/DenseGeneral_2', 'attention/out': 'Attention_0/DenseGeneral_3',
    'up': 'Dense_0', 'down': 'Einsum_0', 'head': 'Dense_1'}
CONV_NNX_NAMES = {'conv': 'Conv_0', 'hidden': 'Dense_0', 'head': 'Dense_1'}
TOKEN_EMBED = ('embed', 'Embed_0')


def _copy_into(module: nnx.Module, variables, names) -> nnx.Module:
  """`module` with each named layer's kernel/bias (and embeddings) from the linen params."""
  params = variables['params']
  for nnx_name, linen_name in names.items():
    layer = module
    for part in nnx_name.split('/'):
      layer = getattr(layer, part)
    source = params
    for part in linen_name.split('/'):
      source = source[part]
    for leaf, value in source.items():
      getattr(layer, leaf)[...] = value
  return module


def nnx_token_classifier(variables) -> NNXTokenClassifier:
  model = _copy_into(NNXTokenClassifier(nnx.Rngs(0, dropout=1)), variables, TOKEN_NNX_NAMES)
  model.embed.embedding[...] = variables['params']['Embed_0']['embedding']
  return model


def nnx_conv_regressor(variables) -> NNXConvRegressor:
  return _copy_into(NNXConvRegressor(nnx.Rngs(0, dropout=1)), variables, CONV_NNX_NAMES)


# -- plain JAX over the linen variables ----------------------------------------------------


def _dense_general(p, x, spec):
  return jnp.einsum(spec, x, p['kernel']) + p['bias']


def plain_token_classifier(variables, tokens, train: bool = False):
  """TokenClassifier by hand (no dropout: call it with train=False)."""
  p = variables['params']
  h = p['Embed_0']['embedding'][tokens]
  a = p['Attention_0']
  q, k, v = (_dense_general(a[f'DenseGeneral_{i}'], h, 'btd,dhk->bthk') for i in range(3))
  w = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(WIDTH // HEADS))
  h = h + _dense_general(a['DenseGeneral_3'], jnp.einsum('bhqk,bkhd->bqhd', w, v),
                         'bqhk,hkd->bqd')
  up = nn.gelu(h @ p['Dense_0']['kernel'] + p['Dense_0']['bias'])
  h = h + (jnp.einsum('btf,fd->btd', up, p['Einsum_0']['kernel']) + p['Einsum_0']['bias'])
  return h.mean(axis=1) @ p['Dense_1']['kernel'] + p['Dense_1']['bias']


def plain_conv_regressor(variables, images, train: bool = False):
  """ConvRegressor by hand, with the convolution in NCHW/OIHW (as PyTorch-style code has it)."""
  p = variables['params']
  x = jnp.transpose(images, (0, 3, 1, 2))
  kernel = jnp.transpose(p['Conv_0']['kernel'], (3, 2, 0, 1))
  h = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                   dimension_numbers=('NCHW', 'OIHW', 'NCHW'))
  h = nn.relu(h + p['Conv_0']['bias'][None, :, None, None])
  h = nn.avg_pool(jnp.transpose(h, (0, 2, 3, 1)), (2, 2), strides=(2, 2))
  h = nn.relu(h.reshape(h.shape[0], -1) @ p['Dense_0']['kernel'] + p['Dense_0']['bias'])
  return h @ p['Dense_1']['kernel'] + p['Dense_1']['bias']


# -- a text-conditioned denoiser whose attention sows its weights (guidance) ---------------


C = 8  # the denoisers' width (HEADS heads)


class LinenDenoiser(nn.Module):
  """x [b, 8, 8, 3], t [b], tokens [b, T] -> ε, with flax attention that sows its weights."""

  @nn.compact
  def __call__(self, x, t, tokens):
    context = nn.Embed(len(shapes.VOCAB), C)(tokens)
    h = nn.Conv(C, (3, 3))(x) + nn.Dense(C)(jnp.sin(t[:, None] / 100.0))[:, None, None]
    b, hh, ww, _ = h.shape
    q = h.reshape(b, hh * ww, C)
    a = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=C)(q, context,
                                                                         sow_weights=True)
    return nn.Conv(3, (3, 3))(nn.gelu(h + a.reshape(h.shape)))


class NNXDenoiser(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(len(shapes.VOCAB), C, rngs=rngs)
    self.conv_in = nnx.Conv(3, C, (3, 3), rngs=rngs)
    self.time = nnx.Linear(1, C, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(HEADS, C, C, decode=False, rngs=rngs)
    self.conv_out = nnx.Conv(C, 3, (3, 3), rngs=rngs)

  def __call__(self, x, t, tokens):
    context = self.embed(tokens)
    h = self.conv_in(x) + self.time(jnp.sin(t[:, None] / 100.0))[:, None, None]
    b, hh, ww, _ = h.shape
    a = self.attention(h.reshape(b, hh * ww, C), context, sow_weights=True)
    return self.conv_out(nn.gelu(h + a.reshape(h.shape)))


DENOISER_NAMES = {'embed': 'Embed_0', 'conv_in': 'Conv_0', 'time': 'Dense_0', 'conv_out': 'Conv_1',
         'attention/query': 'MultiHeadDotProductAttention_0/query',
         'attention/key': 'MultiHeadDotProductAttention_0/key',
         'attention/value': 'MultiHeadDotProductAttention_0/value',
         'attention/out': 'MultiHeadDotProductAttention_0/out'}
