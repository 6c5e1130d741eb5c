"""Saving and loading a trained `TextUNet`: `params.msgpack` + `model.json` in one folder.

`params.msgpack` is the flax serialization of the (EMA) params; `model.json`
holds the `lossland.models.TextUNet` constructor arguments. The committed
checkpoints `lossland/guidance/assets/shapes_unet{,_3k}` have this layout.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from lossland.data import shapes
from lossland.models import TextUNet

PARAMS_FILE = 'params.msgpack'
MODEL_FILE = 'model.json'


class Trained(NamedTuple):
  """A loaded checkpoint; unpacks as `model, params = load_trained(folder)`."""
  model: TextUNet
  params: Any


def model_kwargs(model_config: Mapping[str, Any]) -> dict:
  """`TextUNet` arguments for the shapes32 vocabulary from a `config.model` block.

  Keys: channels, attention_resolutions, text_width, text_layers, text_heads,
  num_heads.
  """
  m = model_config
  return dict(vocab_size=len(shapes.VOCAB), channels=tuple(m['channels']),
              attention_resolutions=tuple(m['attention_resolutions']),
              text_width=m['text_width'], text_layers=m['text_layers'],
              text_heads=m['text_heads'], num_heads=m['num_heads'],
              pad_id=shapes.VOCAB.index(shapes.PAD))


def has_trained(directory: str) -> bool:
  """Whether `directory` holds both checkpoint files."""
  return all(os.path.exists(os.path.join(directory, n)) for n in (PARAMS_FILE, MODEL_FILE))


def save_trained(directory: str, params, kwargs: Mapping[str, Any]) -> None:
  """Writes `params` (host copy) and the `TextUNet` arguments `kwargs` into `directory`."""
  with open(os.path.join(directory, PARAMS_FILE), 'wb') as f:
    f.write(flax.serialization.to_bytes(jax.device_get(params)))
  with open(os.path.join(directory, MODEL_FILE), 'w') as f:
    json.dump({k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}, f)


def load_trained(directory: str) -> Trained:
  """(model, params) from a folder holding `params.msgpack` and `model.json`."""
  missing = [n for n in (PARAMS_FILE, MODEL_FILE)
             if not os.path.exists(os.path.join(directory, n))]
  if missing:
    raise ValueError(f'{directory!r} is not a TextUNet checkpoint: it lacks {missing} (a '
                     f'checkpoint folder holds {PARAMS_FILE} and {MODEL_FILE}, as written by '
                     'save_trained)')
  with open(os.path.join(directory, MODEL_FILE)) as f:
    kwargs = json.load(f)
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  model = TextUNet(**kwargs)
  template = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)),
      jnp.zeros((1,)), jnp.zeros((1, shapes.MAX_TOKENS), jnp.int32)))
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
  with open(os.path.join(directory, PARAMS_FILE), 'rb') as f:
    params = flax.serialization.from_bytes(template, f.read())
  return Trained(model, params)
