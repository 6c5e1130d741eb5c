"""A diffusers `unet/` folder (UNet2DConditionModel, SD 1.x/2.x) in: `SDUNet` and its params.

`config_from_diffusers` reads config.json into `SDUNetConfig` and raises one
ValueError naming every field whose value lossland's UNet does not implement
(class or addition embeddings, other block types, dual or cross-only
attention, ...). `load_unet` reads the safetensors weights (float32 or
float16; `diffusion_pytorch_model[.fp16].safetensors`) by name
(`diffusers_tensors`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lossland.interop import diffusers_config, diffusers_tensors
from lossland.models.sd_unet import (CROSS_DOWN, CROSS_UP, PLAIN_DOWN, PLAIN_UP, SDUNet,
                                     SDUNetConfig)

_NONE = (None,)
SUPPORTED = {
    '_class_name': ('UNet2DConditionModel',),
    'act_fn': ('silu',),
    'down_block_types': lambda v: all(b in (CROSS_DOWN, PLAIN_DOWN) for b in v),
    'up_block_types': lambda v: all(b in (CROSS_UP, PLAIN_UP) for b in v),
    'mid_block_type': ('UNetMidBlock2DCrossAttn',),
    'num_attention_heads': _NONE,  # diffusers itself refuses it for this class
    'cross_attention_dim': lambda v: isinstance(v, int),
    'addition_embed_type': _NONE, 'class_embed_type': _NONE, 'num_class_embeds': _NONE,
    'encoder_hid_dim': _NONE, 'encoder_hid_dim_type': _NONE, 'time_cond_proj_dim': _NONE,
    'time_embedding_type': ('positional',), 'time_embedding_dim': _NONE,
    'time_embedding_act_fn': _NONE, 'timestep_post_act': _NONE,
    'resnet_time_scale_shift': ('default',), 'resnet_skip_time_act': (False,),
    'resnet_out_scale_factor': (1.0,), 'conv_in_kernel': (3,), 'conv_out_kernel': (3,),
    'center_input_sample': (False,), 'dual_cross_attention': (False,),
    'only_cross_attention': lambda v: not any(v) if isinstance(v, (list, tuple)) else not v,
    'cross_attention_norm': _NONE, 'attention_type': ('default',),
    'mid_block_only_cross_attention': (None, False), 'class_embeddings_concat': (False,),
    'reverse_transformer_layers_per_block': _NONE, 'addition_time_embed_dim': _NONE,
    'projection_class_embeddings_input_dim': _NONE,
}
WEIGHTS_STEM = 'diffusion_pytorch_model'


def config_from_diffusers(config: Mapping[str, Any]) -> SDUNetConfig:
  """`SDUNetConfig` of a diffusers UNet2DConditionModel config dict (checked: module docstring)."""
  diffusers_config.check_fields(config, SUPPORTED, 'the UNet (unet/config.json)')
  blocks = len(config['block_out_channels'])
  per_block = lambda key, default: diffusers_config.per_block(config.get(key, default), blocks, key)
  if config.get('mid_block_type', 'UNetMidBlock2DCrossAttn') is None:
    raise ValueError('the UNet config has mid_block_type=None; lossland implements '
                     'UNetMidBlock2DCrossAttn')
  return SDUNetConfig(
      in_channels=int(config.get('in_channels', 4)),
      out_channels=int(config.get('out_channels', 4)),
      block_out_channels=tuple(config['block_out_channels']),
      down_block_types=tuple(config['down_block_types']),
      up_block_types=tuple(config['up_block_types']),
      layers_per_block=per_block('layers_per_block', 2),
      transformer_layers_per_block=per_block('transformer_layers_per_block', 1),
      heads=per_block('attention_head_dim', 8),
      cross_attention_dim=int(config.get('cross_attention_dim', 1280)),
      norm_num_groups=int(config.get('norm_num_groups', 32)),
      norm_eps=float(config.get('norm_eps', 1e-5)),
      use_linear_projection=bool(config.get('use_linear_projection', False)),
      flip_sin_to_cos=bool(config.get('flip_sin_to_cos', True)),
      freq_shift=float(config.get('freq_shift', 0)),
      downsample_padding=int(config.get('downsample_padding', 1)),
      mid_block_scale_factor=float(config.get('mid_block_scale_factor', 1.0)),
      sample_size=int(config.get('sample_size', 64)))


def param_shapes(unet: SDUNet) -> Any:
  """The UNet's params tree as ShapeDtypeStructs (abstract init at a small latent size)."""
  c = unet.config
  size = 2 ** (len(c.block_out_channels) - 1)
  x = jax.ShapeDtypeStruct((1, size, size, c.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  ctx = jax.ShapeDtypeStruct((1, 1, c.cross_attention_dim), jnp.float32)
  return jax.eval_shape(unet.init, jax.random.key(0), x, t, ctx)['params']


def load_unet(folder: str | os.PathLike, dtype=jnp.float32) -> tuple[SDUNet, dict[str, Any]]:
  """(SDUNet computing in `dtype`, {'params': float32 arrays}) of a diffusers unet/ folder."""
  folder = os.fspath(folder)
  with open(os.path.join(folder, 'config.json')) as f:
    unet = SDUNet(config_from_diffusers(json.load(f)), dtype=dtype)
  state = diffusers_tensors.read_state_dict(
      diffusers_tensors.weights_file(folder, WEIGHTS_STEM))
  params = diffusers_tensors.params_from_state_dict(param_shapes(unet), state, what='UNet')
  return unet, {'params': jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32)), params)}
