"""`launch.compile` for Stable Diffusion sampling (`launch.compile_sd`), on the tiny SD 1.x folder.

One real compile for `v5e:2x2` (the baseline arm, 2 steps: the TPU compiler
takes about 15 s per UNet program on 2 cores); the batch search is checked on
its own.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from launch import compile as compile_lib
from launch import compile_sd

TINY_DIR = 'tests/fixtures/sd/tiny_sd1'
TINY = ['--config=configs/compile/sd15_astar.py', '--topology=v5e:2x2',
        '--config.sd.path=tests/fixtures/sd/tiny_sd1', '--config.sd.latent_size=32',
        '--config.sd.num_steps=2']


@pytest.mark.skipif(not compile_lib.libtpu_available(), reason='libtpu (pip install -e ".[tpu]")')
def test_tiny_sd_sampling_compiles_and_reports_memory_and_batch(tmp_path, capsys):
  report = compile_lib.run(TINY + ['--config.sd.arm=baseline', '--config.sd.max_batch_per_chip=1',
                                   f'--workdir={tmp_path}'])
  saved = json.loads((tmp_path / 'compile.json').read_text())
  entry = saved['programs']['sd_sample']
  assert saved['largest_batch_per_chip'] == 1 and entry['batch_size'] == 4  # 4 chips x 1
  assert saved['model_calls'] == 3 and saved['image_size'] == 256
  # bfloat16 params (the config's param_dtype), replicated on every chip.
  assert report['param_bytes_per_chip'] == 2 * report['param_count']
  assert entry['argument_bytes'] >= report['param_bytes_per_chip']
  assert 0 < entry['total_bytes'] < saved['hbm_bytes_per_chip']
  assert 'largest seed batch per chip: 1' in capsys.readouterr().out


def test_the_batch_search_finds_the_largest_fitting_batch():
  hbm = 16 * 2 ** 30
  for base, per_seed, bend in ((4.5, 0.9, 1.0), (4.5, 0.9, 1.3), (4.5, 0.9, 0.7), (2.0, 3.0, 1.0)):
    used = lambda n: int(2 ** 30 * (base + per_seed * n ** bend))  # linear or not
    want = max(n for n in range(0, 200) if n == 0 or used(n) <= hbm)
    for limit in (1, 8, 64):
      asked = set()
      got = compile_sd._largest_fitting(lambda n: asked.add(n) or used(n), hbm, limit)
      assert got == min(want, limit), (base, per_seed, bend, limit)
      assert max(asked) <= limit + 1 and len(asked) <= 4 + 2 * limit.bit_length()
  refused = lambda n: None if n > 5 else 2 ** 30 * n  # the compiler refuses n > 5
  measured = {}

  def measure(n):  # the compiler crashes at 6 and 7 seeds; 1.5 GiB per seed otherwise
    measured[n] = {'crashed': True} if n in (6, 7) else {'total_bytes': int(1.5 * 2 ** 30 * n)}
    return measured[n]
  got = compile_sd._largest_fitting(lambda n: compile_sd._bytes_past_crashes(measure, n, 64),
                                    hbm, 64)
  assert got == 10 and not measured[got].get('crashed')  # 10 x 1.5 GiB fits, 11 does not
  assert compile_sd._largest_fitting(
      lambda n: compile_sd._bytes_past_crashes(measure, n, 7), hbm, 7) == 5  # 6, 7 crash
  crashes = (10, 11)  # where the line through 1 and 2 seeds lands: two crashes in a row

  def measure_high(n):
    return {'crashed': True} if n in crashes else {'total_bytes': int(1.5 * 2 ** 30 * n)}
  assert compile_sd._largest_fitting(  # one crash stepped over, the second counts as too big
      lambda n: compile_sd._bytes_past_crashes(measure_high, n, 64, max_steps=1), hbm, 64) == 9
  assert compile_sd._largest_fitting(refused, hbm, 64) == 5
  assert compile_sd._largest_fitting(lambda n: None, hbm, 64) == 0


def test_sd_sample_compiles_alone_and_a_bad_folder_is_named():
  with pytest.raises(compile_lib.CompileError, match='sd_sample compiles alone'):
    compile_lib.compile_all(None, 'v5e:2x2', ['sd_sample', 'train'])
  config = compile_lib.parse(TINY[:1] + ['--topology=v5e:2x2', '--config.sd.path=/nonexistent'])[1]
  with pytest.raises(ValueError, match=r"lacks \['unet/config.json'"):
    compile_sd._configs(config.sd)


def test_a_child_that_dies_or_raises_is_reported_not_fatal():
  from launch import isolated  # pylint: disable=g-import-not-at-top
  assert isolated.run_isolated(divmod, 7, 2) == ((3, 1), 0)
  result, code = isolated.run_isolated(os.abort)  # dies of SIGABRT, as libtpu did of SIGSEGV
  assert result is None and isolated.signal_name(code) == 'SIGABRT'
  with pytest.raises(RuntimeError, match='ZeroDivisionError'):
    isolated.run_isolated(divmod, 1, 0)


def _folder_with_scheduler(tmp_path, scheduler: dict):
  """The configs of tiny_sd1 (all launch.compile reads) with another scheduler_config.json."""
  for part in ('unet', 'text_encoder'):
    (tmp_path / part).mkdir()
    shutil.copy(os.path.join(TINY_DIR, part, 'config.json'), tmp_path / part / 'config.json')
  (tmp_path / 'scheduler').mkdir()
  (tmp_path / 'scheduler' / 'scheduler_config.json').write_text(json.dumps(scheduler))
  return tmp_path


def test_a_folder_scheduler_lossland_lacks_compiles_as_load_stable_diffusion_samples_it(tmp_path):
  """Euler ancestral: load_stable_diffusion's DDIM fallback (one warning), not a refusal."""
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lossland.guidance import schedulers  # pylint: disable=g-import-not-at-top
  with open(os.path.join(TINY_DIR, 'scheduler', 'scheduler_config.json')) as f:
    euler_a = dict(json.load(f), _class_name='EulerAncestralDiscreteScheduler')
  folder = _folder_with_scheduler(tmp_path, euler_a)
  config = compile_lib.parse(TINY[:1] + ['--topology=v5e:2x2', f'--config.sd.path={folder}',
                                         '--config.sd.num_steps=3', '--config.sd.arm=baseline'])[1]
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(4, 1), ('data', 'model'))
  with pytest.warns(UserWarning, match='lossland does not implement EulerAncestralDiscreteScheduler'
                    '.*samples with DDIM'):
    program = compile_sd.SDProgram(config, mesh)
  want = schedulers.scheduler_from_config(schedulers.folder_config(euler_a)[0], 3)
  assert program.calls == len(want.timesteps) == 3
  with pytest.warns(UserWarning, match='samples with DDIM'):
    got = compile_sd._scheduler(config.sd, euler_a)
  np.testing.assert_array_equal(got.timesteps, want.timesteps)
  assert type(got) is type(want)


