"""Euler and DPM-Solver++ (2M) against diffusers' EulerDiscreteScheduler and DPMSolverMultistep.

References: tests/fixtures/sd/euler_dpm_reference.npz, written by
scripts/make_scheduler_fixtures.py (diffusers 0.42.1): per setting (the SD
folders' configs switched to Euler or DPM-Solver++ with `from_config`, and
variants: spacings, predictions, Karras σ, solver order and type, final σ, a
clipped λ), the timesteps, σ, z_T scale, and the latents after each step on
fixed N(0, 1) model outputs, each step's output fed back, with the model
inputs (`scale_model_input`); and StableDiffusionPipeline latents of tiny_sd1
with either scheduler.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import parallel
from lossland.guidance import schedulers, sd

SD = pathlib.Path(__file__).resolve().parent.parent / 'fixtures' / 'sd'
REF = np.load(SD / 'euler_dpm_reference.npz')
SETTINGS = [str(k) for k in REF['setting_names']]
# Each step is a few float32 operations (~1e-7 relative each) with per-step constants
# computed from float32 ᾱ whose last bits differ from torch's (float32 linspace): the
# measured worst over every setting is ~1e-6 of the latents' scale; 1e-5 leaves margin,
# while a wrong σ, order or coefficient is off by 1e-3 or more.
RTOL = 1e-5


def _config(key):
  return json.loads(str(REF['setting_configs'][SETTINGS.index(key)]))


def _run(scheduler, z, outputs):
  """All steps in one compiled scan with a traced step index, as the samplers run them."""
  def body(carry, xs):
    z, state = carry
    i, out = xs
    x = scheduler.scale_model_input(z, i)
    z, state = scheduler.step(state, z, out, i)
    return (z, state), (z, x)
  z = jnp.asarray(z)
  _, (zs, xs) = jax.jit(lambda z, o: jax.lax.scan(
      body, (z, scheduler.init_state(z)), (jnp.arange(len(o)), o)))(z, jnp.asarray(outputs))
  return np.asarray(zs), np.asarray(xs)


def _close(got, want):
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


@pytest.mark.parametrize('key', SETTINGS)
def test_steps_match_diffusers(key):
  config = _config(key)
  scheduler = schedulers.scheduler_from_config(config, int(REF[f'{key}/num_inference_steps']))
  kind = (schedulers.EulerScheduler if config['_class_name'] == 'EulerDiscreteScheduler'
          else schedulers.DPMSolverScheduler)
  assert isinstance(scheduler, kind)
  want_t = REF[f'{key}/timesteps']
  assert np.asarray(scheduler.timesteps).dtype.kind == want_t.dtype.kind  # float Euler, int DPM
  # Karras σ map back to fractional timesteps through log σ of the float32 ᾱ (torch's last
  # bits differ): ~5e-6 relative; the others are equal.
  np.testing.assert_allclose(scheduler.timesteps, want_t, rtol=RTOL, atol=0)
  if isinstance(scheduler, schedulers.EulerScheduler):
    _close(scheduler.sigmas, REF[f'{key}/sigmas'])
  np.testing.assert_allclose(scheduler.init_noise_sigma, REF[f'{key}/init_noise_sigma'], rtol=1e-6)
  samples = REF[f'{key}/samples']
  zs, xs = _run(scheduler, samples[0], REF[f'{key}/outputs'])
  _close(xs, REF[f'{key}/scaled'])
  _close(zs, samples[1:])


def test_dpm_orders_follow_diffusers():
  """First order at the first step and (final σ = 0, or under 15 steps) the last; else 2M."""
  first = lambda s: [i for i in range(len(s.timesteps)) if s.c[i] == 0 and s.e[i] == 0]
  for key, want in (('dpm_sd1_leading_8', [0, 7]), ('dpm_sd1_leading_20', [0, 19]),
                    ('dpm_sigma_min_no_lower_final_6', [0]), ('dpm_order1_5', [0, 1, 2, 3, 4])):
    s = schedulers.scheduler_from_config(_config(key), int(REF[f'{key}/num_inference_steps']))
    assert first(s) == want, key


@pytest.fixture(scope='module')
def tiny_sd1():
  return sd.load_stable_diffusion(SD / 'tiny_sd1'), dict(np.load(SD / 'tiny_sd1' /
                                                                 'pipeline_reference.npz'))


@pytest.mark.parametrize('name', ['euler', 'dpm'])
def test_sampling_tiny_sd1_matches_the_pipeline(tiny_sd1, name):
  model, base = tiny_sd1
  config = json.loads(str(REF[f'pipe_{name}_config']))
  scheduler = schedulers.scheduler_from_config(config, int(base['num_steps']))
  mesh = parallel.make_mesh({'data': 2}, jax.devices()[:2])
  sampler = sd.make_sd_sampler(model, scheduler=scheduler, mesh=mesh)
  out = sampler([str(p) for p in base['prompts']], latents=base['latents'].transpose(0, 2, 3, 1),
                cfg_scale=float(base['guidance_scale']), decode=False)
  want = REF[f'pipe_{name}_latents'].transpose(0, 2, 3, 1)
  # As the DDIM test (test_sd_sampling.py): 10 steps of a float32 UNet with CFG 7.5.
  np.testing.assert_allclose(np.asarray(out.latents), want, rtol=0,
                             atol=2e-4 * np.abs(want).max())
