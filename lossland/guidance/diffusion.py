"""DDPM training objective and DDIM steps for a text-conditioned ε-prediction model.

* Forward process and ε-prediction loss: Ho et al. 2020, "Denoising Diffusion
  Probabilistic Models", eq. 4 and Algorithm 1 (linear β from 1e-4 to 0.02
  over T = 1000 steps, their CIFAR-10 setting).
* Caption dropout for classifier-free guidance: Ho & Salimans 2022, sec. 3.2;
  guided ε = ε(∅) + w (ε(c) − ε(∅)) (their eq. 6).
* Deterministic DDIM update (η = 0): Song et al. 2021, eq. 12.

All functions are pure and jit-safe; the model is any
`apply_fn(params, x[b,H,W,C], t[b], tokens[b,T]) -> ε[b,H,W,C]`.
"""
from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Schedule:
  """ᾱ_t = Π_{s<=t} (1 − β_s) for t = 0..T-1 (float32 [T])."""
  alpha_bar: jax.Array

  @property
  def num_timesteps(self) -> int:
    return int(self.alpha_bar.shape[0])


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 0.02) -> Schedule:
  betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  return Schedule(jnp.asarray(np.cumprod(1.0 - betas), jnp.float32))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """z_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε (Ho et al. 2020, eq. 4)."""
  ab = schedule.alpha_bar[t][:, None, None, None]
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def diffusion_loss(apply_fn: Callable, schedule: Schedule, null_tokens: jax.Array, *,
                   caption_dropout: float = 0.1) -> Callable:
  """`loss_fn(params, batch, rng) -> (loss, metrics)` for `lossland.train.fit`.

  `batch` holds `image` (uint8 [b,H,W,C]) and `tokens` (int [b,T]). The
  image is scaled to [-1, 1]; a fraction `caption_dropout` of captions is
  replaced by `null_tokens` ([T], the empty caption) so the same network
  learns the unconditional ε(∅) used by classifier-free guidance.
  """
  def loss_fn(params, batch, rng):
    x0 = batch['image'].astype(jnp.float32) / 127.5 - 1.0
    tokens = batch['tokens']
    k_t, k_noise, k_drop = jax.random.split(rng, 3)
    b = x0.shape[0]
    t = jax.random.randint(k_t, (b,), 0, schedule.num_timesteps)
    noise = jax.random.normal(k_noise, x0.shape)
    drop = jax.random.uniform(k_drop, (b,)) < caption_dropout
    tokens = jnp.where(drop[:, None], null_tokens[None].astype(tokens.dtype), tokens)
    eps = apply_fn(params, q_sample(schedule, x0, t, noise), t, tokens)
    loss = jnp.mean((eps - noise) ** 2)
    return loss, {'loss': loss}
  return loss_fn


def ddim_timesteps(schedule: Schedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Descending timesteps [num_steps] and their predecessors (-1 means t = 0 is reached)."""
  if not 1 <= num_steps <= schedule.num_timesteps:
    raise ValueError(f'num_steps={num_steps} must be in [1, {schedule.num_timesteps}]')
  ts = np.round(np.linspace(schedule.num_timesteps - 1, 0, num_steps)).astype(np.int32)
  prev = np.concatenate([ts[1:], [-1]]).astype(np.int32)
  return ts, prev


def cfg_eps(apply_fn: Callable, params, z: jax.Array, t: jax.Array, tokens: jax.Array,
            null_tokens: jax.Array, cfg_scale: float | jax.Array, *, has_aux: bool = False):
  """Classifier-free guided ε from one batched call on [cond; uncond] (Ho & Salimans eq. 6).

  With `has_aux`, `apply_fn` returns `(ε, aux)` (e.g. the attention
  probabilities of `attention.apply_with_attention`) and `(ε, aux of the
  conditional half)` is returned, so the maps come for free.
  """
  b = z.shape[0]
  null = jnp.broadcast_to(null_tokens, tokens.shape).astype(tokens.dtype)
  both_t = jnp.full((2 * b,), t, jnp.int32)
  inputs = (jnp.concatenate([z, z]), both_t, jnp.concatenate([tokens, null]))
  if has_aux:
    eps, aux = apply_fn(params, *inputs)
  else:
    eps, aux = apply_fn(params, *inputs), None
  eps_c, eps_u = eps[:b], eps[b:]
  eps = eps_u + cfg_scale * (eps_c - eps_u)
  if not has_aux:
    return eps
  return eps, jax.tree.map(lambda a: a[:b], aux)


def ddim_step(schedule: Schedule, z: jax.Array, eps: jax.Array, t: jax.Array, t_prev: jax.Array,
              *, clip: bool = True) -> jax.Array:
  """z_{t_prev} from z_t and ε, η = 0 (Song et al. 2021, eq. 12), x̂0 clipped to [-1, 1]."""
  ab = schedule.alpha_bar[t]
  ab_prev = jnp.where(t_prev >= 0, schedule.alpha_bar[jnp.maximum(t_prev, 0)], 1.0)
  x0 = (z - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)
  if clip:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = (z - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)
  return jnp.sqrt(ab_prev) * x0 + jnp.sqrt(1.0 - ab_prev) * eps
