"""CLIP's text encoder (Radford et al. 2021, sec. 2.4) in linen, as Stable Diffusion uses it.

It is transformers' `CLIPTextModel` up to `last_hidden_state`: token plus
learned position embeddings, pre-LN transformer layers with causal
self-attention and an MLP (fc1, quick-GELU or GELU, fc2), a final layer norm.
SD 1.x/2.x feed the UNet's cross-attention with all T=77 outputs; the pooled
output (the end token's) and the projection are not built.

Submodules carry transformers' names (`encoder/layers_0/self_attn/q_proj`, a
`ModuleList` index `.0` written `_0`), so the torch name of a leaf is
`text_model.` + its path (`lossland.interop.diffusers_tensors`). Params are
float32; `dtype` is the compute dtype; attention logits and softmax are float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's own (Hendrycks & Gimpel 2016)
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU (OpenCLIP, SD 2.x)
}


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  """transformers' `CLIPTextConfig` fields that shape the encoder (defaults are its defaults)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'hidden_act={self.hidden_act!r}; supported: {list(ACTIVATIONS)}')
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size={self.hidden_size} is not a multiple of '
                       f'num_attention_heads={self.num_attention_heads}')


class ClipAttention(nn.Module):
  """Multi-head self-attention with a causal mask, scale 1/sqrt(head_dim) (`CLIPAttention`)."""
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [n, T, D] -> [n, T, D]; position t attends to positions <= t."""
    n, length, width = x.shape
    dense = lambda name: nn.Dense(width, dtype=self.dtype, name=name)
    split = lambda y: y.reshape(n, length, self.heads, width // self.heads)
    q, k, v = (split(dense(name)(x)) for name in ('q_proj', 'k_proj', 'v_proj'))
    logits = jnp.einsum('nqhd,nkhd->nhqk', q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(width // self.heads)
    causal = jnp.tril(jnp.ones((length, length), bool))
    probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1).astype(v.dtype)
    out = jnp.einsum('nhqk,nkhd->nqhd', probs, v).reshape(n, length, width)
    return dense('out_proj')(out)


class ClipMLP(nn.Module):
  """fc1 -> activation -> fc2 (`CLIPMLP`)."""
  intermediate_size: int
  hidden_act: str = 'quick_gelu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dense(self.intermediate_size, dtype=self.dtype, name='fc1')(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name='fc2')(ACTIVATIONS[self.hidden_act](h))


class ClipEncoderLayer(nn.Module):
  """Pre-LN block (`CLIPEncoderLayer`): x + self_attn(layer_norm1(x)); x + mlp(layer_norm2(x))."""
  config: ClipTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    norm = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name=name)
    x = x + ClipAttention(c.num_attention_heads, self.dtype, name='self_attn')(
        norm('layer_norm1')(x))
    return x + ClipMLP(c.intermediate_size, c.hidden_act, self.dtype, name='mlp')(
        norm('layer_norm2')(x))


class ClipEmbeddings(nn.Module):
  """token_embedding(ids) + position_embedding(0..T-1) (`CLIPTextEmbeddings`)."""
  config: ClipTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    c = self.config
    tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name='token_embedding')
    positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                         name='position_embedding')
    return tokens(ids) + positions(jnp.arange(ids.shape[1]))[None]


class ClipEncoder(nn.Module):
  """The stack of `ClipEncoderLayer`s (`CLIPEncoder`), named layers_0, layers_1, ..."""
  config: ClipTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x = ClipEncoderLayer(self.config, self.dtype, name=f'layers_{i}')(x)
    return x


class ClipTextEncoder(nn.Module):
  """CLIP's text transformer (`CLIPTextModel.text_model`): ids [n, T] -> last_hidden_state.

  Attributes:
    config: the architecture (`ClipTextConfig`).
    dtype: compute dtype (params stay float32).
  """
  config: ClipTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids [n, T] int, T <= max_position_embeddings -> [n, T, hidden_size] in `dtype`."""
    c = self.config
    if ids.ndim != 2 or ids.shape[1] > c.max_position_embeddings:
      raise ValueError(f'ids must be [n, T] with T <= {c.max_position_embeddings}, got shape '
                       f'{ids.shape}')
    x = ClipEmbeddings(c, self.dtype, name='embeddings')(ids)
    x = ClipEncoder(c, self.dtype, name='encoder')(x)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name='final_layer_norm')(x)
