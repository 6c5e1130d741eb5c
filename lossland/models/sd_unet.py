"""The Stable Diffusion 1.x/2.x UNet (Rombach et al. 2022, sec. 3.3) in linen, NHWC.

It is diffusers' `UNet2DConditionModel` for the configurations SD 1.x and 2.x
ship: a sinusoidal timestep embedding and its MLP, `conv_in`, down blocks
(`CrossAttnDownBlock2D` / `DownBlock2D`), `UNetMidBlock2DCrossAttn`, up blocks
(`CrossAttnUpBlock2D` / `UpBlock2D`) fed by the down path's skips, then
GroupNorm-SiLU-`conv_out`. Every transformer block has self-attention
(`attn1`), cross-attention to the text features (`attn2`) and a GEGLU
feed-forward (Shazeer 2020).

Submodules carry diffusers' names (`down_blocks_1/attentions_0/
transformer_blocks_0/attn2`), so the params tree maps onto a diffusers state
dict by rule (`lossland.interop.diffusers_tensors`) and the cross-attention
probabilities [batch, heads, H*W, tokens] of each layer are the output of its
`taps.AttentionWeights` layer at '<...>/attn2/probs' (how `lossland.guidance`
captures them; `guidance.sd.CROSS_ATTENTION` selects 'attn2'). Self-attention
(`self_attention`) exposes no probabilities.

Params are float32; `dtype` is the compute dtype. Attention logits and
softmax are float32 (diffusers' `upcast_attention`/`upcast_softmax` in
half precision).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lossland import taps
from lossland.models.sd_blocks import Downsample2D, ResnetBlock2D, Upsample2D

CROSS_DOWN, PLAIN_DOWN = 'CrossAttnDownBlock2D', 'DownBlock2D'
CROSS_UP, PLAIN_UP = 'CrossAttnUpBlock2D', 'UpBlock2D'


@dataclasses.dataclass(frozen=True)
class SDUNetConfig:
  """The architecture fields of a diffusers UNet2DConditionModel config (SD 1.x/2.x).

  `heads` is attention heads per block: diffusers' `attention_head_dim` of SD
  configs counts heads, not head width (its own legacy naming). Per-block
  tuples follow `block_out_channels`; the up path reads them reversed.
  """
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
  up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
  layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
  transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
  heads: tuple[int, ...] = (8, 8, 8, 8)
  cross_attention_dim: int = 768
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  use_linear_projection: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  sample_size: int = 64

  def __post_init__(self):
    blocks = len(self.block_out_channels)
    for name in ('down_block_types', 'up_block_types', 'layers_per_block',
                 'transformer_layers_per_block', 'heads'):
      if len(getattr(self, name)) != blocks:
        raise ValueError(f'{name} has {len(getattr(self, name))} entries for {blocks} blocks '
                         f'(block_out_channels={self.block_out_channels})')
    for ch, h in zip(self.block_out_channels, self.heads):
      if ch % h:
        raise ValueError(f'{ch} channels do not split into {h} attention heads')


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
  """diffusers' `get_timestep_embedding` (Vaswani et al. 2017, sec. 3.5): [b] -> [b, dim] float32.

  Frequencies exp(-ln(max_period) i / (dim/2 - freq_shift)), i < dim/2;
  [sin, cos], or [cos, sin] with `flip_sin_to_cos` (as SD).
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None]
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


QUERY_BLOCK = 256  # queries per block of self-attention logits (`self_attention`)


