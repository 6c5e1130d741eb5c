"""AdamW (Loshchilov & Hutter 2019) with linear warmup, cosine decay and global-norm clipping."""
from __future__ import annotations

import jax
import optax


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int,
                  final_lr: float) -> optax.Schedule:
  """Linear warmup from 0 to `peak_lr`, then cosine decay to `final_lr` at `total_steps`."""
  if total_steps <= warmup_steps:
    raise ValueError(f'total_steps={total_steps} must exceed warmup_steps={warmup_steps}')
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, total_steps, final_lr)


def decay_mask(params):
  """Weight decay on matrices only (kernels, embeddings), not on norms and biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(*, learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999,
          weight_decay: float = 0.0, grad_clip: float | None = 1.0) -> optax.GradientTransformation:
  """Clip by global norm (if `grad_clip`), then AdamW with decay on matrices only."""
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)
