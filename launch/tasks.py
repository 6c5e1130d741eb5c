"""Training tasks built from a config: language modelling and image classification.

A task bundles what `lossland.train.fit` needs: the model, a function that
initializes its params, the loss, a deterministic `batch_fn(step)` and the
evaluation batch stacks.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from launch import common
from lossland import data as data_lib
from lossland import train as train_lib
from lossland.errors import UserError


@dataclasses.dataclass
class Task:
  model: Any
  init_params: Callable[[], Any]  # `fit` calls it while the first training block compiles
  loss_fn: Callable
  batch_fn: Callable[[int], dict]
  eval_sets: dict[str, dict]
  tokens_per_step: int
  extras: dict

  @functools.cached_property
  def params(self):
    return self.init_params()


def _init_fn(model, seed: int, example_input) -> Callable[[], Any]:
  """`model.init` as one compiled program: a few seconds less than running it op by op."""
  return functools.partial(jax.jit(model.init), jax.random.key(seed), example_input)


def lm_task(config: ml_collections.ConfigDict, *, model=None) -> Task:
  """Next-token prediction on `config.data`'s text; `model` (e.g. an imported GPT-2) replaces
  `config.model`. A `train.seq_len` past the model's learned positions is a UserError."""
  t, e = config.train, config.eval
  corpus = None
  if model is None:
    corpus = common.build_text_corpus(config.data)
    model = common.build_model(config.model, vocab_size=corpus.vocab.size)
  common.check_seq_len(model, t.seq_len, 'train.seq_len')  # before anything compiles
  if corpus is None:  # a given model is checked before its text is read
    corpus = common.build_text_corpus(config.data)
  init_params = _init_fn(model, config.seed, jnp.zeros((1, t.seq_len), jnp.int32))
  pid, pcount = jax.process_index(), jax.process_count()

  def batch_fn(step: int) -> dict:
    return data_lib.lm_batch(corpus.train, step, batch_size=t.batch_size, seq_len=t.seq_len,
                             seed=config.seed, process_index=pid, process_count=pcount)

  def eval_stack(tokens, seed):
    return data_lib.stack_batches([
        data_lib.lm_batch(tokens, i, batch_size=e.batch_size, seq_len=t.seq_len, seed=seed,
                          process_index=pid, process_count=pcount)
        for i in range(e.num_batches)])

  # Fixed evaluation windows (seeds distinct from training) so every evaluation
  # of a run, and every run, scores the same text.
  eval_sets = {'val': eval_stack(corpus.validation, 10_000 + config.seed)}
  if e.get('train_too', True):
    eval_sets['train'] = eval_stack(corpus.train, 20_000 + config.seed)
  return Task(model, init_params, train_lib.next_token_loss(model.apply), batch_fn, eval_sets,
              t.batch_size * t.seq_len, {'corpus': corpus})


def classify_task(config: ml_collections.ConfigDict, *, model=None) -> Task:
  """`train.fit_classifier`'s recipe: epoch shuffles of the training images, the test set."""
  dataset = data_lib.load_image_dataset(config.data.source, data_dir=config.data.data_dir or None)
  t, e = config.train, config.eval
  model = model or common.build_model(config.model, num_classes=dataset.num_classes)
  init_params = _init_fn(model, config.seed, dataset.train_images[:1])
  batch_fn = train_lib.shuffled_batches(dataset.train_images, dataset.train_labels,
                                        batch_size=t.batch_size, data_seed=config.seed)
  eval_sets = {'test': train_lib.eval_stack(dataset.test_images, dataset.test_labels,
                                            batch_size=e.batch_size)}
  return Task(model, init_params, train_lib.classification_loss(model.apply), batch_fn, eval_sets,
              t.batch_size, {'dataset': dataset})


TASKS = {'lm': lm_task, 'classify': classify_task}


def build_task(config: ml_collections.ConfigDict, **kwargs) -> Task:
  """The task `config.task` names; a UserError (config key `task`) for an unknown one."""
  if config.task not in TASKS:
    raise UserError(f'unknown task {config.task!r} (config key task); available: '
                    f'{sorted(TASKS)}')
  return TASKS[config.task](config, **kwargs)
