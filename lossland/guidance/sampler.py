"""DDIM with classifier-free guidance and test-time attention guidance, as one `lax.scan`.

For the first K of N DDIM steps, the latent is moved by gradient steps on a
loss of the concept tokens' cross-attention maps before the usual update:
z_t ← z_t − α_t ∇_{z_t} L(A_t) (Attend-and-Excite, Chefer et al. 2023, eq. 3,
with α_t = s·sqrt(linspace(1, 0.5, N))_t; A-STAR, Agarwal et al. ICCV 2023,
sec. 3.3, with L = L_seg + L_ret). Optional iterative refinement (A&E sec.
3.3) repeats the gradient step at chosen steps, per sample, until the loss is
at most a target (for A&E, 1 − the wanted max attention), at most
`max_refine_iters` times.

The whole batch of seeds (and prompts) is guided at once. Guidance is behind a
`lax.cond` on the step index and step size, so steps after K (or with α = 0)
run no backward pass, and α = 0 reproduces `guidance=None` bit for bit (a
test checks this). The gradient comes from the conditional branch alone, as
in A&E's code; the ε of the update uses CFG.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lossland.guidance import diffusion
from lossland.guidance import losses as losses_lib
from lossland.guidance import maps as maps_lib
from lossland.guidance import tokens as tokens_lib

LOSSES = ('astar', 'segregation', 'retention', 'attend_excite', 'divide_bind')


@dataclasses.dataclass(frozen=True)
class Guidance:
  """Static settings of attention guidance (hashable: part of the jit cache key).

  Attributes:
    loss: one of `LOSSES`.
    num_guided_steps: K, guide DDIM steps 0..K-1.
    resolution: map resolution (the model must sow maps at it).
    softmax_scale: re-normalization over text tokens (None: divide by the sum).
    smooth_sigma: Gaussian smoothing of the maps (None: none).
    threshold: 'otsu' or 'topq' binarization for the retention masks.
    top_q: the fraction of pixels kept by 'topq'.
    retention_weight: λ in L_seg + λ L_ret.
    refine_steps: step indices with iterative refinement.
    refine_targets: per refine step, the per-sample loss to reach.
    max_refine_iters: cap on refinement iterations per refine step.
  """
  loss: str = 'astar'
  num_guided_steps: int = 10
  resolution: int = 16
  softmax_scale: float | None = 100.0
  smooth_sigma: float | None = 0.5
  threshold: str = 'otsu'
  top_q: float = 0.2
  retention_weight: float = 1.0
  refine_steps: tuple[int, ...] = ()
  refine_targets: tuple[float, ...] = ()
  max_refine_iters: int = 20

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f'unknown guidance loss {self.loss!r}; available: {LOSSES}')
    if len(self.refine_steps) != len(self.refine_targets):
      raise ValueError(f'refine_steps {self.refine_steps} and refine_targets '
                       f'{self.refine_targets} must have the same length')
    if self.threshold not in ('otsu', 'topq'):
      raise ValueError(f'unknown threshold {self.threshold!r}; available: otsu, topq')


def step_size_schedule(scale: float, num_steps: int) -> np.ndarray:
  """α_i = scale · sqrt(linspace(1, 0.5, N))_i (A&E's schedule), float32 [N]."""
  return (scale * np.sqrt(np.linspace(1.0, 0.5, num_steps))).astype(np.float32)


def _per_sample_loss(g: Guidance, maps: jax.Array, masks: jax.Array) -> jax.Array:
  """[b] losses of [b, H, W, M] maps."""
  if g.loss == 'astar':
    fn = lambda a, b: losses_lib.astar_loss(a, b, retention_weight=g.retention_weight)
  elif g.loss == 'segregation':
    fn = lambda a, b: losses_lib.segregation_loss(a)
  elif g.loss == 'retention':
    fn = losses_lib.retention_loss
  elif g.loss == 'attend_excite':
    fn = lambda a, b: losses_lib.attend_excite_loss(a)
  else:
    fn = lambda a, b: losses_lib.divide_bind_attendance(a)
  return jax.vmap(fn)(maps, masks)


def _local_rows(x) -> np.ndarray:
  """This process's rows of a host or (batch-sharded, possibly multi-host) device array."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  rows = {s.index[0].start or 0: np.asarray(s.data) for s in x.addressable_shards}
  return np.concatenate([rows[k] for k in sorted(rows)])


def make_sampler(apply_fn: Callable, schedule: diffusion.Schedule, *, num_steps: int,
                 guidance: Guidance | None = None, clip: bool = True,
                 vocab: Sequence[str] | None = None) -> Callable:
  """Returns a jitted `sample(params, noise, tokens, null_tokens, text_mask, token_indices,
  cfg_scale, step_sizes) -> (images [b,H,W,C] in [-1,1], aux)`.

  With guidance, each call first checks on the host that every concept index is
  a word of its prompt (`tokens.check_token_indices`, naming the prompt's
  tokens, as words when `vocab` is given): an index out of range would give NaN
  losses inside the compiled loop, one at the start token, end token or
  padding would silently guide nothing. Calls from inside another trace skip
  the check.

  Args (of `sample`):
    noise: [b, H, W, C] initial latents z_T (one per seed).
    tokens: [b, T] prompt token ids; null_tokens: [T] the empty caption.
    text_mask: [b, T] bool tokens of the map re-normalization (`tokens.text_mask`).
    token_indices: [b, M] concept token positions (`tokens.concept_indices`).
    cfg_scale: classifier-free guidance weight w.
    step_sizes: [num_steps] α per step (`step_size_schedule`); zeros = no guidance.
  `aux` holds `loss` [num_steps, b] (the guidance loss at each step, 0 where
  not guided) and `maps` [b, res, res, M], the maps at the last guided step.
  With `guidance=None` the sampler is plain DDIM + CFG and aux is empty.
  """
  ts, prevs = diffusion.ddim_timesteps(schedule, num_steps)
  mutable = ['intermediates']

  def cond_maps(params, z, t, tokens, text_mask, token_indices):
    _, state = apply_fn(params, z, jnp.full((z.shape[0],), t, jnp.int32), tokens,
                        mutable=mutable)
    return _maps_from_state(state, text_mask, token_indices)

  def _maps_from_state(state, text_mask, token_indices):
    attn = maps_lib.average_maps(state['intermediates'], guidance.resolution)
    return maps_lib.token_maps(attn, text_mask, token_indices, scale=guidance.softmax_scale,
                               smooth_sigma=guidance.smooth_sigma)

  def binarize(maps):
    return jax.vmap(lambda m: losses_lib.binarize(m, guidance.threshold, guidance.top_q))(maps)

  def sample(params, noise, tokens, null_tokens, text_mask, token_indices, cfg_scale,
             step_sizes):
    def denoise(z, t, t_prev):
      eps, state = diffusion.cfg_eps(apply_fn, params, z, t, tokens, null_tokens, cfg_scale,
                                     mutable=mutable)
      return diffusion.ddim_step(schedule, z, eps, t, t_prev, clip=clip), state

    if guidance is None:
      def plain_step(z, xs):
        t, t_prev = xs
        return denoise(z, t, t_prev)[0], None
      z, _ = jax.lax.scan(plain_step, noise, (jnp.asarray(ts), jnp.asarray(prevs)))
      return z, {}

    def loss_sum(z, t, masks, first):
      maps = cond_maps(params, z, t, tokens, text_mask, token_indices)
      masks = jnp.where(first, binarize(jax.lax.stop_gradient(maps)), masks)
      per_sample = _per_sample_loss(guidance, maps, masks)
      return per_sample.sum(), (per_sample, maps)

    grad_fn = jax.grad(loss_sum, has_aux=True)

    def refine(z, t, masks, first, alpha, target):
      def cond(carry):
        _, it, done = carry
        return (it < guidance.max_refine_iters) & ~jnp.all(done)

      def body(carry):
        z, it, _ = carry
        g, (per_sample, _) = grad_fn(z, t, masks, first)
        done = per_sample <= target
        z = z - alpha * jnp.where(done[:, None, None, None], 0.0, g)
        return z, it + 1, done

      z, _, _ = jax.lax.while_loop(cond, body, (z, 0, jnp.zeros((z.shape[0],), bool)))
      return z

    refine_steps = jnp.asarray(guidance.refine_steps or (-1,), jnp.int32)
    refine_targets = jnp.asarray(guidance.refine_targets or (0.0,), jnp.float32)

    def guide(z, i, t, masks, alpha):
      first = i == 0
      if guidance.refine_steps:
        hit = refine_steps == i
        z = jax.lax.cond(jnp.any(hit), lambda z: refine(
            z, t, masks, first, alpha, jnp.sum(jnp.where(hit, refine_targets, 0.0))),
                         lambda z: z, z)
      g, (per_sample, maps) = grad_fn(z, t, masks, first)
      return z - alpha * g, per_sample, maps

    m = token_indices.shape[1]
    res = guidance.resolution
    map_shape = (noise.shape[0], res, res, m)

    def skip(z, i, t, masks, alpha):
      del i, t, masks, alpha
      return z, jnp.zeros((z.shape[0],), jnp.float32), jnp.zeros(map_shape, jnp.float32)

    def step(carry, xs):
      z, masks, last_maps = carry
      i, t, t_prev, alpha = xs
      active = (i < guidance.num_guided_steps) & (alpha != 0)
      z, per_sample, maps = jax.lax.cond(active, guide, skip, z, i, t, masks, alpha)
      last_maps = jnp.where(active, maps, last_maps)
      z, state = denoise(z, t, t_prev)
      if guidance.loss in ('astar', 'retention'):
        # B^m for the next step: binarized maps of the conditional pass just run.
        masks = binarize(_maps_from_state(state, text_mask, token_indices))
      return (z, masks, last_maps), per_sample

    xs = (jnp.arange(num_steps), jnp.asarray(ts), jnp.asarray(prevs),
          jnp.asarray(step_sizes, jnp.float32))
    init = (noise, jnp.zeros(map_shape, jnp.float32), jnp.zeros(map_shape, jnp.float32))
    (z, _, last_maps), loss_trace = jax.lax.scan(step, init, xs)
    return z, {'loss': loss_trace, 'maps': last_maps}

  jitted = jax.jit(sample)
  if guidance is None:
    return jitted

  @functools.wraps(jitted)
  def checked(params, noise, tokens, null_tokens, text_mask, token_indices, *args, **kwargs):
    if not any(isinstance(x, jax.core.Tracer) for x in (tokens, text_mask, token_indices)):
      tokens_lib.check_token_indices(_local_rows(tokens), _local_rows(text_mask),
                                     _local_rows(token_indices), vocab)
    return jitted(params, noise, tokens, null_tokens, text_mask, token_indices, *args, **kwargs)

  checked.lower = jitted.lower
  checked._cache_size = jitted._cache_size  # pylint: disable=protected-access
  return checked


def to_uint8(images: jax.Array) -> np.ndarray:
  """[-1, 1] float images -> uint8 [0, 255] on the host."""
  return np.asarray(np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255), np.uint8)
