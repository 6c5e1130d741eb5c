"""Sampling schedulers as pure, scan-friendly objects: DDIM, PLMS, Euler and DPM-Solver++ (2M).

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
* Euler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
  Generative Models", Algorithm 2 with Euler steps only and no churn, as
  k-diffusion's `sample_euler`), diffusers' `EulerDiscreteScheduler`. The
  latent is carried in the variance-exploding form x = z / sqrt(ᾱ), with
  σ = sqrt((1 − ᾱ) / ᾱ): x̂0 from the model output, dx/dσ = (x − x̂0) / σ and
  x_{i+1} = x_i + (σ_{i+1} − σ_i) dx/dσ. The model sees x / sqrt(σ² + 1) = z
  (`scale_model_input`) at float timesteps (σ interpolated linearly in t, or
  Karras' ρ = 7 schedule with `use_karras_sigmas`), and x_T = σ_max · noise
  (`init_noise_sigma`; sqrt(σ_max² + 1) for 'leading' spacing).
* DPM-Solver++ (2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
  Sampling of Diffusion Probabilistic Models", Algorithm 2; its first-order
  step is DDIM's), diffusers' `DPMSolverMultistepScheduler` with
  `algorithm_type='dpmsolver++'`: with λ = log(α/σ), h = λ_{t} − λ_{s} and the
  data prediction D = x̂0, z_t = (σ_t/σ_s) z_s − α_t (e^{−h} − 1) (D_0 +
  D_1 / 2) where D_1 = (D_0 − D_{-1}) / r, r = h_{prev} / h ('midpoint';
  'heun' weighs D_1 by (e^{−h} − 1)/h + 1 instead of −(e^{−h} − 1)/2). The
  first step, and the last with `lower_order_final` (fewer than 15 steps),
  `euler_at_final` or a final σ of zero, are first order (D_1 = 0). The
  previous D is the state carried through the scan.

Every scheduler has host `timesteps` [num_steps] (one model call each; the
sampler's loop length; integers, float for Euler), `init_noise_sigma`,
`init_state(z)`, `scale_model_input(z, i)` (what the model is fed) and
`step(state, z, model_output, i) -> (z, state)`, jit-safe with a traced step
index `i`: the per-step constants are host arrays indexed by `i`, so one
`lax.scan` body serves every step. The per-step constants are computed on the
host in float32 by the same operations as diffusers' (torch float32), so a
step matches diffusers' to float32 rounding. `scheduler_from_config` reads
diffusers' `scheduler_config.json` fields (`scheduler_config`: defaults,
leniency, a Stable Diffusion folder's fix-ups and fallback); `lossland_ddim`
wraps lossland's own `diffusion.ddim_step` over a `diffusion.Schedule` (the toy
models' sampler).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from lossland.guidance import diffusion
from lossland.guidance import scheduler_config
# Re-exported: the config rules live in scheduler_config (schedulers.check_config, ...).
from lossland.guidance.scheduler_config import (  # noqa: F401
    BETA_SCHEDULES, PREDICTION_TYPES, SPACINGS, SUPPORTED_CLASSES, check_config, folder_config)


class Scheduler(Protocol):
  """What a sampler needs of a scheduler (see the module docstring)."""
  timesteps: np.ndarray
  init_noise_sigma: float

  def init_state(self, z: jax.Array) -> Any: ...

  def scale_model_input(self, z: jax.Array, i) -> jax.Array: ...

  def step(self, state, z: jax.Array, model_output: jax.Array, i) -> tuple[jax.Array, Any]: ...


class _UnscaledInput:
  """The model sees z as it is (DDIM, PLMS, DPM-Solver: diffusers' `scale_model_input` is the
  identity)."""

  def scale_model_input(self, z, i):
    del i
    return z


def _alpha_bar_cosine(t: float) -> float:
  return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
  name = config.get('_class_name')
  defaults = (scheduler_config.DEFAULTS.get(name) or scheduler_config.OTHER_DEFAULTS.get(name)
              or scheduler_config.DEFAULTS['DDIMScheduler'])
  return dict(defaults, **config)


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
class DDIMScheduler(_UnscaledInput):
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
class PLMSScheduler(_UnscaledInput):
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


def _train_sigmas(acp: np.ndarray) -> np.ndarray:
  """σ_t = sqrt((1 − ᾱ_t) / ᾱ_t), float32 as diffusers' torch expression."""
  one = np.float32(1.0)
  return (((one - acp) / acp) ** np.float32(0.5)).astype(np.float32)


