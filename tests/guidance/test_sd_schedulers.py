"""DDIM and PLMS schedulers against diffusers' DDIMScheduler / PNDMScheduler step outputs.

References: tests/fixtures/sd/*/scheduler_reference.npz, written by
scripts/make_sd_pipeline_fixtures.py (z_0 and fixed N(0, 1) model outputs, each
`step`'s output fed back into the next step, NCHW; lossland's schedulers are
elementwise, so the layout does not matter).
"""
import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland.guidance import diffusion, schedulers

SD = pathlib.Path(__file__).resolve().parent.parent / 'fixtures' / 'sd'


def _settings():
  for name in ('tiny_sd1', 'tiny_sd2'):
    ref = np.load(SD / name / 'scheduler_reference.npz')
    for key, config in zip(ref['setting_names'], ref['setting_configs']):
      yield pytest.param(name, str(key), json.loads(str(config)), id=f'{name}-{key}')


def _run(scheduler, z, outputs):
  """All steps in one compiled scan with a traced step index, as the samplers run them."""
  def body(carry, xs):
    z, state = carry
    i, out = xs
    z, state = scheduler.step(state, z, out, i)
    return (z, state), z
  z = jnp.asarray(z)
  _, zs = jax.jit(lambda z, o: jax.lax.scan(body, (z, scheduler.init_state(z)),
                                            (jnp.arange(len(o)), o)))(z, jnp.asarray(outputs))
  return np.asarray(zs)


@pytest.mark.parametrize('name,key,config', list(_settings()))
def test_scheduler_steps_match_diffusers(name, key, config):
  ref = np.load(SD / name / 'scheduler_reference.npz')
  steps = int(ref[f'{key}/num_inference_steps'])
  scheduler = schedulers.scheduler_from_config(config, steps)
  np.testing.assert_array_equal(scheduler.timesteps, ref[f'{key}/timesteps'])
  # ᾱ: the same float32 running product as torch.cumprod; β from a float32 linspace whose
  # last bits may differ from torch's (1 ulp ≈ 6e-8 relative, summed over 1000 factors).
  np.testing.assert_allclose(schedulers.alphas_cumprod(config), ref[f'{key}/alphas_cumprod'],
                             rtol=1e-5)
  samples = ref[f'{key}/samples']
  got = _run(scheduler, samples[0], ref[f'{key}/outputs'])
  # Each step is a few float32 ops on O(1) values (the coefficients reach ~30 at the last,
  # nearly noiseless step: sqrt(ᾱ_prev/ᾱ_t) and 1/sqrt(ᾱ_t)); 6 steps of ~1e-6 relative each.
  np.testing.assert_allclose(got, samples[1:], rtol=1e-4, atol=1e-4 * np.abs(samples).max())


def test_folder_schedulers_are_the_expected_kinds():
  sd1 = schedulers.load_scheduler(SD / 'tiny_sd1' / 'scheduler', 10)
  sd2 = schedulers.load_scheduler(SD / 'tiny_sd2' / 'scheduler', 10)
  assert isinstance(sd1, schedulers.PLMSScheduler) and len(sd1.timesteps) == 11
  assert sd1.timesteps[1] == sd1.timesteps[2] == 801  # PLMS takes its first step twice
  assert isinstance(sd2, schedulers.DDIMScheduler) and sd2.prediction_type == 'v_prediction'
  assert list(sd2.timesteps) == list(range(901, 0, -100))