def _query_blocks(x: jax.Array, block: int) -> jax.Array:
  """[b, n, h, d] -> [ceil(n/block), b, block, h, d], zero rows appended (their results are cut)."""
  b, n, h, d = x.shape
  blocks = -(-n // block)
  x = jnp.pad(x, ((0, 0), (0, blocks * block - n), (0, 0), (0, 0)))
  return x.reshape(b, blocks, block, h, d).swapaxes(0, 1)


def _from_blocks(x: jax.Array, n: int) -> jax.Array:
  """`_query_blocks`' inverse: [blocks, b, block, h, d] -> [b, n, h, d]."""
  blocks, b, block, h, d = x.shape
  return x.swapaxes(0, 1).reshape(b, blocks * block, h, d)[:, :n]


def _probs(q: jax.Array, k: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) [b, h, n, m] in float32 (`jax.nn.dot_product_attention`'s order)."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits * jnp.float32(1 / math.sqrt(q.shape[-1])), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def self_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                   block: int = QUERY_BLOCK) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v, float32 logits; q [b, n, h, d], k, v [b, m, h, d] -> [b, n, h, d].

  `jax.nn.dot_product_attention`'s XLA implementation (the same products, scale
  and softmax; the UNet's output agrees with it to float32 rounding), computed
  over blocks of `block` queries (`lax.map`) when n is larger, so that no more
  than [b, h, block, m] logits exist at once (SD's 64x64 latents make 4096
  positions, whose full logits are 64 MiB per sample and head), with a
  recomputing backward pass (Dao et al. 2022, FlashAttention, algorithm 4):
  per block, P again from q and k, dV += P^T dO, dS = P (dO V^T - rowsum(dO O)),
  dQ = dS K / sqrt(d), dK += dS^T Q / sqrt(d). Gradients agree with autodiff's to
  float32 rounding. Reverse mode only (a `jax.custom_vjp`: `jax.jvp` through it
  is refused).

  Why not `jax.nn.dot_product_attention`: on XLA:CPU it compiles to one fused
  product-softmax-product over the whole logits with its scale broadcast to
  their shape, 2-4x slower at 1024 positions (the tiny SD UNet's 32x32 level),
  and autodiff of the blocked form is another 2.5x slower backward than this one
  (`python -m benchmarks.sd_vs_diffusers --profile`).
  """
  n = q.shape[1]
  attend = lambda qb: jnp.einsum('bhqk,bkhd->bqhd', _probs(qb, k).astype(v.dtype), v)
  if n <= block:
    return attend(q)
  return _from_blocks(jax.lax.map(attend, _query_blocks(q, block)), n)


def _self_attention_fwd(q, k, v, block):
  out = self_attention(q, k, v, block)
  return out, (q, k, v, out)


def _self_attention_bwd(block, residuals, d_out):
  q, k, v, out = residuals
  n, scale = q.shape[1], jnp.float32(1 / math.sqrt(q.shape[-1]))
  # rowsum(P * dP) = dO . O per query: [b, h, n]
  delta = jnp.einsum('bqhd,bqhd->bhq', d_out, out, preferred_element_type=jnp.float32)

  def one(carry, xs):
    dk, dv = carry
    qb, dob, delta_b = xs  # [b, c, h, d], [b, c, h, d], [b, c, h]
    p = _probs(qb, k)  # [b, h, c, m]
    dv = dv + jnp.einsum('bhqk,bqhd->bkhd', p, dob, preferred_element_type=jnp.float32)
    dp = jnp.einsum('bqhd,bkhd->bhqk', dob, v, preferred_element_type=jnp.float32)
    ds = p * (dp - jnp.swapaxes(delta_b, 1, 2)[..., None]) * scale
    dq = jnp.einsum('bhqk,bkhd->bqhd', ds, k, preferred_element_type=jnp.float32)
    dk = dk + jnp.einsum('bhqk,bqhd->bkhd', ds, qb, preferred_element_type=jnp.float32)
    return (dk, dv), dq.astype(q.dtype)

  zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  if n <= block:
    (dk, dv), dq = one(zeros, (q, d_out, jnp.swapaxes(delta, 1, 2)))
  else:
    delta = _query_blocks(jnp.swapaxes(delta, 1, 2)[..., None], block)[..., 0]
    (dk, dv), dq = jax.lax.scan(one, zeros, (_query_blocks(q, block),
                                             _query_blocks(d_out, block), delta))
    dq = _from_blocks(dq, n)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype)


self_attention.defvjp(_self_attention_fwd, _self_attention_bwd)


class Attention(nn.Module):
  """diffusers' `Attention` of a transformer block: to_q/to_k/to_v without bias, to_out_0.

  softmax(q k^T / sqrt(d)) v per head (Vaswani et al. 2017, eq. 1). With
  `context`, keys and values come from it (cross-attention) and the
  probabilities pass through `probs` (`taps.AttentionWeights`); without, it
  attends over x itself (`self_attention`).
  """
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """x [b, n, C], context [b, T, D] or None -> [b, n, C]."""
    b, n, ch = x.shape
    head_dim = ch // self.heads
    source = x if context is None else context
    dense = lambda name, bias=False: nn.Dense(ch, use_bias=bias, dtype=self.dtype, name=name)
    split = lambda y: y.reshape(*y.shape[:2], self.heads, head_dim)
    q, k, v = split(dense('to_q')(x)), split(dense('to_k')(source)), split(dense('to_v')(source))
    if context is None:
      out = self_attention(q, k, v)
    else:
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
      probs = taps.AttentionWeights(name='probs')(logits / math.sqrt(head_dim))
      out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)
    return dense('to_out_0', bias=True)(out.reshape(b, n, ch))


class GEGLU(nn.Module):
  """proj(x) split into (h, g); h * GELU(g) with the exact erf GELU (Shazeer 2020, eq. 5)."""
  inner: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name='proj')(x), 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """diffusers' FeedForward with GEGLU: net_0 (GEGLU to 4C), net_2 (back to C)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = GEGLU(4 * x.shape[-1], dtype=self.dtype, name='net_0')(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name='net_2')(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LN self-attention, cross-attention and feed-forward, each with a residual."""
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    x = x + Attention(self.heads, self.dtype, name='attn1')(norm('norm1')(x))
    x = x + Attention(self.heads, self.dtype, name='attn2')(norm('norm2')(x), context)
    return x + FeedForward(self.dtype, name='ff')(norm('norm3')(x))


class Transformer2D(nn.Module):
  """diffusers' Transformer2DModel: GroupNorm, proj_in, transformer blocks, proj_out, residual.

  proj_in/proj_out are 1x1 convolutions (SD 1.x) or linear layers over the
  positions (`linear_projection`, SD 2.x); the two are the same map.
  """
  heads: int
  layers: int
  groups: int
  linear_projection: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, hgt, wid, ch = x.shape
    proj = lambda name: (nn.Dense(ch, dtype=self.dtype, name=name) if self.linear_projection
                         else nn.Conv(ch, (1, 1), dtype=self.dtype, name=name))
    h = nn.GroupNorm(self.groups, epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
                     name='norm')(x)
    h = proj('proj_in')(h).reshape(b, hgt * wid, ch)
    for i in range(self.layers):
      h = BasicTransformerBlock(self.heads, self.dtype, name=f'transformer_blocks_{i}')(h, context)
    return proj('proj_out')(h.reshape(b, hgt, wid, ch)) + x


class DownBlock(nn.Module):
  """CrossAttnDownBlock2D / DownBlock2D: (resnet [+ transformer]) x layers, then a downsampler.

  Returns the output and the skips it adds (after each layer and the downsampler).
  """
  out: int
  layers: int
  cross: bool
  transformer: dict
  resnet: dict
  downsample_padding: int | None  # None: the last block, no downsampler
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, temb, context):
    skips = []
    for j in range(self.layers):
      h = ResnetBlock2D(self.out, name=f'resnets_{j}', dtype=self.dtype, **self.resnet)(h, temb)
      if self.cross:
        h = Transformer2D(name=f'attentions_{j}', dtype=self.dtype, **self.transformer)(h, context)
      skips.append(h)
    if self.downsample_padding is not None:
      h = Downsample2D(self.out, padding=self.downsample_padding, name='downsamplers_0',
                       dtype=self.dtype)(h)
      skips.append(h)
    return h, skips


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""
  transformer: dict
  resnet: dict
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, temb, context):
    h = ResnetBlock2D(name='resnets_0', dtype=self.dtype, **self.resnet)(h, temb)
    h = Transformer2D(name='attentions_0', dtype=self.dtype, **self.transformer)(h, context)
    return ResnetBlock2D(name='resnets_1', dtype=self.dtype, **self.resnet)(h, temb)


class UpBlock(nn.Module):
  """CrossAttnUpBlock2D / UpBlock2D: (concat a skip, resnet [+ transformer]) x layers, upsample.

  `skips` are consumed last first; `upsample_to` is the next skip's (H, W)
  (None: the last block, no upsampler).
  """
  out: int
  layers: int
  cross: bool
  transformer: dict
  resnet: dict
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, skips, temb, context, upsample_to=None):
    for j in range(self.layers):
      h = jnp.concatenate([h, skips[-1 - j]], axis=-1)
      h = ResnetBlock2D(self.out, name=f'resnets_{j}', dtype=self.dtype, **self.resnet)(h, temb)
      if self.cross:
        h = Transformer2D(name=f'attentions_{j}', dtype=self.dtype, **self.transformer)(h, context)
    if upsample_to is not None:
      h = Upsample2D(self.out, name='upsamplers_0', dtype=self.dtype)(h, upsample_to)
    return h


