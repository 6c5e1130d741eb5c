"""Guided DDIM sampler, diffusion maths and the UNet's cross-attention maps (tapped and sown)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import guidance as G
from lossland import parallel, taps
from lossland.guidance import tokens as tokens_lib
from lossland.data import shapes
from lossland.models import TextUNet

V = shapes.VOCAB
PROMPTS = ['a red circle and a blue square', 'a green triangle and a yellow circle']


def tiny_text_unet():
  """(model, tokens of PROMPTS, unit-scale random params) of a two-level TextUNet."""
  # Two levels (32, 16) keep compiles short; cross-attention at 16x16 in 3 layers.
  model = TextUNet(vocab_size=len(V), channels=(8, 16), attention_resolutions=(16,),
                   text_width=16, num_heads=2, text_heads=2)
  tokens = np.stack([shapes.tokenize(p) for p in PROMPTS])
  # Random params drawn on the host from the init's shapes (no init compile; the real init
  # zero-initializes output layers, which would make every gradient vanish).
  shapes_ = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                           jnp.zeros((1,)), tokens[:1])
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    base = 1.0 if 'scale' in jax.tree_util.keystr(path) else 0.0
    fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1
    return jnp.asarray(base + rng.normal(0, 1.0 / np.sqrt(fan_in), leaf.shape), jnp.float32)

  return model, tokens, jax.tree_util.tree_map_with_path(draw, shapes_)


@pytest.fixture(scope='module')
def setup():
  model, tokens, params = tiny_text_unet()
  mask = G.text_mask(tokens, start_id=V.index('<s>'), end_id=V.index('</s>'))
  idx = G.concept_indices(tokens, [['circle', 'square'], ['triangle', 'circle']], V)
  noise = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  mesh = parallel.make_mesh({'data': 2}, jax.devices()[:2])  # the batch of 2 on 2 devices
  return dict(model=model, params=params, tokens=tokens, mask=mask, idx=idx, noise=noise,
              mesh=mesh,
              null=jnp.asarray(shapes.tokenize('')), schedule=G.linear_schedule())


_SAMPLERS = {}


def _sampler(s, guidance, num_steps=3, attention=G.AttentionSource()):
  """One compiled sampler per (guidance, steps, source), shared by the tests (compiles dominate)."""
  key = (guidance, num_steps, attention)
  if key not in _SAMPLERS:
    _SAMPLERS[key] = G.make_sampler(s['model'].apply, s['schedule'], num_steps=num_steps,
                                    null_tokens=s['null'], guidance=guidance, attention=attention,
                                    mesh=s['mesh'])
  return _SAMPLERS[key]


def _batch(s, idx=None):
  return {'noise': s['noise'], 'tokens': s['tokens'], 'text_mask': s['mask'],
          'token_indices': s['idx'] if idx is None else idx}


def _sample(s, guidance, step_sizes, idx=None, attention=G.AttentionSource()):
  fn = _sampler(s, guidance, attention=attention)
  return fn(s['params'], _batch(s, idx), cfg_scale=3.0, step_sizes=step_sizes)


@pytest.mark.parametrize('guidance', [
    G.Guidance('astar', num_guided_steps=2),
    pytest.param(G.Guidance('attend_excite', num_guided_steps=2, refine_steps=(0,),
                            refine_targets=(0.1,), max_refine_iters=2), marks=pytest.mark.slow)])
def test_step_size_zero_reproduces_baseline_bit_for_bit(setup, guidance):
  base = _sample(setup, None, None)
  assert base.loss is None and base.maps is None
  zero = _sample(setup, guidance, np.zeros(3, np.float32))
  np.testing.assert_array_equal(np.asarray(base.images), np.asarray(zero.images))
  assert float(jnp.abs(zero.loss).max()) == 0.0  # no guided step ran
  moved = _sample(setup, guidance, G.step_size_schedule(50.0, 3))
  assert float(jnp.abs(moved.images - base.images).max()) > 1e-3
  assert float(moved.loss[:2].min()) > 0.0 and float(jnp.abs(moved.loss[2:]).max()) == 0.0
  assert moved.maps.shape == (2, 16, 16, 2)
  assert _sampler(setup, guidance).cache_size() == 1


@pytest.mark.parametrize('idx,needle', [
    ([[9, 9], [3, 7]], 'concept 0 of prompt 0 is at position 9, the start token, end token or '
                       'padding'),  # padding: its map is empty, so it would guide nothing
    ([[3, 7], [0, 3]], 'concept 0 of prompt 1 is at position 0, the start token'),
    ([[3, 7], [3, 10]], 'concept 1 of prompt 1 is at position 10, outside the 10 token '
                        'positions'),  # out of range: NaN losses inside the jitted loop
    ([[3, -1], [3, 7]], 'concept 1 of prompt 0 is at position -1, outside'),
])
def test_concept_indices_outside_the_prompt_words_are_refused(setup, idx, needle):
  guidance = G.Guidance('astar', num_guided_steps=2)
  with pytest.raises(ValueError, match=needle) as e:
    _sample(setup, guidance, G.step_size_schedule(50.0, 3), idx=np.array(idx, np.int32))
  assert '0:1, 1:3' in str(e.value)  # lists the prompt's tokens (position:id)
  assert _sampler(setup, guidance).cache_size() <= 1  # refused before tracing a new shape


def test_empty_prompt_and_no_concepts_are_refused(setup):
  s = setup
  sample = G.make_sampler(s['model'].apply, s['schedule'], num_steps=3, null_tokens=s['null'],
                          guidance=G.Guidance('astar', num_guided_steps=2), vocab=V,
                          mesh=s['mesh'])
  empty = np.stack([shapes.tokenize(''), s['tokens'][1]])
  mask = G.text_mask(empty, start_id=V.index('<s>'), end_id=V.index('</s>'))
  steps = G.step_size_schedule(50.0, 3)
  with pytest.raises(ValueError, match=r'prompt 0 has no words to guide \(empty prompt\); its '
                                       r'tokens \(position:token\) are \[0:<s>, 1:</s>, 2:<pad>'):
    sample(s['params'], dict(_batch(s), tokens=empty, text_mask=mask), cfg_scale=3.0,
           step_sizes=steps)
  with pytest.raises(ValueError, match=r'no concept tokens \(M = 0\)'):
    sample(s['params'], _batch(s, np.zeros((2, 0), np.int32)), cfg_scale=3.0, step_sizes=steps)
  with pytest.raises(ValueError, match=r"the batch lacks \['token_indices'\]"):
    sample(s['params'], {k: v for k, v in _batch(s).items() if k != 'token_indices'},
           cfg_scale=3.0, step_sizes=steps)
  with pytest.raises(ValueError, match='needs step_sizes'):
    sample(s['params'], _batch(s), cfg_scale=3.0)
  with pytest.raises(ValueError, match=r'one step size per sampling step: \(3,\)'):
    sample(s['params'], _batch(s), cfg_scale=3.0, step_sizes=np.zeros(4, np.float32))


def test_token_check_passes_for_sharded_inputs(setup):
  s = setup
  mesh = parallel.make_mesh({'data': 2, 'model': 1}, jax.devices()[:2])
  batch = parallel.shard_batch({'tokens': s['tokens'], 'mask': s['mask'],
                                'idx': np.array([[3, 7], [0, 3]], np.int32)}, mesh)
  with pytest.raises(ValueError, match='concept 0 of prompt 1 is at position 0'):
    tokens_lib.check_token_indices(batch['tokens'], batch['mask'], batch['idx'])
  tokens_lib.check_token_indices(batch['tokens'], batch['mask'], s['idx'])


def test_one_gradient_step_lowers_the_loss(setup):
  s = setup

  def loss(z):
    maps = G.concept_maps(s['model'].apply, s['params'], {
        'x': z, 't': jnp.full((2,), 900), 'tokens': s['tokens'], 'text_mask': s['mask'],
        'token_indices': s['idx']}, resolution=16)
    return G.batched(G.segregation_loss)(maps)

  loss = jax.jit(loss)
  value, grad = jax.jit(jax.value_and_grad(loss))(s['noise'])
  assert float(jnp.abs(grad).max()) > 0
  assert float(loss(s['noise'] - 1e-2 * grad / jnp.linalg.norm(grad))) < float(value)
  with pytest.raises(ValueError, match=r"the batch lacks \['t', 'tokens'"):
    G.concept_maps(s['model'].apply, s['params'], {'x': s['noise']}, resolution=16)


def test_sampler_compiles_once_per_shape(setup):
  s = setup
  fn = _sampler(s, G.Guidance('astar', num_guided_steps=2))
  for scale, cfg in ((0.0, 2.0), (5.0, 4.0)):
    fn(s['params'], _batch(s), cfg_scale=cfg, step_sizes=G.step_size_schedule(scale, 3))
  other = jax.tree.map(lambda x: x * 1.01, s['params'])  # params are an argument, not a constant
  fn(other, _batch(s), cfg_scale=2.0, step_sizes=G.step_size_schedule(5.0, 3))
  assert fn.cache_size() == 1
  default = G.make_sampler(s['model'].apply, s['schedule'], num_steps=3, null_tokens=s['null'])
  assert default.mesh.axis_names == ('data',)
  assert default.mesh.devices.size == len(jax.local_devices())


def test_bad_resolution_lists_available(setup):
  with pytest.raises(ValueError, match=r'available resolutions \(res: layers\): \{16: 3\}'):
    _sample(setup, G.Guidance('astar', resolution=32), G.step_size_schedule(1.0, 3))


def test_guidance_settings_are_validated():
  with pytest.raises(ValueError, match='available'):
    G.Guidance('syngen')
  with pytest.raises(ValueError, match='same length'):
    G.Guidance('attend_excite', refine_steps=(0, 5), refine_targets=(0.5,))


def test_ddim_with_the_true_noise_recovers_the_image():
  schedule = G.linear_schedule()
  x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  ts, prevs = G.ddim_timesteps(schedule, 10)
  z = G.q_sample(schedule, x0, jnp.full((2,), ts[0]), noise)
  for t, tp in zip(ts, prevs):
    ab = schedule.alpha_bar[t]
    eps = (z - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)  # an oracle ε-prediction
    z = G.ddim_step(schedule, z, eps, jnp.int32(t), jnp.int32(tp))
  np.testing.assert_allclose(z, x0, atol=1e-4)


def test_diffusion_loss_is_zero_for_an_oracle_and_drops_captions():
  schedule = G.linear_schedule()
  seen = []

  def oracle(params, z, t, tokens):
    del params
    seen.append(tokens)
    return jnp.zeros_like(z)

  null = jnp.asarray(shapes.tokenize(''))
  loss_fn = G.diffusion_loss(oracle, schedule, null, caption_dropout=0.5)
  batch = {'image': np.full((400, 2, 2, 3), 127, np.uint8),
           'tokens': np.stack([shapes.tokenize('a red circle')] * 400)}
  loss, _ = loss_fn(None, batch, jax.random.key(0))
  np.testing.assert_allclose(loss, 1.0, atol=0.05)  # E[ε²] = 1 for a zero prediction
  dropped = np.mean(np.all(np.asarray(seen[0]) == np.asarray(null), axis=1))
  assert 0.4 < dropped < 0.6


def _check_maps(model, params, s, expected):
  tapped = G.apply_with_attention(model.apply)
  sown = G.apply_with_attention(model.apply, G.AttentionSource(sown='cross_attention'))
  (out, records), (_, sown_records) = jax.jit(
      lambda p: (tapped(p, s['noise'], jnp.zeros((2,)), s['tokens']),
                 sown(p, s['noise'], jnp.zeros((2,)), s['tokens'])))(params)
  assert out.shape == (2, 32, 32, 3)
  assert G.available_resolutions(records) == expected
  for res in expected:  # the same maps: taps give call order, sown values name order
    np.testing.assert_array_equal(G.average_maps(records, res), G.average_maps(sown_records, res))
  probs = records[0]  # down_1_attn/probs: [b, heads, 256, T]
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert float(probs[..., -1].max()) == 0.0  # the padding position gets no attention


def test_unet_cross_attention_is_tapped_sown_and_masks_padding(setup):
  _check_maps(setup['model'], setup['params'], setup, {16: 3})
  layers = taps.find_layers(setup['model'].apply, setup['params'], setup['noise'],
                            jnp.zeros((2,)), setup['tokens'], types=(taps.AttentionWeights,))
  assert list(layers) == ['down_1_attn/probs', 'mid_attn/probs', 'up_1_attn/probs']


class TwiceAttention(nn.Module):
  """A user's model: flax attention that sows its weights, and one layer called twice."""

  @nn.compact
  def __call__(self, x, context):
    attend = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)
    h = attend(x, context, sow_weights=True)
    return attend(x + h, context, sow_weights=True)