def test_unsupported_settings_are_named_in_one_error():
  base = {'_class_name': 'DDIMScheduler', 'beta_schedule': 'scaled_linear'}
  with pytest.raises(ValueError, match=r"timestep_spacing='karras' "
                                       r"\(supported: \['leading', 'trailing', 'linspace'\]\); "
                                       r"thresholding=true \(supported: false\)"):
    schedulers.scheduler_from_config(dict(base, thresholding=True, timestep_spacing='karras'), 10)
  with pytest.raises(ValueError, match=r"scheduler class 'UniPCMultistepScheduler' is not "
                                       r"supported; supported: \['DDIMScheduler', "
                                       r"'PNDMScheduler', 'EulerDiscreteScheduler', "
                                       r"'DPMSolverMultistepScheduler'\]"):
    schedulers.scheduler_from_config({'_class_name': 'UniPCMultistepScheduler'}, 10)
  with pytest.raises(ValueError, match='only PLMS is supported: skip_prk_steps=true'):
    schedulers.scheduler_from_config({'_class_name': 'PNDMScheduler'}, 10)
  with pytest.raises(ValueError, match=r"prediction_type='sample' \(supported: \['epsilon', "
                                       r"'v_prediction'\]\)"):
    schedulers.scheduler_from_config({'_class_name': 'PNDMScheduler', 'skip_prk_steps': True,
                                      'prediction_type': 'sample'}, 10)
  with pytest.raises(ValueError, match=r"algorithm_type='sde-dpmsolver\+\+' \(supported: "
                                       r"'dpmsolver\+\+'\); use_lu_lambdas=true"):
    schedulers.scheduler_from_config({'_class_name': 'DPMSolverMultistepScheduler',
                                      'algorithm_type': 'sde-dpmsolver++',
                                      'use_lu_lambdas': True}, 10)
  with pytest.raises(ValueError,
                     match=r"no scheduler_config.json in .*tiny_sd1'; it has \[.*'scheduler'"):
    schedulers.load_scheduler(SD / 'tiny_sd1', 10)


def test_fields_of_other_classes_are_ignored_and_unknown_ones_with_a_warning():
  """As diffusers' from_config: another scheduler class's fields silently, others with a warning."""
  base = {'_class_name': 'DDIMScheduler', 'beta_schedule': 'scaled_linear', 'beta_start': 0.00085,
          'beta_end': 0.012, 'clip_sample': False}
  want = schedulers.scheduler_from_config(base, 10)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # no warning for other classes' fields
    got = schedulers.scheduler_from_config(dict(base, skip_prk_steps=True, use_karras_sigmas=True,
                                                solver_order=3, interpolation_type='linear'), 10)
  np.testing.assert_array_equal(got.alpha_prev, want.alpha_prev)
  with pytest.warns(UserWarning, match=r"fields \['use_karras'\] belong to no diffusers "
                                       r"scheduler; they are ignored"):
    got = schedulers.scheduler_from_config(dict(base, use_karras=True), 10)
  np.testing.assert_array_equal(got.alpha_prev, want.alpha_prev)


def test_ddim_with_the_true_noise_recovers_the_sample_in_float64():
  """Song et al. eq. 12 is exact for an oracle ε: z_T -> x0, for every spacing and prediction."""
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (2, 3))
  noise = rng.standard_normal(x0.shape)
  for spacing in schedulers.SPACINGS:
    config = {'_class_name': 'DDIMScheduler', 'beta_schedule': 'scaled_linear',
              'beta_start': 0.00085, 'beta_end': 0.012, 'clip_sample': False,
              'set_alpha_to_one': True, 'timestep_spacing': spacing, 'steps_offset': 1}
    acp = schedulers.alphas_cumprod(config).astype(np.float64)
    s = schedulers.scheduler_from_config(config, 8)
    ab = acp[s.timesteps[0]]
    z = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    for i in range(len(s.timesteps)):
      a_t, a_prev = float(s.alpha_t[i]), float(s.alpha_prev[i])
      z = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * noise  # eq. 12 with the oracle
      z_step, _ = s.step((), jnp.asarray(np.sqrt(a_t) * x0 + np.sqrt(1 - a_t) * noise,
                                         jnp.float32), jnp.asarray(noise, jnp.float32), i)
      np.testing.assert_allclose(z_step, z, atol=1e-5)  # float32 on O(1) values
    np.testing.assert_allclose(z, x0 * np.sqrt(a_prev) + np.sqrt(1 - a_prev) * noise)
    assert float(s.alpha_prev[-1]) == 1.0  # set_alpha_to_one: the last step lands on x0


def test_lossland_ddim_is_the_toy_samplers_ddim():
  schedule = diffusion.linear_schedule()
  s = schedulers.lossland_ddim(schedule, 5)
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  eps = jax.random.normal(jax.random.key(1), z.shape)
  ts, prevs = diffusion.ddim_timesteps(schedule, 5)
  for i in range(5):
    want = diffusion.ddim_step(schedule, z, eps, jnp.int32(ts[i]), jnp.int32(prevs[i]))
    got, _ = s.step((), z, eps, i)
    np.testing.assert_array_equal(got, want)
