"""diffusers reference samples and scheduler steps for lossland's SD samplers (tests/guidance/).

Writes, next to the tiny Stable Diffusion folders of `make_sd_fixtures.py`:

  tests/fixtures/sd/<name>/scheduler_reference.npz  (tiny_sd1 and tiny_sd2)
    For each setting k (`setting_names`, JSON configs in `setting_configs`):
    `k/timesteps` [n], `k/alphas_cumprod` [T], `k/samples` [n + 1, 1, 4, 8, 8]
    (z_0 then each `step`'s prev_sample, fed back) and `k/outputs` [n, 1, 4, 8, 8]
    (fixed N(0, 1) model outputs, one per call). The folder's own scheduler
    config and variants of it (other beta schedules, spacings, predictions,
    clipping, set_alpha_to_one), NCHW.

  tests/fixtures/sd/tiny_sd1/pipeline_reference.npz
    prompts [2] str, token_indices [2, 2] int64, latents [2, 4, 32, 32] (z_T),
    num_steps, guidance_scale, ddim_config (JSON: the DDIMScheduler built from
    the folder's PNDM config with clip_sample=False);
    `ddim_unguided`, `pndm_unguided` [2, 4, 32, 32]: StableDiffusionPipeline
      latents (output_type='latent') with each scheduler;
    `ae_latents` [2, 4, 32, 32]: StableDiffusionAttendAndExcitePipeline with the
      DDIM scheduler, `ae_max_iter_to_alter`, `ae_thresholds` [k, 2] (step,
      threshold), `ae_scale_factor`, attn_res (16, 16);
    `ae_loss_step`, `ae_loss_sample`, `ae_loss_value`, `ae_loss_refining` [e]:
      every A&E loss the pipeline computed, in order (its step, its sample, the
      value, whether it was inside `_perform_iterative_refinement_step`);
    `maps_probs` [2, 16, 16, 77]: the per-sample mean of reference.npz's
      `unet_probs16` over layers, `maps_indices` [2, 2] and `maps_max` [2, 2]:
      the pipeline's `_compute_max_attention_per_index` of them (softmax of
      100·A over positions 1..75, GaussianSmoothing with reflect padding, max).

Environment (torch, transformers and diffusers are not lossland dependencies):

  python3 -m venv /tmp/sdvenv
  /tmp/sdvenv/bin/pip install torch==2.13.0 transformers==5.24.0 diffusers==0.42.1 \
      safetensors==0.8.0 tokenizers==0.23.3 numpy==2.4.6

Run from the repository root:  /tmp/sdvenv/bin/python scripts/make_sd_pipeline_fixtures.py
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
from diffusers.pipelines.deprecated import StableDiffusionAttendAndExcitePipeline

ROOT = pathlib.Path(__file__).resolve().parent.parent / 'tests' / 'fixtures' / 'sd'
PROMPTS = ['a cat and a dog', 'a red ball on a blue bench']
TOKEN_INDICES = [[2, 5], [3, 7]]  # cat, dog; ball, bench (position 0 is the start token)
NUM_STEPS = 10
GUIDANCE_SCALE = 7.5
# A&E on this random model: refinement at steps 0 and 2 (thresholds that the first read misses),
# gradient steps in the first 4 of 10.
AE_MAX_ITER = 4
AE_THRESHOLDS = {0: 0.5, 2: 0.6}
AE_SCALE_FACTOR = 20

SCHEDULER_VARIANTS = {  # name -> (class, overrides of the folder's config)
    'tiny_sd1': {
        'folder': (None, {}),
        'pndm_v_trailing': (PNDMScheduler, dict(prediction_type='v_prediction',
                                                timestep_spacing='trailing')),
        'pndm_linear_linspace_alpha1': (PNDMScheduler, dict(
            beta_schedule='linear', beta_start=1e-4, beta_end=0.02, timestep_spacing='linspace',
            set_alpha_to_one=True, steps_offset=0)),
        'ddim_eps_clip': (DDIMScheduler, dict(clip_sample=True, clip_sample_range=1.0,
                                              set_alpha_to_one=True)),
        'ddim_sample_cosine_linspace': (DDIMScheduler, dict(
            prediction_type='sample', beta_schedule='squaredcos_cap_v2',
            timestep_spacing='linspace', clip_sample=False)),
    },
    'tiny_sd2': {
        'folder': (None, {}),
        'ddim_v_trailing_clip': (DDIMScheduler, dict(timestep_spacing='trailing',
                                                     clip_sample=True, clip_sample_range=0.5)),
        'pndm_v_leading': (PNDMScheduler, dict(skip_prk_steps=True)),
    },
}
SCHEDULER_STEPS = {'folder': 6}  # other settings use 5 steps


def scheduler_references(name: str) -> None:
  folder = ROOT / name
  base_config = json.loads((folder / 'scheduler' / 'scheduler_config.json').read_text())
  base_class = {'PNDMScheduler': PNDMScheduler, 'DDIMScheduler': DDIMScheduler}[
      base_config['_class_name']]
  gen = torch.Generator().manual_seed(7)
  ref, names, configs = {}, [], []
  for key, (cls, overrides) in SCHEDULER_VARIANTS[name].items():
    cls = cls or base_class
    config = {k: v for k, v in base_config.items() if not k.startswith('_')}
    config.update(overrides)
    scheduler = cls.from_config(config)
    full = dict(scheduler.config)
    full['_class_name'] = cls.__name__
    full = {k: v for k, v in full.items() if not k.startswith('_') or k == '_class_name'}
    scheduler.set_timesteps(SCHEDULER_STEPS.get(key, 5))
    z = torch.randn((1, 4, 8, 8), generator=gen)
    samples, outputs = [z], []
    for t in scheduler.timesteps:
      out = torch.randn((1, 4, 8, 8), generator=gen)
      z = scheduler.step(out, t, z).prev_sample
      samples.append(z)
      outputs.append(out)
    ref[f'{key}/timesteps'] = scheduler.timesteps.numpy()
    ref[f'{key}/alphas_cumprod'] = scheduler.alphas_cumprod.numpy()
    ref[f'{key}/samples'] = torch.stack(samples).numpy()
    ref[f'{key}/outputs'] = torch.stack(outputs).numpy()
    ref[f'{key}/num_inference_steps'] = np.int64(SCHEDULER_STEPS.get(key, 5))
    names.append(key)
    configs.append(json.dumps(full, default=list))
  ref['setting_names'] = np.array(names)
  ref['setting_configs'] = np.array(configs)
  np.savez_compressed(folder / 'scheduler_reference.npz', **ref)
  print(f'{folder}/scheduler_reference.npz: {names}')


def _record_ae_losses(pipe) -> dict:
  """Wraps the pipeline's loss and refinement so every computed A&E loss is recorded."""
  log = {'step': [], 'sample': [], 'value': [], 'refining': []}
  state = {'step': 0, 'sample': -1, 'refining': False}
  compute, refine, step = pipe._compute_loss, pipe._perform_iterative_refinement_step, None

  def compute_loss(max_attention_per_index):
    loss = compute(max_attention_per_index)
    if not state['refining']:
      state['sample'] += 1  # a sample's first loss of a step is read outside refinement
    log['step'].append(state['step'])
    log['sample'].append(state['sample'])
    log['value'].append(float(loss))
    log['refining'].append(state['refining'])
    return loss

  def refine_step(*args, **kwargs):
    state['refining'] = True
    try:
      return refine(*args, **kwargs)
    finally:
      state['refining'] = False

  step = pipe.scheduler.step

  def scheduler_step(*args, **kwargs):
    state['step'] += 1
    state['sample'] = -1
    return step(*args, **kwargs)

  pipe._compute_loss = compute_loss
  pipe._perform_iterative_refinement_step = refine_step
  pipe.scheduler.step = scheduler_step
  return log


