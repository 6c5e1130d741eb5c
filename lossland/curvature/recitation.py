"""Per-passage recitation of a memorized set, and its rates by kind with bootstrap intervals.

Merullo et al. (2025), sec. 4.1 report strict and loose recitation rates of a
memorized set before and after an edit. On a set found in real text
(`memorization.scan`) the set is small and of two kinds (stored text and
rule-following sequences), so each rate is given per kind with a percentile
bootstrap interval over passages (Efron & Tibshirani 1993, ch. 13), and every
passage's own result is kept for the per-passage tables.

Host functions; decoding is jitted once per (prefix, suffix) shape.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from lossland.curvature import memorization, metrics


@dataclasses.dataclass(frozen=True)
class PassageScores:
  """Similarity (1 - Levenshtein/L) and strict match of each passage, in the passages' order."""
  similarity: np.ndarray  # [n] float
  strict: np.ndarray  # [n] bool


def recite(apply_fn: Callable, params, passages: Sequence[memorization.Passage], *,
           batch_size: int = 8) -> PassageScores:
  """Greedy-decodes every passage's suffix after its prefix and scores it."""
  n = len(passages)
  similarity, strict = np.zeros(n), np.zeros(n, bool)
  groups: dict[tuple[int, int], list[int]] = {}
  for i, p in enumerate(passages):
    groups.setdefault((len(p.prefix), len(p.suffix)), []).append(i)
  for (_, length), idx in groups.items():
    prefixes = np.array([passages[i].prefix for i in idx], np.int32)
    suffixes = np.array([passages[i].suffix for i in idx], np.int32)
    generated = memorization.greedy_continuations(apply_fn, params, prefixes, length,
                                                  batch_size=batch_size)
    for j, i in enumerate(idx):
      similarity[i] = 1.0 - metrics.levenshtein(generated[j], suffixes[j]) / length
      strict[i] = bool(np.all(generated[j] == suffixes[j]))
  return PassageScores(similarity, strict)


def bootstrap_interval(values: np.ndarray, *, draws: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of `values` (resampling them with replacement)."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return (float('nan'), float('nan'))
  rng = np.random.default_rng(seed)
  means = values[rng.integers(0, values.size, (draws, values.size))].mean(axis=1)
  tail = (1.0 - level) / 2
  return (float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail)))


def rates_by_kind(passages: Sequence[memorization.Passage], scores: PassageScores, *,
                  loose_threshold: float, seed: int = 0) -> dict[str, dict]:
  """{kind or 'all': {'n', 'strict', 'strict_ci', 'loose', 'loose_ci', 'similarity'}}."""
  kinds = np.array([p.kind for p in passages])
  loose = scores.similarity >= loose_threshold
  out = {}
  for kind in ['all'] + sorted(set(kinds.tolist())):
    sel = np.ones(len(passages), bool) if kind == 'all' else kinds == kind
    if not sel.any():
      continue
    out[kind] = {'n': int(sel.sum()),
                 'strict': float(scores.strict[sel].mean()),
                 'strict_ci': bootstrap_interval(scores.strict[sel], seed=seed),
                 'loose': float(loose[sel].mean()),
                 'loose_ci': bootstrap_interval(loose[sel], seed=seed),
                 'similarity': float(scores.similarity[sel].mean())}
  return out
