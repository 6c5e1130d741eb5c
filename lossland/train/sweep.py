"""Learning-rate sweeps whose grid grows past its edge while the best rate sits on it.

A best rate at the end of the grid means the optimum may lie outside it (a
half-parameter model often wants a larger rate), and comparing models each at
its grid's edge compares them below their best. `sweep_rates` therefore adds
rates geometrically past that end, with the ratio of the two outermost rates,
until the best rate is inside or `extend` rates were added.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence


@dataclasses.dataclass(frozen=True)
class RateSweep:
  """The finished runs of a sweep, in increasing rate order."""
  rates: tuple[float, ...]  # the rate of each finished run
  runs: tuple[Any, ...]  # what `run_at` returned for it
  scores: tuple[float, ...]  # `score(run)`, lower is better

  @property
  def best_index(self) -> int | None:
    """Index of the lowest score (the first of equal ones); None for an empty sweep."""
    return min(range(len(self.runs)), key=self.scores.__getitem__) if self.runs else None

  @property
  def best_rate(self) -> float | None:
    return None if self.best_index is None else self.rates[self.best_index]

  @property
  def best(self) -> Any:
    return None if self.best_index is None else self.runs[self.best_index]


def extend_grid(rates: Sequence[float], best: float) -> float | None:
  """The next rate past the grid's end where `best` sits, or None if it is inside.

  The step is the ratio of the two outermost rates at that end: [1e-3, 3e-3, 1e-2]
  with best 1e-2 gives 1e-2 * (1e-2 / 3e-3). Grids of fewer than two rates give None.
  """
  rates = sorted(rates)
  if len(rates) < 2:
    return None
  if best == rates[-1]:
    return rates[-1] * rates[-1] / rates[-2]
  if best == rates[0]:
    return rates[0] * rates[0] / rates[1]
  return None


def _default_score(run) -> float:
  return run['val_loss']


def sweep_rates(run_at: Callable[[float], Any], rates: Sequence[float], *, extend: int = 0,
                score: Callable[[Any], float] = _default_score) -> RateSweep:
  """Runs every rate of `rates`, then up to `extend` more past the end the best one sits on.

  Args:
    run_at: `lr -> run` (anything `score` reads), or None for a run that is not
      available (e.g. only finished runs are summarized); a None stops the extension.
    rates: the grid (any order; duplicates are run once).
    extend: at most this many rates are added beyond the grid (`extend_grid`).
    score: `run -> float`, lower is better (default: `run['val_loss']`). Ties go to
      the rate run first.

  Returns:
    RateSweep of the finished runs in increasing rate order.
  """
  if not isinstance(extend, int) or isinstance(extend, bool) or extend < 0:
    raise ValueError(f'extend={extend!r} must be an integer >= 0 (rates added past the grid)')
  if not rates:
    raise ValueError('rates is empty; give at least one learning rate')
  grid = sorted(set(float(r) for r in rates))
  done = {lr: run_at(lr) for lr in grid}
  for _ in range(extend if len(grid) > 1 else 0):
    finished = {lr: r for lr, r in done.items() if r is not None}
    if not finished:
      break
    new = extend_grid(grid, min(finished, key=lambda lr: score(finished[lr])))
    if new is None:
      break
    grid = sorted(grid + [new])
    done[new] = run_at(new)
    if done[new] is None:
      break
  kept = [lr for lr in grid if done[lr] is not None]
  return RateSweep(rates=tuple(kept), runs=tuple(done[lr] for lr in kept),
                   scores=tuple(float(score(done[lr])) for lr in kept))
