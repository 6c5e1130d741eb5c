"""Do a model's cross-attention maps mark where the prompt's objects are?

Attention guidance rests on this: Attend-and-Excite (Chefer et al. 2023,
sec. 3 and fig. 2) and A-STAR (Agarwal et al. ICCV 2023, sec. 3) read a
concept token's cross-attention map as the region of its object, and move
z_t so that every concept gets its own region. `map_localization` measures the
premise on ground-truth scenes: noise the renders to timestep t with
q(x_t | x_0), run the model once with the true caption, and correlate each
object's colour-token and noun-token map (heads x layers mean at one
resolution, before any re-normalization) with that object's pixel mask pooled
to the map resolution (Pearson, per object, mean over scenes).

One compiled function (params an argument, t traced) serves every model of
the same architecture and every timestep.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lossland import parallel
from lossland.data import shapes
from lossland.guidance import attention as attention_lib
from lossland.guidance import diffusion
from lossland.guidance import maps as maps_lib
from lossland.guidance import tokens as tokens_lib


def object_masks(images: np.ndarray, objects: np.ndarray, resolution: int) -> np.ndarray:
  """[n, 2, res, res]: the fraction of each map cell covered by object m's palette colour.

  Args:
    images: uint8 [n, H, W, 3] ground-truth renders of two-object scenes.
    objects: int [n, 2, 2] (colour id, shape id) per object, as in
      `shapes.render_dataset` (colours of the two objects differ).
    resolution: the map side; H must be a multiple of it.
  """
  n, h, w, _ = images.shape
  if h % resolution or w % resolution:
    raise ValueError(f'image size {h}x{w} is not a multiple of the map resolution {resolution}')
  if (objects[:, 1, 0] < 0).any():
    raise ValueError('object_masks needs two-object scenes; got single-object rows '
                     f'{np.flatnonzero(objects[:, 1, 0] < 0)[:5].tolist()}')
  palette = np.asarray([shapes.COLORS[c] for c in shapes.COLOR_NAMES])  # [colours, 3]
  colour = palette[objects[:, :, 0]]  # [n, 2, 3]
  hit = np.all(images[:, None].astype(np.int32) == colour[:, :, None, None], axis=-1)
  return hit.reshape(n, 2, resolution, h // resolution, resolution, w // resolution).mean((3, 5))


def pearson(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Per-row Pearson correlation of [..., res, res] maps and masks (NaN for a constant row)."""
  a = maps.reshape(*maps.shape[:-2], -1)
  b = masks.reshape(*masks.shape[:-2], -1)
  a = a - a.mean(-1, keepdims=True)
  b = b - b.mean(-1, keepdims=True)
  denom = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(denom > 0, (a * b).sum(-1) / denom, np.nan)


@dataclasses.dataclass(frozen=True)
class Localization:
  """Map-mask correlations per timestep t (each a mean over objects and scenes).

  Attributes:
    colour: {t: Pearson r of the colour tokens' maps with their objects' masks}.
    noun: {t: the same for the shape-noun tokens}.
    start_token_mass: {t: mean attention probability on the start token}.
  """
  colour: dict[int, float]
  noun: dict[int, float]
  start_token_mass: dict[int, float]

  def as_dict(self) -> dict:
    """{'t<t>': {'colour': r, 'noun': r}, ..., 'start_token_mass': {'t<t>': mass}} (JSON)."""
    out: dict = {'start_token_mass': {f't{t}': m for t, m in self.start_token_mass.items()}}
    out.update({f't{t}': {'colour': self.colour[t], 'noun': self.noun[t]} for t in self.colour})
    return out


@functools.partial(jax.jit, static_argnames=('model_fn', 'resolution'))
def _noised_attention(params, schedule, x0, tokens, t, key, *, model_fn, resolution):
  """Heads x layers mean maps [n, res, res, T] of the renders noised to timestep t."""
  noise = jax.random.normal(key, x0.shape)
  ts = jnp.full((x0.shape[0],), t)
  xt = diffusion.q_sample(schedule, x0, ts, noise)
  _, records = model_fn(params, xt, ts, tokens)
  return maps_lib.average_maps(records, resolution)


@functools.lru_cache(maxsize=32)
def _model_fn(apply_fn, source, kwargs_items):
  return attention_lib.apply_with_attention(apply_fn, source, dict(kwargs_items))


def map_localization(apply_fn: Callable, params, schedule: diffusion.Schedule, scenes: dict, *,
                     timesteps: Sequence[int], resolution: int, rng: jax.Array,
                     attention: attention_lib.AttentionSource = attention_lib.AttentionSource(),
                     apply_kwargs: Mapping[str, Any] | None = None,
                     mesh: Mesh | None = None) -> Localization:
  """Mean map-mask correlation of the colour and noun tokens at each timestep.

  Args:
    apply_fn: `(params, x, t, tokens, **apply_kwargs) -> ε` (e.g. `model.apply`); its
      cross-attention probabilities are read as `attention` says.
    params: the model's variables (an argument of the compiled function: one
      trace serves every params of the same shapes).
    schedule: the diffusion schedule.
    scenes: two-object ground truth, as from `shapes.render_dataset(n, seed,
      two_object_fraction=1.0)`: 'image' uint8, 'tokens', 'objects'.
    timesteps: the t at which the renders are noised.
    resolution: the map resolution.
    rng: timestep t noises with `fold_in(rng, t)`.
    apply_kwargs: keyword arguments of `apply_fn` (hashable values).
    mesh: the scenes are sharded over its `data` axis; None uses all local
      devices (the number of scenes must divide by their number).
  """
  images = np.asarray(scenes['image'])
  objects = np.asarray(scenes['objects'])
  tokens = np.asarray(scenes['tokens'])
  vocab = shapes.VOCAB
  words = lambda part: [[shapes.COLOR_NAMES[o[m, 0]] if part == 'colour'
                         else shapes.SHAPES[o[m, 1]] for m in range(2)] for o in objects]
  positions = {part: tokens_lib.concept_indices(tokens, words(part), vocab)
               for part in ('colour', 'noun')}
  masks = object_masks(images, objects, resolution)
  mesh = parallel.data_mesh(mesh)
  device = parallel.shard_batch({'x0': images.astype(np.float32) / 127.5 - 1.0,
                                 'tokens': tokens}, mesh)
  model_fn = _model_fn(apply_fn, attention, tuple(sorted((apply_kwargs or {}).items())))

  out = {'colour': {}, 'noun': {}, 'start_token_mass': {}}
  rows = np.arange(len(images))[:, None]
  for t in timesteps:
    attn = np.asarray(parallel.settle(_noised_attention(
        params, schedule, device['x0'], device['tokens'], jnp.int32(t),
        jax.random.fold_in(rng, t), model_fn=model_fn, resolution=resolution)))
    for part, pos in positions.items():
      maps = attn.transpose(0, 3, 1, 2)[rows, pos]  # [n, 2, res, res]
      out[part][int(t)] = float(np.nanmean(pearson(maps, masks)))
    out['start_token_mass'][int(t)] = float(attn[..., 0].mean())
  return Localization(**out)
