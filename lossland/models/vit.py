"""Vision Transformer (Dosovitskiy et al. 2021, eqs. 1-4) for small images.

Patches are flattened and embedded by an `nn.Dense` (`patch_embed`), a learned
class token and position embeddings are added, pre-norm blocks of
bidirectional attention and a GELU MLP (`fc1`, `fc2`) follow, and the class
token feeds the `head`. All linear maps are `nn.Dense`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lossland.models.transformer import Attention


class ViTMLP(nn.Module):
  hidden_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.gelu(nn.Dense(self.hidden_dim, dtype=self.dtype, name='fc1')(x))
    return nn.Dense(x.shape[-1], dtype=self.dtype, name='fc2')(h)


class ViTBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.LayerNorm(name='attn_norm', dtype=self.dtype)(x)
    x = x + Attention(self.num_heads, causal=False, rotary=False, dtype=self.dtype,
                      kernel_init=nn.initializers.lecun_normal(),
                      out_init=nn.initializers.lecun_normal(), name='attn')(h)
    h = nn.LayerNorm(name='mlp_norm', dtype=self.dtype)(x)
    return x + ViTMLP(self.mlp_dim, dtype=self.dtype, name='mlp')(h)


class ViT(nn.Module):
  """`apply(params, images[batch, H, W, C]) -> logits[batch, num_classes]`."""
  num_classes: int
  patch_size: int = 2
  d_model: int = 64
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    batch, height, width, channels = images.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f'image size {height}x{width} is not divisible by patch_size={p}')
    patches = images.reshape(batch, height // p, p, width // p, p, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, p * p * channels)
    x = nn.Dense(self.d_model, dtype=self.dtype, name='patch_embed')(patches)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, self.d_model))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.d_model)).astype(x.dtype), x], 1)
    pos = self.param('pos_embed', nn.initializers.normal(0.02), (1, x.shape[1], self.d_model))
    x = x + pos.astype(x.dtype)
    for i in range(self.num_layers):
      x = ViTBlock(self.num_heads, self.mlp_dim, dtype=self.dtype, name=f'block_{i}')(x)
    x = nn.LayerNorm(name='final_norm', dtype=self.dtype)(x[:, 0])
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)