def _karras(sigmas: np.ndarray, num_steps: int, sigma_min=None, sigma_max=None) -> np.ndarray:
  """Karras et al. 2022, eq. 5 (ρ = 7), σ_max down to σ_min (diffusers' `_convert_to_karras`)."""
  sigma_min = float(sigmas[-1]) if sigma_min is None else sigma_min
  sigma_max = float(sigmas[0]) if sigma_max is None else sigma_max
  rho = 7.0
  ramp = np.linspace(0, 1, num_steps)
  min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
  """The fractional timestep of σ: linear interpolation of log σ (diffusers' `_sigma_to_t`)."""
  sigma = np.asarray(sigma)
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, np.newaxis]
  low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  high_idx = low_idx + 1
  low, high = log_sigmas[low_idx], log_sigmas[high_idx]
  w = np.clip((low - log_sigma) / (low - high), 0, 1)
  return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _final_sigma(config, acp) -> np.float32:
  """σ after the last step: 0, or σ_0 with `final_sigmas_type='sigma_min'`."""
  if config['final_sigmas_type'] == 'sigma_min':
    return _train_sigmas(acp[:1])[0]
  return np.float32(0.0)


@dataclasses.dataclass(frozen=True, eq=False)
class EulerScheduler:
  """Euler in σ, diffusers' `EulerDiscreteScheduler` without churn (module docstring).

  Attributes:
    timesteps: [N] float32 model timesteps (fractional with 'linspace' spacing or Karras σ).
    sigmas: [N + 1] float32 σ_i, descending, then the final σ (0 or σ_min).
    input_scale: [N] float32 sqrt(σ_i² + 1): the model sees z / input_scale[i].
    v_out: [N] float32 −σ_i / sqrt(σ_i² + 1) (the v-prediction's x̂0 weight of the output).
    prediction_type: 'epsilon', 'v_prediction' or 'sample'.
    init_noise_sigma: z_T = init_noise_sigma · N(0, I).
  """
  timesteps: np.ndarray
  sigmas: np.ndarray
  input_scale: np.ndarray
  v_out: np.ndarray
  prediction_type: str = 'epsilon'
  init_noise_sigma: float = 1.0

  def init_state(self, z: jax.Array) -> tuple:
    del z
    return ()

  def scale_model_input(self, z, i):
    """z / sqrt(σ_i² + 1), what the model is fed at step i (diffusers' `scale_model_input`)."""
    return z / jnp.asarray(self.input_scale)[i]

  def step(self, state, z, model_output, i):
    """(z_{i+1}, state): z + (σ_{i+1} − σ_i)(z − x̂0)/σ_i; jit-safe, i may be traced."""
    sigmas = jnp.asarray(self.sigmas)
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    if self.prediction_type == 'epsilon':
      x0 = z - sigma * model_output
    elif self.prediction_type == 'sample':
      x0 = model_output
    else:  # v_prediction: x̂0 = c_out·v + c_skip·z (diffusers divides by σ² + 1)
      x0 = model_output * jnp.asarray(self.v_out)[i] + z / (sigma ** 2 + 1)
    derivative = (z - x0) / sigma
    return z + derivative * (sigma_next - sigma), state


def _euler(config, num_inference_steps: int) -> EulerScheduler:
  n, count = int(config['num_train_timesteps']), num_inference_steps
  spacing = config['timestep_spacing']
  if spacing == 'linspace':
    timesteps = np.linspace(0, n - 1, count, dtype=np.float32)[::-1].copy()
  elif spacing == 'leading':
    ratio = n // count
    timesteps = (np.arange(0, count) * ratio).round()[::-1].copy().astype(np.float32)
    timesteps += config['steps_offset']
  else:  # trailing
    timesteps = np.arange(n, 0, -n / count).round().copy().astype(np.float32) - 1
  acp = alphas_cumprod(config)
  train = _train_sigmas(acp)
  sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
  if config['use_karras_sigmas']:
    sigmas = _karras(sigmas, count, config['sigma_min'], config['sigma_max'])
    timesteps = np.array([_sigma_to_t(s, np.log(train)) for s in sigmas])
  sigmas = np.concatenate([sigmas, [_final_sigma(config, acp)]]).astype(np.float32)
  one = np.float32(1.0)
  s = sigmas[:-1]
  top = sigmas.max()
  init = top if spacing in ('linspace', 'trailing') else (top ** 2 + one) ** np.float32(0.5)
  return EulerScheduler(
      timesteps=timesteps.astype(np.float32), sigmas=sigmas,
      input_scale=((s ** 2 + one) ** np.float32(0.5)).astype(np.float32),
      v_out=(-s / (s ** 2 + one) ** np.float32(0.5)).astype(np.float32),
      prediction_type=config['prediction_type'], init_noise_sigma=float(np.float32(init)))


