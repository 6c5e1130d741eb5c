"""A local diffusers Stable Diffusion folder in: its components as linen modules and params.

The layout is diffusers' `StableDiffusionPipeline.save_pretrained` (SD 1.x and
2.x): `model_index.json` and the subfolders

  unet/          config.json + diffusion_pytorch_model[.fp16].safetensors
  text_encoder/  config.json + model[.fp16].safetensors (transformers' CLIPTextModel)
  vae/           config.json + diffusion_pytorch_model[.fp16].safetensors
  tokenizer/     vocab.json + merges.txt (CLIP BPE; transformers 4.x), or tokenizer.json
                 (transformers 5's save_pretrained writes only tokenizer.json and
                 tokenizer_config.json)
  scheduler/     scheduler_config.json

`check_folder` lists, in one error, every missing component or file together
with what the folder has; `load_folder` reads each component with its own
loader (`diffusers_unet.load_unet`, `diffusers_text.load_text_encoder`,
`diffusers_vae.load_vae`, `clip_tokenizer.load_clip_tokenizer`) and casts the
parameters to `dtype` (float16 checkpoints compute in float32 by default).
The scheduler stays a config dict here (`lossland.guidance.schedulers` builds
samplers from it). Nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

COMPONENTS = ('unet', 'text_encoder', 'vae', 'tokenizer', 'scheduler')
_CONFIG = {'unet': 'config.json', 'text_encoder': 'config.json', 'vae': 'config.json',
           'scheduler': 'scheduler_config.json'}
_WEIGHTS = ('unet', 'text_encoder', 'vae')
DEFAULT_VAE_SCALING = 0.18215  # diffusers' AutoencoderKL default (SD 1.x and 2.x)


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusersFolder:
  """The components of a Stable Diffusion folder.

  Attributes:
    path: the folder.
    unet, text_encoder, vae: linen modules (`SDUNet`, `ClipTextEncoder`, `SDVAE`).
    params: {'unet', 'text_encoder', 'vae'} -> their variables.
    tokenizer: the CLIP tokenizer (`clip_tokenizer.ClipTokenizer`).
    scheduler_config: scheduler/scheduler_config.json as a dict.
    vae_scaling_factor: latents = scaling_factor * VAE latents (vae/config.json).
    unet_config: unet/config.json (sample_size, in_channels, ...).
  """
  path: str
  unet: nn.Module
  text_encoder: nn.Module
  vae: nn.Module
  params: dict[str, Any]
  tokenizer: Any
  scheduler_config: dict[str, Any]
  vae_scaling_factor: float
  unet_config: dict[str, Any]


def _listing(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    return []
  return sorted(f + ('/' if os.path.isdir(os.path.join(folder, f)) else '')
                for f in os.listdir(folder))


def check_folder(path: str | os.PathLike, components: tuple[str, ...] = COMPONENTS) -> None:
  """Raises one ValueError naming every missing component or file and what the folder has."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ValueError(f'{path!r} is not a folder; a Stable Diffusion folder (diffusers layout) has '
                     f'{[c + "/" for c in COMPONENTS]}')
  missing = []
  for name in components:
    sub = os.path.join(path, name)
    if not os.path.isdir(sub):
      missing.append(f'{name}/')
      continue
    files = os.listdir(sub)
    if name == 'tokenizer':  # either layout (`clip_tokenizer` module docstring)
      has_bpe = 'tokenizer.json' in files or {'vocab.json', 'merges.txt'} <= set(files)
      lacks = [] if has_bpe else ['tokenizer.json or vocab.json + merges.txt']
    else:
      lacks = [f for f in [_CONFIG[name]] if f not in files]
    if name in _WEIGHTS and not any(f.endswith('.safetensors') for f in files):
      lacks.append('*.safetensors')
    missing += [f'{name}/{f}' for f in lacks]
  if missing:
    have = {c: _listing(os.path.join(path, c)) for c in components
            if os.path.isdir(os.path.join(path, c))}
    raise ValueError(f'the Stable Diffusion folder {path!r} lacks {missing}. It has '
                     f'{_listing(path)}' + ''.join(f'; {c}/ has {v}' for c, v in have.items())
                     + f'. Needed: {[c + "/" for c in components]} as diffusers\' '
                     'save_pretrained writes them (unet/, text_encoder/ and vae/ with config.json '
                     'and safetensors weights; tokenizer/ with vocab.json + merges.txt, as '
                     "transformers 4.x writes them, or tokenizer.json, as transformers 5's "
                     'save_pretrained writes it with tokenizer_config.json; scheduler/ with '
                     'scheduler_config.json)')


def _cast(params, dtype):
  return jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(
      jnp.asarray(x).dtype, jnp.floating) else x, params)


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def load_folder(path: str | os.PathLike, dtype=jnp.float32) -> DiffusersFolder:
  """Every component of a Stable Diffusion folder, parameters in `dtype` (`check_folder` first)."""
  from lossland.interop import clip_tokenizer, diffusers_text, diffusers_unet, diffusers_vae
  path = os.fspath(path)
  check_folder(path)
  unet, unet_params = diffusers_unet.load_unet(os.path.join(path, 'unet'))
  text, text_params = diffusers_text.load_text_encoder(os.path.join(path, 'text_encoder'))
  vae, vae_params = diffusers_vae.load_vae(os.path.join(path, 'vae'))
  tokenizer = clip_tokenizer.load_clip_tokenizer(os.path.join(path, 'tokenizer'))
  vae_config = _read_json(os.path.join(path, 'vae', 'config.json'))
  params = {'unet': _cast(unet_params, dtype), 'text_encoder': _cast(text_params, dtype),
            'vae': _cast(vae_params, dtype)}
  return DiffusersFolder(
      path=path, unet=unet, text_encoder=text, vae=vae, params=params, tokenizer=tokenizer,
      scheduler_config=_read_json(os.path.join(path, 'scheduler', 'scheduler_config.json')),
      vae_scaling_factor=float(vae_config.get('scaling_factor', DEFAULT_VAE_SCALING)),
      unet_config=_read_json(os.path.join(path, 'unet', 'config.json')))
