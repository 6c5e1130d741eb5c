"""Choosing which layers to edit and how much curvature mass ρ to keep.

Merullo et al. (2025), sec. 4.1 (and app. on hyperparameters): the edit's
layers and ρ are chosen on a *sweep* set of memorized sequences (canary set
A) and recitation is reported on a disjoint set (set B), so the reported
number is not fitted to its own examples. Candidates are runs of consecutive
decoder blocks (`block_i`, up to `max_blocks` long); a candidate is allowed
when its held-out perplexity stays within `max_ppl_ratio` of the unedited
model's, and the allowed candidate with the lowest strict recitation on set A
(then the lowest perplexity ratio) wins. Sec. 4.3 (noisy labels) chooses ρ the
same way with classification scores: `choose_rho`.

Host functions (they loop over candidate edits; each edit and score is jitted).
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from lossland.curvature import edit as edit_lib
from lossland.curvature import eigen as eigen_lib
from lossland.curvature.evaluate import LMEvaluator

_BLOCK = re.compile(r'(?:^|/)block_(\d+)(?:/|$)')


@dataclasses.dataclass(frozen=True)
class SweepPoint:
  """One candidate of the selection sweep, scored on set A."""
  blocks: tuple[int, ...]
  rho: float
  ppl_ratio: float  # held-out perplexity after / before
  strict_a: float  # strict recitation of set A after the edit

  def as_dict(self) -> dict:
    return {'blocks': list(self.blocks), 'rho': self.rho, 'ppl_ratio': self.ppl_ratio,
            'strict_a': self.strict_a}


@dataclasses.dataclass(frozen=True)
class Selection:
  """The chosen edit: layer paths (with their blocks), ρ, and the whole sweep."""
  layers: tuple[str, ...]
  blocks: tuple[int, ...]
  rho: float
  sweep: tuple[SweepPoint, ...]


@dataclasses.dataclass(frozen=True)
class RhoSweep:
  """Strict recitation and held-out perplexity of one set of layers at each ρ."""
  rhos: tuple[float, ...]
  strict: tuple[float, ...]
  perplexity: tuple[float, ...]


def block_index(path: str) -> int | None:
  """The i of the `block_i` module in a layer path, or None."""
  match = _BLOCK.search(path)
  return int(match.group(1)) if match else None


def contiguous_block_runs(candidate_blocks: Sequence[int], max_blocks: int
                          ) -> list[tuple[int, ...]]:
  """Runs of 1..max_blocks consecutive block indices drawn from `candidate_blocks`.

  Ordered by length, then by position among the candidates (as `itertools.combinations`).
  """
  runs = []
  for k in range(1, max_blocks + 1):
    for run in itertools.combinations(candidate_blocks, k):
      if list(run) == list(range(run[0], run[0] + k)):
        runs.append(tuple(run))
  return runs


def layers_of_blocks(bases: Mapping[str, eigen_lib.LayerBasis], blocks: Sequence[int]
                     ) -> dict[str, eigen_lib.LayerBasis]:
  """The bases whose layer lies in one of `blocks` (paths `.../block_i/...`)."""
  wanted = set(blocks)
  return {n: b for n, b in bases.items() if block_index(n) in wanted}


def select_layers_and_rho(params, bases: Mapping[str, eigen_lib.LayerBasis],
                          evaluator: LMEvaluator, prefixes_a: np.ndarray, suffixes_a: np.ndarray,
                          *, candidate_blocks: Sequence[int], max_blocks: int,
                          rhos: Sequence[float], max_ppl_ratio: float,
                          ppl_before: float | None = None,
                          rho_overrides: Sequence[tuple[str, float]] = (),
                          log: Callable[[str], None] | None = None) -> Selection:
  """Sweeps block runs x ρ (< 1) on set A and returns the choice (module docstring).

  Args:
    params: the unedited model's variables.
    bases: eigenbases of every candidate layer (paths containing `block_i`).
    evaluator: scores perplexity and recitation.
    prefixes_a, suffixes_a: set A token arrays [n, P], [n, L].
    candidate_blocks: block indices the runs are drawn from.
    max_blocks: longest run.
    rhos: kept-mass fractions to try (values >= 1 are skipped: no edit).
    max_ppl_ratio: allowed perplexity after / before; when no candidate is
      within it, the candidate with the lowest recitation of all is chosen.
    ppl_before: the unedited perplexity (computed when None).
    rho_overrides: (regex, ρ) pairs that fix ρ for the layers they match
      (`rho_by_layer`); the swept ρ applies to the others.
    log: called with one line per candidate (e.g. `print`).
  """
  runs = contiguous_block_runs(candidate_blocks, max_blocks)
  if not runs:
    raise ValueError(f'no run of consecutive blocks among candidate_blocks={list(candidate_blocks)}')
  if ppl_before is None:
    ppl_before = evaluator.perplexity(params)
  sweep = []
  for blocks in runs:
    sub = layers_of_blocks(bases, blocks)
    if not sub:
      raise ValueError(f'no layer of blocks {list(blocks)} among the bases {list(bases)[:4]}')
    for rho in rhos:
      if rho >= 1.0:
        continue
      edited = edit_lib.curvature_edit(params, sub, rho_by_layer(sub, rho, rho_overrides))
      ppl = evaluator.perplexity(edited)
      strict = evaluator.recitation(edited, prefixes_a, suffixes_a).strict
      sweep.append(SweepPoint(tuple(blocks), rho, ppl / ppl_before, strict))
      if log is not None:
        log(f'selection: blocks {list(blocks)} rho {rho}: perplexity ratio '
            f'{ppl / ppl_before:.4f}, strict recitation (set A) {strict:.4f}')
  if not sweep:
    raise ValueError(f'rhos={list(rhos)} has no value below 1; give at least one')
  ok = [s for s in sweep if s.ppl_ratio <= max_ppl_ratio] or sweep
  choice = min(ok, key=lambda s: (s.strict_a, s.ppl_ratio))
  layers = tuple(layers_of_blocks(bases, choice.blocks))
  return Selection(layers, choice.blocks, choice.rho, tuple(sweep))


def rho_sweep(params, bases: Mapping[str, eigen_lib.LayerBasis], evaluator: LMEvaluator,
              prefixes: np.ndarray, suffixes: np.ndarray, rhos: Sequence[float],
              masses: Mapping | None = None) -> RhoSweep:
  """Strict recitation and perplexity of `curvature_edit(params, bases, ρ[, masses])` per ρ."""
  strict, ppl = [], []
  for rho in rhos:
    p = edit_lib.curvature_edit(params, bases, rho, masses)
    strict.append(evaluator.recitation(p, prefixes, suffixes).strict)
    ppl.append(evaluator.perplexity(p))
  return RhoSweep(tuple(rhos), tuple(strict), tuple(ppl))


def score_rhos(params, bases: Mapping[str, eigen_lib.LayerBasis], rhos: Sequence[float],
               score_fn: Callable, masses: Mapping | None = None) -> list[dict]:
  """`score_fn(curvature_edit(params, bases, ρ[, masses]))` (a dict of floats) per ρ."""
  return [score_fn(edit_lib.curvature_edit(params, bases, r, masses)) for r in rhos]


def choose_rho(rhos: Sequence[float], rows: Sequence[Mapping], *,
               objective: Callable[[Mapping], float],
               feasible: Callable[[Mapping], bool]) -> int:
  """Index of the ρ with the lowest `objective` among `feasible` rows (ties: larger ρ).

  When no row is feasible, index 0 (the first, normally mildest, ρ) is returned.
  """
  ok = [i for i, row in enumerate(rows) if feasible(row)] or [0]
  return min(ok, key=lambda i: (objective(rows[i]), -rhos[i]))


def rho_by_layer(layers, rho: float, overrides: Sequence[tuple[str, float]] = ()
                 ) -> dict[str, float]:
  """{layer: ρ}: `rho` for every layer, except the first `(regex, ρ)` of `overrides` it matches.

  E.g. `overrides=(('mlp/down', 0.95),)` keeps more of the down projections,
  whose mass concentrates in few pairs, than the gate/up ones.
  """
  out = {}
  for name in layers:
    out[name] = next((float(r) for pattern, r in overrides if re.search(pattern, name)), rho)
    edit_lib.check_rho(out[name])
  return out
