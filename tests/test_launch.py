"""Launchers end to end, in subprocesses like a user runs them: train, resume after SIGKILL and
SIGTERM, re-running a finished run, changed configs, a busy workdir, config errors, bench."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lossland import train

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
  """The params of checkpoint `step`, restored onto one device and checked against its checksums."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          ocp.StandardCheckpointer().metadata(path).item_metadata.tree)
  state, _ = train.Checkpointer(workdir, every=1).restore(step, abstract)
  return state['params']


def _assert_same_params(workdir, reference, step=80):
  flat_ref = ocp.tree.to_flat_dict(_final_params(reference, step))
  flat_res = ocp.tree.to_flat_dict(_final_params(workdir, step))
  assert flat_ref.keys() == flat_res.keys()
  for key in flat_ref:
    np.testing.assert_array_equal(flat_res[key], flat_ref[key], err_msg=str(key))


# runlocal with a smaller model (quicker to compile) and room to interrupt it.
RESUME_ARGS = [f'--config={LM_CONFIG}', '--config.train.num_steps=80',
               '--config.checkpoint.every=20', '--config.eval.every=40', '--config.progress=false',
               '--config.model.d_model=64', '--config.model.num_layers=2',
               '--config.model.mlp_dim=128']


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, data_dir):
  """An uninterrupted 80-step run that the interrupted ones must reproduce exactly."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  _launch('launch.train', *RESUME_ARGS, f'--workdir={workdir}', data_dir=data_dir)
  return workdir


def _start_and_wait_for_checkpoint(workdir, data_dir, step=20):
  cmd = [sys.executable, '-m', 'launch.train', *RESUME_ARGS, f'--workdir={workdir}']
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(data_dir), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  first = os.path.join(workdir, 'checkpoints', str(step))
  deadline = time.time() + 300
  while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  return proc


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


@pytest.mark.slow  # ~33 s; the SIGTERM subprocess test below covers resuming the same command
def test_sigkill_then_same_command_resumes_to_identical_params(tmp_path, data_dir, reference_run):
  workdir = str(tmp_path / 'killed')
  proc = _start_and_wait_for_checkpoint(workdir, data_dir)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
  assert os.path.exists(os.path.join(workdir, 'lock'))  # left behind; the next run takes it over

  _launch('launch.train', *RESUME_ARGS, f'--workdir={workdir}', data_dir=data_dir)
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert 20 <= results['resumed_from'] < 80
  assert results['steps'] == 80
  _assert_same_params(workdir, reference_run)


def test_sigterm_saves_the_current_step_and_the_same_command_resumes_exactly(
    tmp_path, data_dir, reference_run):
  workdir = str(tmp_path / 'preempted')
  proc = _start_and_wait_for_checkpoint(workdir, data_dir)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
  stopped = re.search(r'stopped by SIGTERM at step (\d+): checkpoint (\d+) is in', stderr)
  assert stopped and stopped.group(1) == stopped.group(2), stderr[-2000:]
  assert 'Traceback' not in stderr
  step = int(stopped.group(1))
  assert 20 <= step < 80 and os.path.isdir(os.path.join(workdir, 'checkpoints', str(step)))

  _launch('launch.train', *RESUME_ARGS, f'--workdir={workdir}', data_dir=data_dir)
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['resumed_from'] == step
  _assert_same_params(workdir, reference_run)


def test_rerunning_a_finished_command_keeps_its_results(tmp_path, data_dir, reference_run):
  workdir = str(tmp_path / 'finished')
  shutil.copytree(reference_run, workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    before = json.load(f)
  proc = _launch('launch.train', *RESUME_ARGS, f'--workdir={workdir}', data_dir=data_dir)
  assert 'already finished at step 80' in proc.stderr
  with open(os.path.join(workdir, 'results.json')) as f:
    after = json.load(f)
  assert after['steps'] == 80 and after['resumed_from'] == 80
  for key in ('final_train_loss', 'final_val_loss'):
    assert np.isfinite(after[key])
    np.testing.assert_allclose(after[key], before[key], rtol=1e-6)  # the same params re-evaluated
  for key in ('tokens_per_second', 'compile_seconds', 'wall_seconds'):
    assert after[key] == before[key]  # the training's figures, not the re-evaluation's


def test_resuming_with_a_changed_config_lists_the_keys(tmp_path, data_dir, reference_run):
  workdir = str(tmp_path / 'changed')
  shutil.copytree(reference_run, workdir)
  # num_heads keeps every param shape: only the stored config can tell the change.
  proc = _launch('launch.train', *RESUME_ARGS, '--config.train.learning_rate=0.01',
                 '--config.model.num_heads=2', '--config.train.steps_per_block=5',
                 f'--workdir={workdir}', data_dir=data_dir, check=False)
  assert proc.returncode == 1
  assert 'changed: model.num_heads: 4 -> 2; train.learning_rate: 0.001 -> 0.01.' in proc.stderr
  assert 'steps_per_block' not in proc.stderr  # speed-only keys may change
  assert '--allow_config_change' in proc.stderr and 'Traceback' not in proc.stderr


def test_a_second_run_on_a_busy_workdir_stops_at_once(tmp_path, data_dir):
  workdir = tmp_path / 'busy'
  workdir.mkdir()
  code = ('import fcntl, json, os, socket, time\n'
          f'fd = os.open({str(workdir / "lock")!r}, os.O_RDWR | os.O_CREAT)\n'
          'fcntl.flock(fd, fcntl.LOCK_EX)\n'
          'os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())\n'
          'print("locked", flush=True)\n'
          'time.sleep(120)\n')
  holder = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    proc = _launch('launch.train', f'--config={LM_CONFIG}', f'--workdir={workdir}',
                   data_dir=data_dir, check=False)
  finally:
    holder.kill()
    holder.wait()
  assert proc.returncode == 1
  assert f'is in use by pid {holder.pid}' in proc.stderr and 'Traceback' not in proc.stderr
  assert sorted(os.listdir(workdir)) == ['lock']  # nothing of the run was touched


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


@pytest.mark.parametrize('override,message', [
    ('--config.bench=nope', "error: unknown bench 'nope' (config key bench); available: "
                            'curvature_any_model, curvature_factors, guidance_sampling'),
    ('--config.task=nope', "error: unknown task 'nope' (config key task)"),
])
def test_bench_bad_config_is_one_line(override, message, monkeypatch):
  from launch import bench  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv('LOSSLAND_TRACEBACK', raising=False)
  config = 'configs/curvature/bench_factors.py' if 'bench=' in override else LM_CONFIG
  with pytest.raises(SystemExit) as e:
    bench.main([f'--config={config}', override])
  assert str(e.value.code).startswith(message)


@pytest.mark.slow  # ~14 s; launch.bench's `config.bench` path stays in the default run (stitching)
def test_bench_prints_one_json_line(data_dir):
  proc = _launch('launch.bench', f'--config={LM_CONFIG}', data_dir=data_dir)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in ('step_ms', 'tokens_per_second', 'compile_seconds', 'peak_rss_mb'):
    assert result[key] > 0
