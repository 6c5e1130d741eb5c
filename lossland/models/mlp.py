"""Multilayer perceptron classifier: `dense_0 .. dense_{L-1}` with ReLU, then `head`.

With `residual=True` each hidden layer is a block `block_i` computing
x + relu(dense(x)) (an identity shortcut, He et al. 2016) wherever the width
does not change, and relu(dense(x)) where it does; the block outputs (the
residual stream) are then the layers to capture or stitch.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class ResidualBlock(nn.Module):
  """x + relu(dense(x)), or relu(dense(x)) when `width` differs from the input width."""
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(nn.Dense(self.width, dtype=self.dtype, name='dense')(x))
    return x + y if x.shape[-1] == self.width else y


class MLP(nn.Module):
  """`apply(params, x[batch, ...]) -> logits[batch, num_classes]`; inputs are flattened."""
  features: Sequence[int]
  num_classes: int
  dtype: Any = jnp.float32
  residual: bool = False

  @property
  def hidden_layers(self) -> list[str]:
    """Names of the hidden layers' outputs, the points to capture or stitch."""
    prefix = 'block' if self.residual else 'dense'
    return [f'{prefix}_{i}' for i in range(len(self.features))]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    for i, width in enumerate(self.features):
      if self.residual:
        x = ResidualBlock(width, dtype=self.dtype, name=f'block_{i}')(x)
      else:
        x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f'dense_{i}')(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)
