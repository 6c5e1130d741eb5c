"""Stable Diffusion sampling against diffusers' pipelines, on the tiny random SD 1.x folder.

References: tests/fixtures/sd/tiny_sd1/pipeline_reference.npz, written by
scripts/make_sd_pipeline_fixtures.py: StableDiffusionPipeline latents (DDIM
and PLMS, 10 steps, CFG 7.5) and StableDiffusionAttendAndExcitePipeline
latents (DDIM, A&E in the first 4 steps with refinement at steps 0 and 2,
scale_factor 20) from the same z_T, with every A&E loss the pipeline read.
"""
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from lossland import parallel
from lossland.guidance import sampler as sampler_lib
from lossland.guidance import schedulers, sd

SD1 = pathlib.Path(__file__).resolve().parent.parent / 'fixtures' / 'sd' / 'tiny_sd1'


@pytest.fixture(scope='module')
def setup():
  ref = dict(np.load(SD1 / 'pipeline_reference.npz'))
  model = sd.load_stable_diffusion(SD1)
  mesh = parallel.make_mesh({'data': 2}, jax.devices()[:2])  # the batch of 2 on 2 devices
  ddim = schedulers.scheduler_from_config(json.loads(str(ref['ddim_config'])),
                                          int(ref['num_steps']))
  prompts = [str(p) for p in ref['prompts']]
  latents = ref['latents'].transpose(0, 2, 3, 1)  # NCHW -> NHWC
  return dict(ref=ref, sd=model, mesh=mesh, ddim=ddim, prompts=prompts, latents=latents,
              cfg=float(ref['guidance_scale']), samplers={})


def _sampler(s, arm, scheduler='ddim', **kw):
  key = (arm, scheduler, tuple(sorted(kw.items())))
  if key not in s['samplers']:
    sched = s['ddim'] if scheduler == 'ddim' else s['sd'].scheduler(int(s['ref']['num_steps']))
    s['samplers'][key] = sd.make_sd_sampler(s['sd'], arm, scheduler=sched, mesh=s['mesh'], **kw)
  return s['samplers'][key]


def _ae(s):
  ref = s['ref']
  refine = {int(k): float(v) for k, v in ref['ae_thresholds']}
  return _sampler(s, 'attend_excite', num_guided_steps=int(ref['ae_max_iter_to_alter']),
                  refine_steps=tuple(sorted(refine)),
                  refine_targets=tuple(1 - refine[k] for k in sorted(refine)))


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def test_unguided_ddim_sample_matches_diffusers(setup):
  s = setup
  out = _sampler(s, 'baseline')(s['prompts'], latents=s['latents'], cfg_scale=s['cfg'],
                                decode=False)
  want = _nhwc(s['ref']['ddim_unguided'])
  # 10 steps of a float32 UNet (~1e-6 relative per op, a few hundred ops deep) with CFG 7.5
  # amplifying the cond-uncond difference: ~1e-4 of the latents' scale.
  scale = np.abs(want).max()
  np.testing.assert_allclose(np.asarray(out.latents), want, atol=2e-4 * scale, rtol=0)
  assert out.images is None and out.loss is None


@pytest.mark.slow
def test_unguided_plms_sample_matches_diffusers(setup):
  s = setup
  out = _sampler(s, 'baseline', scheduler='folder')(s['prompts'], latents=s['latents'],
                                                    cfg_scale=s['cfg'], decode=False)
  want = _nhwc(s['ref']['pndm_unguided'])
  np.testing.assert_allclose(np.asarray(out.latents), want, atol=2e-4 * np.abs(want).max())


def _reference_losses(ref, steps, batch):
  """Per (step, sample): the last A&E loss the pipeline read (the one its update used)."""
  out = np.zeros((steps, batch))
  for st, b, v in zip(ref['ae_loss_step'], ref['ae_loss_sample'], ref['ae_loss_value']):
    if st < steps:
      out[st, b] = v
  return out


def test_attend_and_excite_matches_diffusers_and_step_size_zero_is_unguided(setup):
  s = setup
  ref = s['ref']
  ae = _ae(s)
  idx = ref['token_indices'].astype(np.int32)
  out = ae(s['prompts'], token_indices=idx, latents=s['latents'], cfg_scale=s['cfg'],
           step_scale=float(ref['ae_scale_factor']), decode=False)
  k = int(ref['ae_max_iter_to_alter'])
  want_loss = _reference_losses(ref, k, 2)
  got_loss = np.asarray(out.loss)
  assert np.all(got_loss[k:] == 0)  # no guided steps after max_iter_to_alter
  # Up to 22 gradient steps of size 20 per guided step move z by O(10): float32 rounding of
  # the UNet forward and backward (~1e-6 relative) grows along that chain; the losses are
  # maxima of softmax(100·A) maps, so ~1e-3 absolute on values in [0, 1].
  np.testing.assert_allclose(got_loss[:k], want_loss, atol=2e-3)
  want = _nhwc(ref['ae_latents'])
  err = np.abs(np.asarray(out.latents) - want)
  print(f'A&E latents vs diffusers: max abs {err.max():.3g}, max rel '
        f'{err.max() / np.abs(want).max():.3g}')
  np.testing.assert_allclose(np.asarray(out.latents), want, atol=2e-3 * np.abs(want).max())
  # The same compiled sampler with α = 0 is the unguided sample, bit for bit.
  zero = ae(s['prompts'], token_indices=idx, latents=s['latents'], cfg_scale=s['cfg'],
            step_sizes=np.zeros(ae.num_steps, np.float32), decode=False)
  base = _sampler(s, 'baseline')(s['prompts'], latents=s['latents'], cfg_scale=s['cfg'],
                                 decode=False)
  np.testing.assert_array_equal(np.asarray(zero.latents), np.asarray(base.latents))
  assert float(np.abs(np.asarray(zero.loss)).max()) == 0.0
  assert ae.sampler.cache_size() == 1