def pipeline_reference() -> None:
  folder = ROOT / 'tiny_sd1'
  pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                 requires_safety_checker=False,
                                                 torch_dtype=torch.float32)
  pipe.set_progress_bar_config(disable=True)
  pndm = pipe.scheduler
  ddim = DDIMScheduler.from_config(pndm.config, clip_sample=False)
  ddim_config = {k: v for k, v in dict(ddim.config).items() if not k.startswith('_')}
  ddim_config['_class_name'] = 'DDIMScheduler'
  latents = np.random.default_rng(0).standard_normal((2, 4, 32, 32)).astype(np.float32)
  common = dict(prompt=PROMPTS, num_inference_steps=NUM_STEPS, guidance_scale=GUIDANCE_SCALE,
                output_type='latent', height=64, width=64)
  ref = dict(prompts=np.array(PROMPTS), token_indices=np.array(TOKEN_INDICES),
             latents=latents, num_steps=np.int64(NUM_STEPS),
             guidance_scale=np.float64(GUIDANCE_SCALE), ddim_config=np.array(json.dumps(ddim_config)))
  for key, scheduler in (('ddim', ddim), ('pndm', pndm)):
    pipe.scheduler = scheduler
    out = pipe(latents=torch.tensor(latents), **common).images
    ref[f'{key}_unguided'] = out.numpy()

  parts = ('vae', 'text_encoder', 'tokenizer', 'unet', 'safety_checker', 'feature_extractor')
  ae = StableDiffusionAttendAndExcitePipeline(**{k: pipe.components[k] for k in parts},
                                              scheduler=ddim, requires_safety_checker=False)
  ae.set_progress_bar_config(disable=True)
  log = _record_ae_losses(ae)
  out = ae(latents=torch.tensor(latents), token_indices=TOKEN_INDICES,
           max_iter_to_alter=AE_MAX_ITER, thresholds=dict(AE_THRESHOLDS),
           scale_factor=AE_SCALE_FACTOR, attn_res=(16, 16), **common).images
  ref.update(ae_latents=out.numpy(), ae_max_iter_to_alter=np.int64(AE_MAX_ITER),
             ae_thresholds=np.array(sorted(AE_THRESHOLDS.items()), np.float64),
             ae_scale_factor=np.float64(AE_SCALE_FACTOR),
             ae_loss_step=np.array(log['step']), ae_loss_sample=np.array(log['sample']),
             ae_loss_value=np.array(log['value']), ae_loss_refining=np.array(log['refining']))
  probs = np.load(folder / 'reference.npz')['unet_probs16'].mean(0)  # [2, 256, 77]
  ref['maps_probs'] = probs.reshape(2, 16, 16, 77).astype(np.float32)
  ref['maps_indices'] = np.array([[2, 5], [1, 3]])
  ref['maps_max'] = np.array([[float(m) for m in ae._compute_max_attention_per_index(
      torch.tensor(ref['maps_probs'][b]), list(ref['maps_indices'][b]))] for b in range(2)])
  np.savez_compressed(folder / 'pipeline_reference.npz', **ref)
  refining = np.array(log['refining'])
  steps = np.array(log['step'])
  print(f'{folder}/pipeline_reference.npz: {len(refining)} A&E losses, '
        f'{int(refining.sum())} inside refinement at steps {sorted(set(steps[refining]))}; '
        f'|ae - ddim unguided| max {np.abs(ref["ae_latents"] - ref["ddim_unguided"]).max():.3g}')
  for s in sorted(set(steps)):
    print(f'  step {s}: ' + ', '.join(
        f'{v:.4f}{"*" if r else ""}' for st, v, r in zip(steps, log['value'], refining) if st == s))


if __name__ == '__main__':
  torch.manual_seed(0)
  for name in ('tiny_sd1', 'tiny_sd2'):
    scheduler_references(name)
  pipeline_reference()
