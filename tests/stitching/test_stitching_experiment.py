"""End to end: launch.analyze on the digit-pairs stitching config (shrunk further), and the bench."""
import json
import os

import numpy as np
import pytest

from lossland.stitching import load_digit_pairs


def test_digit_pairs_dataset(data_dir):
  data = load_digit_pairs(200, 100, data_dir=data_dir)
  assert data.train_images.shape == (200, 8, 16, 1) and data.test_labels.shape == (100,)
  assert data.train_labels.max() <= 9 and 0.0 <= data.train_images.min() <= data.train_images.max() <= 1.0
  with pytest.raises(ValueError, match='must be positive'):
    load_digit_pairs(0, 10, data_dir=data_dir)


@pytest.mark.slow  # ~15 s of CPU, ~50 s wall on the shared 2-core machine
def test_analyze_runlocal_end_to_end(data_dir, tmp_path):
  from launch import analyze
  workdir = str(tmp_path / 'stitch')
  analyze.main([
      '--config=configs/stitching/digit_pairs.py:runlocal', f'--workdir={workdir}',
      f'--config.data.data_dir={data_dir}', '--config.model.features=(16,16)',
      '--config.data.num_train=1024', '--config.data.num_test=512',
      '--config.train.num_steps=40', '--config.train.steps_per_block=20',
      '--config.train.warmup_steps=5', '--config.tlm.num_steps=10',
      '--config.tlm.steps_per_block=10', '--config.dm.batch_size=512',
      '--config.eval.batch_size=256', '--config.similarity_examples=256',
      '--config.distant=1', '--config.figures=false'])
  with open(os.path.join(workdir, 'results.json')) as f:
    r = json.load(f)
  for key in ('self_dm_diag_residual_max', 'self_dm_diag_acc_drop_max', 'cka_self_rows_diag_max',
              'dm_self_rows_diag_max', 'tlm_ood_ratio_distant_median',
              'dm_ood_ratio_distant_median', 'tlm_more_similar_than_itself',
              'dm_more_similar_than_itself', 'tlm_direct_more_similar_than_itself'):
    assert np.isfinite(r[key]), key
  # A -> A: DM recovers the identity on the diagonal; CKA's row optimum is the diagonal.
  assert r['self_dm_diag_residual_max'] <= 1e-4
  assert abs(r['self_dm_diag_acc_drop_max']) <= 0.1
  assert r['cka_self_rows_diag_max'] == 1.0 and r['dm_self_rows_diag_max'] == 1.0
  m = r['per_seed'][0]['matrices']['AB']
  assert np.asarray(m['tlm_random_accuracy']).shape == (2, 2)


def test_bench_runlocal(capsys):
  from launch import bench
  bench.main(['--config=configs/stitching/bench_cka.py:runlocal'])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out['max_abs_diff_vs_numpy'] < 1e-4 and out['devices'] == 8