def test_a_scheduler_no_lossland_scheduler_samples_is_one_user_error(tmp_path):
  from lossland import UserError  # pylint: disable=g-import-not-at-top
  folder = _folder_with_scheduler(tmp_path, {'_class_name': 'LMSDiscreteScheduler',
                                             'beta_schedule': 'cosine_warped'})
  config = compile_lib.parse(TINY[:1] + ['--topology=v5e:2x2', f'--config.sd.path={folder}'])[1]
  sched = compile_sd._configs(config.sd)[2]
  with pytest.raises(UserError, match=r"scheduler/scheduler_config.json: the LMSDiscreteScheduler "
                     r"config's training schedule has beta_schedule='cosine_warped'"):
    compile_sd._scheduler(config.sd, sched)
  (folder / 'scheduler' / 'scheduler_config.json').write_text('{"_class_name": ')
  with pytest.raises(UserError, match=r'scheduler_config.json is not valid JSON'):
    compile_sd._configs(config.sd)
  config = compile_lib.parse(TINY + ['--config.sd.num_steps=1001'])[1]
  with pytest.raises(UserError, match=r'--config.sd.num_steps=1001: num_inference_steps=1001 is '
                                      'not supported'):
    compile_sd._scheduler(config.sd, compile_sd._configs(config.sd)[2])
