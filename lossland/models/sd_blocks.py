"""Convolutional pieces shared by the Stable Diffusion UNet and VAE (Rombach et al. 2022), NHWC.

Each class mirrors the diffusers module of the same role, with the same
submodule names (a torch `ModuleList` index `.0` becomes the suffix `_0`), so a
diffusers state dict maps onto the params tree name by name
(`lossland.interop.diffusers_tensors`):

  ResnetBlock2D         diffusers.models.resnet.ResnetBlock2D ('default' time-embedding
                        norm: the projected embedding is added after conv1)
  Downsample2D          diffusers.models.downsampling.Downsample2D (use_conv=True)
  Upsample2D            diffusers.models.upsampling.Upsample2D (use_conv=True, nearest x2)
  SpatialSelfAttention  diffusers.models.attention_processor.Attention as the VAE mid block
                        builds it: group norm over the feature map, self-attention over its
                        H*W positions, residual, division by rescale_output_factor

Params are float32 (`param_dtype`); `dtype` is the compute dtype.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv3x3 (+ projected timestep embedding), GroupNorm-SiLU-conv3x3, residual.

  out = (shortcut(x) + h) / output_scale_factor, where shortcut is a 1x1
  `conv_shortcut` when the channel count changes (diffusers' `use_in_shortcut`)
  and the identity otherwise (He et al. 2016; Ho et al. 2020, appendix B).

  Attributes:
    out_channels: output channels (None keeps the input's).
    groups: GroupNorm groups of both norms.
    eps: GroupNorm epsilon.
    output_scale_factor: the residual sum is divided by it.
    temb: whether `temb` is projected and added (`time_emb_proj`); the VAE has none.
  """
  out_channels: int | None = None
  groups: int = 32
  eps: float = 1e-6
  output_scale_factor: float = 1.0
  temb: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    """x [b, H, W, C_in], temb [b, D] (required when `self.temb`) -> [b, H, W, out_channels]."""
    out = self.out_channels or x.shape[-1]
    norm = lambda name: nn.GroupNorm(self.groups, epsilon=self.eps, use_fast_variance=False,
                                     dtype=self.dtype, name=name)
    conv = lambda name: nn.Conv(out, (3, 3), padding=1, dtype=self.dtype, name=name)
    h = conv('conv1')(nn.silu(norm('norm1')(x)))
    if self.temb:
      if temb is None:
        raise ValueError('this ResnetBlock2D has a time_emb_proj (temb=True); pass temb [b, D] '
                         'or build it with temb=False')
      h = h + nn.Dense(out, dtype=self.dtype, name='time_emb_proj')(nn.silu(temb))[:, None, None]
    h = conv('conv2')(nn.silu(norm('norm2')(h)))
    if x.shape[-1] != out:
      x = nn.Conv(out, (1, 1), dtype=self.dtype, name='conv_shortcut')(x)
    return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """3x3 convolution with stride 2 (`conv`).

  padding=1 pads one pixel on every side (the UNet); padding=0 pads one pixel
  at the bottom and right only (diffusers' `F.pad(x, (0, 1, 0, 1))`, the VAE
  encoder).
  """
  out_channels: int | None = None
  padding: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [b, H, W, C] -> [b, ceil(H/2), ceil(W/2), out_channels]."""
    if self.padding not in (0, 1):
      raise ValueError(f'Downsample2D padding={self.padding}; use 1 (UNet) or 0 (VAE encoder, '
                       'asymmetric (0, 1) padding)')
    pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
    return nn.Conv(self.out_channels or x.shape[-1], (3, 3), strides=(2, 2), padding=pad,
                   dtype=self.dtype, name='conv')(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour upsampling (x2, or to `output_size`) then a 3x3 convolution (`conv`)."""
  out_channels: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    """x [b, H, W, C] -> [b, 2H, 2W, out_channels] (or [b, *output_size, out_channels])."""
    b, hgt, wid, ch = x.shape
    out_h, out_w = output_size if output_size is not None else (2 * hgt, 2 * wid)
    # torch's 'nearest' takes source index floor(i * H / out_h), as jax.image.resize does not
    # for non-integer ratios; index explicitly so odd output sizes match too.
    rows = (jnp.arange(out_h) * hgt) // out_h
    cols = (jnp.arange(out_w) * wid) // out_w
    x = x[:, rows][:, :, cols]
    return nn.Conv(self.out_channels or ch, (3, 3), padding=1, dtype=self.dtype, name='conv')(x)


class SpatialSelfAttention(nn.Module):
  """Self-attention over the H*W positions of a feature map, with group norm and residual.

  out = (x + to_out_0(softmax(q k^T / sqrt(d)) v)) / rescale_output_factor with
  q, k, v = to_q/to_k/to_v(GroupNorm(x)) (Vaswani et al. 2017, eq. 1). The
  softmax runs in float32 (the VAE's `upcast_softmax=True`). The VAE mid block
  uses one head over all channels.

  Attributes:
    heads: attention heads (channels must divide by it).
    groups: GroupNorm groups (`group_norm`).
    eps: GroupNorm epsilon.
    rescale_output_factor: the residual sum is divided by it.
  """
  heads: int = 1
  groups: int = 32
  eps: float = 1e-6
  rescale_output_factor: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [b, H, W, C] -> [b, H, W, C]."""
    b, hgt, wid, ch = x.shape
    if ch % self.heads:
      raise ValueError(f'{ch} channels do not split into {self.heads} heads')
    h = nn.GroupNorm(self.groups, epsilon=self.eps, use_fast_variance=False, dtype=self.dtype,
                     name='group_norm')(x)
    h = h.reshape(b, hgt * wid, ch)
    split = lambda y: y.reshape(b, hgt * wid, self.heads, ch // self.heads)
    q, k, v = (split(nn.Dense(ch, dtype=self.dtype, name=n)(h)) for n in ('to_q', 'to_k', 'to_v'))
    out = _attention(q, k, v).reshape(b, hgt, wid, ch)
    out = nn.Dense(ch, dtype=self.dtype, name='to_out_0')(out)
    return (x + out) / self.rescale_output_factor


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v with float32 logits and softmax; q [b,n,h,d], k, v [b,m,h,d]."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits / jnp.sqrt(q.shape[-1]).astype(jnp.float32), axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)
