"""End-to-end: both curvature experiments and the benchmark at `runlocal` size."""
import json
import os

import pytest

from launch import analyze, bench


@pytest.mark.slow  # ~60 s of CPU each on the shared 2-core machine
@pytest.mark.parametrize('name', ['lm_canaries', 'noisy_labels'])
def test_experiment_runlocal_writes_results(name, tmp_path, data_dir):
  del data_dir
  analyze.main([f'--config=configs/curvature/{name}.py:runlocal', f'--workdir={tmp_path}'])
  with open(os.path.join(tmp_path, 'results.json')) as f:
    results = json.load(f)
  if name == 'lm_canaries':
    for key in ('recitation_strict_before', 'recitation_strict_after', 'recitation_loose_after',
                'perplexity_before', 'perplexity_after', 'rho', 'layers',
                'control_random_strict', 'control_inverted_strict', 'control_svd_strict'):
      assert key in results, key
    assert os.path.exists(os.path.join(tmp_path, 'band_ratio.png'))
  else:
    for key in ('flipped_noisy_before', 'flipped_noisy_after', 'flipped_true_after',
                'test_acc_before', 'test_acc_after'):
      assert key in results, key
  assert os.path.exists(os.path.join(tmp_path, 'spectra.png'))
  assert os.path.exists(os.path.join(tmp_path, 'kept_mass.png'))


@pytest.mark.slow
def test_bench_runlocal(capsys):
  bench.main(['--config=configs/curvature/bench_factors.py:runlocal'])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out['ratio'] > 0 and out['layers'] == 6
