"""The sampler feeds the model the scheduler's scaled input at its (fractional) timesteps.

Euler's model input is z / sqrt(σ² + 1) at float timesteps (diffusers'
`scale_model_input`); the CFG pass and the attention-guidance pass must both
see it, or A&E / A-STAR would read maps of an input 15x too large at σ_max. A
toy TextUNet (tests/guidance/test_guidance_sampler.py's) with 3 Euler steps
over 'linspace' timesteps (999, 499.5, 0): the guided loss of step 0 is the
A&E loss of the maps at the scaled input, and the unguided latents are the
host loop z ← step(z, CFG ε(z / sqrt(σ_i² + 1), t_i)).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import guidance as G
from lossland import parallel
from lossland.data import shapes
from lossland.guidance import schedulers
from test_guidance_sampler import tiny_text_unet  # pylint: disable=g-bad-import-order

V = shapes.VOCAB
CFG = 3.0


@pytest.fixture(scope='module')
def setup():
  model, tokens, params = tiny_text_unet()
  euler = schedulers.scheduler_from_config(
      {'_class_name': 'EulerDiscreteScheduler', 'beta_schedule': 'scaled_linear',
       'beta_start': 0.00085, 'beta_end': 0.012, 'timestep_spacing': 'linspace'}, 3)
  assert list(euler.timesteps) == [999.0, 499.5, 0.0] and euler.init_noise_sigma > 10
  return dict(model=model, params=params,
              tokens=tokens, null=np.asarray(shapes.tokenize('')), euler=euler,
              mask=G.text_mask(tokens, start_id=V.index('<s>'), end_id=V.index('</s>')),
              idx=G.concept_indices(tokens, [['circle', 'square'], ['triangle', 'circle']], V),
              noise=np.asarray(jax.random.normal(jax.random.key(2), (2, 32, 32, 3))),
              mesh=parallel.make_mesh({'data': 2}, jax.devices()[:2]))


def test_guidance_reads_the_maps_of_the_scaled_input(setup):
  s = setup
  guidance = G.Guidance('attend_excite', num_guided_steps=1)
  sampler = G.make_sampler(s['model'].apply, s['euler'], null_tokens=s['null'], guidance=guidance,
                           mesh=s['mesh'])
  out = sampler(s['params'], {'noise': s['noise'], 'tokens': s['tokens'], 'text_mask': s['mask'],
                              'token_indices': s['idx']}, cfg_scale=CFG,
                step_sizes=np.array([1.0, 0.0, 0.0], np.float32))
  z0 = s['noise'] * s['euler'].init_noise_sigma

  def loss(x):
    maps = G.concept_maps(s['model'].apply, s['params'], {
        'x': x, 't': jnp.full((2,), 999.0), 'tokens': s['tokens'], 'text_mask': s['mask'],
        'token_indices': s['idx']}, resolution=16)
    return np.asarray(jax.vmap(G.attend_excite_loss)(maps))

  want = loss(z0 / s['euler'].input_scale[0])
  np.testing.assert_allclose(np.asarray(out.loss[0]), want, rtol=1e-5)
  assert np.abs(loss(z0) - want).max() > 1e-3  # the unscaled input's maps differ


def test_unguided_sampling_is_the_scaled_host_loop(setup):
  s = setup
  sampler = G.make_sampler(s['model'].apply, s['euler'], null_tokens=s['null'], mesh=s['mesh'])
  got = sampler(s['params'], {'noise': s['noise'], 'tokens': s['tokens']}, cfg_scale=CFG).images
  apply = jax.jit(s['model'].apply)
  euler, z = s['euler'], jnp.asarray(s['noise'] * s['euler'].init_noise_sigma)
  null = np.broadcast_to(s['null'], s['tokens'].shape)
  state = euler.init_state(z)
  for i, t in enumerate(euler.timesteps):
    x, ts = z / euler.input_scale[i], jnp.full((2,), t, jnp.float32)
    cond, uncond = apply(s['params'], x, ts, s['tokens']), apply(s['params'], x, ts, null)
    z, state = euler.step(state, z, uncond + CFG * (cond - uncond), i)
  np.testing.assert_allclose(np.asarray(got), np.asarray(z), rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(z).max()))