class TimestepEmbedding(nn.Module):
  """diffusers' TimestepEmbedding: linear_1, SiLU, linear_2."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.silu(nn.Dense(self.features, dtype=self.dtype, name='linear_1')(x))
    return nn.Dense(self.features, dtype=self.dtype, name='linear_2')(x)


class SDUNet(nn.Module):
  """ε (or v) prediction of latents x [b, H, W, C] at timesteps t [b] given text context [b, T, D].

  Diffusers' UNet2DConditionModel.forward (module docstring); H and W need not
  be multiples of 2^(blocks-1): each upsampler resizes to its skip's size.
  """
  config: SDUNetConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
    c = self.config
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    width = c.block_out_channels[0]
    temb = timestep_embedding(t, width, c.flip_sin_to_cos, c.freq_shift).astype(self.dtype)
    temb = TimestepEmbedding(4 * width, self.dtype, name='time_embedding')(temb)
    context = context.astype(self.dtype)
    resnet = dict(groups=c.norm_num_groups, eps=c.norm_eps)
    transformer = lambda i: dict(heads=c.heads[i], layers=c.transformer_layers_per_block[i],
                                 groups=c.norm_num_groups,
                                 linear_projection=c.use_linear_projection)

    h = nn.Conv(width, (3, 3), padding=1, dtype=self.dtype, name='conv_in')(x.astype(self.dtype))
    skips = [h]
    last = len(c.block_out_channels) - 1
    for i, (kind, out) in enumerate(zip(c.down_block_types, c.block_out_channels)):
      h, added = DownBlock(out, c.layers_per_block[i], kind == CROSS_DOWN, transformer(i), resnet,
                           c.downsample_padding if i < last else None, self.dtype,
                           name=f'down_blocks_{i}')(h, temb, context)
      skips += added

    mid_resnet = dict(resnet, output_scale_factor=c.mid_block_scale_factor)
    h = MidBlock(transformer(last), mid_resnet, self.dtype, name='mid_block')(h, temb, context)

    for i, kind in enumerate(c.up_block_types):
      block = last - i  # the up path reads the per-block settings reversed
      layers = c.layers_per_block[block] + 1
      mine, skips = skips[-layers:], skips[:-layers]
      h = UpBlock(c.block_out_channels[block], layers, kind == CROSS_UP, transformer(block),
                  resnet, self.dtype, name=f'up_blocks_{i}')(
                      h, mine, temb, context, skips[-1].shape[1:3] if i < last else None)

    h = nn.GroupNorm(c.norm_num_groups, epsilon=c.norm_eps, use_fast_variance=False,
                     dtype=self.dtype, name='conv_norm_out')(h)
    return nn.Conv(c.out_channels, (3, 3), padding=1, dtype=self.dtype,
                   name='conv_out')(nn.silu(h))