def test_a_batch_that_does_not_divide_the_mesh_is_padded_and_cut_back(setup):
  s = setup
  base = _sample(s, None, None)
  rows = {k: np.asarray(v)[[0, 1, 0]] for k, v in _batch(s).items()}  # 3 rows on 2 devices
  out = _sampler(s, None)(s['params'], rows, cfg_scale=3.0)
  assert out.images.shape == (3, 32, 32, 3)
  np.testing.assert_allclose(out.images[:2], base.images, atol=1e-5)
  np.testing.assert_array_equal(out.images[2], out.images[0])


def test_sown_flax_attention_and_a_layer_called_twice():
  """Every call of a layer is one map, in call order, and weighs the same in the average."""
  x = jax.random.normal(jax.random.key(0), (2, 16, 4))  # 4x4 positions
  context = jax.random.normal(jax.random.key(1), (2, 3, 4))  # 3 tokens
  model = TwiceAttention()
  params = jax.jit(model.init)(jax.random.key(2), x, context)
  fn = G.apply_with_attention(model.apply, G.AttentionSource(sown='attention_weights'))
  out, records = jax.jit(fn)(params, x, context)
  assert len(records) == 2 and records[0].shape == (2, 2, 16, 3)
  np.testing.assert_allclose(out, jax.jit(model.apply)(params, x, context), rtol=1e-6)
  assert float(jnp.abs(records[0] - records[1]).max()) > 1e-4  # the second call sees x + h
  mean = G.average_maps(records, 4)
  np.testing.assert_allclose(mean, ((records[0].mean(1) + records[1].mean(1)) / 2)
                             .reshape(2, 4, 4, 3), rtol=1e-6)
  with pytest.raises(ValueError, match='no cross-attention probabilities as outputs of '
                                       'AttentionWeights layers'):
    G.apply_with_attention(model.apply)(params, x, context)


@pytest.mark.slow
def test_default_unet_has_maps_at_16_and_8(setup):
  model = TextUNet(vocab_size=len(V))
  params = jax.jit(model.init)(jax.random.key(0), setup['noise'], jnp.zeros((2,)),
                               setup['tokens'])
  _check_maps(model, params, setup, {8: 3, 16: 2})


def test_text_encoder_is_causal(setup):
  from lossland.models import TextEncoder
  enc = TextEncoder(len(V), width=16, num_layers=2, num_heads=2)
  tokens = np.stack([shapes.tokenize('a red circle'), shapes.tokenize('a red square')])
  params = enc.init(jax.random.key(0), tokens)
  out = enc.apply(params, tokens)
  np.testing.assert_allclose(out[0, :3], out[1, :3], rtol=1e-6)  # <s> a red: same prefix
  assert float(jnp.abs(out[0, 3] - out[1, 3]).max()) > 1e-4
