"""The likelihoods whose Fisher the K-FAC factors approximate.

The Fisher of a model p(y | x, θ) is E[∇ log p ∇ log pᵀ]; K-FAC needs the
gradient of the negative log-likelihood at each selected layer's output
(Martens & Grosse 2015, sec. 2). The *true* Fisher draws y from the model's
own predictive distribution (Merullo et al. 2025, sec. 3.1, the default); the
*empirical* Fisher uses the dataset's targets.

- 'categorical': outputs are logits [..., classes]; the loss is the softmax
  cross-entropy with labels sampled from the logits ('true') or taken from
  `batch['targets']` / `batch['labels']` ('empirical').
- 'gaussian': outputs are the means of a unit-variance Gaussian (regression,
  squared error); the loss is ½‖y − mean‖² per example, summed over the last
  output axis, with y ~ N(mean, I) ('true') or the batch targets ('empirical').
- a callable `(outputs, batch, rng) -> per-example loss array`: the negative
  log-likelihood of targets it chooses itself (sampled from stop-gradient
  outputs for a true Fisher); its terms are summed, weighted by
  `batch['mask']` when the batch has one.

Each loss function returns `(Σ mask·loss, mask)`; the mask (ones when the
batch has none) says which positions are samples.

Mutable collections. A model applied with `mutable=` (e.g. BatchNorm in train
mode, `apply_kwargs={'train': True, 'mutable': ['batch_stats']}`) returns
`(outputs, updates)` with `updates` a dict of collections; every likelihood
(a callable too) is given `outputs`, the first element, and the updates are
dropped (the factors never write back batch statistics).

Regression targets under 'categorical'. A batch whose 'targets' (or
'labels') are floats of the model outputs' shape holds regression targets;
the categorical likelihood refuses it (for either Fisher type, though the true
Fisher never reads them) and asks for likelihood='gaussian'. Integer labels
([batch] or [batch, seq]) and batches without targets are unaffected.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

FISHER_TYPES = ('true', 'empirical')
LIKELIHOODS = ('categorical', 'gaussian')

Likelihood = str | Callable


def check(likelihood: Likelihood, fisher_type: str) -> None:
  """Raises a ValueError naming the argument when the pair is not supported."""
  if fisher_type not in FISHER_TYPES:
    raise ValueError(f'fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}')
  if callable(likelihood):
    if fisher_type != 'true':
      raise ValueError(f'fisher_type={fisher_type!r} has no meaning for a likelihood callable: '
                       'it chooses its own targets (read them from `batch` inside it for an '
                       "empirical Fisher) and fisher_type must stay 'true'")
    return
  if likelihood not in LIKELIHOODS:
    raise ValueError(f'likelihood must be one of {LIKELIHOODS} or a callable '
                     f'(outputs, batch, rng) -> per-example loss, got {likelihood!r}')


def model_outputs(outputs: Any) -> Any:
  """`outputs` itself, or the first element of `(outputs, updates)` from `apply(..., mutable=...)`.

  A pair counts as mutable-apply output when its second element is a Mapping
  of collections (each a Mapping, e.g. {'batch_stats': {...}}).
  """
  if (isinstance(outputs, tuple) and len(outputs) == 2 and isinstance(outputs[1], Mapping)
      and all(isinstance(c, Mapping) for c in outputs[1].values())):
    return outputs[0]
  return outputs


def _targets(batch, likelihood: str) -> jax.Array:
  for key in ('targets', 'labels'):
    if key in batch:
      return batch[key]
  raise ValueError(f"the batch has keys {sorted(batch)}; the empirical Fisher of the "
                   f"{likelihood!r} likelihood needs 'targets' or 'labels' next to 'inputs'")


def _categorical(logits: jax.Array, batch, rng: jax.Array, fisher_type: str) -> jax.Array:
  if logits.ndim == 0 or logits.shape[-1] < 2:
    raise ValueError(f'the model outputs have shape {tuple(logits.shape)}: a categorical '
                     'likelihood needs logits over at least 2 classes on the last axis (a '
                     'single output has zero gradient). For a regression model pass '
                     "likelihood='gaussian'")
  for key in ('targets', 'labels'):
    if key not in batch:
      continue
    t = batch[key]
    if jnp.issubdtype(t.dtype, jnp.floating) and tuple(t.shape) == tuple(logits.shape):
      raise ValueError(f"the batch {key} are {t.dtype} with the model outputs' shape "
                       f'{tuple(logits.shape)}: they look like regression targets, which the '
                       "default likelihood='categorical' (a softmax over the outputs) does not "
                       "fit; for a regression model pass likelihood='gaussian' (for one-hot "
                       'class targets, give integer labels instead)')
  if fisher_type == 'true':
    labels = jax.random.categorical(rng, jax.lax.stop_gradient(logits).astype(jnp.float32))
  else:
    labels = _targets(batch, 'categorical')
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f'the batch targets are {labels.dtype}, but a categorical likelihood '
                       "needs integer class labels; for regression targets pass "
                       "likelihood='gaussian'")
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _gaussian(means: jax.Array, batch, rng: jax.Array, fisher_type: str) -> jax.Array:
  means = means.astype(jnp.float32)
  if fisher_type == 'true':
    y = jax.lax.stop_gradient(means) + jax.random.normal(rng, means.shape, jnp.float32)
  else:
    y = _targets(batch, 'gaussian').astype(jnp.float32)
    if y.shape != means.shape:
      raise ValueError(f'the batch targets have shape {tuple(y.shape)} but the model outputs '
                       f'(the Gaussian means) have shape {tuple(means.shape)}; give targets of '
                       'the outputs\' shape')
  sq = 0.5 * (y - means) ** 2
  return sq.sum(-1) if sq.ndim >= 2 else sq


def loss_fn(likelihood: Likelihood, fisher_type: str, batch, rng: jax.Array) -> Callable:
  """`outputs -> (Σ mask·per-example loss, mask)` for `batch`; jit-safe.

  `outputs` may be the `(outputs, updates)` pair of a mutable apply (see
  `model_outputs`).
  """
  check(likelihood, fisher_type)

  def loss(outputs):
    outputs = model_outputs(outputs)
    if callable(likelihood):
      per_example = jnp.asarray(likelihood(outputs, batch, rng), jnp.float32)
    elif likelihood == 'categorical':
      per_example = _categorical(outputs, batch, rng, fisher_type)
    else:
      per_example = _gaussian(outputs, batch, rng, fisher_type)
    mask = batch.get('mask')
    if mask is None:
      mask = jnp.ones(per_example.shape, jnp.float32)
    elif tuple(mask.shape) != tuple(per_example.shape) and callable(likelihood):
      raise ValueError(f'batch["mask"] has shape {tuple(mask.shape)} but the likelihood returned '
                       f'per-example losses of shape {tuple(per_example.shape)}; return one '
                       'loss per masked position')
    return (per_example * mask).sum(), mask.astype(jnp.float32)

  return loss
