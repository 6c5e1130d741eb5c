"""K-FAC factor accumulation of one LM written three ways: linen, NNX and a plain function.

The same decoder LM (attention + MLP blocks of Dense layers with biases,
the same weights) as a linen module (module taps), an NNX module and a plain
function of the linen params (both tapped in the traced program). Each
accumulator (`curvature.factors.make_factor_accumulator`, every linear
layer) is jitted once and timed on the same sharded batch, the three
interleaved round by round; the result is each path's median and its ratio
to linen's (target: NNX and plain at most 1.05x), and the largest factor
difference from linen's.
"""
from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from launch import common
from lossland import parallel, taps
from lossland.curvature import capture, factors


def _attention(q, k, v, heads):
  b, t, d = q.shape
  split = lambda a: a.reshape(b, t, heads, d // heads)
  logits = jnp.einsum('bqhd,bkhd->bhqk', split(q), split(k)) / np.sqrt(d // heads)
  logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits), split(v)).reshape(b, t, d)


class LinenLM(nn.Module):
  vocab: int
  d: int
  blocks: int
  heads: int

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(self.vocab, self.d, name='embed')(tokens)
    for i in range(self.blocks):
      x = nn.LayerNorm(name=f'block_{i}_ln1')(h)
      q, k, v = (nn.Dense(self.d, name=f'block_{i}_{n}')(x) for n in 'qkv')
      h = h + nn.Dense(self.d, name=f'block_{i}_o')(_attention(q, k, v, self.heads))
      x = nn.LayerNorm(name=f'block_{i}_ln2')(h)
      up = nn.Dense(4 * self.d, name=f'block_{i}_up')(x)
      h = h + nn.Dense(self.d, name=f'block_{i}_down')(nn.gelu(up))
    return nn.Dense(self.vocab, name='head')(h)


def plain_lm(variables, tokens, *, heads):
  """LinenLM by hand over its params."""
  p = variables['params']
  dense = lambda name, x: x @ p[name]['kernel'] + p[name]['bias']

  def norm(name, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * p[name]['scale'] + p[name]['bias']

  h = p['embed']['embedding'][tokens]
  blocks = sum(1 for k in p if k.endswith('_ln1'))
  for i in range(blocks):
    x = norm(f'block_{i}_ln1', h)
    q, k, v = (dense(f'block_{i}_{n}', x) for n in 'qkv')
    h = h + dense(f'block_{i}_o', _attention(q, k, v, heads))
    x = norm(f'block_{i}_ln2', h)
    h = h + dense(f'block_{i}_down', nn.gelu(dense(f'block_{i}_up', x)))
  return dense('head', h)


class NNXLM(nnx.Module):
  """LinenLM in NNX, with the linen params copied in (same attribute names as linen's)."""

  def __init__(self, variables, heads: int):
    self.heads = heads
    self.layers = nnx.Dict()
    for name, leaves in variables['params'].items():
      if 'kernel' in leaves:
        layer = nnx.Linear(*leaves['kernel'].shape, rngs=nnx.Rngs(0))
        layer.kernel[...], layer.bias[...] = leaves['kernel'], leaves['bias']
      elif 'embedding' in leaves:
        layer = nnx.Embed(*leaves['embedding'].shape, rngs=nnx.Rngs(0))
        layer.embedding[...] = leaves['embedding']
      else:
        layer = nnx.LayerNorm(leaves['scale'].shape[0], epsilon=1e-6, rngs=nnx.Rngs(0))
        layer.scale[...], layer.bias[...] = leaves['scale'], leaves['bias']
      self.layers[name] = layer

  def __call__(self, tokens):
    lay = self.layers
    h = lay['embed'](tokens)
    blocks = sum(1 for k in lay if k.endswith('_ln1'))
    for i in range(blocks):
      x = lay[f'block_{i}_ln1'](h)
      q, k, v = (lay[f'block_{i}_{n}'](x) for n in 'qkv')
      h = h + lay[f'block_{i}_o'](_attention(q, k, v, self.heads))
      x = lay[f'block_{i}_ln2'](h)
      h = h + lay[f'block_{i}_down'](nn.gelu(lay[f'block_{i}_up'](x)))
    return lay['head'](h)


def run(config) -> dict:
  c = config.model
  mesh = common.build_mesh(config.mesh, config.batch_size)
  rng = np.random.default_rng(config.seed)
  toks = rng.integers(0, c.vocab_size, size=(config.batch_size, config.seq_len + 1))
  batch = parallel.shard_batch({'inputs': toks[:, :-1].astype(np.int32),
                                'targets': toks[:, 1:].astype(np.int32)}, mesh)
  linen = LinenLM(c.vocab_size, c.d_model, c.num_layers, c.num_heads)
  variables = linen.init(jax.random.key(config.seed), jnp.zeros((1, config.seq_len), jnp.int32))
  heads = c.num_heads
  forms = {'linen': (linen.apply, variables),
           'nnx': taps.as_function(NNXLM(variables, heads)),
           'plain': (lambda p, x: plain_lm(p, x, heads=heads), variables)}
  steps, sums, names = {}, {}, {}
  for form, (fn, params) in forms.items():
    params = jax.device_put(params, parallel.replicated(mesh))
    views = capture.find_layers(fn, params, batch['inputs'])
    names[form] = list(views)
    acc = factors.make_factor_accumulator(fn, names[form], mesh=mesh,
                                          fisher_type=config.fisher_type)
    zero = jax.device_put(factors.zero_sums(views), parallel.replicated(mesh))
    one = jax.block_until_ready(acc(zero, params, batch, jax.random.key(1)))  # compiles
    sums[form] = jax.device_get(one)  # one batch's sums, to compare the forms
    steps[form] = [acc, params, one]  # the sums are donated: each call returns the next
  times = {form: [] for form in forms}
  for _ in range(config.repeats):  # interleaved, so that load changes hit every form
    for form, step in steps.items():
      acc, params, state = step
      t0 = time.perf_counter()
      step[2] = jax.block_until_ready(acc(state, params, batch, jax.random.key(1)))
      times[form].append(time.perf_counter() - t0)
  ms = {form: float(np.median(t)) * 1e3 for form, t in times.items()}
  diff = {}
  for form in ('nnx', 'plain'):
    twin = dict(zip(names['linen'], names[form]))  # the same layers, in call order
    diff[form] = max(float(np.abs(sums['linen'][n].G - sums[form][twin[n]].G).max() /
                           (np.abs(sums['linen'][n].G).max() + 1e-30))
                     for n in names['linen'])
  return {'linen_ms': ms['linen'], 'nnx_ms': ms['nnx'], 'plain_ms': ms['plain'],
          'nnx_ratio': ms['nnx'] / ms['linen'], 'plain_ratio': ms['plain'] / ms['linen'],
          'max_relative_G_difference': diff, 'layers': len(names['linen']),
          'tokens': config.batch_size * config.seq_len, 'devices': int(mesh.devices.size)}
