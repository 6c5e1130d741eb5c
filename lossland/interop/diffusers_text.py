"""A Stable Diffusion `text_encoder/` folder (transformers' CLIPTextModel) as a `ClipTextEncoder`.

The folder holds `config.json` (a `CLIPTextConfig`) and `model.safetensors`
(or diffusers' `model.fp16.safetensors`). Every config field that changes the
architecture is checked first (`diffusers_config.check_fields`); the state
dict's tensors then fill the params tree by name
(`diffusers_tensors.params_from_state_dict`): `text_model.*` as transformers
4.x saves them (every SD release), or without that prefix as transformers 5.x
does; the `position_ids` buffer is skipped. Params come back float32 whatever the checkpoint stores.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from lossland.interop import diffusers_config, diffusers_tensors
from lossland.models.clip_text import ACTIVATIONS, ClipTextConfig, ClipTextEncoder

SUPPORTED = {
    'model_type': ('clip_text_model',),
    'architectures': lambda v: v is None or list(v) == ['CLIPTextModel'],  # not ...WithProjection
    'hidden_act': ('quick_gelu',) + tuple(a for a in ACTIVATIONS if a != 'quick_gelu'),
}


def text_config(config: dict[str, Any]) -> ClipTextConfig:
  """The `ClipTextConfig` of a transformers CLIPTextConfig dict (checked; defaults for the rest)."""
  diffusers_config.check_fields(config, SUPPORTED, 'text encoder (CLIPTextModel)')
  fields = {f.name for f in dataclasses.fields(ClipTextConfig)}
  return ClipTextConfig(**{k: v for k, v in config.items() if k in fields})


def load_text_encoder(folder: str | os.PathLike) -> tuple[ClipTextEncoder, dict[str, Any]]:
  """(`ClipTextEncoder`, {'params': float32 params}) of a text_encoder folder."""
  folder = os.fspath(folder)
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'the text encoder folder {folder!r} has no config.json')
  with open(path) as f:
    config = text_config(json.load(f))
  module = ClipTextEncoder(config)
  ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), ids)['params']
  state = diffusers_tensors.read_state_dict(diffusers_tensors.weights_file(folder, 'model'))
  # transformers 4.x saves CLIPTextModel's tensors as text_model.*, 5.x without the prefix.
  prefix = 'text_model.' if any(k.startswith('text_model.') for k in state) else ''
  params = diffusers_tensors.params_from_state_dict(
      shapes, state, prefix=prefix, ignore=[r'position_ids$'], what='text encoder')
  return module, {'params': jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)}
