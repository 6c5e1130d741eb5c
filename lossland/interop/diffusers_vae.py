"""A diffusers `vae/` folder (AutoencoderKL, SD 1.x/2.x) in: `SDVAE` and its params.

`config_from_diffusers` reads config.json into `SDVAEConfig` and raises one
ValueError naming every field whose value lossland's VAE does not implement
(another class, block types other than DownEncoderBlock2D / UpDecoderBlock2D,
an activation other than silu, the latent statistics `latents_mean` /
`latents_std` / `shift_factor` of later models). `scaling_factor` and
`force_upcast` are the caller's (`lossland.interop.diffusers`). `load_vae`
reads the safetensors weights (float32, float16 or bfloat16;
`diffusion_pytorch_model[.fp16].safetensors`) by name (`diffusers_tensors`).
VAEs saved before diffusers 0.14 name the mid-block attention's projections
`query`, `key`, `value` and `proj_attn`; they are read as `to_q`, `to_k`, `to_v`
and `to_out.0`, the renaming diffusers' `ModelMixin._fix_state_dict_keys_on_load`
does for these `_from_deprecated_attn_block` layers (`rename_deprecated_attention`).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lossland.interop import diffusers_config, diffusers_tensors
from lossland.models.sd_vae import SDVAE, SDVAEConfig

DOWN, UP = 'DownEncoderBlock2D', 'UpDecoderBlock2D'
_NONE = (None,)


def _all(kind):
  return lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(b == kind for b in v)


SUPPORTED = {
    '_class_name': ('AutoencoderKL',),
    'act_fn': ('silu',),
    'down_block_types': _all(DOWN),
    'up_block_types': _all(UP),
    'latents_mean': _NONE, 'latents_std': _NONE, 'shift_factor': _NONE,
    'layers_per_block': lambda v: isinstance(v, int) and v >= 1,
}
WEIGHTS_STEM = 'diffusion_pytorch_model'
_DEPRECATED = re.compile(r'^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.'
                         r'(query|key|value|proj_attn)\.(weight|bias)$')
_RENAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def rename_deprecated_attention(state: Mapping[str, Any]) -> dict[str, Any]:
  """The state dict with the mid-block attention's old names (`query`, `key`, `value`,
  `proj_attn`) as diffusers renames them on load (`to_q`, `to_k`, `to_v`, `to_out.0`; an old
  name replaces a new one, as in diffusers); other tensors unchanged."""
  out = {k: v for k, v in state.items() if not _DEPRECATED.match(k)}
  for key, value in state.items():
    m = _DEPRECATED.match(key)
    if m:
      out[f'{m.group(1)}.{_RENAMES[m.group(2)]}.{m.group(3)}'] = value
  return out


def config_from_diffusers(config: Mapping[str, Any]) -> SDVAEConfig:
  """`SDVAEConfig` of a diffusers AutoencoderKL config dict (checked: module docstring)."""
  diffusers_config.check_fields(config, SUPPORTED, 'the VAE (vae/config.json)')
  channels = tuple(int(c) for c in config.get('block_out_channels', (64,)))
  for key, default in (('down_block_types', (DOWN,)), ('up_block_types', (UP,))):
    if len(config.get(key, default)) != len(channels):
      raise ValueError(f'the VAE config has {len(config.get(key, default))} {key} for '
                       f'{len(channels)} block_out_channels')
  return SDVAEConfig(
      in_channels=int(config.get('in_channels', 3)),
      out_channels=int(config.get('out_channels', 3)),
      latent_channels=int(config.get('latent_channels', 4)),
      block_out_channels=channels,
      layers_per_block=int(config.get('layers_per_block', 1)),
      norm_num_groups=int(config.get('norm_num_groups', 32)),
      act_fn=config.get('act_fn', 'silu'),
      mid_block_add_attention=bool(config.get('mid_block_add_attention', True)),
      use_quant_conv=bool(config.get('use_quant_conv', True)),
      use_post_quant_conv=bool(config.get('use_post_quant_conv', True)))


def param_shapes(vae: SDVAE) -> Any:
  """The VAE's params tree as ShapeDtypeStructs (abstract init at the smallest image size)."""
  c = vae.config
  size = c.downsample_factor
  x = jax.ShapeDtypeStruct((1, size, size, c.in_channels), jnp.float32)
  return jax.eval_shape(vae.init, jax.random.key(0), x)['params']


def load_vae(folder: str | os.PathLike, dtype=jnp.float32) -> tuple[SDVAE, dict[str, Any]]:
  """(SDVAE computing in `dtype`, {'params': float32 arrays}) of a diffusers vae/ folder."""
  folder = os.fspath(folder)
  with open(os.path.join(folder, 'config.json')) as f:
    vae = SDVAE(config_from_diffusers(json.load(f)), dtype=dtype)
  state = rename_deprecated_attention(diffusers_tensors.read_state_dict(
      diffusers_tensors.weights_file(folder, WEIGHTS_STEM)))
  params = diffusers_tensors.params_from_state_dict(param_shapes(vae), state, what='VAE')
  return vae, {'params': jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32)), params)}
