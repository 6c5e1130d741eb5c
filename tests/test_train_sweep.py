"""train.sweep_rates: the grid grows past the edge the best rate sits on, and only there."""
import numpy as np
import pytest

from lossland import train


def test_rate_sweep_extends_past_the_edge_until_the_best_rate_is_inside():
  optimum = 0.05  # a loss curve whose minimum lies above the grid
  calls = []

  def run_at(lr):
    calls.append(lr)
    return {'lr': lr, 'val_loss': abs(np.log(lr / optimum))}

  sweep = train.sweep_rates(run_at, [1e-2, 1e-3, 3e-3], extend=3)
  np.testing.assert_allclose(sweep.rates, [1e-3, 3e-3, 1e-2, 1e-2 * 10 / 3, 1e-2 * (10 / 3) ** 2])
  assert [r['lr'] for r in sweep.runs] == list(sweep.rates)
  assert sweep.best_rate == sweep.rates[3] and sweep.best is sweep.runs[3]  # inside now: stop
  assert sweep.scores[3] == min(sweep.scores)
  assert len(calls) == 5
  # Below the grid, bounded by `extend`; and an interior optimum adds nothing.
  low = train.sweep_rates(lambda lr: {'val_loss': lr}, [1e-3, 3e-3], extend=2)
  np.testing.assert_allclose(low.rates, [1e-3 / 9, 1e-3 / 3, 1e-3, 3e-3])
  assert len(train.sweep_rates(lambda lr: {'val_loss': abs(lr - 3e-3)}, [1e-3, 3e-3, 1e-2],
                               extend=2).runs) == 3
  # A custom score; one rate is never extended.
  assert train.sweep_rates(lambda lr: -lr, [1.0, 2.0], extend=1, score=lambda r: r).best_rate == 4.0
  assert train.sweep_rates(lambda lr: {'val_loss': 0.0}, [1e-3], extend=5).rates == (1e-3,)


def test_unfinished_runs_are_skipped_not_extended_and_ties_go_to_the_first_run():
  empty = train.sweep_rates(lambda lr: None, [1e-3, 3e-3], extend=2)
  assert empty.runs == () and empty.best is None and empty.best_rate is None
  # Every rate diverged (inf): the first rate run is the best, so the grid grows downward.
  diverged = train.sweep_rates(lambda lr: {'val_loss': float('inf')}, [1e-3, 1e-2], extend=1)
  np.testing.assert_allclose(diverged.rates, [1e-4, 1e-3, 1e-2])
  assert diverged.best_rate == pytest.approx(1e-4)


def test_extend_grid_and_bad_arguments():
  assert train.extend_grid([1.0, 2.0, 4.0], 4.0) == 8.0
  assert train.extend_grid([1.0, 2.0, 4.0], 1.0) == 0.5
  assert train.extend_grid([1.0, 2.0, 4.0], 2.0) is None
  assert train.extend_grid([1.0], 1.0) is None
  with pytest.raises(ValueError, match='extend'):
    train.sweep_rates(lambda lr: None, [1.0], extend=-1)
  with pytest.raises(ValueError, match='rates is empty'):
    train.sweep_rates(lambda lr: None, [], extend=1)
