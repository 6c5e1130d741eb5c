"""AdamW (Loshchilov & Hutter 2019), global-norm clipping, warmup then cosine or constant rates."""
from __future__ import annotations

import jax
import optax


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int,
                  final_lr: float) -> optax.Schedule:
  """Linear warmup from 0 to `peak_lr`, then cosine decay to `final_lr` at `total_steps`."""
  if total_steps <= warmup_steps:
    raise ValueError(f'total_steps={total_steps} must exceed warmup_steps={warmup_steps}')
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, total_steps, final_lr)


def warmup_constant(peak_lr: float, warmup_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then constant.

  For runs that may stop at any step (a time budget): the model at every step
  after warmup is trained under the same rate, and an EMA of the params
  (`fit(ema_decay=...)`) does the averaging a decay would.
  """
  if warmup_steps < 0:
    raise ValueError(f'warmup_steps={warmup_steps} must be >= 0')
  if warmup_steps == 0:
    return optax.constant_schedule(peak_lr)
  return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup_steps),
                               optax.constant_schedule(peak_lr)], [warmup_steps])


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
