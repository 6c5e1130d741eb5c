"""Small convolutional classifier: 3x3 `conv_i` + ReLU (optionally strided), global
average pooling, then a `head`. Convolutions are `nn.Conv`, the head `nn.Dense`."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class CNN(nn.Module):
  """`apply(params, images[batch, H, W, C]) -> logits[batch, num_classes]`.

  Attributes:
    features: output channels of each conv layer.
    strides: stride of each conv layer (default 1 everywhere).
    num_classes: output classes.
  """
  features: Sequence[int]
  num_classes: int
  strides: Sequence[int] | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    strides = self.strides or (1,) * len(self.features)
    if len(strides) != len(self.features):
      raise ValueError(f'strides has {len(strides)} entries but features has {len(self.features)}')
    x = images.astype(self.dtype)
    for i, (width, stride) in enumerate(zip(self.features, strides)):
      x = nn.relu(nn.Conv(width, (3, 3), strides=stride, dtype=self.dtype, name=f'conv_{i}')(x))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)
