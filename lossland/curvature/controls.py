"""Controls for the curvature edit at matched perplexity (Merullo et al. 2025, sec. 4.1).

An edit that removes recitation is only interesting if other edits that hurt
general ability as much do not: the paper compares the curvature edit with a
random mask, the inverted mask (keep the *lowest*-mass pairs, i.e. drop the
top of the spectrum) and SVD truncation of the weight, each tuned so that its
held-out perplexity matches the curvature edit's. Every control has a knob in
[0, 1], higher = milder edit, and `bisect_knob` finds the knob whose
perplexity is closest to the target (perplexity falls as the knob grows):

- random: keep round(knob * pairs) uniformly random pairs per layer;
- inverted: drop all but round(pairs ** (1 - knob)) lowest-mass pairs, a log
  scale (dropping even a few top-mass pairs costs a lot; knob 1 drops 1 pair
  per layer, knob 0 drops all of them);
- svd: truncate each layer matrix to rank round(knob * min(shape)).

`same_count_controls` also scores random and inverted masks that keep exactly
as many pairs as the curvature edit. Host functions.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import numpy as np

from lossland.curvature import edit as edit_lib
from lossland.curvature import eigen as eigen_lib
from lossland.curvature.evaluate import LMEvaluator, Recitation

KINDS = ('random', 'inverted', 'svd')


@dataclasses.dataclass(frozen=True)
class Bisection:
  """The best point of a knob bisection: knob, its perplexity and the edited params."""
  knob: float
  perplexity: float
  params: object


@dataclasses.dataclass(frozen=True)
class ControlReport:
  """A matched-perplexity control scored on the evaluation set."""
  kind: str
  knob: float
  perplexity: float
  recitation: Recitation


def pair_counts(bases: Mapping[str, eigen_lib.LayerBasis]) -> dict[str, int]:
  """Number of eigenbasis pairs (coefficients) of each layer."""
  return {n: b.shape[0] * b.shape[1] for n, b in bases.items()}


def kept_counts(bases: Mapping[str, eigen_lib.LayerBasis], rho,
                masses: Mapping | None = None) -> dict[str, int]:
  """Pairs the curvature edit at ρ (one, or {layer: ρ}) keeps per layer."""
  return {n: int(m.sum()) for n, m in edit_lib.curvature_masks(bases, rho, masses).items()}


def control_edit(kind: str, params, bases: Mapping[str, eigen_lib.LayerBasis], knob: float, *,
                 rng: jax.Array):
  """The `kind` control of strength `knob` in [0, 1] (higher = milder; module docstring)."""
  total = pair_counts(bases)
  if kind == 'svd':
    ranks = {n: max(1, int(round(knob * min(b.shape)))) for n, b in bases.items()}
    return edit_lib.svd_edit(params, {n: b.view for n, b in bases.items()}, ranks)
  if kind == 'inverted':
    counts = {n: total[n] - max(1, int(round(total[n] ** (1.0 - knob)))) for n in bases}
  elif kind == 'random':
    counts = {n: max(1, int(round(knob * total[n]))) for n in bases}
  else:
    raise ValueError(f'control kind must be one of {KINDS}, got {kind!r}')
  return edit_lib.masked_edit(params, bases, edit_lib.control_masks(kind, bases, counts, rng=rng))


def bisect_knob(evaluate: Callable[[float], tuple[float, object]], target_ppl: float, steps: int,
                lo: float = 0.0, hi: float = 1.0) -> Bisection:
  """Bisects the knob in [lo, hi] for the perplexity closest (in log) to `target_ppl`.

  `evaluate(knob) -> (perplexity, params)`; perplexity must fall as the knob
  grows. Returns the best of the `steps` midpoints tried.
  """
  if steps < 1:
    raise ValueError(f'bisection needs at least one step, got steps={steps}')
  best = None
  for _ in range(steps):
    mid = (lo + hi) / 2
    ppl, params = evaluate(mid)
    if best is None or abs(np.log(ppl / target_ppl)) < abs(np.log(best.perplexity / target_ppl)):
      best = Bisection(mid, ppl, params)
    if ppl > target_ppl:
      lo = mid
    else:
      hi = mid
  return best


def matched_control(kind: str, params, bases: Mapping[str, eigen_lib.LayerBasis],
                    evaluator: LMEvaluator, target_ppl: float, *, steps: int,
                    rng: jax.Array) -> Bisection:
  """The `kind` control whose held-out perplexity best matches `target_ppl`."""
  def evaluate(knob):
    p = control_edit(kind, params, bases, knob, rng=rng)
    return evaluator.perplexity(p), p
  return bisect_knob(evaluate, target_ppl, steps)


def same_count_controls(params, bases: Mapping[str, eigen_lib.LayerBasis],
                        kept: Mapping[str, int], *, rng: jax.Array) -> dict[str, object]:
  """{'random', 'inverted'}: params edited by masks keeping `kept[layer]` pairs each."""
  return {kind: edit_lib.masked_edit(params, bases,
                                     edit_lib.control_masks(kind, bases, kept, rng=rng))
          for kind in ('random', 'inverted')}


def matched_controls(params, bases: Mapping[str, eigen_lib.LayerBasis], evaluator: LMEvaluator,
                     target_ppl: float, prefixes, suffixes, *, steps: int, rng: jax.Array,
                     kinds=KINDS, log: Callable[[str], None] | None = None
                     ) -> dict[str, ControlReport]:
  """Each control of `kinds` at `target_ppl` (`matched_control`), with its recitation."""
  out = {}
  for kind in kinds:
    c = matched_control(kind, params, bases, evaluator, target_ppl, steps=steps, rng=rng)
    rec = evaluator.recitation(c.params, prefixes, suffixes)
    out[kind] = ControlReport(kind, c.knob, c.perplexity, rec)
    if log is not None:
      log(f'control {kind}: perplexity {c.perplexity:.4f} (target {target_ppl:.4f}), strict '
          f'{rec.strict:.4f}')
  return out
