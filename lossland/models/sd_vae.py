"""The Stable Diffusion 1.x/2.x VAE (Kingma & Welling 2014; Rombach et al. 2022, sec. 3.1) in linen.

It is diffusers' `AutoencoderKL` for the configurations SD 1.x and 2.x ship,
NHWC:

  encode  x [b, H, W, in_channels] -> `encoder` (conv_in, `DownEncoderBlock2D`s, each but
          the last halving the size, `UNetMidBlock2D`, GroupNorm-SiLU-conv_out to
          2 * latent_channels) -> `quant_conv` (1x1) -> the diagonal Gaussian's
          (mean, logvar), each [b, H/f, W/f, latent_channels], logvar clamped to [-30, 20]
  decode  z [b, h, w, latent_channels] -> `post_quant_conv` (1x1) -> `decoder` (conv_in,
          `UNetMidBlock2D`, `UpDecoderBlock2D`s in reversed channel order, each but the
          last doubling the size, GroupNorm-SiLU-conv_out) -> [b, h*f, w*f, out_channels]

with f = 2 ** (len(block_out_channels) - 1). There is no scaling factor here:
SD latents are `scaling_factor * z` and callers divide by it before `decode`.
The mid blocks' attention has one head over all channels (diffusers'
`attention_head_dim` = channels); every GroupNorm has epsilon 1e-6.

Submodules carry diffusers' names (`encoder/down_blocks_0/resnets_0`,
`decoder/up_blocks_0/upsamplers_0/conv`, `encoder/mid_block/attentions_0/to_q`),
so the params tree maps onto a diffusers state dict by rule
(`lossland.interop.diffusers_tensors`; `lossland.interop.diffusers_vae` loads a
folder). Params are float32; `dtype` is the compute dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lossland.models.sd_blocks import (Downsample2D, ResnetBlock2D, SpatialSelfAttention,
                                       Upsample2D)

EPS = 1e-6  # diffusers' VAE GroupNorm epsilon (resnets, attention, conv_norm_out)
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


@dataclasses.dataclass(frozen=True)
class SDVAEConfig:
  """The architecture fields of a diffusers AutoencoderKL config (vae/config.json).

  Defaults are SD 1.x/2.x's. `layers_per_block` is the encoder's resnets per
  down block; the decoder has one more per up block (as diffusers builds it).
  """
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  act_fn: str = 'silu'
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True

  def __post_init__(self):
    if self.act_fn != 'silu':
      raise ValueError(f'act_fn={self.act_fn!r}: lossland\'s VAE implements silu only')
    if not self.block_out_channels:
      raise ValueError('block_out_channels is empty')
    for ch in self.block_out_channels:
      if ch % self.norm_num_groups:
        raise ValueError(f'{ch} channels do not split into {self.norm_num_groups} groups')

  @property
  def downsample_factor(self) -> int:
    """Image size / latent size: 2 ** (number of blocks - 1)."""
    return 2 ** (len(self.block_out_channels) - 1)


class UNetMidBlock2D(nn.Module):
  """diffusers' `UNetMidBlock2D` without a timestep embedding: resnet, [attention, resnet].

  `resnets_0`, then `attentions_0` (one head, when `attention`) and `resnets_1`.
  """
  groups: int
  attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [b, H, W, C] -> [b, H, W, C]."""
    resnet = lambda name: ResnetBlock2D(groups=self.groups, eps=EPS, temb=False,
                                        dtype=self.dtype, name=name)
    x = resnet('resnets_0')(x)
    if self.attention:
      x = SpatialSelfAttention(heads=1, groups=self.groups, eps=EPS, dtype=self.dtype,
                               name='attentions_0')(x)
    return resnet('resnets_1')(x)