@dataclasses.dataclass(frozen=True, eq=False)
class DPMSolverScheduler(_UnscaledInput):
  """DPM-Solver++ (2M), diffusers' `DPMSolverMultistepScheduler` (module docstring).

  Per step i (host float32 arrays, [N]): the data prediction D_0 = x̂0 from
  α_s = `alpha[i]` and σ_s = `sigma[i]` (α_s = 1 / sqrt(σ_i² + 1), σ_s = σ_i α_s);
  z_{i+1} = `a[i]` z − `b[i]` D_0 − `e[i]` D_1 with D_1 = `c[i]` (D_0 − D_{-1}),
  `a` = σ_t/σ_s, `b` = α_t (e^{−h} − 1); `c` and `e` are 0 at first-order steps.
  """
  timesteps: np.ndarray
  alpha: np.ndarray
  sigma: np.ndarray
  a: np.ndarray
  b: np.ndarray
  c: np.ndarray
  e: np.ndarray
  prediction_type: str = 'epsilon'
  init_noise_sigma: float = 1.0

  def init_state(self, z: jax.Array) -> jax.Array:
    """D_{-1}, the previous step's data prediction (zeros before the first step)."""
    return jnp.zeros_like(z)

  def step(self, state, z, model_output, i):
    """(z_{i+1}, D_0); jit-safe, i may be traced."""
    alpha, sigma = jnp.asarray(self.alpha)[i], jnp.asarray(self.sigma)[i]
    if self.prediction_type == 'epsilon':
      x0 = (z - sigma * model_output) / alpha
    elif self.prediction_type == 'sample':
      x0 = model_output
    else:  # v_prediction
      x0 = alpha * z - sigma * model_output
    d1 = jnp.asarray(self.c)[i] * (x0 - state)
    z = jnp.asarray(self.a)[i] * z - jnp.asarray(self.b)[i] * x0 - jnp.asarray(self.e)[i] * d1
    return z, x0


