"""Scanned and rematerialized layers are layers: a 4-block LM scanned equals it unrolled.

The same decoder LM is written unrolled (linen, blocks 'block_0'..'block_3'),
with `nn.scan` (and `nn.remat` inside it), as a plain function over stacked
weights with `lax.scan` + `jax.checkpoint`, and as an NNX module with
`nnx.scan`. Each scan step is its own layer, 'blocks/mlp/up[3]', and must
give the numbers of 'block_3/mlp/up' for factors, the edit, capture, CKA
and `replace_dense`.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lossland import curvature, lowrank, taps
from lossland import stitching as st

VOCAB, D, HEADS, SEQ, BLOCKS = 16, 8, 2, 6, 4


def _attention(q, k, v):
  b, t, _ = q.shape
  split = lambda a: a.reshape(b, t, HEADS, D // HEADS)
  logits = jnp.einsum('bqhd,bkhd->bhqk', split(q), split(k)) / np.sqrt(D // HEADS)
  logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits), split(v)).reshape(b, t, D)


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _=None):
    x = nn.RMSNorm(name='norm1')(h)
    a = _attention(nn.Dense(D, name='q')(x), nn.Dense(D, name='k')(x), nn.Dense(D, name='v')(x))
    h = h + nn.Dense(D, name='o')(a)
    x = nn.RMSNorm(name='norm2')(h)
    return h + nn.Dense(D, name='down')(nn.gelu(nn.Dense(2 * D, name='up')(x))), None


class UnrolledLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(VOCAB, D, name='embed')(tokens)
    for i in range(BLOCKS):
      h, _ = Block(name=f'block_{i}')(h)
    return nn.Dense(VOCAB, name='head')(h)


class ScannedLM(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(VOCAB, D, name='embed')(tokens)
    block = nn.remat(Block) if self.remat else Block
    h, _ = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                   length=BLOCKS)(name='blocks')(h, None)
    return nn.Dense(VOCAB, name='head')(h)


def plain_lm(params, tokens):
  """The LM by hand over the scanned linen params: `lax.scan` of a checkpointed block."""
  p = params['params']

  def dense(w, x):
    return x @ w['kernel'] + w['bias']

  def norm(w, x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w['scale']

  @jax.checkpoint
  def block(h, w):
    x = norm(w['norm1'], h)
    h = h + dense(w['o'], _attention(dense(w['q'], x), dense(w['k'], x), dense(w['v'], x)))
    x = norm(w['norm2'], h)
    return h + dense(w['down'], nn.gelu(dense(w['up'], x))), None

  h, _ = jax.lax.scan(block, p['embed']['embedding'][tokens], p['blocks'])
  return dense(p['head'], h)


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.norm1, self.norm2 = nnx.RMSNorm(D, rngs=rngs), nnx.RMSNorm(D, rngs=rngs)
    self.q, self.k, self.v, self.o = (nnx.Linear(D, D, rngs=rngs) for _ in range(4))
    self.up, self.down = nnx.Linear(D, 2 * D, rngs=rngs), nnx.Linear(2 * D, D, rngs=rngs)

  def __call__(self, h):
    x = self.norm1(h)
    h = h + self.o(_attention(self.q(x), self.k(x), self.v(x)))
    return h + self.down(nn.gelu(self.up(self.norm2(h))))


class NNXScannedLM(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)

    @nnx.split_rngs(splits=BLOCKS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs):
      return NNXBlock(rngs)

    self.blocks = blocks(rngs)
    self.head = nnx.Linear(D, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def step(h, block):
      return block(h)

    return self.head(step(self.embed(tokens), self.blocks))


def _nnx_twin(scanned_params) -> NNXScannedLM:
  model = NNXScannedLM(nnx.Rngs(0))
  p = scanned_params['params']
  model.embed.embedding[...] = p['embed']['embedding']
  model.head.kernel[...], model.head.bias[...] = p['head']['kernel'], p['head']['bias']
  for name in ('q', 'k', 'v', 'o', 'up', 'down'):
    getattr(model.blocks, name).kernel[...] = p['blocks'][name]['kernel']
    getattr(model.blocks, name).bias[...] = p['blocks'][name]['bias']
  for name in ('norm1', 'norm2'):
    getattr(model.blocks, name).scale[...] = p['blocks'][name]['scale']
  return model


@pytest.fixture(scope='module')
def lms():
  tokens = jax.random.randint(jax.random.key(0), (8, SEQ), 0, VOCAB)
  scanned = ScannedLM().init(jax.random.key(1), tokens)
  # random biases, so that an edit or a factorization that loses a bias shows
  scanned = jax.tree_util.tree_map_with_path(
      lambda path, v: v + 0.1 * jax.random.normal(jax.random.key(len(str(path))), v.shape)
      if 'bias' in jax.tree_util.keystr(path) else v, scanned)
  p = scanned['params']
  unrolled = {'params': {'embed': p['embed'], 'head': p['head'],
                         **{f'block_{i}': jax.tree.map(lambda a, i=i: a[i], p['blocks'])
                            for i in range(BLOCKS)}}}
  return {'tokens': tokens, 'unrolled': (UnrolledLM(), unrolled),
          'scanned': (ScannedLM(), scanned), 'remat': (ScannedLM(remat=True), scanned),
          'plain': (plain_lm, scanned), 'nnx': (_nnx_twin(scanned), None)}


FORMS = ('scanned', 'remat', 'plain', 'nnx')


def _unrolled_name(name: str) -> str:
  """'blocks/mlp/up[3]' -> 'block_3/mlp/up'."""
  if not name.startswith('blocks/'):
    return name
  base, step = name[len('blocks/'):].rsplit('[', 1)
  return f'block_{step[:-1]}/{base}'


def test_every_form_computes_the_same_function(lms):
  x = lms['tokens']
  want = lms['unrolled'][0].apply(lms['unrolled'][1], x)
  for form in FORMS:
    fn, params = taps.as_function(*lms[form])
    np.testing.assert_allclose(fn(params, x), want, atol=2e-5, err_msg=form)


def test_each_scan_step_is_its_own_layer(lms):
  x = lms['tokens']
  want = list(taps.find_layers(*taps.as_function(*lms['unrolled']), x))
  for form in FORMS:
    got = list(taps.find_layers(*taps.as_function(*lms[form]), x))
    assert [_unrolled_name(n) for n in got] == want, form
  assert 'blocks/up[3]' in got


@pytest.mark.parametrize('form', FORMS)
def test_scanned_factors_and_edit_equal_the_unrolled_ones(lms, form):
  batch = {'inputs': lms['tokens'], 'labels': jnp.roll(lms['tokens'], -1, axis=1)}
  kw = dict(rng=jax.random.key(3), homogeneous=True)
  want = curvature.estimate_factors(*lms['unrolled'], [batch], select=r'block_\d/(up|o)', **kw)
  model, params = lms[form]
  got = curvature.estimate_factors(model, params, [batch], select=r'blocks/(up|o)\[\d\]', **kw)
  assert sorted(_unrolled_name(n) for n in got) == sorted(want)
  for name, f in got.items():
    w = want[_unrolled_name(name)]
    np.testing.assert_allclose(f.A, w.A, atol=1e-5 * float(np.abs(w.A).max()))
    np.testing.assert_allclose(f.G, w.G, atol=1e-5 * float(np.abs(w.G).max()))
  edited_unrolled = curvature.curvature_edit(lms['unrolled'][1], curvature.eigenbasis(want), 0.5)
  edited = curvature.curvature_edit(model if form == 'nnx' else params,
                                    curvature.eigenbasis(got), rho=0.5)
  fn, new_params = taps.as_function(edited if form == 'nnx' else model,
                                    None if form == 'nnx' else edited)
  x = lms['tokens']
  np.testing.assert_allclose(fn(new_params, x), lms['unrolled'][0].apply(edited_unrolled, x),
                             atol=2e-5)
  assert not np.allclose(fn(new_params, x), lms['unrolled'][0].apply(lms['unrolled'][1], x),
                         atol=1e-3)


@pytest.mark.parametrize('form', ('scanned', 'plain', 'nnx'))
def test_scanned_capture_and_cka_equal_the_unrolled_ones(lms, form):
  x = lms['tokens']
  model, params = lms[form]
  fn, params = taps.as_function(model, params)
  _, got = taps.capture(fn, params, x, select=['blocks/up[2]', 'head'])
  _, want = taps.capture(*taps.as_function(*lms['unrolled']), x, select=['block_2/up', 'head'])
  np.testing.assert_allclose(got.inputs['blocks/up[2]'][0], want.inputs['block_2/up'][0],
                             atol=2e-5)
  np.testing.assert_allclose(got.outputs['blocks/up[2]'][0], want.outputs['block_2/up'][0],
                             atol=2e-5)
  batch = {'inputs': x}
  cka = st.layer_similarity(model, lms[form][1], *lms['unrolled'], batch,
                            layers_a=['blocks/up[1]', 'blocks/down[3]'],
                            layers_b=['block_1/up', 'block_3/down'])['linear_cka'].values
  np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-5)


@pytest.mark.parametrize('form', FORMS)
def test_replace_dense_through_a_scan_converts_each_step(lms, form):
  x = lms['tokens']
  model, params = lms[form]
  select = 'blocks/up' if form in ('scanned', 'remat') else r'blocks/up\[\d\]'
  fm = lowrank.replace_dense(model, 'lowrank', select=select, rank=D,
                             params=params if form == 'plain' else None)
  variables = fm.convert(params, x) if form in ('scanned', 'remat') else fm.convert(x)
  factors = variables['params']['blocks']['up']
  if form in ('plain', 'nnx'):
    factors = factors['kernel']
  assert factors['lowrank_a'].shape == (BLOCKS, D, D)  # one factorization per step
  want = lms['unrolled'][0].apply(lms['unrolled'][1], x)
  np.testing.assert_allclose(fm.apply(variables, x), want, atol=1e-4)  # full rank: the same
  low = lowrank.replace_dense(model, 'lowrank', select=select, rank=2,
                              params=params if form == 'plain' else None)
  low_vars = low.convert(params, x) if form in ('scanned', 'remat') else low.convert(x)
  assert not np.allclose(low.apply(low_vars, x), want, atol=1e-3)


def test_selecting_some_steps_of_a_scanned_weight_is_one_error(lms):
  model, params = lms['plain']
  fm = lowrank.replace_dense(model, 'lowrank', select=['blocks/up[1]'], rank=2, params=params)
  with pytest.raises(ValueError, match=r"some steps of the scanned weight 'blocks/up'"):
    fm.convert(lms['tokens'])
