"""diffusers references for lossland's Euler and DPM-Solver++ schedulers and SD folders' configs.

Writes tests/fixtures/sd/euler_dpm_reference.npz (lossland/guidance/schedulers.py,
scheduler_config.py; tests/guidance/test_sd_euler_dpm.py):

  Step references. For each setting k (`setting_names`; `setting_configs`: the
  scheduler's full config as JSON, `_class_name` included), built with
  `<class>.from_config(base config, **overrides)` from the scheduler config of
  tiny_sd1 (PNDM, epsilon, 'leading', steps_offset 1) or tiny_sd2 (DDIM,
  v-prediction), as people switch an SD folder's scheduler:
    k/num_inference_steps, k/timesteps [n] (float32 for Euler, int64 for DPM),
    k/sigmas [n + 1] float32, k/init_noise_sigma,
    k/samples [n + 1, 1, 4, 8, 8]: z_0 = init_noise_sigma * N(0, 1), then each
      `step`'s prev_sample, fed back;
    k/scaled [n, 1, 4, 8, 8]: `scale_model_input(z_i, t_i)` before each step;
    k/outputs [n, 1, 4, 8, 8]: the fixed N(0, 1) model outputs.

  Pipeline fix-ups. `fixup_inputs` [m] (JSON scheduler configs as a folder may
  hold them: outdated steps_offset / clip_sample, fields of other classes,
  unknown fields) and `fixup_outputs` [m] (JSON: the scheduler config of
  `StableDiffusionPipeline(..., scheduler=<class>.from_config(input))` after
  its __init__, i.e. what the pipeline samples with).

  End to end on tiny_sd1: `pipe_<name>_config` (JSON) and `pipe_<name>_latents`
  [2, 4, 32, 32] for name in ('euler', 'dpm'): StableDiffusionPipeline latents
  (output_type='latent') with `<class>.from_config(the folder's scheduler
  config)`, from pipeline_reference.npz's prompts, z_T, step count and CFG.

Environment (torch, transformers and diffusers are not lossland dependencies):

  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers==5.24.0 diffusers==0.42.1 \
      safetensors==0.8.0 tokenizers==0.23.3 numpy==2.4.6

Run from the repository root:  /tmp/hfvenv/bin/python scripts/make_scheduler_fixtures.py
"""
from __future__ import annotations

import json
import math
import pathlib

import diffusers
import numpy as np
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       PNDMScheduler, StableDiffusionPipeline)

ROOT = pathlib.Path(__file__).resolve().parent.parent / 'tests' / 'fixtures' / 'sd'
DPM, EULER = DPMSolverMultistepScheduler, EulerDiscreteScheduler
LINEAR = dict(beta_schedule='linear', beta_start=1e-4, beta_end=0.02)
SETTINGS = {  # name -> (class, base folder, overrides, steps)
    'dpm_sd1_leading_8': (DPM, 'tiny_sd1', {}, 8),
    'dpm_sd1_leading_20': (DPM, 'tiny_sd1', {}, 20),
    'dpm_sd2_v_linspace_10': (DPM, 'tiny_sd2', dict(timestep_spacing='linspace'), 10),
    'dpm_trailing_heun_sample_6': (DPM, 'tiny_sd1', dict(
        timestep_spacing='trailing', solver_type='heun', prediction_type='sample'), 6),
    'dpm_sigma_min_no_lower_final_6': (DPM, 'tiny_sd1', dict(
        final_sigmas_type='sigma_min', lower_order_final=False), 6),
    'dpm_order1_5': (DPM, 'tiny_sd1', dict(solver_order=1), 5),
    'dpm_karras_12': (DPM, 'tiny_sd1', dict(use_karras_sigmas=True), 12),
    'dpm_cosine_clipped_8': (DPM, 'tiny_sd1', dict(
        beta_schedule='squaredcos_cap_v2', lambda_min_clipped=-5.1,
        timestep_spacing='linspace'), 8),
    'dpm_linear_euler_at_final_16': (DPM, 'tiny_sd1', dict(LINEAR, euler_at_final=True), 16),
    'euler_sd1_leading_10': (EULER, 'tiny_sd1', {}, 10),
    'euler_sd2_v_linspace_8': (EULER, 'tiny_sd2', dict(timestep_spacing='linspace'), 8),
    'euler_trailing_sample_6': (EULER, 'tiny_sd1', dict(timestep_spacing='trailing',
                                                        prediction_type='sample'), 6),
    'euler_karras_12': (EULER, 'tiny_sd1', dict(use_karras_sigmas=True), 12),
    'euler_karras_bounds_linspace_7': (EULER, 'tiny_sd1', dict(
        use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, timestep_spacing='linspace'), 7),
    'euler_linear_sigma_min_7': (EULER, 'tiny_sd1', dict(LINEAR, final_sigmas_type='sigma_min',
                                                         timestep_spacing='linspace'), 7),
}
_SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')
FIXUP_INPUTS = [  # scheduler_config.json files as folders have them
    dict(_class_name='DDIMScheduler', steps_offset=0, clip_sample=True, **_SD),
    dict(_class_name='DDIMScheduler', **_SD),  # class defaults: steps_offset 0, clip_sample true
    dict(_class_name='EulerDiscreteScheduler', timestep_spacing='leading', **_SD),
    dict(_class_name='PNDMScheduler', skip_prk_steps=True, steps_offset=1, clip_sample=True, **_SD),
    dict(_class_name='DDIMScheduler', steps_offset=1, clip_sample=False, skip_prk_steps=True,
         use_karras_sigmas=True, solver_order=3, not_a_field=7, **_SD),
    dict(_class_name='DPMSolverMultistepScheduler', steps_offset=1, algorithm_type='dpmsolver++',
         solver_order=2, prediction_type='v_prediction', **_SD),
]


