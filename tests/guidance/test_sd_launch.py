"""End to end: `launch.analyze` with configs/guidance/sd_guided.py on a tiny random SD folder."""
import json
import pathlib
import shutil

import numpy as np
import pytest
import safetensors.numpy

from launch import analyze

SD1 = pathlib.Path(__file__).resolve().parent.parent / 'fixtures' / 'sd' / 'tiny_sd1'


def _random_folder(path: pathlib.Path, seed: int) -> pathlib.Path:
  """tiny_sd1's layout and configs with freshly drawn UNet weights (same shapes and dtypes)."""
  shutil.copytree(SD1, path, ignore=shutil.ignore_patterns('*.npz'))
  weights = path / 'unet' / 'diffusion_pytorch_model.safetensors'
  rng = np.random.default_rng(seed)
  state = safetensors.numpy.load_file(str(weights))
  redrawn = {k: (rng.standard_normal(v.shape) / np.sqrt(max(1, v[0].size))).astype(v.dtype)
             if v.ndim > 1 else v for k, v in state.items()}
  safetensors.numpy.save_file(redrawn, str(weights))
  return path


def _run(tmp_path, arms):
  folder = _random_folder(tmp_path / 'sd', seed=3)
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('# two prompts\na cat and a dog | cat, dog\n\na red ball on a blue bench | '
                     'ball, bench\n')
  workdir = tmp_path / 'out'
  analyze.main(['--config=configs/guidance/sd_guided.py:runlocal',
                f'--config.model.path={folder}', f'--config.prompts_file={prompts}',
                f'--config.arms={arms!r}', '--config.sampling.num_steps=2',
                f'--workdir={workdir}'])
  return json.loads((workdir / 'results.json').read_text()), workdir


def _check(results, workdir, arms):
  assert set(results['arms']) == set(arms)
  assert results['samples_per_arm'] == 4 and results['seeds'] == [0, 1]
  images = np.load(workdir / 'images.npz')
  for arm in arms:
    assert images[f'{arm}/images'].shape == (4, 64, 64, 3)
    if arm != 'baseline':
      assert images[f'{arm}/maps'].shape == (4, 16, 16, 2)
      assert results['arms'][arm]['guided_over_unguided_time'] > 0
      # Same z_T, different arms: guidance moved the images.
      assert np.any(images[f'{arm}/images'] != images['baseline/images'])
  assert (workdir / 'sd_grid.png').stat().st_size > 0


def test_sd_guided_runlocal_baseline_and_astar(tmp_path):
  arms = ('baseline', 'astar')
  _check(*_run(tmp_path, arms), arms)


@pytest.mark.slow
def test_sd_guided_runlocal_every_arm(tmp_path):
  arms = ('baseline', 'attend_excite', 'astar', 'divide_bind')
  _check(*_run(tmp_path, arms), arms)


def test_a_bad_prompts_line_is_named(tmp_path):
  from lossland.guidance import sd_runs
  with pytest.raises(ValueError, match=r"line 2: 'a cat and a dog'"):
    sd_runs.parse_prompts(['a dog | dog', 'a cat and a dog'])
