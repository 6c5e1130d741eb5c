"""Sampling schedulers as pure, scan-friendly objects: DDIM and PLMS (PNDM without Runge-Kutta).

* DDIM, η = 0 (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12):
  z_{t'} = sqrt(ᾱ_{t'}) x̂0 + sqrt(1 − ᾱ_{t'}) ε̂, mirroring diffusers'
  `DDIMScheduler.step` (x̂0 and ε̂ from an ε-, v- or x0-prediction; x̂0 clipped
  when `clip_sample`; ε̂ is not recomputed from the clipped x̂0, diffusers'
  default `use_clipped_model_output=False`; t' = t − T // N for every
  `timestep_spacing`, as diffusers does; t' < 0 takes the final ᾱ, 1 with
  `set_alpha_to_one` else ᾱ_0).
* PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
  Manifolds", eq. 9 for the transfer and eq. 12 for the linear multistep),
  mirroring diffusers' `PNDMScheduler` with `skip_prk_steps=True`
  (`step_plms`): N + 1 model calls for N steps, because the first step is
  taken twice: step 0 is an Euler step from z_T with ε_0, step 1 re-evaluates
  the model at that estimate (the timestep repeats) and restarts from z_T with
  (ε_0 + ε_1) / 2; then Adams-Bashforth with 2, 3 and 4 outputs,
  (3e_1 − e_2)/2, (23e_1 − 16e_2 + 5e_3)/12, (55e_1 − 59e_2 + 37e_3 − 9e_4)/24.

Every scheduler has host `timesteps` [num_steps] (one model call each; the
sampler's loop length), `init_noise_sigma`, `init_state(z)` and
`step(state, z, model_output, i) -> (z, state)`, jit-safe with a traced step
index `i`: the per-step constants are host arrays indexed by `i`, so one
`lax.scan` body serves every step. `scheduler_from_config` reads diffusers'
`scheduler_config.json` fields; `lossland_ddim` wraps lossland's own
`diffusion.ddim_step` over a `diffusion.Schedule` (the toy models' sampler).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from lossland.guidance import diffusion

PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')
BETA_SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')
SPACINGS = ('leading', 'trailing', 'linspace')
# Config fields that only describe the file, or that the supported settings ignore.
_INFORMATIONAL = {'_class_name', '_diffusers_version', 'dynamic_thresholding_ratio',
                  'sample_max_value'}
_COMMON = {'num_train_timesteps', 'beta_start', 'beta_end', 'beta_schedule', 'trained_betas',
           'set_alpha_to_one', 'steps_offset', 'timestep_spacing', 'prediction_type'}
_DDIM_FIELDS = _COMMON | {'clip_sample', 'clip_sample_range', 'thresholding',
                          'rescale_betas_zero_snr'}
_PNDM_FIELDS = _COMMON | {'skip_prk_steps'}
SUPPORTED_CLASSES = ('DDIMScheduler', 'PNDMScheduler')


class Scheduler(Protocol):
  """What a sampler needs of a scheduler (see the module docstring)."""
  timesteps: np.ndarray
  init_noise_sigma: float

  def init_state(self, z: jax.Array) -> Any: ...

  def step(self, state, z: jax.Array, model_output: jax.Array, i) -> tuple[jax.Array, Any]: ...


def _alpha_bar_cosine(t: float) -> float:
  return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
  return dict(_DEFAULTS.get(config.get('_class_name'), _DEFAULTS['DDIMScheduler']), **config)


def betas(config: Mapping[str, Any]) -> np.ndarray:
  """β_t in float32 as diffusers builds them (float32 linspace; squaredcos_cap_v2 of Nichol &
  Dhariwal 2021, eq. 17, capped at 0.999); missing fields take the class's defaults."""
  config = _with_defaults(config)
  n = int(config['num_train_timesteps'])
  if config.get('trained_betas') is not None:
    return np.asarray(config['trained_betas'], np.float32)
  kind = config['beta_schedule']
  if kind == 'linear':
    return np.linspace(config['beta_start'], config['beta_end'], n, dtype=np.float32)
  if kind == 'scaled_linear':
    return np.linspace(config['beta_start'] ** 0.5, config['beta_end'] ** 0.5, n,
                       dtype=np.float32) ** 2
  return np.asarray([min(1 - _alpha_bar_cosine((i + 1) / n) / _alpha_bar_cosine(i / n), 0.999)
                     for i in range(n)], np.float32)


def alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
  """ᾱ_t = Π_{s<=t} (1 − β_s), a float32 running product like torch.cumprod's."""
  return np.cumprod(np.float32(1.0) - betas(config), dtype=np.float32)


def spaced_timesteps(config: Mapping[str, Any], num_inference_steps: int) -> np.ndarray:
  """The N timesteps of `timestep_spacing`, descending (diffusers' `set_timesteps`)."""
  n, spacing = int(config['num_train_timesteps']), config['timestep_spacing']
  if spacing == 'linspace':
    ts = np.linspace(0, n - 1, num_inference_steps).round()
  elif spacing == 'leading':
    ts = np.arange(num_inference_steps) * (n // num_inference_steps) + config['steps_offset']
  else:  # trailing
    ts = np.round(np.arange(n, 0, -n / num_inference_steps))[::-1] - 1
  return np.sort(ts.astype(np.int64))[::-1].copy()


def _final_alpha(config, acp) -> np.float32:
  return np.float32(1.0) if config['set_alpha_to_one'] else acp[0]


def _alpha_at(acp, final, t) -> np.float32:
  return acp[t] if t >= 0 else final


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMScheduler:
  """Deterministic DDIM (η = 0) as diffusers' `DDIMScheduler.step` (module docstring).

  Attributes:
    timesteps: [N] int host array, descending.
    alpha_t, alpha_prev: [N] float32 ᾱ at t_i and at t_i − T // N.
    prediction_type: 'epsilon', 'v_prediction' or 'sample'.
    clip_range: clip x̂0 to [−r, r]; None: no clipping.
  """
  timesteps: np.ndarray
  alpha_t: np.ndarray
  alpha_prev: np.ndarray
  prediction_type: str = 'epsilon'
  clip_range: float | None = None
  init_noise_sigma: float = 1.0

  def init_state(self, z: jax.Array) -> tuple:
    del z
    return ()

  def step(self, state, z, model_output, i):
    """(z_{t'}, state) from z_t and the model output at step i; jit-safe, i may be traced."""
    a_t = jnp.asarray(self.alpha_t)[i]
    a_prev = jnp.asarray(self.alpha_prev)[i]
    b_t = 1 - a_t
    if self.prediction_type == 'epsilon':
      x0 = (z - b_t ** 0.5 * model_output) / a_t ** 0.5
      eps = model_output
    elif self.prediction_type == 'sample':
      x0 = model_output
      eps = (z - a_t ** 0.5 * x0) / b_t ** 0.5
    else:  # v_prediction (Salimans & Ho 2022, sec. 4)
      x0 = a_t ** 0.5 * z - b_t ** 0.5 * model_output
      eps = a_t ** 0.5 * model_output + b_t ** 0.5 * z
    if self.clip_range is not None:
      x0 = jnp.clip(x0, -self.clip_range, self.clip_range)
    return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps, state


@dataclasses.dataclass(frozen=True, eq=False)
class PLMSScheduler:
  """PLMS, diffusers' `PNDMScheduler(skip_prk_steps=True)` (module docstring).

  Per model call i (host arrays, [N + 1]): the transfer of eq. 9 from ᾱ at
  `alpha_t` to ᾱ at `alpha_prev`; `weights[i]` the multistep coefficients of
  (this output, the last three stored outputs, newest first) with `divisor[i]`;
  `restart[i]`: start from the stored z_T instead of z (call 1); `store[i]`:
  push this output into the history (every call but 1).
  """
  timesteps: np.ndarray
  alpha_t: np.ndarray
  alpha_prev: np.ndarray
  weights: np.ndarray  # [N + 1, 4]
  divisor: np.ndarray  # [N + 1]
  restart: np.ndarray  # [N + 1] bool
  store: np.ndarray  # [N + 1] bool
  prediction_type: str = 'epsilon'
  init_noise_sigma: float = 1.0

  def init_state(self, z: jax.Array) -> dict[str, jax.Array]:
    """The history of the last 3 stored outputs (newest first) and z at call 0."""
    return {'ets': jnp.zeros((3,) + z.shape, z.dtype), 'first_sample': jnp.zeros_like(z)}

  def step(self, state, z, model_output, i):
    """(z_{t'}, state) after model call i; jit-safe, i may be traced."""
    ets, first = state['ets'], state['first_sample']
    first = jnp.where(i == 0, z, first)
    w = jnp.asarray(self.weights)[i]
    combined = w[0] * model_output
    for k in range(3):
      combined = combined + w[k + 1] * ets[k]
    combined = combined / jnp.asarray(self.divisor)[i]
    sample = jnp.where(jnp.asarray(self.restart)[i], first, z)
    ets = jnp.where(jnp.asarray(self.store)[i], jnp.concatenate([model_output[None], ets[:2]]),
                    ets)
    a_t = jnp.asarray(self.alpha_t)[i]
    a_prev = jnp.asarray(self.alpha_prev)[i]
    b_t, b_prev = 1 - a_t, 1 - a_prev
    if self.prediction_type == 'v_prediction':
      combined = a_t ** 0.5 * combined + b_t ** 0.5 * sample
    sample_coeff = (a_prev / a_t) ** 0.5
    denom = a_t * b_prev ** 0.5 + (a_t * b_t * a_prev) ** 0.5
    z = sample_coeff * sample - (a_prev - a_t) * combined / denom
    return z, {'ets': ets, 'first_sample': first}


def _plms(config, num_inference_steps: int) -> PLMSScheduler:
  n_train = int(config['num_train_timesteps'])
  spaced = spaced_timesteps(config, num_inference_steps)[::-1]  # ascending
  timesteps = np.concatenate([spaced[:-1], spaced[-2:-1], spaced[-1:]])[::-1].copy()
  acp = alphas_cumprod(config)
  final = _final_alpha(config, acp)
  delta = n_train // num_inference_steps
  count = len(timesteps)
  alpha_t, alpha_prev = np.zeros(count, np.float32), np.zeros(count, np.float32)
  weights, divisor = np.zeros((count, 4), np.float32), np.ones(count, np.float32)
  restart, store = np.zeros(count, bool), np.ones(count, bool)
  stored = 0
  for i, t in enumerate(timesteps.tolist()):
    t_from, t_to = t, t - delta
    if i == 1:  # the repeated timestep: redo step 0 from z_T with the mean of two outputs
      t_from, t_to = t + delta, t
      weights[i], divisor[i], restart[i], store[i] = (1, 1, 0, 0), 2, True, False
    else:
      stored += 1
      weights[i], divisor[i] = {1: ((1, 0, 0, 0), 1), 2: ((3, -1, 0, 0), 2),
                                3: ((23, -16, 5, 0), 12)}.get(stored, ((55, -59, 37, -9), 24))
    alpha_t[i], alpha_prev[i] = acp[t_from], _alpha_at(acp, final, t_to)
  return PLMSScheduler(timesteps.astype(np.int64), alpha_t, alpha_prev, weights, divisor,
                       restart, store, config['prediction_type'])


def _ddim(config, num_inference_steps: int) -> DDIMScheduler:
  timesteps = spaced_timesteps(config, num_inference_steps)
  acp = alphas_cumprod(config)
  final = _final_alpha(config, acp)
  delta = int(config['num_train_timesteps']) // num_inference_steps
  alpha_t = acp[timesteps]
  alpha_prev = np.asarray([_alpha_at(acp, final, t - delta) for t in timesteps.tolist()],
                          np.float32)
  clip = float(config.get('clip_sample_range', 1.0)) if config.get('clip_sample', True) else None
  return DDIMScheduler(timesteps, alpha_t, alpha_prev, config['prediction_type'], clip)


_DEFAULTS = {  # diffusers' constructor defaults, per class
    'DDIMScheduler': dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                          beta_schedule='linear', trained_betas=None, clip_sample=True,
                          set_alpha_to_one=True, steps_offset=0, prediction_type='epsilon',
                          thresholding=False, clip_sample_range=1.0, timestep_spacing='leading',
                          rescale_betas_zero_snr=False),
    'PNDMScheduler': dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                          beta_schedule='linear', trained_betas=None, skip_prk_steps=False,
                          set_alpha_to_one=False, prediction_type='epsilon',
                          timestep_spacing='leading', steps_offset=0)}


