"""A small pixel-space text-conditioned UNet and its causal text encoder.

The denoiser of `lossland.guidance` (A-STAR, Agarwal et al. ICCV 2023;
Attend-and-Excite, Chefer et al. 2023), shaped like Stable Diffusion's UNet
(Rombach et al. 2022, sec. 3.3) at toy size: ResNet blocks with a timestep
embedding (Ho et al. 2020), and cross-attention from image positions (queries)
to text tokens (keys/values) at the 16x16 and 8x8 resolutions. Each
`CrossAttention` computes its probabilities [batch, heads, H*W, tokens] in a
`lossland.taps.AttentionWeights` layer ('<name>/probs'), which is how
`lossland.guidance` captures them, and also sows them into the
`intermediates` collection as `cross_attention`.

The text encoder is causal (like CLIP's) with start and end tokens, trained
jointly with the UNet, so the start token can become an attention sink as in
Stable Diffusion; it reuses `DecoderBlock` from `lossland.models.transformer`.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lossland import taps
from lossland.models.transformer import DecoderBlock


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, sec. 3.5).

  Args:
    t: [batch] timesteps.
    dim: even embedding width.
  Returns:
    [batch, dim] float32.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TextEncoder(nn.Module):
  """Causal transformer over caption tokens: [batch, seq] int -> [batch, seq, width]."""
  vocab_size: int
  width: int = 64
  num_layers: int = 2
  num_heads: int = 4
  max_len: int = 16

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    if tokens.shape[1] > self.max_len:
      raise ValueError(f'{tokens.shape[1]} tokens exceed the text encoder max_len={self.max_len}')
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 name='embed')(tokens)
    x = x + self.param('pos_embed', nn.initializers.normal(0.02), (self.max_len, self.width)
                       )[None, :tokens.shape[1]]
    for i in range(self.num_layers):
      x = DecoderBlock(self.num_heads, 4 * self.width, self.num_layers, name=f'block_{i}')(x)
    return nn.LayerNorm(name='final_norm')(x)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-Conv twice, with a timestep-embedding shift (DDPM's residual block)."""
  channels: int
  groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    h = nn.Conv(self.channels, (3, 3), name='conv_0')(nn.silu(nn.GroupNorm(self.groups)(x)))
    h = h + nn.Dense(self.channels, name='temb')(nn.silu(temb))[:, None, None, :]
    h = nn.silu(nn.GroupNorm(self.groups)(h))
    h = nn.Conv(self.channels, (3, 3), kernel_init=nn.initializers.zeros, name='conv_1')(h)
    if x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), name='skip')(x)
    return x + h


class CrossAttention(nn.Module):
  """Image positions attend to text tokens; sows probabilities as `cross_attention`.

  probs[b, h, q, k] = softmax_k(<W_q x_q, W_k c_k> / sqrt(d)) over unmasked
  tokens k (Rombach et al. 2022, eq. 3 and sec. 3.3).
  """
  num_heads: int = 4
  groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array) -> jax.Array:
    b, hgt, wid, ch = x.shape
    head_dim = ch // self.num_heads
    h = nn.GroupNorm(self.groups)(x).reshape(b, hgt * wid, ch)  # [b, q, ch]
    q = nn.Dense(ch, use_bias=False, name='query')(h).reshape(b, -1, self.num_heads, head_dim)
    k = nn.Dense(ch, use_bias=False, name='key')(context).reshape(b, -1, self.num_heads, head_dim)
    v = nn.Dense(ch, use_bias=False, name='value')(context).reshape(b, -1, self.num_heads,
                                                                     head_dim)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(head_dim)
    # [b, heads, H*W, tokens], a layer output `lossland.taps` can capture (path '<name>/probs')
    probs = taps.AttentionWeights(name='probs')(logits, context_mask[:, None, None, :])
    self.sow('intermediates', 'cross_attention', probs)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, hgt, wid, ch)
    return x + nn.Dense(ch, kernel_init=nn.initializers.zeros, name='out')(out)


class TextUNet(nn.Module):
  """ε-prediction UNet: `apply(params, x[b,32,32,3], t[b], tokens[b,T]) -> ε[b,32,32,3]`.

  Resolutions 32 -> 16 -> 8 with `channels` per level; one ResBlock per level
  on the way down and up, plus a middle block; cross-attention after every
  ResBlock whose resolution is in `attention_resolutions`. Tokens equal to
  `pad_id` are masked out of cross-attention.

  Attributes:
    vocab_size: caption vocabulary size.
    channels: channels at each level (first is the input resolution).
    attention_resolutions: spatial sizes that get cross-attention.
    text_width, text_layers, text_heads: the text encoder.
    num_heads: cross-attention heads.
    pad_id: the padding token id.
  """
  vocab_size: int
  channels: Sequence[int] = (32, 64, 64)
  attention_resolutions: Sequence[int] = (16, 8)
  text_width: int = 64
  text_layers: int = 2
  text_heads: int = 4
  num_heads: int = 4
  pad_id: int = 0
  out_channels: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, tokens: jax.Array) -> jax.Array:
    context = TextEncoder(self.vocab_size, self.text_width, self.text_layers, self.text_heads,
                          name='text')(tokens)  # [b, T, text_width]
    mask = tokens != self.pad_id  # [b, T]
    temb = timestep_embedding(t, 4 * self.channels[0])
    temb = nn.Dense(4 * self.channels[0], name='temb_1')(
        nn.silu(nn.Dense(4 * self.channels[0], name='temb_0')(temb)))

    def maybe_attend(h, name):
      if h.shape[1] in self.attention_resolutions:
        h = CrossAttention(self.num_heads, name=name)(h, context, mask)
      return h

    h = nn.Conv(self.channels[0], (3, 3), name='conv_in')(x)
    skips = []
    for level, ch in enumerate(self.channels):
      h = ResBlock(ch, name=f'down_{level}')(h, temb)
      h = maybe_attend(h, f'down_{level}_attn')
      skips.append(h)
      if level < len(self.channels) - 1:
        h = nn.Conv(ch, (3, 3), strides=(2, 2), name=f'downsample_{level}')(h)
    h = ResBlock(self.channels[-1], name='mid_0')(h, temb)
    h = maybe_attend(h, 'mid_attn')
    h = ResBlock(self.channels[-1], name='mid_1')(h, temb)
    for level in reversed(range(len(self.channels))):
      h = ResBlock(self.channels[level], name=f'up_{level}')(
          jnp.concatenate([h, skips[level]], axis=-1), temb)
      h = maybe_attend(h, f'up_{level}_attn')
      if level > 0:
        b, hh, ww, c = h.shape
        h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), 'nearest')
        h = nn.Conv(self.channels[level - 1], (3, 3), name=f'upsample_{level}')(h)
    h = nn.silu(nn.GroupNorm(8, name='norm_out')(h))
    return nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros,
                   name='conv_out')(h)
