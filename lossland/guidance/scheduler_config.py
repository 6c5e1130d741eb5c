"""diffusers `scheduler_config.json` files, read as diffusers reads them, for lossland's schedulers.

* `check_config(config)`: the config of one of `SUPPORTED_CLASSES` with the
  class's diffusers defaults filled in. Like diffusers' `ConfigMixin.from_config`
  (`extract_init_dict`), fields of the other SD-compatible scheduler classes are
  dropped silently (SD 1.x's PNDM configs carry DDIM's `clip_sample`), and any
  other unknown field is dropped too (diffusers logs a warning; `ignored_fields`
  names them). A value lossland does not implement (e.g. `thresholding: true`,
  DPM-Solver's `algorithm_type: sde-dpmsolver++`) is one ValueError naming all.
* `folder_config(config)`: what a Stable Diffusion folder's scheduler becomes
  in lossland, with notes saying what was changed and why:
  1. the fix-ups of diffusers' `StableDiffusionPipeline.__init__`, which
     rewrites an outdated scheduler config with a deprecation warning:
     `steps_offset` other than 1 becomes 1, `clip_sample: true` becomes false
     (a field the file lacks counts as the class's default, e.g. DDIM's
     steps_offset 0 and clip_sample true);
  2. a class or setting lossland does not implement (Euler ancestral, LMS,
     Heun, UniPC, SDE variants of DPM-Solver, ...) is not refused: the folder
     samples with DDIM (η = 0) over the config's training schedule
     (`num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`,
     `trained_betas`, `prediction_type`, `timestep_spacing`, each the class's
     diffusers default when missing) with SD's own DDIM settings
     (`steps_offset` 1, `clip_sample` false, `set_alpha_to_one` false, as
     stabilityai/stable-diffusion-2-1 ships them). Only a training schedule
     lossland cannot represent (an unknown `beta_schedule` or `prediction_type`,
     `rescale_betas_zero_snr`) is an error: no scheduler would sample that
     model correctly.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')
BETA_SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')
SPACINGS = ('leading', 'trailing', 'linspace')
SUPPORTED_CLASSES = ('DDIMScheduler', 'PNDMScheduler', 'EulerDiscreteScheduler',
                     'DPMSolverMultistepScheduler')
TRAINING_FIELDS = ('num_train_timesteps', 'beta_start', 'beta_end', 'beta_schedule',
                   'trained_betas', 'prediction_type', 'timestep_spacing')

_TRAINING = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear',
                 trained_betas=None, prediction_type='epsilon')
_SIGMA_KINDS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
DEFAULTS = {  # diffusers' constructor defaults (0.42.1), per implemented class
    'DDIMScheduler': dict(
        _TRAINING, clip_sample=True, set_alpha_to_one=True, steps_offset=0, thresholding=False,
        dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
        timestep_spacing='leading', rescale_betas_zero_snr=False),
    'PNDMScheduler': dict(_TRAINING, skip_prk_steps=False, set_alpha_to_one=False,
                          timestep_spacing='leading', steps_offset=0),
    'EulerDiscreteScheduler': dict(
        _TRAINING, **_SIGMA_KINDS, interpolation_type='linear', sigma_min=None, sigma_max=None,
        timestep_spacing='linspace', timestep_type='discrete', steps_offset=0,
        rescale_betas_zero_snr=False, final_sigmas_type='zero'),
    'DPMSolverMultistepScheduler': dict(
        _TRAINING, **_SIGMA_KINDS, solver_order=2, thresholding=False,
        dynamic_thresholding_ratio=0.995, sample_max_value=1.0, algorithm_type='dpmsolver++',
        solver_type='midpoint', lower_order_final=True, euler_at_final=False,
        use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type='zero',
        lambda_min_clipped=-math.inf, variance_type=None, timestep_spacing='linspace',
        steps_offset=0, rescale_betas_zero_snr=False, use_dynamic_shifting=False,
        time_shift_type='exponential'),
}
_LINSPACE = dict(_TRAINING, timestep_spacing='linspace', steps_offset=0)
_K_DEFAULTS = dict(_LINSPACE, beta_start=0.00085, beta_end=0.012)
OTHER_DEFAULTS = {  # the training-schedule defaults of diffusers' other SD schedulers
    'DDPMScheduler': dict(_TRAINING, timestep_spacing='leading', steps_offset=0, clip_sample=True),
    'LMSDiscreteScheduler': _LINSPACE, 'EulerAncestralDiscreteScheduler': _LINSPACE,
    'DPMSolverSinglestepScheduler': _LINSPACE, 'DEISMultistepScheduler': _LINSPACE,
    'UniPCMultistepScheduler': _LINSPACE, 'HeunDiscreteScheduler': dict(_K_DEFAULTS,
                                                                         clip_sample=False),
    'KDPM2DiscreteScheduler': _K_DEFAULTS, 'KDPM2AncestralDiscreteScheduler': _K_DEFAULTS,
}
# Fields of diffusers' SD-compatible scheduler classes (`KarrasDiffusionSchedulers`):
# `from_config` drops those of other classes without a word.
_COMPATIBLE_FIELDS = {k for d in DEFAULTS.values() for k in d} | {
    'clip_sample', 'clip_sample_range', 'disable_corrector', 'predict_x0', 'rho',
    'shift_terminal', 'sigma_data', 'sigma_schedule', 'solver_p', 'noise_sampler_seed'}

_NO = (False,)
_IMPLEMENTED = {  # field -> the values lossland implements (first: diffusers' default)
    'DDIMScheduler': dict(prediction_type=PREDICTION_TYPES, thresholding=_NO,
                          rescale_betas_zero_snr=_NO),
    'PNDMScheduler': dict(prediction_type=('epsilon', 'v_prediction'),
                          skip_prk_steps=(True,)),
    'EulerDiscreteScheduler': dict(
        prediction_type=PREDICTION_TYPES, interpolation_type=('linear',),
        use_exponential_sigmas=_NO, use_beta_sigmas=_NO, timestep_type=('discrete',),
        rescale_betas_zero_snr=_NO, final_sigmas_type=('zero', 'sigma_min')),
    'DPMSolverMultistepScheduler': dict(
        prediction_type=PREDICTION_TYPES, algorithm_type=('dpmsolver++',), solver_order=(2, 1),
        solver_type=('midpoint', 'heun'), thresholding=_NO, use_exponential_sigmas=_NO,
        use_beta_sigmas=_NO, use_lu_lambdas=_NO, use_flow_sigmas=_NO,
        final_sigmas_type=('zero', 'sigma_min'), variance_type=(None,),
        rescale_betas_zero_snr=_NO, use_dynamic_shifting=_NO),
}
_SHARED_CHECKS = (('beta_schedule', BETA_SCHEDULES), ('timestep_spacing', SPACINGS))


def ignored_fields(config: Mapping[str, Any]) -> list[str]:
  """Fields of `config` that no SD-compatible diffusers scheduler has (diffusers warns and
  ignores them); private fields (`_class_name`, `_diffusers_version`) are not listed."""
  return sorted(k for k in config if not k.startswith('_') and k not in _COMPATIBLE_FIELDS)


def _show(value: Any) -> str:
  """A config value as scheduler_config.json spells it (true, null, 'text')."""
  return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def _show_all(values: tuple) -> str:
  return _show(values[0]) if len(values) == 1 else f'[{", ".join(map(_show, values))}]'


def _problems(cfg: Mapping[str, Any]) -> list[str]:
  name = cfg['_class_name']
  checks = list(_SHARED_CHECKS) + list(_IMPLEMENTED[name].items())
  out = []
  for key, allowed in checks:
    if cfg[key] not in allowed or (isinstance(cfg[key], bool) != isinstance(allowed[0], bool)):
      hint = ('only PLMS is supported: skip_prk_steps=true' if key == 'skip_prk_steps'
              else f'supported: {_show_all(allowed)}')
      out.append(f'{key}={_show(cfg[key])} ({hint})')
  return out


def check_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """The config of a `SUPPORTED_CLASSES` scheduler with diffusers' class defaults filled in and
  other classes' and unknown fields dropped (module docstring); one ValueError naming the class
  when it is not supported, or every value lossland does not implement."""
  name = config.get('_class_name')
  if name not in SUPPORTED_CLASSES:
    raise ValueError(f'scheduler class {name!r} is not supported; supported: '
                     f'{list(SUPPORTED_CLASSES)} (set "_class_name" in scheduler_config.json; '
                     'load_stable_diffusion samples other classes of a folder with DDIM)')
  own = DEFAULTS[name]
  cfg = dict(own, **{k: v for k, v in config.items() if k in own})
  cfg['_class_name'] = name
  if name == 'DPMSolverMultistepScheduler':  # diffusers' __init__ maps DEIS/UniPC names
    if cfg['algorithm_type'] == 'deis':
      cfg['algorithm_type'] = 'dpmsolver++'
    if cfg['solver_type'] in ('logrho', 'bh1', 'bh2'):
      cfg['solver_type'] = 'midpoint'
  problems = _problems(cfg)
  if problems:
    raise ValueError(f'unsupported {name} settings: {"; ".join(problems)}. The fields lossland '
                     f'reads for {name}: {sorted(own)}')
  return cfg


def _pipeline_fixups(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """`StableDiffusionPipeline.__init__`'s rewrites of an outdated scheduler config.

  diffusers' scheduler config holds the class's fields and every other field
  of the file (`from_config` keeps them hidden), so the file's value counts,
  else the class's default; a class without the field is left alone.
  """
  name = config.get('_class_name')
  defaults = DEFAULTS.get(name) or OTHER_DEFAULTS.get(name) or {}
  notes = []
  offset = config.get('steps_offset', defaults.get('steps_offset', 1))
  if offset != 1:
    notes.append(f'steps_offset={_show(offset)} is outdated: it is set to 1, as diffusers\' '
                 'StableDiffusionPipeline does (with a deprecation warning)')
    config = dict(config, steps_offset=1)
  if config.get('clip_sample', defaults.get('clip_sample', False)) is True:
    notes.append('clip_sample=true is outdated: it is set to false, as diffusers\' '
                 'StableDiffusionPipeline does (with a deprecation warning)')
    config = dict(config, clip_sample=False)
  return config, notes


def ddim_fallback(config: Mapping[str, Any]) -> dict[str, Any]:
  """The DDIM config of `folder_config`'s fallback: the training schedule of `config` (its
  class's diffusers defaults where missing) with SD's DDIM settings (module docstring)."""
  name = config.get('_class_name')
  defaults = DEFAULTS.get(name) or OTHER_DEFAULTS.get(name) or DEFAULTS['DDIMScheduler']
  if config.get('rescale_betas_zero_snr'):
    raise ValueError(f'the {name} config has rescale_betas_zero_snr=true, a training schedule '
                     'lossland does not implement (Lin et al. 2024 zero terminal SNR)')
  shared = {k: config.get(k, defaults.get(k, DEFAULTS['DDIMScheduler'][k]))
            for k in TRAINING_FIELDS}
  if shared['timestep_spacing'] not in SPACINGS:
    shared['timestep_spacing'] = 'leading'
  cfg = dict(DEFAULTS['DDIMScheduler'], **shared, steps_offset=1, clip_sample=False,
             set_alpha_to_one=False, _class_name='DDIMScheduler')
  bad = [f'{k}={_show(cfg[k])} (supported: {_show_all(v)})' for k, v in
         (('beta_schedule', BETA_SCHEDULES), ('prediction_type', PREDICTION_TYPES))
         if cfg[k] not in v and not (k == 'beta_schedule' and cfg['trained_betas'] is not None)]
  if bad:
    raise ValueError(f'the {name} config\'s training schedule has {"; ".join(bad)}, which '
                     'lossland does not implement, so no lossland scheduler samples this model')
  return cfg


def folder_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """(the scheduler config lossland samples a Stable Diffusion folder with, notes on what was
  changed): the pipeline's fix-ups, dropped fields, or the DDIM fallback (module docstring)."""
  config, notes = _pipeline_fixups(dict(config))
  name = config.get('_class_name')
  unknown = ignored_fields(config)
  if unknown:
    notes.append(f'fields {unknown} belong to no diffusers scheduler and are ignored, as '
                 'diffusers ignores them')
  if name in SUPPORTED_CLASSES:
    try:
      return check_config(config), notes
    except ValueError as e:
      reason = str(e)
  else:
    reason = f'lossland does not implement {name}'
  cfg = ddim_fallback(config)
  schedule = ', '.join(f'{k}={cfg[k]!r}' for k in TRAINING_FIELDS
                       if k != 'trained_betas' or cfg[k] is not None)
  notes.append(f'{reason}. The folder samples with DDIM (eta = 0) over its training schedule '
               f'({schedule}) with SD\'s DDIM settings (steps_offset=1, clip_sample=false, '
               'set_alpha_to_one=false). To sample with another scheduler, pass '
               'make_sd_sampler(sd, arm, scheduler=schedulers.scheduler_from_config(config, '
               f'num_steps)) with a config of one of {list(SUPPORTED_CLASSES)}')
  return cfg, notes