def check_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """The config with diffusers' class defaults filled in; one ValueError naming every unsupported
  class, field or value (e.g. `thresholding: true`, PNDM without `skip_prk_steps`, an unknown
  `beta_schedule`), with what is supported."""
  name = config.get('_class_name')
  if name not in SUPPORTED_CLASSES:
    raise ValueError(f'scheduler class {name!r} is not supported; supported: '
                     f'{list(SUPPORTED_CLASSES)} (set "_class_name" in scheduler_config.json)')
  own = _DDIM_FIELDS if name == 'DDIMScheduler' else _PNDM_FIELDS
  # Fields of the other class are ignored, as diffusers' from_config ignores them (SD 1.x's
  # PNDM configs carry DDIM's clip_sample); fields of no supported class are an error.
  cfg = dict(_DEFAULTS[name], **{k: v for k, v in config.items()
                                 if k in own or k not in _DDIM_FIELDS | _PNDM_FIELDS})
  known = own | _INFORMATIONAL
  problems = [f'unknown field {k!r}' for k in sorted(set(cfg) - known)]
  checks = [('beta_schedule', BETA_SCHEDULES), ('timestep_spacing', SPACINGS),
            ('prediction_type', PREDICTION_TYPES if name == 'DDIMScheduler'
             else ('epsilon', 'v_prediction'))]
  for key, allowed in checks:
    if cfg[key] not in allowed:
      problems.append(f'{key}={cfg[key]!r} (supported: {list(allowed)})')
  if name == 'DDIMScheduler':
    for key in ('thresholding', 'rescale_betas_zero_snr'):
      if cfg[key]:
        problems.append(f'{key}=true (supported: false)')
  elif not cfg['skip_prk_steps']:
    problems.append('skip_prk_steps=false (only PLMS is supported: skip_prk_steps=true)')
  if problems:
    raise ValueError(f'unsupported {name} settings: {"; ".join(problems)}. Supported fields: '
                     f'{sorted(known - _INFORMATIONAL)}')
  return cfg


