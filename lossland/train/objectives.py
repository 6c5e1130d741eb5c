"""Loss functions with the trainer's signature `loss_fn(params, batch, rng) -> (loss, metrics)`."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def next_token_loss(apply_fn: Callable) -> Callable:
  """Mean next-token cross-entropy of `apply_fn(params, inputs)` against `targets`.

  `batch` holds `inputs`, `targets` ([batch, seq] int) and optionally `mask`
  ([batch, seq], 1 for positions that count).
  """
  def loss_fn(params, batch, rng):
    del rng
    logits = apply_fn(params, batch['inputs'])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    mask = batch.get('mask', jnp.ones_like(nll))
    count = jnp.maximum(mask.sum(), 1.0)
    loss = (nll * mask).sum() / count
    accuracy = ((logits.argmax(-1) == batch['targets']) * mask).sum() / count
    return loss, {'loss': loss, 'accuracy': accuracy}
  return loss_fn


def classification_loss(apply_fn: Callable) -> Callable:
  """Mean softmax cross-entropy of `apply_fn(params, inputs)` against integer `labels`."""
  def loss_fn(params, batch, rng):
    del rng
    logits = apply_fn(params, batch['inputs'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['labels']).mean()
    accuracy = (logits.argmax(-1) == batch['labels']).mean()
    return loss, {'loss': loss, 'accuracy': accuracy}
  return loss_fn
