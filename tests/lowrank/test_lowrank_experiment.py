"""End to end: `launch.analyze` on configs/lowrank/pretrain_compare.py:runlocal, and the bench."""
import json
import os

import pytest

from launch import analyze, bench

CONFIG = 'configs/lowrank/pretrain_compare.py:runlocal'


def test_pretrain_compare_runlocal_writes_results(data_dir, tmp_path, monkeypatch):
  monkeypatch.chdir(os.path.join(os.path.dirname(__file__), '..', '..'))
  workdir = str(tmp_path / 'cmp')
  args = [f'--config={CONFIG}', f'--workdir={workdir}', '--config.lowrank.seeds=(0,)',
          f'--config.data.data_dir={data_dir}']
  analyze.main(args)
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  for arm in ('dense', 'lost'):
    r = results['arms'][arm]
    for key in ('val_loss_mean', 'val_loss_std', 'best_lr', 'linear_params', 'param_fraction',
                'step_ms', 'train_state_bytes'):
      assert key in r, (arm, key)
    assert 0 < r['val_loss_mean'] < 6.0  # below log(256) = 5.55 + slack after 12 steps
  assert results['arms']['dense']['param_fraction'] == 1.0
  assert 0.4 < results['arms']['lost']['param_fraction'] <= 0.5
  assert results['arms']['lost']['train_state_bytes'] < results['arms']['dense'][
      'train_state_bytes']
  assert isinstance(results['accept_lost_within_dense_0.05'], bool)
  # Finished runs are reused: summarizing trains nothing and reproduces the numbers.
  analyze.main(args + ['--config.lowrank.summarize_only=true'])
  with open(os.path.join(workdir, 'results.json')) as f:
    again = json.load(f)
  assert again['arms']['lost']['val_loss_mean'] == results['arms']['lost']['val_loss_mean']
  # A different training config never reuses a stale result.
  analyze.main(args + ['--config.lowrank.summarize_only=true', '--config.train.num_steps=13'])
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['arms'] == {}


@pytest.mark.slow
def test_step_bench_runlocal(data_dir, monkeypatch, capsys):
  monkeypatch.chdir(os.path.join(os.path.dirname(__file__), '..', '..'))
  bench.main(['--config=configs/lowrank/bench_step.py:runlocal',
              f'--config.data.data_dir={data_dir}'])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out['dense_step_ratio'] == 1.0 and out['lost_step_ms'] > 0
  assert out['lost_state_bytes_ratio'] < 0.7