def scheduler_from_config(config: Mapping[str, Any], num_inference_steps: int) -> Scheduler:
  """A `DDIMScheduler` or `PLMSScheduler` from a diffusers scheduler config dict.

  Missing fields take diffusers' defaults for the class; unsupported settings
  raise one ValueError (`check_config`), as does a step count outside
  [1, num_train_timesteps] (PLMS: at least 2).
  """
  cfg = check_config(config)
  low = 2 if cfg['_class_name'] == 'PNDMScheduler' else 1
  if not low <= num_inference_steps <= int(cfg['num_train_timesteps']):
    raise ValueError(f'num_inference_steps={num_inference_steps} is not supported by '
                     f'{cfg["_class_name"]}: use {low} to num_train_timesteps='
                     f'{cfg["num_train_timesteps"]}')
  return _ddim(cfg, num_inference_steps) if cfg['_class_name'] == 'DDIMScheduler' else _plms(
      cfg, num_inference_steps)


def load_scheduler(folder: str | os.PathLike, num_inference_steps: int) -> Scheduler:
  """`scheduler_from_config` of `folder/scheduler_config.json` (a diffusers `scheduler/`)."""
  path = os.path.join(folder, 'scheduler_config.json')
  if not os.path.isfile(path):
    raise ValueError(f'no scheduler_config.json in {str(folder)!r}; it has '
                     f'{sorted(os.listdir(folder)) if os.path.isdir(folder) else "nothing"}')
  with open(path) as f:
    return scheduler_from_config(json.load(f), num_inference_steps)


@dataclasses.dataclass(frozen=True, eq=False)
class ScheduleDDIM:
  """lossland's DDIM over a `diffusion.Schedule` (`diffusion.ddim_step`, x̂0 clipped and ε
  recomputed), with `diffusion.ddim_timesteps`; what the toy-model sampler has always run."""
  schedule: diffusion.Schedule
  timesteps: np.ndarray
  previous: np.ndarray
  clip: bool = True
  init_noise_sigma: float = 1.0

  def init_state(self, z: jax.Array) -> tuple:
    del z
    return ()

  def step(self, state, z, model_output, i):
    t = jnp.asarray(self.timesteps)[i]
    t_prev = jnp.asarray(self.previous)[i]
    return diffusion.ddim_step(self.schedule, z, model_output, t, t_prev, clip=self.clip), state


def lossland_ddim(schedule: diffusion.Schedule, num_steps: int, *,
                  clip: bool = True) -> ScheduleDDIM:
  """lossland's own DDIM (η = 0, Song et al. eq. 12) with `num_steps` steps over `schedule`."""
  ts, prevs = diffusion.ddim_timesteps(schedule, num_steps)
  return ScheduleDDIM(schedule, ts, prevs, clip)
