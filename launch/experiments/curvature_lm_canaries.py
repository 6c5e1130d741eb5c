"""Experiment: remove canary memorization from a small LM by K-FAC curvature edits.

Merullo et al. (2025), sec. 4.1 at toy scale; see configs/curvature/lm_canaries.py.
Trains the LM (or reuses the checkpoint in WORKDIR/train), estimates K-FAC
factors of the MLP gate/up projections on clean text, chooses the layers and
ρ on canary set A (lowest strict recitation with perplexity ratio within
`max_ppl_ratio`), reports set B, and compares random / inverted / SVD controls
at matched perplexity. Writes results.json and PNG figures.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from launch import common
from launch.experiments import curvature_canary_data as canary_data
from lossland import data as data_lib
from lossland import train as train_lib
from lossland.curvature import metrics


def train_lm(config, workdir: str):
  """Trains (or restores from WORKDIR/train) the canary LM; returns (model, params, extras)."""
  corpus = data_lib.load_tfds_text(config.data.source, vocab=config.data.vocab,
                                   data_dir=config.data.data_dir or None)
  cc, t = config.canary, config.train
  canaries = canary_data.make_canaries(cc.num, cc.prefix_len, cc.suffix_len, config.seed)
  num_steps = canary_data.steps_for_repeats(cc.num, cc.repeats, cc.rows)
  batch_fn = canary_data.make_batch_fn(
      corpus.train, canaries, batch_size=t.batch_size, seq_len=t.seq_len, canary_rows=cc.rows,
      repeats=cc.repeats, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  model = common.build_model(config.model, vocab_size=corpus.vocab.size)
  params = model.init(jax.random.key(config.seed), jnp.zeros((1, t.seq_len), jnp.int32))
  mesh = common.build_mesh(config.mesh, t.batch_size)
  schedule = train_lib.warmup_cosine(t.learning_rate, t.warmup_steps, num_steps, t.final_lr)
  optimizer = train_lib.adamw(learning_rate=schedule, b1=t.b1, b2=t.b2,
                              weight_decay=t.weight_decay, grad_clip=t.grad_clip)
  start = time.perf_counter()
  result = train_lib.fit(
      params=params, loss_fn=train_lib.next_token_loss(model.apply), optimizer=optimizer,
      batch_fn=batch_fn, num_steps=num_steps, mesh=mesh, rng=jax.random.key(config.seed + 1),
      data_seed=config.seed, workdir=os.path.join(workdir, 'train'),
      checkpoint_every=config.checkpoint_every, steps_per_block=t.steps_per_block,
      show_progress=config.progress)
  extras = {'corpus': corpus, 'canaries': canaries, 'mesh': mesh, 'num_steps': num_steps,
            'train_seconds': time.perf_counter() - start,
            'resumed_from': result.resumed_from}
  return model, jax.device_get(result.state.params), extras


def run(config, workdir: str) -> dict:
  model, params, ex = train_lm(config, workdir)
  canaries = ex['canaries']
  decode = jax.jit(lambda p, x: metrics.greedy_decode(model.apply, p, x, config.canary.suffix_len))
  gen = np.asarray(decode(params, canaries.prefixes))
  scores = metrics.recitation_scores(gen, canaries.suffixes)
  return {'train_steps': ex['num_steps'], 'train_seconds': ex['train_seconds'],
          **{f'all_{k}': v for k, v in scores.items()}}
