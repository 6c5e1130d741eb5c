"""Held-out perplexity and recitation of (edited) LM params: the evaluator of the edit.

Merullo et al. (2025), sec. 4.1 measure an edit by two numbers: the model's
perplexity on held-out clean text (general ability; it should barely move)
and recitation of memorized sequences, greedy decoding the suffix after each
prefix (strict = exact, loose = 1 - Levenshtein/L >= 0.75; `metrics`). An
`LMEvaluator` holds fixed held-out batches placed on the mesh and jits the
scoring once, in the spirit of big_vision's `evaluators/`: every candidate
edit of a selection sweep or a control bisection is scored by the same
compiled functions.

    ev = LMEvaluator(model.apply, heldout_batches(valid_tokens, 16, 32, 48, seed=0))
    ev.perplexity(params), ev.recitation(params, prefixes, suffixes).strict

Host class (not jit-safe); the functions it compiles are.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from lossland import parallel
from lossland.curvature import metrics

FACTOR_SEED_OFFSET = 30_000  # factor batches: a window stream distinct from training's
HELDOUT_SEED_OFFSET = 40_000  # held-out perplexity windows


@dataclasses.dataclass(frozen=True)
class Recitation:
  """Recitation scores of a set of (prefix, suffix) pairs (means over the pairs)."""
  strict: float  # exact suffix match
  loose: float  # 1 - Levenshtein / L >= 0.75
  levenshtein: float  # mean normalized edit distance
  count: int  # number of pairs


def lm_windows(tokens: np.ndarray, num_batches: int, batch_size: int, seq_len: int,
               seed: int) -> list[dict]:
  """`num_batches` host batches of random `seq_len` windows of `tokens` (`data.lm_batch`)."""
  # lossland.data imports tensorflow_datasets; `import lossland.curvature` must not.
  from lossland.data.text import lm_batch  # pylint: disable=import-outside-toplevel
  if len(tokens) <= seq_len:
    raise ValueError(f'{len(tokens)} tokens are too few for windows of seq_len={seq_len}; give '
                     'more text or a shorter seq_len')
  return [lm_batch(tokens, i, batch_size=batch_size, seq_len=seq_len, seed=seed)
          for i in range(num_batches)]


def factor_batches(tokens: np.ndarray, num_batches: int, batch_size: int, seq_len: int,
                   seed: int) -> list[dict]:
  """Clean-text batches for the K-FAC factors of run seed `seed` (window seed + 30000)."""
  return lm_windows(tokens, num_batches, batch_size, seq_len, FACTOR_SEED_OFFSET + seed)


def heldout_batches(tokens: np.ndarray, num_batches: int, batch_size: int, seq_len: int,
                    seed: int) -> list[dict]:
  """Held-out perplexity batches of run seed `seed` (window seed + 40000)."""
  return lm_windows(tokens, num_batches, batch_size, seq_len, HELDOUT_SEED_OFFSET + seed)


class LMEvaluator:
  """Perplexity on fixed held-out batches and greedy-decoding recitation (jitted once).

  Args:
    apply_fn: `(params, tokens) -> logits` of a causal LM (`model.apply`); a
      `CausalLM`'s apply decodes with its KV cache (`metrics.greedy_decode`).
    heldout: host batches {'inputs', 'targets'[, 'mask']} for perplexity.
    mesh: the batches are sharded on its `data` axis; None = all local devices.
  """

  def __init__(self, apply_fn: Callable, heldout: Sequence[dict], *, mesh: Mesh | None = None):
    if not heldout:
      raise ValueError('LMEvaluator needs at least one held-out batch')
    self.mesh = mesh = parallel.data_mesh(mesh)
    self.ppl_batches = [parallel.shard_batch(b, mesh) for b in heldout]
    self._nll = jax.jit(lambda p, b: metrics.nll_sum(apply_fn, p, b))
    self._decode = jax.jit(functools.partial(metrics.greedy_decode, apply_fn), static_argnums=2)

  def perplexity(self, params) -> float:
    """exp(mean next-token NLL) over all held-out tokens."""
    # One batch at a time on multi-device CPU: each call all-reduces over the sharded batch.
    totals = [parallel.settle(self._nll(params, b)) for b in self.ppl_batches]
    nll, count = jax.device_get((sum(t[0] for t in totals), sum(t[1] for t in totals)))
    return metrics.perplexity(float(nll), float(count))

  def generate(self, params, prefixes: np.ndarray, num_tokens: int) -> np.ndarray:
    """Greedy continuations [n, num_tokens] of equal-length prefixes [n, P]."""
    return np.asarray(self._decode(params, prefixes, int(num_tokens)))

  def recitation(self, params, prefixes: np.ndarray, suffixes: np.ndarray) -> Recitation:
    """Recitation of equal-length token prefixes [n, P] and suffixes [n, L]."""
    suffixes = np.asarray(suffixes)
    scores = metrics.recitation_scores(self.generate(params, prefixes, suffixes.shape[1]),
                                       suffixes)
    return Recitation(scores['strict'], scores['loose'], scores['levenshtein'], len(suffixes))

  def recitation_of_pairs(self, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
                          ) -> Recitation:
    """Recitation of token (prefix, suffix) pairs of any lengths (decoded in equal-shape groups)."""
    if not pairs:
      raise ValueError('no (prefix, suffix) pairs to score')
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (prefix, suffix) in enumerate(pairs):
      if len(prefix) == 0 or len(suffix) == 0:
        raise ValueError(f'pair {i} has an empty prefix or suffix after tokenization')
      groups.setdefault((len(prefix), len(suffix)), []).append(i)
    if len(groups) == 1:
      return self.recitation(params, np.array([p for p, _ in pairs], np.int32),
                             np.array([s for _, s in pairs], np.int32))
    totals = np.zeros(3)
    for idx in groups.values():
      prefixes = np.array([pairs[i][0] for i in idx], np.int32)
      suffixes = np.array([pairs[i][1] for i in idx], np.int32)
      r = self.recitation(params, prefixes, suffixes)
      totals += len(idx) * np.array([r.strict, r.loose, r.levenshtein])
    strict, loose, lev = (float(v) for v in totals / len(pairs))
    return Recitation(strict, loose, lev, len(pairs))