def _folder_config(name: str) -> dict:
  config = json.loads((ROOT / name / 'scheduler' / 'scheduler_config.json').read_text())
  return {k: v for k, v in config.items() if not k.startswith('_')}


def _full(scheduler) -> dict:
  config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith('_')}
  config['_class_name'] = type(scheduler).__name__
  return config


def _json(config: dict) -> str:
  return json.dumps(config, default=list)  # -inf (lambda_min_clipped) as -Infinity


def step_references(ref: dict) -> None:
  gen = torch.Generator().manual_seed(11)
  names, configs = [], []
  for key, (cls, base, overrides, steps) in SETTINGS.items():
    scheduler = cls.from_config(_folder_config(base), **overrides)
    scheduler.set_timesteps(steps)
    sigma0 = scheduler.init_noise_sigma
    z = torch.randn((1, 4, 8, 8), generator=gen) * sigma0
    samples, scaled, outputs = [z], [], []
    for t in scheduler.timesteps:
      scaled.append(scheduler.scale_model_input(z, t))
      out = torch.randn((1, 4, 8, 8), generator=gen)
      z = scheduler.step(out, t, z).prev_sample
      samples.append(z)
      outputs.append(out)
    ref[f'{key}/num_inference_steps'] = np.int64(steps)
    ref[f'{key}/timesteps'] = scheduler.timesteps.numpy()
    ref[f'{key}/sigmas'] = scheduler.sigmas.numpy()
    ref[f'{key}/init_noise_sigma'] = np.float32(sigma0)
    ref[f'{key}/samples'] = torch.stack(samples).numpy()
    ref[f'{key}/scaled'] = torch.stack(scaled).numpy()
    ref[f'{key}/outputs'] = torch.stack(outputs).numpy()
    names.append(key)
    configs.append(_json(_full(scheduler)))
    print(f'{key}: timesteps {scheduler.timesteps.numpy().round(2).tolist()}')
  ref['setting_names'] = np.array(names)
  ref['setting_configs'] = np.array(configs)


def pipeline_references(ref: dict) -> None:
  folder = ROOT / 'tiny_sd1'
  pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                 requires_safety_checker=False,
                                                 torch_dtype=torch.float32)
  pipe.set_progress_bar_config(disable=True)
  parts = {k: pipe.components[k] for k in ('vae', 'text_encoder', 'tokenizer', 'unet')}
  outputs = []
  for config in FIXUP_INPUTS:
    cls = getattr(diffusers, config['_class_name'])
    fixed = StableDiffusionPipeline(**parts, scheduler=cls.from_config(config), safety_checker=None,
                                    feature_extractor=None, requires_safety_checker=False)
    outputs.append(_json(_full(fixed.scheduler)))
  ref['fixup_inputs'] = np.array([_json(c) for c in FIXUP_INPUTS])
  ref['fixup_outputs'] = np.array(outputs)

  base = np.load(folder / 'pipeline_reference.npz')
  prompts = [str(p) for p in base['prompts']]
  for name, cls in (('euler', EULER), ('dpm', DPM)):
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    latents = pipe(prompt=prompts, latents=torch.tensor(base['latents']),
                   num_inference_steps=int(base['num_steps']),
                   guidance_scale=float(base['guidance_scale']), output_type='latent',
                   height=64, width=64).images
    ref[f'pipe_{name}_config'] = np.array(_json(_full(pipe.scheduler)))
    ref[f'pipe_{name}_latents'] = latents.numpy()
    print(f'pipeline {name}: |latents| max {latents.abs().max():.3g}; '
          f'timesteps {pipe.scheduler.timesteps.numpy().tolist()}')


if __name__ == '__main__':
  assert diffusers.__version__ == '0.42.1', diffusers.__version__
  assert not math.isfinite(DPM().config.lambda_min_clipped)
  torch.manual_seed(0)
  reference: dict = {}
  step_references(reference)
  pipeline_references(reference)
  np.savez_compressed(ROOT / 'euler_dpm_reference.npz', **reference)
  print(f'{ROOT / "euler_dpm_reference.npz"}: {len(SETTINGS)} settings, '
        f'{len(FIXUP_INPUTS)} folder configs')
