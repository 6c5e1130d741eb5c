"""Decoder-only transformer language model (LLaMA-style).

RMSNorm (Zhang & Sennrich 2019), rotary position embeddings (Su et al. 2021,
eq. 34), causal multi-head attention whose probabilities are sown into the
`intermediates` collection, and a gated MLP (Shazeer 2020, SwiGLU:
down(silu(gate(x)) * up(x))) with separate `gate`, `up` and `down` layers.

Every linear map is created through the `dense` field (default `nn.Dense`),
so analyses find them with `nn.intercept_methods` and `lossland.lowrank` can
swap in factorized layers by config. The embedding and output head always stay
dense.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

DenseFactory = Callable[..., nn.Module]


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotates pairs of channels by position-dependent angles (RoFormer eq. 34).

  Args:
    x: [batch, seq, heads, head_dim] with an even head_dim.
    positions: [seq] integer positions.
    base: the wavelength base.
  """
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  angles = positions[:, None].astype(jnp.float32) * freqs[None, :]  # [seq, half]
  sin = jnp.sin(angles)[None, :, None, :].astype(x.dtype)
  cos = jnp.cos(angles)[None, :, None, :].astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nn.Module):
  """Multi-head attention; sows its probabilities as `attention_weights`.

  Attributes:
    num_heads: number of heads; the model width must divide evenly.
    causal: mask future positions.
    rotary: apply rotary position embeddings to queries and keys.
    dense: factory for the query/key/value/out linear maps.
    out_init: initializer of the output projection.
  """
  num_heads: int
  causal: bool = True
  rotary: bool = True
  dense: DenseFactory = nn.Dense
  kernel_init: Callable = nn.initializers.normal(0.02)
  out_init: Callable = nn.initializers.normal(0.02)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
    batch, seq, width = x.shape
    if width % self.num_heads:
      raise ValueError(f'model width {width} is not divisible by num_heads={self.num_heads}')
    head_dim = width // self.num_heads
    dense = functools.partial(self.dense, use_bias=False, dtype=self.dtype)
    split = lambda y: y.reshape(batch, seq, self.num_heads, head_dim)
    q = split(dense(width, name='query', kernel_init=self.kernel_init)(x))
    k = split(dense(width, name='key', kernel_init=self.kernel_init)(x))
    v = split(dense(width, name='value', kernel_init=self.kernel_init)(x))
    if self.rotary:
      positions = jnp.arange(seq)
      q, k = rotary_embedding(q, positions), rotary_embedding(k, positions)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    allowed = jnp.ones((seq, seq), bool)
    if self.causal:
      allowed = jnp.tril(allowed)
    allowed = allowed[None, None]
    if padding_mask is not None:  # [batch, seq], True = real token
      allowed = allowed & padding_mask[:, None, None, :].astype(bool)
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)  # [batch, heads, q, k]
    self.sow('intermediates', 'attention_weights', probs)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), v).reshape(batch, seq, width)
    return dense(width, name='out', kernel_init=self.out_init)(out)


class GatedMLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
  hidden_dim: int
  dense: DenseFactory = nn.Dense
  kernel_init: Callable = nn.initializers.normal(0.02)
  out_init: Callable = nn.initializers.normal(0.02)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(self.dense, use_bias=False, dtype=self.dtype)
    gate = dense(self.hidden_dim, name='gate', kernel_init=self.kernel_init)(x)
    up = dense(self.hidden_dim, name='up', kernel_init=self.kernel_init)(x)
    return dense(x.shape[-1], name='down', kernel_init=self.out_init)(nn.silu(gate) * up)


class DecoderBlock(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x))."""
  num_heads: int
  mlp_dim: int
  num_layers: int
  dense: DenseFactory = nn.Dense
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
    # GPT-2 style: residual-branch outputs start smaller by 1/sqrt(2 * num_layers).
    out_init = nn.initializers.normal(0.02 / (2 * self.num_layers) ** 0.5)
    h = nn.RMSNorm(name='attn_norm', dtype=self.dtype)(x)
    x = x + Attention(self.num_heads, dense=self.dense, out_init=out_init, dtype=self.dtype,
                      name='attn')(h, padding_mask)
    h = nn.RMSNorm(name='mlp_norm', dtype=self.dtype)(x)
    return x + GatedMLP(self.mlp_dim, dense=self.dense, out_init=out_init, dtype=self.dtype,
                        name='mlp')(h)


class TransformerLM(nn.Module):
  """Decoder-only LM. `apply(params, tokens[batch, seq]) -> logits[batch, seq, vocab]`.

  Attributes:
    vocab_size: number of token ids.
    d_model: residual width.
    num_layers: number of decoder blocks, named `block_0`, `block_1`, ...
    num_heads: attention heads per block.
    mlp_dim: hidden width of the gated MLP.
    tie_embeddings: use the embedding matrix as the output head.
    dense: factory for attention and MLP linear maps (see `lossland.lowrank`).
    dtype: compute dtype (params stay float32).
  """
  vocab_size: int
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 512
  tie_embeddings: bool = False
  dense: DenseFactory = nn.Dense
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
    embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=nn.initializers.normal(0.02),
                     dtype=self.dtype, name='embed')
    x = embed(tokens)  # [batch, seq, d_model]
    for i in range(self.num_layers):
      x = DecoderBlock(self.num_heads, self.mlp_dim, self.num_layers, dense=self.dense,
                       dtype=self.dtype, name=f'block_{i}')(x, padding_mask)
    x = nn.RMSNorm(name='final_norm', dtype=self.dtype)(x)
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(self.vocab_size, use_bias=False, kernel_init=nn.initializers.normal(0.02),
                        dtype=self.dtype, name='head')(x)
    return logits.astype(jnp.float32)
