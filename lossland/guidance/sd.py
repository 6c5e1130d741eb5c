"""Attention-guided Stable Diffusion sampling: prompts + concept words + seeds -> latents, images.

Arms (each paper's settings; `arm_guidance`):

* 'baseline': the scheduler with classifier-free guidance only (Ho & Salimans
  2022, eq. 6; w = 7.5 as the papers sample SD).
* 'attend_excite': Attend-and-Excite (Chefer et al. 2023) as its official code
  and diffusers' deprecated `StableDiffusionAttendAndExcitePipeline` run it:
  16x16 maps averaged over heads and layers, softmax of 100·A over positions
  1..75, its Gaussian smoothing, L = max_s (1 − max A_s), α_i = 20 ·
  sqrt(linspace(1, 0.5, N))_i in the first N/2 steps (25 of 50), refinement at
  steps {0: 0.05, 10: 0.5, 20: 0.8} with at most 20 iterations and the
  pipeline's stopping rule (`sampler.Guidance.attend_excite`).
* 'astar': A-STAR (Agarwal et al. ICCV 2023, L_seg + L_ret, sec. 3.3) on the
  same maps. The paper leaves α_t and the binarization unstated: A&E's α
  schedule and guided steps, Otsu masks, no refinement.
* 'divide_bind': Divide & Bind's attendance (Li et al. 2023, −min_s TV(A_s))
  on the same maps, A&E's α schedule and guided steps, no refinement (its
  binding term needs attribute-object pairs: `losses.divide_bind_binding`).

A concept word the tokenizer splits into several tokens (e.g. "elephant" into
"ele" + "phant</w>") is refused by default, naming the pieces: the papers guide
one token per subject and their prompts use single-token nouns. With
`multi_token='last'` the word's last piece is guided: CLIP's text encoder is
causal, so the last piece is the only one whose feature has seen the whole word.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lossland.guidance import attention as attention_lib
from lossland.guidance import maps as maps_lib
from lossland.guidance import sampler as sampler_lib
from lossland.guidance import schedulers as schedulers_lib
from lossland.guidance import tokens as tokens_lib

ARMS = ('baseline', 'attend_excite', 'astar', 'divide_bind')
CROSS_ATTENTION = attention_lib.AttentionSource(select=r'.*attn2.*')
AE_STEP_SCALE = 20.0  # A&E's scale_factor


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
  """A loaded Stable Diffusion folder (`load_stable_diffusion`).

  Attributes:
    unet, text_encoder, vae: linen modules.
    params: {'unet', 'text_encoder', 'vae'} -> variables.
    tokenizer: the CLIP tokenizer (encode, word_positions, start_id, end_id, vocab).
    scheduler_config: the config the folder samples with (`scheduler(num_steps)`): its
      scheduler/scheduler_config.json as `schedulers.folder_config` reads it (diffusers'
      pipeline fix-ups; DDIM for a class lossland does not implement).
    vae_scaling_factor: latents are the VAE latents times this.
    latent_size, latent_channels: the UNet's sample_size and in_channels.
    path: the folder.
    scheduler_notes: what `schedulers.folder_config` changed in the folder's scheduler config
      (also given as one warning when loading).
  """
  unet: Any
  text_encoder: Any
  vae: Any
  params: dict[str, Any]
  tokenizer: Any
  scheduler_config: dict[str, Any]
  vae_scaling_factor: float
  latent_size: int
  latent_channels: int
  path: str = ''
  scheduler_notes: tuple[str, ...] = ()

  def scheduler(self, num_steps: int) -> schedulers_lib.Scheduler:
    """The folder's scheduler with `num_steps` inference steps."""
    return schedulers_lib.scheduler_from_config(self.scheduler_config, num_steps)

  def apply_unet(self, params, x, t, context):
    """ε (or v) [b, H, W, C] of latents x [b, H, W, C] at timesteps t [b], context [b, T, D]."""
    return self.unet.apply(params['unet'], x, t, context)

  def encode_text(self, params, ids):
    """Text-encoder features [n, T, D] of token ids [n, T]."""
    return self.text_encoder.apply(params['text_encoder'], ids)

  def decode(self, params, latents):
    """Images [b, 8·H', 8·W', 3] in about [-1, 1] from SD latents (divided by the scaling)."""
    return self.vae.apply(params['vae'], latents / self.vae_scaling_factor,
                          method=self.vae.decode)