def _dpm_timesteps(config, num_inference_steps: int, acp: np.ndarray) -> np.ndarray:
  """diffusers' `DPMSolverMultistepScheduler.set_timesteps` integer timesteps (N + 1 points of
  the spacing without the last), ending where λ falls below `lambda_min_clipped`."""
  n, count = int(config['num_train_timesteps']), num_inference_steps
  with np.errstate(divide='ignore'):
    lambdas = np.log(np.sqrt(acp)) - np.log(np.sqrt(np.float32(1.0) - acp))
  last = n - int(np.searchsorted(lambdas[::-1], config['lambda_min_clipped']))
  spacing = config['timestep_spacing']
  if spacing == 'linspace':
    ts = np.linspace(0, last - 1, count + 1).round()[::-1][:-1].copy().astype(np.int64)
  elif spacing == 'leading':
    ratio = last // (count + 1)
    ts = (np.arange(0, count + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
    ts += config['steps_offset']
  else:  # trailing
    ts = np.arange(last, 0, -n / count).round().copy().astype(np.int64) - 1
  return ts


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
  alpha = np.float32(1.0) / (sigma ** 2 + np.float32(1.0)) ** np.float32(0.5)
  return alpha, sigma * alpha


def _dpm(config, num_inference_steps: int) -> DPMSolverScheduler:
  acp = alphas_cumprod(config)
  timesteps = _dpm_timesteps(config, num_inference_steps, acp)
  train = _train_sigmas(acp)
  if config['use_karras_sigmas']:
    log_sigmas = np.log(train)
    sigmas = _karras(np.flip(train).copy(), num_inference_steps)
    timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
    if config['beta_schedule'] != 'squaredcos_cap_v2':
      timesteps = timesteps.round()
    timesteps = timesteps.astype(np.int64)
  else:
    sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
  sigmas = np.concatenate([sigmas, [_final_sigma(config, acp)]]).astype(np.float32)
  count = len(timesteps)
  arrays = {k: np.zeros(count, np.float32) for k in ('alpha', 'sigma', 'a', 'b', 'c', 'e')}
  with np.errstate(divide='ignore'):  # a final σ of 0: λ = +inf, e^{−h} = 0
    lam = []
    for s in sigmas:
      alpha, sigma = _alpha_sigma(s)
      lam.append(np.log(alpha) - np.log(sigma))
    one = np.float32(1.0)
    for i in range(count):
      alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])
      alpha_s, sigma_s = _alpha_sigma(sigmas[i])
      h = lam[i + 1] - lam[i]
      b = alpha_t * (np.exp(-h) - one)
      last = i == count - 1
      first = (config['solver_order'] == 1 or i == 0 or (last and (
          config['euler_at_final'] or (config['lower_order_final'] and count < 15)
          or config['final_sigmas_type'] == 'zero')))
      if first:
        c = e = np.float32(0.0)
      else:
        c = one / ((lam[i] - lam[i - 1]) / h)
        e = (np.float32(0.5) * b if config['solver_type'] == 'midpoint'
             else -(alpha_t * ((np.exp(-h) - one) / h + one)))
      values = dict(alpha=alpha_s, sigma=sigma_s, a=sigma_t / sigma_s, b=b, c=c, e=e)
      for k, v in values.items():
        arrays[k][i] = v
  return DPMSolverScheduler(timesteps=timesteps, prediction_type=config['prediction_type'],
                            **arrays)


_BUILDERS = {'DDIMScheduler': _ddim, 'PNDMScheduler': _plms,
             'EulerDiscreteScheduler': _euler, 'DPMSolverMultistepScheduler': _dpm}


def scheduler_from_config(config: Mapping[str, Any], num_inference_steps: int) -> Scheduler:
  """The lossland scheduler of a diffusers scheduler config dict (`SUPPORTED_CLASSES`).

  Missing fields take diffusers' defaults for the class; fields of other
  scheduler classes are ignored as diffusers ignores them, and fields of no
  diffusers scheduler with a warning, as diffusers warns
  (`scheduler_config.check_config`). Unsupported classes or settings raise one
  ValueError, as does a step count outside [1, num_train_timesteps] (PLMS: at
  least 2). This builds exactly the config's scheduler; a Stable Diffusion
  folder's scheduler goes through `scheduler_config.folder_config` first
  (`guidance.sd.load_stable_diffusion`).
  """
  unknown = scheduler_config.ignored_fields(config)
  if unknown:
    warnings.warn(f'the {config.get("_class_name")} config fields {unknown} belong to no '
                  'diffusers scheduler; they are ignored, as diffusers ignores them', stacklevel=2)
  cfg = check_config(config)
  name = cfg['_class_name']
  low = 2 if name == 'PNDMScheduler' else 1
  if not low <= num_inference_steps <= int(cfg['num_train_timesteps']):
    raise ValueError(f'num_inference_steps={num_inference_steps} is not supported by '
                     f'{name}: use {low} to num_train_timesteps={cfg["num_train_timesteps"]}')
  return _BUILDERS[name](cfg, num_inference_steps)


def load_scheduler(folder: str | os.PathLike, num_inference_steps: int) -> Scheduler:
  """`scheduler_from_config` of `folder/scheduler_config.json` (a diffusers `scheduler/`)."""
  path = os.path.join(folder, 'scheduler_config.json')
  if not os.path.isfile(path):
    raise ValueError(f'no scheduler_config.json in {str(folder)!r}; it has '
                     f'{sorted(os.listdir(folder)) if os.path.isdir(folder) else "nothing"}')
  with open(path) as f:
    return scheduler_from_config(json.load(f), num_inference_steps)


@dataclasses.dataclass(frozen=True, eq=False)
class ScheduleDDIM(_UnscaledInput):
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
