"""Launchers end to end, in subprocesses like a user runs them: train, resume after SIGKILL,
config errors, bench."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM_CONFIG = 'configs/lm/pydoc_byte.py:runlocal'


def _env(data_dir):
  env = dict(os.environ, LOSSLAND_DATA_DIR=data_dir, OPENBLAS_NUM_THREADS='1')
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  return env


def _launch(module, *args, data_dir, check=True, **kw):
  cmd = [sys.executable, '-m', module, *args]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(data_dir), capture_output=True, text=True, **kw)
  if check and proc.returncode:
    raise AssertionError(f'{cmd} failed:\n{proc.stderr[-3000:]}')
  return proc


def _final_params(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  return ocp.PyTreeCheckpointer().restore(path)['params']


def test_train_writes_results_and_metrics(tmp_path, data_dir):
  workdir = str(tmp_path / 'lm')
  proc = _launch('launch.train', f'--config={LM_CONFIG}', f'--workdir={workdir}',
                 data_dir=data_dir)
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  for key in ('final_train_loss', 'final_val_loss', 'steps', 'tokens_per_second',
              'wall_seconds'):
    assert key in results
  assert results['steps'] == 40
  assert results['final_val_loss'] < np.log(256)  # learned something beyond uniform bytes
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert records[-1]['step'] == 40 and 'val_loss' in records[-1]
  assert 'final_val_loss' in proc.stdout  # the printed table
  assert 'step/s' in proc.stderr and 'ETA' in proc.stderr  # the progress bar


def test_sigkill_then_same_command_resumes_to_identical_params(tmp_path, data_dir):
  args = [f'--config={LM_CONFIG}', '--config.train.num_steps=80', '--config.checkpoint.every=20',
          '--config.eval.every=40', '--config.progress=false']
  reference = str(tmp_path / 'reference')
  _launch('launch.train', *args, f'--workdir={reference}', data_dir=data_dir)

  workdir = str(tmp_path / 'killed')
  cmd = [sys.executable, '-m', 'launch.train', *args, f'--workdir={workdir}']
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(data_dir), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  first = os.path.join(workdir, 'checkpoints', '20')
  deadline = time.time() + 300
  while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'

  _launch('launch.train', *args, f'--workdir={workdir}', data_dir=data_dir)
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert 20 <= results['resumed_from'] < 80
  assert results['steps'] == 80
  reference_params, resumed_params = _final_params(reference, 80), _final_params(workdir, 80)
  flat_ref = ocp.tree.to_flat_dict(reference_params)
  flat_res = ocp.tree.to_flat_dict(resumed_params)
  assert flat_ref.keys() == flat_res.keys()
  for key in flat_ref:
    np.testing.assert_array_equal(flat_res[key], flat_ref[key], err_msg=str(key))


def test_unknown_config_key_names_the_key(tmp_path, data_dir):
  proc = _launch('launch.train', f'--config={LM_CONFIG}', '--config.train.lerning_rate=0.1',
                 f'--workdir={tmp_path}', data_dir=data_dir, check=False)
  assert proc.returncode != 0
  assert "unknown config key 'train.lerning_rate'" in proc.stderr
  assert 'learning_rate' in proc.stderr  # lists what exists


def test_batch_not_divisible_by_data_axis_is_a_clear_error(tmp_path, data_dir):
  proc = _launch('launch.train', f'--config={LM_CONFIG}', '--config.mesh.data=2',
                 '--config.train.batch_size=15', '--config.eval.batch_size=16',
                 f'--workdir={tmp_path}', data_dir=data_dir, check=False)
  assert proc.returncode != 0
  assert 'not divisible by the data axis' in proc.stderr


def test_bench_prints_one_json_line(data_dir):
  proc = _launch('launch.bench', f'--config={LM_CONFIG}', data_dir=data_dir)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in ('step_ms', 'tokens_per_second', 'compile_seconds', 'peak_rss_mb'):
    assert result[key] > 0