def load_stable_diffusion(path: str | os.PathLike, dtype=jnp.float32) -> StableDiffusion:
  """Loads a local diffusers Stable Diffusion folder (`lossland.interop.diffusers`).

  The scheduler is the folder's as diffusers' `StableDiffusionPipeline` would
  run it (`schedulers.folder_config`): an outdated config (`steps_offset` 0,
  `clip_sample` true) is fixed up as the pipeline fixes it, and a scheduler class
  or setting lossland does not implement falls back to DDIM over the folder's
  training schedule; either comes with one UserWarning saying what changed
  (`StableDiffusion.scheduler_notes`) and that `make_sd_sampler(...,
  scheduler=...)` picks another scheduler. Raises one ValueError listing the
  missing components (and what the folder has), or naming a training schedule
  lossland cannot sample (e.g. an unknown `beta_schedule`).
  """
  from lossland.interop import diffusers as diffusers_lib
  folder = diffusers_lib.load_folder(path, dtype)
  scheduler_config, notes = schedulers_lib.folder_config(folder.scheduler_config)
  if notes:
    warnings.warn(f'{os.path.join(folder.path, "scheduler", "scheduler_config.json")}: '
                  + '; '.join(notes), stacklevel=2)
  return StableDiffusion(
      unet=folder.unet, text_encoder=folder.text_encoder, vae=folder.vae, params=folder.params,
      tokenizer=folder.tokenizer, scheduler_config=scheduler_config,
      vae_scaling_factor=folder.vae_scaling_factor,
      latent_size=int(folder.unet_config.get('sample_size', 64)),
      latent_channels=int(folder.unet_config.get('in_channels', 4)), path=folder.path,
      scheduler_notes=tuple(notes))


