"""End to end: `launch.analyze` trains the runlocal UNet and evaluates every arm (slow)."""
import json
import os

import pytest

from launch import analyze


@pytest.mark.slow
def test_runlocal_train_and_eval(tmp_path, data_dir):
  del data_dir
  workdir = str(tmp_path / 'eval')
  analyze.main(['--config=configs/guidance/shapes_eval.py:runlocal', f'--workdir={workdir}'])
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  for key in ('two_object_success', 'single_object_success', 'mcnemar_p_astar_vs_baseline',
              'guided_over_unguided_time'):
    assert key in results
  assert set(results['two_object_success']) == {'baseline', 'attend_excite', 'astar',
                                                'astar_non_concept'}
  assert results['samples_per_arm'] == 8 and results['model_source'] == 'trained'
  assert os.path.exists(os.path.join(workdir, 'params.msgpack'))
  assert os.path.exists(os.path.join(workdir, 'guidance_grid.png'))


def test_train_data_two_object_fraction():
  from lossland.guidance import training
  with pytest.raises(ValueError, match='source=generate'):
    training.shapes_train_data('shapes32', two_object_fraction=0.1)
  with pytest.raises(ValueError, match='num_examples'):
    training.shapes_train_data('generate', two_object_fraction=0.1)
  with pytest.raises(ValueError, match="unknown data.source 'tfds'"):
    training.shapes_train_data('tfds')
  data = training.shapes_train_data('generate', num_examples=2000, two_object_fraction=0.1)
  two = (data['objects'][:, 1, 0] >= 0).mean()
  assert 0.07 < two < 0.13, two