def test_concept_words_and_bad_inputs_are_named(setup):
  s = setup
  ae = _ae(s)
  tok = s['sd'].tokenizer
  got = sd.concept_positions(tok, s['prompts'], [['cat', 'dog'], ['ball', 'bench']])
  np.testing.assert_array_equal(got, s['ref']['token_indices'])
  with pytest.raises(ValueError, match=r"concept 'horse' is not a word of prompt 0 \('a cat and "
                                       r"a dog'\); its tokens \(position:token\) are \[0:"):
    ae(s['prompts'], concepts=[['cat', 'horse'], ['ball', 'bench']], latents=s['latents'])
  with pytest.raises(ValueError, match=r"concept 'elephant' of prompt 0 is split into 2 tokens"):
    sd.concept_positions(tok, ['an elephant and a horse'], [['elephant', 'horse']])
  last = sd.concept_positions(tok, ['an elephant and a horse'], [['elephant', 'horse']],
                              multi_token='last')
  assert tok.tokens('an elephant and a horse')[last[0, 0]] == 'phant</w>'
  with pytest.raises(ValueError, match='start token, end token or padding'):  # the end token
    ae(s['prompts'], token_indices=np.array([[2, 6], [3, 7]], np.int32), latents=s['latents'])
  with pytest.raises(ValueError):  # the tokenizer's own error for a prompt over 77 tokens
    ae(['a cat ' * 60, 'a dog'], concepts=[['cat'], ['dog']], latents=s['latents'])
  assert ae.sampler.cache_size() <= 1  # refused on the host, before tracing


def test_a_resolution_the_unet_cannot_make_lists_the_available(setup):
  s = setup
  avail = sd.available_map_resolutions(s['sd'])
  assert avail == {8: 1, 16: 3, 32: 3}  # mid; down_blocks.1 + up_blocks.1 (2); 32: 1 + 2
  with pytest.raises(ValueError, match=r'no cross-attention maps at 4x4 for 32x32 latents; '
                                       r'available resolutions \(res: layer calls\): '
                                       r'\{8: 1, 16: 3, 32: 3\}'):
    sd.make_sd_sampler(s['sd'], 'astar', scheduler=s['ddim'], resolution=4)


def test_a_folder_missing_a_component_names_it(tmp_path):
  for name in ('text_encoder', 'tokenizer', 'scheduler'):
    os.symlink(SD1 / name, tmp_path / name)
  (tmp_path / 'vae').mkdir()
  (tmp_path / 'vae' / 'config.json').write_text('{}')
  with pytest.raises(ValueError, match=r"lacks \['unet/', 'vae/\*.safetensors'\]. It has "
                                       r"\['scheduler/', 'text_encoder/', 'tokenizer/', 'vae/'\]"):
    sd.load_stable_diffusion(tmp_path)


def test_arm_defaults_follow_the_papers():
  g, scale = sd.arm_guidance('attend_excite', 50)
  assert (g.num_guided_steps, g.refine_steps, scale) == (25, (0, 10, 20), 20.0)
  np.testing.assert_allclose(g.refine_targets, (0.95, 0.5, 0.2))
  assert (g.softmax_tokens, g.smooth_kernel, g.refine_rule) == ('sequence', 'attend_excite',
                                                                'attend_excite')
  assert sd.arm_guidance('baseline', 50) == (None, 0.0)
  astar, _ = sd.arm_guidance('astar', 50)
  assert astar.loss == 'astar' and astar.refine_steps == ()
  with pytest.raises(ValueError, match='available'):
    sd.arm_guidance('syngen', 50)
  with pytest.raises(ValueError, match='unknown refine_rule'):
    sampler_lib.Guidance('attend_excite', refine_rule='until_done')


def test_maps_are_attend_and_excites():
  """Softmax of 100·A over positions 1..75, A&E's Gaussian (reflect padding), max: as the pipeline."""
  import jax.numpy as jnp
  from lossland.guidance import losses, maps
  ref = np.load(SD1 / 'pipeline_reference.npz')
  g = sampler_lib.Guidance.attend_excite()
  length = ref['maps_probs'].shape[-1]
  mask = np.broadcast_to((np.arange(length) > 0) & (np.arange(length) < length - 1), (2, length))
  got = maps.token_maps(jnp.asarray(ref['maps_probs']), mask, ref['maps_indices'].astype(np.int32),
                        scale=g.softmax_scale, smooth_sigma=g.smooth_sigma,
                        smooth_formula=g.smooth_kernel)
  # float32 softmax over 75 logits of size <= 100 and a 9-term average: ~1e-6 relative.
  np.testing.assert_allclose(np.asarray(got).max((1, 2)), ref['maps_max'], rtol=1e-5)
  np.testing.assert_allclose(jax.vmap(losses.attend_excite_loss)(got),
                             1 - ref['maps_max'].min(1), rtol=1e-5)