def arm_guidance(arm: str, num_steps: int, **overrides) -> tuple[sampler_lib.Guidance | None,
                                                                 float]:
  """(Guidance, step-size scale) of an arm with its paper's defaults (module docstring).

  `num_steps` is the number of model calls (the scheduler's `timesteps`);
  guidance runs in the first half, as A&E's 25 of 50. `overrides` replace
  Guidance fields (e.g. `num_guided_steps`, `refine_steps`).
  """
  if arm not in ARMS:
    raise ValueError(f'unknown arm {arm!r}; available: {ARMS}')
  if arm == 'baseline':
    if overrides:
      raise ValueError(f'the baseline arm has no guidance settings, got {sorted(overrides)}')
    return None, 0.0
  overrides = dict(overrides)
  guided = overrides.pop('num_guided_steps', max(1, num_steps // 2))
  if arm == 'attend_excite':
    return sampler_lib.Guidance.attend_excite(guided, **overrides), AE_STEP_SCALE
  shared = dict(num_guided_steps=guided, resolution=16, softmax_scale=100.0, smooth_sigma=0.5,
                smooth_kernel='attend_excite', softmax_tokens='sequence')
  loss = 'astar' if arm == 'astar' else 'divide_bind'
  return sampler_lib.Guidance(loss, **dict(shared, **overrides)), AE_STEP_SCALE


def concept_positions(tokenizer, prompts: Sequence[str], concepts: Sequence[Sequence[str]], *,
                      multi_token: str = 'error') -> np.ndarray:
  """[n, M] token positions of each prompt's concept words (a repeat takes the next occurrence).

  Raises ValueError naming the prompt and its tokens when a word is not in it,
  and, with `multi_token='error'`, when the tokenizer splits a word into
  several tokens (naming them); `multi_token='last'` takes the last piece.
  """
  if multi_token not in ('error', 'last'):
    raise ValueError(f"multi_token must be 'error' or 'last', got {multi_token!r}")
  if len(concepts) != len(prompts):
    raise ValueError(f'{len(concepts)} concept lists for {len(prompts)} prompts')
  counts = {len(c) for c in concepts}
  if len(counts) != 1 or 0 in counts:
    raise ValueError(f'every prompt needs the same number (>= 1) of concept words, got '
                     f'{[len(c) for c in concepts]}; batch prompts with equal counts together')
  out = np.zeros((len(prompts), counts.pop()), np.int32)
  for b, (prompt, words) in enumerate(zip(prompts, concepts)):
    taken: dict[str, int] = {}
    for m, word in enumerate(words):
      occurrences = tokenizer.word_positions(prompt, word)
      listing = ', '.join(f'{p}:{t}' for p, t in enumerate(tokenizer.tokens(prompt)))
      k = taken.get(word, 0)
      if k >= len(occurrences):
        raise ValueError(f'concept {word!r} is not a word of prompt {b} ({prompt!r})'
                         + (f' {k + 1} times' if k else '')
                         + f'; its tokens (position:token) are [{listing}]')
      pieces = list(occurrences[k])
      if len(pieces) > 1 and multi_token == 'error':
        names = [tokenizer.tokens(prompt)[p] for p in pieces]
        raise ValueError(f'concept {word!r} of prompt {b} is split into {len(pieces)} tokens '
                         f'{names} at positions {pieces}; the papers guide one token per subject. '
                         "Pass multi_token='last' to guide its last piece (CLIP's encoder is "
                         'causal: only that one has seen the whole word), or token indices. Its '
                         f'tokens (position:token) are [{listing}]')
      out[b, m] = pieces[-1]
      taken[word] = k + 1
  return out


@flax.struct.dataclass
class SDSamples:
  """What `SDSampler` returns.

  Attributes:
    latents: [b, H, W, C] final SD latents (scaled, as the UNet sees them).
    images: [b, 8H, 8W, 3] decoded images in about [-1, 1] (None without decode).
    loss: [num_steps, b] guidance losses (None for the baseline).
    maps: [b, 16, 16, M] the concept maps at the last guided step (None for the baseline).
    token_indices: [b, M] the guided positions (None for the baseline).
  """
  latents: jax.Array
  images: jax.Array | None = None
  loss: jax.Array | None = None
  maps: jax.Array | None = None
  token_indices: np.ndarray | None = None


def initial_latents(seeds: Sequence[int], size: int, channels: int) -> np.ndarray:
  """[n, size, size, channels] float32 z_T, one N(0, 1) draw per seed (numpy PCG64)."""
  return np.stack([np.random.default_rng(int(s)).standard_normal((size, size, channels))
                   .astype(np.float32) for s in seeds])


@dataclasses.dataclass(frozen=True, eq=False)
class SDSampler:
  """Samples one arm on a Stable Diffusion model (`make_sd_sampler`); one compile per shape."""
  sd: StableDiffusion
  arm: str
  sampler: sampler_lib.Sampler
  guidance: sampler_lib.Guidance | None
  step_scale: float
  decode_fn: Any

  @property
  def num_steps(self) -> int:
    return self.sampler.num_steps

  def batch(self, prompts: Sequence[str], *, concepts=None, token_indices=None, seeds=None,
            latents=None, multi_token: str = 'error') -> dict[str, np.ndarray]:
    """The host batch: token ids, text mask, concept positions, z_T (see `__call__`)."""
    tok = self.sd.tokenizer
    ids = np.asarray(tok.encode(list(prompts)), np.int32)  # raises on a too-long prompt
    if (seeds is None) == (latents is None):
      raise ValueError('give exactly one of seeds (one per prompt) or latents [n, H, W, C]')
    if latents is None:
      latents = initial_latents(seeds, self.sd.latent_size, self.sd.latent_channels)
    latents = np.asarray(latents, np.float32)
    if len(latents) != len(ids):
      raise ValueError(f'{len(latents)} initial latents (seeds) for {len(ids)} prompts; repeat '
                       'the prompts to sample several seeds of one prompt')
    batch = {'noise': latents, 'tokens': ids}
    if self.guidance is None:
      return batch
    if (concepts is None) == (token_indices is None):
      raise ValueError(f'the {self.arm} arm needs exactly one of concepts (words per prompt) '
                       'or token_indices [n, M]')
    if token_indices is None:
      token_indices = concept_positions(tok, prompts, concepts, multi_token=multi_token)
    batch['text_mask'] = tokens_lib.text_mask(ids, start_id=tok.start_id, end_id=tok.end_id)
    batch['token_indices'] = np.asarray(token_indices, np.int32)
    return batch

  def __call__(self, prompts: Sequence[str], *, concepts: Sequence[Sequence[str]] | None = None,
               token_indices=None, seeds: Sequence[int] | None = None, latents=None,
               cfg_scale: float = 7.5, step_scale: float | None = None, step_sizes=None,
               decode: bool = True, multi_token: str = 'error') -> SDSamples:
    """Samples `prompts` (one per seed) with this arm.

    Args:
      prompts: n prompts (repeat a prompt for several seeds).
      concepts: per prompt, the M words to guide (or `token_indices` [n, M]).
      seeds: n seeds for z_T (`initial_latents`), or `latents` [n, H, W, C].
      cfg_scale: classifier-free guidance weight (7.5 in the papers).
      step_scale: α scale (default: the arm's, 20); or `step_sizes` [num_steps].
      decode: also decode the latents with the VAE.
      multi_token: 'error' or 'last' (module docstring).
    Host-side; the sampling itself is one compiled scan per batch shape,
    sharded over the mesh's `data` axis.
    """
    batch = self.batch(prompts, concepts=concepts, token_indices=token_indices, seeds=seeds,
                       latents=latents, multi_token=multi_token)
    if self.guidance is not None and step_sizes is None:
      scale = self.step_scale if step_scale is None else step_scale
      step_sizes = sampler_lib.step_size_schedule(scale, self.num_steps)
    out = self.sampler(self.sd.params, batch, cfg_scale=cfg_scale, step_sizes=step_sizes)
    images = self.decode_fn(self.sd.params, out.images) if decode else None
    return SDSamples(out.images, images, out.loss, out.maps, batch.get('token_indices'))


def available_map_resolutions(sd: StableDiffusion, latent_size: int | None = None,
                              attention: attention_lib.AttentionSource = CROSS_ATTENTION
                              ) -> dict[int, int]:
  """{resolution: cross-attention layer calls} of the UNet at this latent size (abstract eval)."""
  size = sd.latent_size if latent_size is None else latent_size
  model_fn = attention_lib.apply_with_attention(sd.apply_unet, attention)
  ids = jnp.asarray(sd.tokenizer.encode(['']), jnp.int32)

  def run(params):
    context = sd.encode_text(params, ids)
    return model_fn(params, jnp.zeros((1, size, size, sd.latent_channels)),
                    jnp.zeros((1,), jnp.int32), context)[1]
  records = jax.eval_shape(run, sd.params)
  return maps_lib.available_resolutions(records)


def make_sd_sampler(sd: StableDiffusion, arm: str = 'baseline', *, num_steps: int = 50,
                    scheduler: schedulers_lib.Scheduler | None = None,
                    guidance: sampler_lib.Guidance | None = None, mesh: Mesh | None = None,
                    attention: attention_lib.AttentionSource = CROSS_ATTENTION,
                    **guidance_overrides) -> SDSampler:
  """An `SDSampler` for one arm.

  Args:
    sd: `load_stable_diffusion(...)`.
    arm: one of `ARMS`.
    num_steps: inference steps N of the folder's scheduler (ignored with `scheduler`).
    scheduler: another scheduler, e.g. `schedulers.scheduler_from_config(config, N)` with a
      config of DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler or
      DPMSolverMultistepScheduler (`dict(sd.scheduler_config, _class_name=...)` keeps the
      folder's training schedule).
    guidance: full Guidance settings instead of the arm's defaults.
    mesh: batches are sharded over its `data` axis (None: all local devices).
    attention: the UNet's cross-attention probabilities (its 'attn2' layers).
    **guidance_overrides: Guidance fields replacing the arm's defaults.
  Raises ValueError when the guidance's map resolution is not one the UNet
  produces at this latent size, listing the available ones.
  """
  scheduler = sd.scheduler(num_steps) if scheduler is None else scheduler
  calls = len(scheduler.timesteps)
  if guidance is None:
    guidance, scale = arm_guidance(arm, calls, **guidance_overrides)
  else:
    scale = AE_STEP_SCALE
  if arm == 'baseline' and guidance is not None:
    raise ValueError("the baseline arm takes no guidance; pick arm='attend_excite', 'astar' or "
                     "'divide_bind'")
  if guidance is not None:
    available = available_map_resolutions(sd, attention=attention)
    if guidance.resolution not in available:
      raise ValueError(f'the UNet makes no cross-attention maps at {guidance.resolution}x'
                       f'{guidance.resolution} for {sd.latent_size}x{sd.latent_size} latents; '
                       f'available resolutions (res: layer calls): {available}. Set the '
                       'Guidance resolution to one of them.')
  tok = sd.tokenizer
  null = np.asarray(tok.encode(['']), np.int32)[0]
  sampler = sampler_lib.make_sampler(
      sd.apply_unet, scheduler, null_tokens=null, guidance=guidance, attention=attention,
      mesh=mesh, vocab=_vocab_list(tok), encode_fn=sd.encode_text)
  return SDSampler(sd=sd, arm=arm, sampler=sampler, guidance=guidance, step_scale=scale,
                   decode_fn=jax.jit(sd.decode))


def _vocab_list(tokenizer) -> list[str]:
  """id -> token string, for naming a prompt's tokens in errors."""
  vocab = tokenizer.vocab
  if isinstance(vocab, Mapping):
    out = [''] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
      out[i] = token
    return out
  return list(vocab)


__all__ = ['ARMS', 'CROSS_ATTENTION', 'SDSampler', 'SDSamples', 'StableDiffusion', 'arm_guidance',
           'available_map_resolutions', 'concept_positions', 'initial_latents',
           'load_stable_diffusion', 'make_sd_sampler']
