"""Diffusion sampling with classifier-free guidance and test-time attention guidance, one `lax.scan`.

The scheduler is pluggable (`lossland.guidance.schedulers`): lossland's DDIM
over a `diffusion.Schedule` (the toy models), or diffusers' DDIM / PLMS / Euler /
DPM-Solver++ from a scheduler config (Stable Diffusion). The model is fed the
scheduler's `scale_model_input(z, i)` (z / sqrt(σ² + 1) for Euler, z itself
for the others) at the scheduler's timesteps (float for Euler), in the CFG
pass and in the guidance pass alike, so the attention maps and their
gradient (taken with respect to z, through the scaling) come from the input
the model expects. (diffusers' A&E pipeline feeds its guidance pass the
unscaled latents; with DDIM, its scheduler, the two are the same.)

For the first K of N steps, the latent is moved by gradient steps on a loss of
the concept tokens' cross-attention maps before the usual update:
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

The model is any `apply_fn(params, x[b,H,W,C], t[b], tokens[b,T],
**apply_kwargs) -> ε`; its cross-attention probabilities are read as the
`attention.AttentionSource` says (taps by default, or sown values). With an
`encode_fn(params, ids[n,T]) -> context[n,T,D]` (a text encoder, e.g. CLIP's),
the batch still carries token ids; the encoder runs once per call, inside the
same jit, on [prompts; empty captions], and `apply_fn` receives contexts.

Attend-and-Excite exactly as its official code (diffusers' deprecated
`StableDiffusionAttendAndExcitePipeline`): `Guidance.attend_excite()`, whose
three settings differ from lossland's defaults (see `Guidance`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lossland import parallel, taps
from lossland.guidance import attention as attention_lib
from lossland.guidance import diffusion
from lossland.guidance import losses as losses_lib
from lossland.guidance import maps as maps_lib
from lossland.guidance import schedulers as schedulers_lib
from lossland.guidance import tokens as tokens_lib

LOSSES = ('astar', 'segregation', 'retention', 'attend_excite', 'divide_bind')
SOFTMAX_TOKENS = ('words', 'sequence')
REFINE_RULES = ('stop', 'attend_excite')


@dataclasses.dataclass(frozen=True)
class Guidance:
  """Static settings of attention guidance (hashable: part of the jit cache key).

  Attributes:
    loss: one of `LOSSES`.
    num_guided_steps: K, guide DDIM steps 0..K-1.
    resolution: map resolution (the model must have cross-attention at it).
    softmax_scale: re-normalization over text tokens (None: divide by the sum).
    smooth_sigma: Gaussian smoothing of the maps (None: none).
    threshold: 'otsu' or 'topq' binarization for the retention masks.
    top_q: the fraction of pixels kept by 'topq'.
    retention_weight: λ in L_seg + λ L_ret.
    refine_steps: step indices with iterative refinement.
    refine_targets: per refine step, the per-sample loss to reach.
    max_refine_iters: cap on refinement iterations per refine step.
    softmax_tokens: which tokens compete in the softmax: 'words', the
      prompt's words (the batch's `text_mask`; A&E's `normalize_eot=True`, its
      SD 2.1 setting); 'sequence', every position but the first and the last
      of the padded sequence, end token and padding included (A&E's code for
      SD 1.4, `attention_maps[:, :, 1:-1]`, as in diffusers' pipeline).
    smooth_kernel: `maps.gaussian_kernel` formula: 'gaussian' (textbook), or
      'attend_excite' (A&E's `GaussianSmoothing`, a textbook σ·√2).
    refine_rule: 'stop': a sample's refinement stops updating as soon as its
      loss is at the target (no update from a read at target). 'attend_excite':
      A&E's `_perform_iterative_refinement_step`: it reads the loss and then
      updates, and its while test uses the loss read before that update, so
      it updates once more after reading a loss at the target (n updates, n
      the first with L(z_{n-1}) <= target, capped at `max_refine_iters`).
      Both then take the step's usual gradient step. lossland refines only at
      guided steps (i < K, α != 0); the pipeline also refines at a threshold
      step i >= K (without the usual step), which A&E's defaults never do.
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
  softmax_tokens: str = 'words'
  smooth_kernel: str = 'gaussian'
  refine_rule: str = 'stop'

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f'unknown guidance loss {self.loss!r}; available: {LOSSES}')
    for name, allowed in (('softmax_tokens', SOFTMAX_TOKENS), ('smooth_kernel', maps_lib.KERNELS),
                          ('refine_rule', REFINE_RULES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f'unknown {name} {getattr(self, name)!r}; available: {allowed}')
    if len(self.refine_steps) != len(self.refine_targets):
      raise ValueError(f'refine_steps {self.refine_steps} and refine_targets '
                       f'{self.refine_targets} must have the same length')
    if self.threshold not in ('otsu', 'topq'):
      raise ValueError(f'unknown threshold {self.threshold!r}; available: otsu, topq')


  @classmethod
  def attend_excite(cls, num_guided_steps: int = 25, refine: Mapping[int, float] | None = None,
                    **overrides) -> 'Guidance':
    """Attend-and-Excite as its official code runs it on SD 1.4 (Chefer et al. 2023, sec. 3-4).

    `refine` is the pipeline's `thresholds` {step: wanted max attention}
    (default {0: 0.05, 10: 0.5, 20: 0.8}); the refine targets are the losses
    1 − threshold. Use `step_size_schedule(20, num_steps)` (scale_factor 20).
    """
    refine = {0: 0.05, 10: 0.5, 20: 0.8} if refine is None else dict(refine)
    settings = dict(loss='attend_excite', num_guided_steps=num_guided_steps, resolution=16,
                    softmax_scale=100.0, smooth_sigma=0.5, smooth_kernel='attend_excite',
                    softmax_tokens='sequence', refine_rule='attend_excite', max_refine_iters=20,
                    refine_steps=tuple(sorted(refine)),
                    refine_targets=tuple(max(0.0, 1.0 - refine[k]) for k in sorted(refine)))
    settings.update(overrides)
    return cls(**settings)


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


@flax.struct.dataclass
class Samples:
  """What a sampler returns (a pytree of device arrays).

  Attributes:
    images: [b, H, W, C] the final sample: images in [-1, 1] for a pixel
      model (`to_uint8` for pictures), latents for a latent model.
    loss: [num_steps, b] the guidance loss at each step (0 where not guided);
      None without guidance.
    maps: [b, res, res, M] the concept maps at the last guided step; None
      without guidance.
  """
  images: jax.Array
  loss: jax.Array | None = None
  maps: jax.Array | None = None


BATCH_KEYS = ('noise', 'tokens')
GUIDED_KEYS = ('text_mask', 'token_indices')


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _check_finite_inputs(params, noise, cfg_scale, step_sizes) -> None:
  """One error naming what is empty or not finite: a NaN anywhere would give NaN images."""
  if np.shape(noise)[0] == 0:
    raise ValueError("the batch has 0 seeds ('noise' has 0 rows); give at least one")
  for name, value in (('cfg_scale', cfg_scale), ('step_sizes', step_sizes)):
    if not np.isfinite(np.asarray(value, np.float64)).all():
      raise ValueError(f'{name}={value!r} is not finite; give finite numbers')
  if not bool(_all_finite(noise)):
    raise ValueError("batch['noise'] holds NaN or inf; draw it from a normal distribution")
  if not bool(_all_finite(params)):
    raise ValueError('the model params hold NaN or inf; load a finite checkpoint')


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
  """A compiled CFG sampler, guided or not: `sampler(params, batch, ...) -> Samples`.

  Made by `make_sampler`; one compilation per batch shape serves every
  params, CFG weight and step-size schedule.
  """
  fn: Callable  # jitted (params, batch, null_tokens, cfg_scale, step_sizes) -> Samples
  guidance: Guidance | None
  num_steps: int
  null_tokens: np.ndarray
  mesh: Mesh
  vocab: tuple[str, ...] | None

  def __call__(self, params, batch: Mapping[str, Any], *, cfg_scale: float,
               step_sizes=None) -> Samples:
    """Samples one batch of seeds (and prompts).

    Args:
      params: the model's variables.
      batch: a dict of [b, ...] arrays: 'noise' [b, H, W, C] (z_T, one per
        seed) and 'tokens' [b, T] prompt ids; with guidance also 'text_mask'
        [b, T] bool (`tokens.text_mask`) and 'token_indices' [b, M] concept
        positions (`tokens.concept_indices`). Host arrays are sharded over the
        mesh's `data` axis; when b does not divide by its size, the batch is
        padded with repeats of its rows and the result cut back to b (exact:
        rows are sampled independently, and a repeated row finishes its
        refinement when its original does).
      cfg_scale: classifier-free guidance weight w.
      step_sizes: [num_steps] α per step (`step_size_schedule`); zeros = no
        guidance. Needed with guidance, ignored without. num_steps is the
        number of model calls, `len(scheduler.timesteps)` (N + 1 for PLMS).

    NaN or inf noise, CFG weight, step sizes or params, and an empty batch,
    are refused first, by name. With guidance, the concept indices are checked on the host
    (`tokens.check_token_indices`, naming the prompt's tokens, as words when
    the sampler has a `vocab`): an index out of range would give NaN losses
    inside the compiled loop, one at the start token, end token or padding
    would silently guide nothing. Calls from inside another trace skip the
    check and the sharding.
    """
    keys = BATCH_KEYS + (GUIDED_KEYS if self.guidance is not None else ())
    missing = [k for k in keys if k not in batch]
    if missing:
      raise ValueError(f'the batch lacks {missing}; a sampler batch is a dict with {list(keys)} '
                       f'(it has {sorted(batch)})')
    batch = {k: batch[k] for k in keys}
    if self.guidance is None:
      step_sizes = np.zeros(self.num_steps, np.float32)
    elif step_sizes is None:
      raise ValueError('a guided sampler needs step_sizes, e.g. step_size_schedule(scale, '
                       f'{self.num_steps})')
    if np.shape(step_sizes) != (self.num_steps,):
      raise ValueError(f'step_sizes has shape {np.shape(step_sizes)}; it needs one step size per '
                       f'sampling step: ({self.num_steps},)')
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((params, batch)))
    if traced:
      return self.fn(params, batch, self.null_tokens, cfg_scale, step_sizes)
    _check_finite_inputs(params, batch['noise'], cfg_scale, step_sizes)
    if self.guidance is not None:
      tokens_lib.check_token_indices(_local_rows(batch['tokens']), _local_rows(batch['text_mask']),
                                     _local_rows(batch['token_indices']), self.vocab)
    if any(isinstance(v, jax.Array) and not v.is_fully_addressable for v in batch.values()):
      rows = None  # a global (multi-host) batch, already sharded by the caller
    else:
      rows = len(batch['noise'])
      data = self.mesh.shape['data']
      if rows % data:  # pad with repeats of its rows: they are sampled independently
        take = np.arange(-(-rows // data) * data) % rows
        batch = {k: np.asarray(v)[take] for k, v in batch.items()}
      batch = parallel.shard_batch(batch, self.mesh)
    out = parallel.settle(self.fn(params, batch, self.null_tokens, jnp.float32(cfg_scale),
                                  jnp.asarray(step_sizes, jnp.float32)))
    if rows is not None and rows % self.mesh.shape['data']:
      out = Samples(out.images[:rows], None if out.loss is None else out.loss[:, :rows],
                    None if out.maps is None else out.maps[:rows])
    return out

  def cache_size(self) -> int:
    """How many times the sampler has been compiled (one per batch shape)."""
    return self.fn._cache_size()  # pylint: disable=protected-access


def _at(fn: Callable, t: jax.Array) -> Callable:
  """`fn` at timestep t whatever timesteps `diffusion.cfg_eps` passes (it casts them to int32;
  Euler's are fractional)."""
  return lambda params, x, t_int, *args: fn(params, x, jnp.full(t_int.shape, t, t.dtype), *args)


def _scheduler(schedule, num_steps: int | None, clip: bool) -> schedulers_lib.Scheduler:
  if isinstance(schedule, diffusion.Schedule):
    if num_steps is None:
      raise ValueError('make_sampler over a diffusion.Schedule needs num_steps (DDIM steps)')
    return schedulers_lib.lossland_ddim(schedule, num_steps, clip=clip)
  if not all(hasattr(schedule, k) for k in ('timesteps', 'init_state', 'step')):
    raise TypeError(f'schedule must be a diffusion.Schedule or a scheduler (timesteps, '
                    f'init_state, step; see guidance.schedulers), got {type(schedule).__name__}')
  if num_steps is not None and num_steps != len(schedule.timesteps):
    raise ValueError(f'num_steps={num_steps} but the scheduler makes {len(schedule.timesteps)} '
                     'model calls; leave num_steps out for a scheduler')
  return schedule


def make_sampler(apply_fn: Callable, schedule, *, num_steps: int | None = None,
                 null_tokens, guidance: Guidance | None = None,
                 attention: attention_lib.AttentionSource = attention_lib.AttentionSource(),
                 apply_kwargs: Mapping[str, Any] | None = None, mesh: Mesh | None = None,
                 clip: bool = True, vocab: Sequence[str] | None = None,
                 encode_fn: Callable | None = None) -> Sampler:
  """A `Sampler`: a scheduler with CFG, and attention guidance when `guidance` is given.

  Args:
    apply_fn: `(params, x, t, tokens, **apply_kwargs) -> model output` (e.g.
      `model.apply`; with `encode_fn`, it gets contexts [b, T, D] for tokens),
      or an NNX module or graphdef (the sampler's params are then its state,
      and `attention` names its sown weights).
    schedule: a `diffusion.Schedule` (lossland's DDIM, η = 0, with `num_steps`
      steps and `clip`) or a scheduler from `guidance.schedulers` (e.g.
      `scheduler_from_config(config, 50)`; its `timesteps` set the steps).
    num_steps: DDIM steps N over a `diffusion.Schedule`; with a scheduler,
      None or `len(scheduler.timesteps)`.
    null_tokens: [T] the empty caption (the unconditional branch of CFG).
    guidance: the guidance settings; None samples without attention guidance.
    attention: where the cross-attention probabilities come from (taps'
      `AttentionWeights` layers by default; `AttentionSource(sown=NAME)` for
      models that sow them).
    apply_kwargs: keyword arguments of `apply_fn` (e.g. `{'train': False}`).
    mesh: batches are sharded over its `data` axis; None uses all local devices.
    clip: clip x̂0 to [-1, 1] in each DDIM step of a `diffusion.Schedule`.
    vocab: id -> word, to name a prompt's tokens in bad-index errors.
    encode_fn: optional `(params, ids[n, T]) -> context[n, T, D]`, run once
      per call on [tokens; null_tokens] inside the compiled sampler.
  """
  scheduler = _scheduler(schedule, num_steps, clip)
  timesteps = np.asarray(scheduler.timesteps)
  timesteps = timesteps.astype(np.float32 if np.issubdtype(timesteps.dtype, np.floating)
                               else np.int32)  # Euler's are fractional
  num_steps = len(timesteps)
  scale_input = getattr(scheduler, 'scale_model_input', lambda z, i: z)
  kwargs = dict(apply_kwargs or {})
  model_fn = attention_lib.apply_with_attention(apply_fn, attention, kwargs)
  unguided_fn = taps.as_function(apply_fn)[0]  # an NNX module runs as merge(graphdef, state)
  plain_fn = lambda params, *args: unguided_fn(params, *args, **kwargs)

  def _maps(records, text_mask, token_indices):
    attn = maps_lib.average_maps(records, guidance.resolution)
    if guidance.softmax_tokens == 'sequence':  # A&E's attention_maps[:, :, 1:-1]
      length = text_mask.shape[1]
      text_mask = jnp.broadcast_to((jnp.arange(length) > 0) & (jnp.arange(length) < length - 1),
                                   text_mask.shape)
    return maps_lib.token_maps(attn, text_mask, token_indices, scale=guidance.softmax_scale,
                               smooth_sigma=guidance.smooth_sigma,
                               smooth_formula=guidance.smooth_kernel)

  def cond_maps(params, z, t, context, text_mask, token_indices):
    _, records = model_fn(params, z, jnp.full((z.shape[0],), t, t.dtype), context)
    return _maps(records, text_mask, token_indices)

  def binarize(maps):
    return jax.vmap(lambda m: losses_lib.binarize(m, guidance.threshold, guidance.top_q))(maps)

  def sample(params, batch, null_tokens, cfg_scale, step_sizes):
    noise, tokens = batch['noise'], batch['tokens']
    b = noise.shape[0]
    if encode_fn is None:
      context, null_context = tokens, null_tokens
    else:  # the text encoder, once per call: [prompts; empty captions]
      null_ids = jnp.broadcast_to(null_tokens, tokens.shape).astype(tokens.dtype)
      both = encode_fn(params, jnp.concatenate([tokens, null_ids]))
      context, null_context = both[:b], both[b:]
    z0 = noise if scheduler.init_noise_sigma == 1.0 else noise * scheduler.init_noise_sigma
    xs = (jnp.arange(num_steps), jnp.asarray(timesteps), jnp.asarray(step_sizes, jnp.float32))

    def denoise(z, sched_state, i, t):
      x = scale_input(z, i)
      if guidance is None:
        eps, records = diffusion.cfg_eps(_at(plain_fn, t), params, x, t, context, null_context,
                                         cfg_scale), None
      else:
        eps, records = diffusion.cfg_eps(_at(model_fn, t), params, x, t, context, null_context,
                                         cfg_scale, has_aux=True)
      z, sched_state = scheduler.step(sched_state, z, eps, i)
      return z, sched_state, records

    if guidance is None:
      def plain_step(carry, xs):
        z, sched_state = carry
        i, t, _ = xs
        z, sched_state, _ = denoise(z, sched_state, i, t)
        return (z, sched_state), None
      (z, _), _ = jax.lax.scan(plain_step, (z0, scheduler.init_state(z0)), xs)
      return Samples(z)

    text_mask, token_indices = batch['text_mask'], batch['token_indices']

    def loss_sum(z, t, masks, i):
      maps = cond_maps(params, scale_input(z, i), t, context, text_mask, token_indices)
      masks = jnp.where(i == 0, binarize(jax.lax.stop_gradient(maps)), masks)
      per_sample = _per_sample_loss(guidance, maps, masks)
      return per_sample.sum(), (per_sample, maps)

    grad_fn = jax.grad(loss_sum, has_aux=True)

    def refine(z, t, masks, i, alpha, target):
      def cond(carry):
        _, it, done = carry
        return (it < guidance.max_refine_iters) & ~jnp.all(done)

      def body(carry):
        z, it, _ = carry
        g, (per_sample, _) = grad_fn(z, t, masks, i)
        done = per_sample <= target
        z = z - alpha * jnp.where(done[:, None, None, None], 0.0, g)
        return z, it + 1, done

      z, _, _ = jax.lax.while_loop(cond, body, (z, 0, jnp.zeros((z.shape[0],), bool)))
      return z

    def refine_then_step(z, t, masks, i, alpha, target):
      """A&E's `_perform_iterative_refinement_step` and the step's update (Guidance docs)."""
      g, (loss, maps) = grad_fn(z, t, masks, i)  # the step's first read, L(z_0)

      def cond(carry):
        *_, read, it = carry
        return jnp.any((read > target) & (it < guidance.max_refine_iters))

      def body(carry):
        z, g, loss, maps, read, it = carry
        update = (read > target) & (it < guidance.max_refine_iters)  # [b]
        z = z - alpha * jnp.where(update[:, None, None, None], g, 0.0)
        read = jnp.where(update, loss, read)  # the loss before this update: the while test's
        g, (loss, maps) = grad_fn(z, t, masks, i)
        return z, g, loss, maps, read, it + 1

      z, g, loss, maps, _, _ = jax.lax.while_loop(cond, body, (z, g, loss, maps, loss, 0))
      return z - alpha * g, loss, maps

    refine_steps = jnp.asarray(guidance.refine_steps or (-1,), jnp.int32)
    refine_targets = jnp.asarray(guidance.refine_targets or (0.0,), jnp.float32)

    def guide(z, i, t, masks, alpha):
      hit = refine_steps == i
      target = jnp.sum(jnp.where(hit, refine_targets, 0.0))
      if guidance.refine_steps and guidance.refine_rule == 'attend_excite':
        def plain(z):
          g, (per_sample, maps) = grad_fn(z, t, masks, i)
          return z - alpha * g, per_sample, maps
        return jax.lax.cond(jnp.any(hit), lambda z: refine_then_step(
            z, t, masks, i, alpha, target), plain, z)
      if guidance.refine_steps:
        z = jax.lax.cond(jnp.any(hit), lambda z: refine(z, t, masks, i, alpha, target),
                         lambda z: z, z)
      g, (per_sample, maps) = grad_fn(z, t, masks, i)
      return z - alpha * g, per_sample, maps

    m = token_indices.shape[1]
    res = guidance.resolution
    map_shape = (b, res, res, m)

    def skip(z, i, t, masks, alpha):
      del i, t, masks, alpha
      return z, jnp.zeros((z.shape[0],), jnp.float32), jnp.zeros(map_shape, jnp.float32)

    def step(carry, xs):
      z, sched_state, masks, last_maps = carry
      i, t, alpha = xs
      active = (i < guidance.num_guided_steps) & (alpha != 0)
      z, per_sample, maps = jax.lax.cond(active, guide, skip, z, i, t, masks, alpha)
      last_maps = jnp.where(active, maps, last_maps)
      z, sched_state, records = denoise(z, sched_state, i, t)
      if guidance.loss in ('astar', 'retention'):
        # B^m for the next step: binarized maps of the conditional pass just run.
        masks = binarize(_maps(records, text_mask, token_indices))
      return (z, sched_state, masks, last_maps), per_sample

    init = (z0, scheduler.init_state(z0), jnp.zeros(map_shape, jnp.float32),
            jnp.zeros(map_shape, jnp.float32))
    (z, _, _, last_maps), loss_trace = jax.lax.scan(step, init, xs)
    return Samples(z, loss_trace, last_maps)

  return Sampler(fn=jax.jit(sample), guidance=guidance, num_steps=num_steps,
                 null_tokens=np.asarray(null_tokens), mesh=parallel.data_mesh(mesh),
                 vocab=tuple(vocab) if vocab is not None else None)


def to_uint8(images: jax.Array) -> np.ndarray:
  """[-1, 1] float images -> uint8 [0, 255] on the host."""
  return np.asarray(np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255), np.uint8)
