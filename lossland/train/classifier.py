"""Training an image (or any) classifier with `fit`, and its accuracy.

The one recipe behind the classification task of `launch.train`, the
noisy-label curvature experiment and the stitching experiment: batches are
`epoch_indices` shuffles of the training arrays (every example once per epoch,
the position is the step), the loss is `classification_loss`, and the params
come back with the `FitResult`.

    result = train.fit_classifier(model, params, images, labels, batch_size=128,
                                  num_steps=1000, optimizer=train.adamw(learning_rate=1e-3),
                                  rng=jax.random.key(1), data_seed=0)
    train.accuracy(model, result.params, {'inputs': test_x, 'labels': test_y})
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh

from lossland.data import images as images_lib
from lossland.parallel import mesh as mesh_lib
from lossland.train import loop, objectives


@dataclasses.dataclass(frozen=True)
class ClassifierResult:
  params: Any  # the trained params (device arrays on the mesh)
  fit: loop.FitResult  # losses, evaluations, timing, EMA and budget of the run

  @property
  def train_losses(self) -> np.ndarray:
    return self.fit.train_losses


def as_apply_fn(model_or_apply_fn, apply_kwargs: Mapping[str, Any] | None = None) -> Callable:
  """`(params, inputs) -> logits` from a linen module or an `apply_fn(params, inputs, **kw)`."""
  apply_fn = model_or_apply_fn.apply if isinstance(model_or_apply_fn, nn.Module) \
      else model_or_apply_fn
  if not callable(apply_fn):
    raise TypeError(f'expected a flax.linen Module or an apply_fn(params, inputs, ...), got '
                    f'{type(model_or_apply_fn).__name__}')
  kwargs = dict(apply_kwargs or {})
  return (lambda params, x: apply_fn(params, x, **kwargs)) if kwargs else apply_fn


def _check_arrays(images, labels) -> None:
  if len(images) != len(labels):
    raise ValueError(f'images has {len(images)} examples but labels has {len(labels)}; pass '
                     'one label per example')


def shuffled_batches(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                     data_seed: int, process_index: int | None = None,
                     process_count: int | None = None) -> Callable[[int], dict]:
  """`batch_fn(step) -> {'inputs', 'labels'}`: this process's rows of global batch `step`.

  Rows are `data.epoch_indices(step, seed=data_seed)`: a fresh permutation of the
  examples per epoch, so the batch depends only on the step (what `fit` resumes by).
  """
  _check_arrays(images, labels)
  pid = jax.process_index() if process_index is None else process_index
  pcount = jax.process_count() if process_count is None else process_count

  def batch_fn(step: int) -> dict:
    idx = images_lib.epoch_indices(step, batch_size=batch_size, num_examples=len(labels),
                                   seed=data_seed, process_index=pid, process_count=pcount)
    return {'inputs': images[idx], 'labels': labels[idx]}
  return batch_fn


def eval_stack(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
               process_index: int | None = None, process_count: int | None = None) -> dict:
  """The examples as `fit`'s evaluation stack [n, this process's rows, ...], in order.

  The last `len % batch_size` examples are left out (every batch is full).
  """
  _check_arrays(images, labels)
  pid = jax.process_index() if process_index is None else process_index
  pcount = jax.process_count() if process_count is None else process_count
  n = len(labels) // batch_size
  if n == 0:
    raise ValueError(f'eval batch size {batch_size} exceeds the {len(labels)} examples; lower '
                     'it (config key eval.batch_size)')
  if batch_size % pcount:
    raise ValueError(f'eval batch size {batch_size} is not divisible by {pcount} processes')
  local = batch_size // pcount
  x = images[:n * batch_size].reshape(n, batch_size, *images.shape[1:])
  y = labels[:n * batch_size].reshape(n, batch_size, *labels.shape[1:])
  rows = slice(pid * local, (pid + 1) * local)
  return {'inputs': x[:, rows], 'labels': y[:, rows]}


def data_mesh(batch_size: int, mesh: Mesh | None = None) -> Mesh:
  """`mesh`, or the most local devices that divide `batch_size` on one `data` axis."""
  if mesh is not None:
    return mesh
  devices = jax.local_devices()
  count = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)
  return mesh_lib.make_mesh({mesh_lib.DATA_AXIS: count}, devices[:count])


def fit_classifier(model_or_apply_fn, params, images: np.ndarray, labels: np.ndarray, *,
                   batch_size: int, num_steps: int, optimizer: optax.GradientTransformation,
                   rng: jax.Array, data_seed: int, mesh: Mesh | None = None,
                   apply_kwargs: Mapping[str, Any] | None = None, steps_per_block: int = 1,
                   show_progress: bool = False, **fit_kwargs) -> ClassifierResult:
  """Trains a classifier on `(images, labels)` with softmax cross-entropy.

  Args:
    model_or_apply_fn: a linen module (its `apply`) or `apply_fn(params, inputs,
      **apply_kwargs) -> logits [batch, classes]`.
    params: initial params, or a zero-argument function returning them (see `fit`).
    images, labels: the whole training set (host arrays; every process holds all of it).
    batch_size: global batch size.
    num_steps: optimizer steps.
    optimizer: an optax transformation (e.g. `train.adamw(...)`).
    rng: `fit`'s base key (step s uses `fold_in(rng, s)`).
    data_seed: seed of the epoch shuffles (`shuffled_batches`).
    mesh: the device mesh; None: the most local devices that divide `batch_size`.
    apply_kwargs: keyword arguments for every call of the apply function.
    steps_per_block, show_progress, **fit_kwargs: passed to `fit` (e.g. `eval_sets`,
      `workdir`, `checkpoint_every`, `ema_decay`, `time_budget_s`).

  Returns:
    ClassifierResult: the trained params and the `FitResult`.
  """
  apply_fn = as_apply_fn(model_or_apply_fn, apply_kwargs)
  batch_fn = shuffled_batches(images, labels, batch_size=batch_size, data_seed=data_seed)
  result = loop.fit(params=params, loss_fn=objectives.classification_loss(apply_fn),
                    optimizer=optimizer, batch_fn=batch_fn, num_steps=num_steps,
                    mesh=data_mesh(batch_size, mesh), rng=rng, data_seed=data_seed,
                    steps_per_block=steps_per_block, show_progress=show_progress, **fit_kwargs)
  return ClassifierResult(params=result.state.params, fit=result)


def accuracy(model_or_apply_fn, params, batches: Mapping[str, Any] | Iterable[Mapping[str, Any]],
             *, apply_kwargs: Mapping[str, Any] | None = None) -> float:
  """Fraction of examples whose argmax logit is the label, over one batch or several.

  `batches` is a dict {'inputs', 'labels'} or an iterable of them; every example
  counts once (a mean over examples, not over batches).
  """
  apply_fn = jax.jit(as_apply_fn(model_or_apply_fn, apply_kwargs))
  if isinstance(batches, Mapping):
    batches = [batches]
  correct = total = 0
  for batch in batches:
    if not isinstance(batch, Mapping) or 'inputs' not in batch or 'labels' not in batch:
      raise ValueError("each batch must be a dict with 'inputs' and 'labels'")
    predicted = np.asarray(apply_fn(params, batch['inputs'])).argmax(-1)
    correct += int((predicted == np.asarray(batch['labels'])).sum())
    total += int(np.asarray(batch['labels']).size)
  if total == 0:
    raise ValueError('accuracy needs at least one example')
  return correct / total