class DownEncoderBlock2D(nn.Module):
  """diffusers' `DownEncoderBlock2D`: `layers` resnets (`resnets_i`), then an optional
  `downsamplers_0` (stride 2, bottom/right padding)."""
  out_channels: int
  layers: int
  groups: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [b, H, W, C_in] -> [b, H', W', out_channels] (H' = ceil(H/2) with a downsampler)."""
    for i in range(self.layers):
      x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=EPS, temb=False,
                        dtype=self.dtype, name=f'resnets_{i}')(x)
    if self.downsample:
      x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name='downsamplers_0')(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """diffusers' `UpDecoderBlock2D`: `layers` resnets (`resnets_i`), then an optional
  `upsamplers_0` (nearest x2 and a 3x3 conv)."""
  out_channels: int
  layers: int
  groups: int
  upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [b, H, W, C_in] -> [b, H', W', out_channels] (H' = 2H with an upsampler)."""
    for i in range(self.layers):
      x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=EPS, temb=False,
                        dtype=self.dtype, name=f'resnets_{i}')(x)
    if self.upsample:
      x = Upsample2D(self.out_channels, dtype=self.dtype, name='upsamplers_0')(x)
    return x


class Encoder(nn.Module):
  """diffusers.models.autoencoders.vae.Encoder (double_z=True): image -> 2 * latent_channels."""
  config: SDVAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [b, H, W, in_channels] -> [b, H/f, W/f, 2 * latent_channels] (mean, logvar halves)."""
    c = self.config
    chans = c.block_out_channels
    x = nn.Conv(chans[0], (3, 3), padding=1, dtype=self.dtype, name='conv_in')(x)
    for i, ch in enumerate(chans):
      x = DownEncoderBlock2D(ch, c.layers_per_block, c.norm_num_groups,
                             downsample=i < len(chans) - 1, dtype=self.dtype,
                             name=f'down_blocks_{i}')(x)
    x = UNetMidBlock2D(c.norm_num_groups, c.mid_block_add_attention, dtype=self.dtype,
                       name='mid_block')(x)
    x = nn.GroupNorm(c.norm_num_groups, epsilon=EPS, use_fast_variance=False, dtype=self.dtype,
                     name='conv_norm_out')(x)
    return nn.Conv(2 * c.latent_channels, (3, 3), padding=1, dtype=self.dtype,
                   name='conv_out')(nn.silu(x))


class Decoder(nn.Module):
  """diffusers.models.autoencoders.vae.Decoder (group norms): latent -> image."""
  config: SDVAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """z [b, h, w, latent_channels] -> [b, h*f, w*f, out_channels]."""
    c = self.config
    chans = tuple(reversed(c.block_out_channels))
    x = nn.Conv(chans[0], (3, 3), padding=1, dtype=self.dtype, name='conv_in')(z)
    x = UNetMidBlock2D(c.norm_num_groups, c.mid_block_add_attention, dtype=self.dtype,
                       name='mid_block')(x)
    for i, ch in enumerate(chans):
      x = UpDecoderBlock2D(ch, c.layers_per_block + 1, c.norm_num_groups,
                           upsample=i < len(chans) - 1, dtype=self.dtype,
                           name=f'up_blocks_{i}')(x)
    x = nn.GroupNorm(c.norm_num_groups, epsilon=EPS, use_fast_variance=False, dtype=self.dtype,
                     name='conv_norm_out')(x)
    return nn.Conv(c.out_channels, (3, 3), padding=1, dtype=self.dtype,
                   name='conv_out')(nn.silu(x))


class SDVAE(nn.Module):
  """diffusers' `AutoencoderKL` (module docstring): `encode`, `decode`; `__call__` for init.

  Attributes:
    config: the architecture (`SDVAEConfig`).
    dtype: compute dtype (params stay float32).
  """
  config: SDVAEConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.encoder = Encoder(c, dtype=self.dtype)
    self.decoder = Decoder(c, dtype=self.dtype)
    self.quant_conv = (nn.Conv(2 * c.latent_channels, (1, 1), dtype=self.dtype)
                       if c.use_quant_conv else None)
    self.post_quant_conv = (nn.Conv(c.latent_channels, (1, 1), dtype=self.dtype)
                            if c.use_post_quant_conv else None)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [b, H, W, in_channels] in [-1, 1] -> (mean, logvar) of q(z|x), each [b, H/f, W/f, C].

    C is latent_channels; logvar is clamped to [-30, 20] (diffusers'
    DiagonalGaussianDistribution). Sample as mean + exp(logvar / 2) * noise.
    """
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    """z [b, h, w, latent_channels] (unscaled VAE latents) -> [b, h*f, w*f, out_channels]."""
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: jax.Array) -> jax.Array:
    """decode(encode(x) mean): the reconstruction of x (touches every param, for `init`)."""
    mean, _ = self.encode(x)
    return self.decode(mean)
