"""Checkpoint faults: corrupt or foreign checkpoints, non-finite states, locks, signals, resumes
with changed settings, torn metrics, and restoring on another mesh."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from lossland import models, parallel, train
from lossland.train import checkpoint as checkpoint_lib
from lossland.train import steps as steps_lib

MLP = models.MLP(features=(256,), num_classes=3)  # wide enough for out-of-line array data
X = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
Y = np.arange(16) % 3
PARAMS = MLP.init(jax.random.key(0), X[:1])
OPTIMIZER = train.adamw(learning_rate=train.warmup_cosine(1e-2, 2, 12, 1e-3))


def batch_fn(step):
  rows = (np.arange(4) + 4 * step) % 16
  return {'inputs': X[rows], 'labels': Y[rows]}


def mesh2():
  return parallel.make_mesh({'data': 2, 'model': 1}, jax.devices()[:2])


def _fit(workdir, num_steps=8, mesh=None, **kw):
  kw.setdefault('checkpoint_every', 2 if workdir else 0)
  kw.setdefault('steps_per_block', 2)
  return train.fit(params=kw.pop('params', PARAMS), loss_fn=train.classification_loss(MLP.apply),
                   optimizer=kw.pop('optimizer', OPTIMIZER), batch_fn=batch_fn,
                   num_steps=num_steps, mesh=mesh or mesh2(), rng=jax.random.key(1), data_seed=0,
                   workdir=workdir, show_progress=False, **kw)


def _assert_same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.state.params),
               jax.device_get(b.state.params))


@pytest.fixture(scope='module')
def uninterrupted():
  return _fit(None, num_steps=8)


def _truncate(step_dir):
  data = [f for f in glob.glob(f'{step_dir}/state/**/d/*', recursive=True) if os.path.isfile(f)]
  for path in data:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def _flip_a_bit(step_dir):
  """Flips one bit in the middle of the largest array-data file(s) of a checkpoint."""
  data = [f for f in glob.glob(f'{step_dir}/state/**/d/*', recursive=True) if os.path.isfile(f)]
  largest = max(map(os.path.getsize, data))
  for path in data:
    if os.path.getsize(path) == largest:
      content = bytearray(open(path, 'rb').read())
      content[len(content) // 2] ^= 0x04
      open(path, 'wb').write(content)


CORRUPTIONS = {
    'truncated': lambda d, state: _truncate(d),
    'no_checkpoint_metadata': lambda d, state: os.remove(f'{d}/_CHECKPOINT_METADATA'),
    'no_state_metadata': lambda d, state: os.remove(f'{d}/state/_METADATA'),
    'flipped_bit': lambda d, state: _flip_a_bit(d),
    'other_arrays': lambda d, state: (shutil.rmtree(f'{d}/state'),  # valid, but not its own
                                      shutil.copytree(f'{d}/../4/state', f'{d}/state')),
}


@pytest.fixture(scope='module')
def six_steps(tmp_path_factory):
  """A workdir with checkpoints 4 and 6, copied by each test that damages it."""
  workdir = str(tmp_path_factory.mktemp('six') / 'run')
  return workdir, _fit(workdir, num_steps=6)


@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path, capfd, uninterrupted, six_steps, corruption):
  workdir = str(tmp_path / 'run')
  shutil.copytree(six_steps[0], workdir)
  CORRUPTIONS[corruption](f'{workdir}/checkpoints/6', six_steps[1].state)
  capfd.readouterr()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    resumed = _fit(workdir, num_steps=8)
  ours = [w for w in caught if 'checkpoint 6' in str(w.message)]
  assert len(ours) == 1, [str(w.message) for w in caught]
  assert 'falling back to checkpoint 4' in str(ours[0].message)
  assert not any('Sharding info' in str(w.message) for w in caught)
  assert 'Traceback' not in capfd.readouterr().err
  assert resumed.resumed_from == 4
  _assert_same_params(resumed, uninterrupted)
  assert os.path.isdir(f'{workdir}/corrupt_checkpoints/6')  # kept for inspection, out of the way
  assert train.Checkpointer(workdir, every=2).all_steps() == [6, 8]


def test_arrays_that_orbax_reads_without_complaint_but_changed_fail_the_checksum(
    tmp_path, six_steps):
  workdir = str(tmp_path / 'run')
  shutil.copytree(six_steps[0], workdir)
  shutil.rmtree(f'{workdir}/checkpoints/6/state')
  shutil.copytree(f'{workdir}/checkpoints/4/state', f'{workdir}/checkpoints/6/state')
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          six_steps[1].state)
  with pytest.raises(train.CorruptCheckpointError,
                     match='checksums of .* arrays do not match .*params/params/dense_0/bias'):
    train.Checkpointer(workdir, every=2).restore(6, abstract)


def test_checksums_do_not_depend_on_the_sharding():
  x = jnp.arange(64 * 6, dtype=jnp.float32).reshape(64, 6) / 7
  mesh = parallel.make_mesh({'data': 8, 'model': 1}, jax.devices())
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, P('data')))
  one = jax.jit(checkpoint_lib.leaf_checksum)(x)
  np.testing.assert_array_equal(jax.jit(checkpoint_lib.leaf_checksum)(sharded), one)
  flipped = x.at[37, 2].set(jnp.nextafter(x[37, 2], jnp.inf))
  assert np.all(checkpoint_lib.leaf_checksum(flipped) != one)
  swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])  # same values, other places
  assert np.all(checkpoint_lib.leaf_checksum(swapped) != one)


def test_a_checkpoint_of_another_model_names_the_shapes_and_the_workdir(tmp_path):
  workdir = str(tmp_path / 'run')
  _fit(workdir, num_steps=2)
  wider = models.MLP(features=(512,), num_classes=3)
  with pytest.raises(train.IncompatibleCheckpointError) as error:
    train.fit(params=wider.init(jax.random.key(0), X[:1]),
              loss_fn=train.classification_loss(wider.apply), optimizer=OPTIMIZER,
              batch_fn=batch_fn, num_steps=4, mesh=mesh2(), rng=jax.random.key(1), data_seed=0,
              workdir=workdir, checkpoint_every=2, show_progress=False)
  message = str(error.value)
  assert 'params/params/dense_0/kernel: checkpoint (5, 256) float32 vs this run (5, 512)' in message
  assert workdir in message and 'strict' not in message
  assert train.Checkpointer(workdir, every=2).all_steps() == [2]  # nothing moved or written


def test_non_finite_params_after_a_finite_loss_are_never_saved(tmp_path):
  def poison_from_step_5():  # the update of step 5 (0-based) makes every param NaN
    def update(updates, count, params=None):
      del params
      scale = jnp.where(count >= 5, jnp.nan, 1.0)
      return jax.tree.map(lambda u: u * scale, updates), count + 1
    return optax.GradientTransformation(lambda p: jnp.zeros((), jnp.int32), update)

  optimizer = optax.chain(optax.sgd(1e-2), poison_from_step_5())
  workdir = str(tmp_path / 'nan')
  with pytest.raises(FloatingPointError, match='after step 6 are not finite.*checkpoint: 4'):
    _fit(workdir, num_steps=10, optimizer=optimizer)
  checkpointer = train.Checkpointer(workdir, every=2)
  assert checkpointer.all_steps() == [2, 4]


def _hold_lock(path):
  """A separate process that holds `path` the way WorkdirLock does, until killed."""
  code = ('import fcntl, json, os, socket, sys, time\n'
          'fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n'
          'fcntl.flock(fd, fcntl.LOCK_EX)\n'
          'os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())\n'
          'print("locked", flush=True)\n'
          'time.sleep(120)\n')
  holder = subprocess.Popen([sys.executable, '-c', code, path], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'locked'
  return holder


def test_a_second_run_on_a_workdir_stops_and_a_crashed_runs_lock_is_taken_over(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  holder = _hold_lock(str(workdir / 'lock'))
  try:
    with pytest.raises(train.WorkdirInUseError, match=f'in use by pid {holder.pid} on host'):
      _fit(str(workdir), num_steps=2)
  finally:
    holder.kill()
    holder.wait()
  assert (workdir / 'lock').exists()  # what a crashed run leaves behind
  assert int(_fit(str(workdir), num_steps=2).state.step) == 2
  assert not (workdir / 'lock').exists()


def test_without_flock_a_lock_of_a_dead_pid_is_stale_and_a_live_one_is_not(tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoint_lib.WorkdirLock, '_flock', staticmethod(lambda fd: None))
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  lock = train.WorkdirLock(str(tmp_path))
  host = __import__('socket').gethostname()
  with open(lock.path, 'w') as f:
    json.dump({'pid': dead.pid, 'host': host}, f)
  with lock:
    assert json.load(open(lock.path))['pid'] == os.getpid()
  with open(lock.path, 'w') as f:
    json.dump({'pid': os.getppid(), 'host': host}, f)  # the live process that started pytest
  with pytest.raises(train.WorkdirInUseError, match=f'pid {os.getppid()}'):
    with train.WorkdirLock(str(tmp_path)):
      pass


def test_sigterm_saves_the_current_step_and_the_same_call_resumes_exactly(tmp_path, uninterrupted):
  workdir = str(tmp_path / 'run')

  def preempted(step):
    # Step 7's batch is read while the block of steps 4..5 runs: that block finishes, the
    # state at step 6 (not a multiple of checkpoint_every) is saved, and fit stops.
    if step == 7:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch_fn(step)

  previous = signal.getsignal(signal.SIGTERM)
  with pytest.raises(train.Interrupted, match='SIGTERM at step 6.*checkpoint 6') as stop:
    train.fit(params=PARAMS, loss_fn=train.classification_loss(MLP.apply), optimizer=OPTIMIZER,
              batch_fn=preempted, num_steps=8, mesh=mesh2(), rng=jax.random.key(1),
              data_seed=0, workdir=workdir, checkpoint_every=4, steps_per_block=2,
              show_progress=False)
  assert stop.value.step == 6 and stop.value.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) == previous
  assert not os.path.exists(f'{workdir}/lock')
  resumed = _fit(workdir, num_steps=8, checkpoint_every=4)
  assert resumed.resumed_from == 6
  _assert_same_params(resumed, uninterrupted)


def test_a_finished_run_is_re_evaluated_not_retrained(tmp_path):
  workdir = str(tmp_path / 'run')
  eval_sets = {'test': {'inputs': X.reshape(2, 8, 5), 'labels': Y.reshape(2, 8)}}
  first = _fit(workdir, num_steps=4, eval_sets=eval_sets)
  again = _fit(workdir, num_steps=4, eval_sets=eval_sets)
  assert again.already_finished and not first.already_finished
  assert len(again.train_losses) == 0
  np.testing.assert_allclose(again.evals[-1]['test_loss'], first.evals[-1]['test_loss'],
                             rtol=1e-6)
  _assert_same_params(again, first)
  with open(f'{workdir}/metrics.jsonl') as f:
    assert [json.loads(line)['step'] for line in f] == [2, 4, 4]  # nothing appended


def test_resume_checks_num_steps_and_the_stored_config(tmp_path):
  workdir = str(tmp_path / 'run')
  config = {'train': {'learning_rate': 1e-2, 'num_steps': 4}, 'model': {'features': [8]}}
  _fit(workdir, num_steps=4, run_config=config)
  with pytest.raises(ValueError, match=r'num_steps=2 \(config key train.num_steps\) is below '
                                       r'the step of the checkpoint .* \(4\)'):
    _fit(workdir, num_steps=2, run_config=config)
  changed = {'train': {'learning_rate': 3e-2, 'num_steps': 6}, 'model': {'features': [8]}}
  with pytest.raises(ValueError, match=r'changed: train.learning_rate: 0.01 -> 0.03; '
                                       r'train.num_steps: 4 -> 6\..*allow'):
    _fit(workdir, num_steps=6, run_config=changed)
  with pytest.warns(UserWarning, match='changed config: train.learning_rate'):
    resumed = _fit(workdir, num_steps=6, run_config=changed, allow_config_change=True)
  assert resumed.resumed_from == 4 and int(resumed.state.step) == 6
  with open(f'{workdir}/config.json') as f:
    assert json.load(f) == changed


def test_a_torn_last_metrics_line_does_not_block_resuming(tmp_path, uninterrupted, six_steps):
  workdir = str(tmp_path / 'run')
  shutil.copytree(six_steps[0], workdir)
  with open(f'{workdir}/metrics.jsonl', 'a') as f:
    f.write('{"step": 8, "train_lo')  # killed mid-write
  with pytest.warns(UserWarning, match='dropped unreadable line'):
    resumed = _fit(workdir, num_steps=8)
  _assert_same_params(resumed, uninterrupted)
  with open(f'{workdir}/metrics.jsonl') as f:
    assert [json.loads(line)['step'] for line in f] == [2, 4, 6, 8]


@pytest.mark.parametrize('argument,value,key', [
    ('steps_per_block', 0, 'train.steps_per_block'),
    ('steps_per_block', -2, 'train.steps_per_block'),
    ('keep_checkpoints', 0, 'checkpoint.keep'),
    ('keep_checkpoints', -1, 'checkpoint.keep'),
    ('num_steps', 0, 'train.num_steps')])
def test_bad_counts_name_their_config_key(tmp_path, argument, value, key):
  with pytest.raises(ValueError, match=f'{argument}={value} must be an integer >= 1 '
                                       fr'\(config key {key}\)'):
    _fit(str(tmp_path / 'run'), **{argument: value})
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_a_checkpoint_from_8_devices_restores_on_2_with_equal_values(tmp_path):
  workdir = str(tmp_path / 'run')
  rules = [('.*dense_0/kernel', P(None, 'model'))]
  eight = parallel.make_mesh({'data': 4, 'model': 2}, jax.devices())
  saved = _fit(workdir, num_steps=4, mesh=eight, param_rules=rules)
  two = parallel.make_mesh({'data': 1, 'model': 2}, jax.devices()[:2])
  abstract = jax.eval_shape(lambda: saved.state)
  shardings = steps_lib.state_shardings(
      abstract, two, parallel.param_shardings(abstract.params, two, rules))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    restored, _ = train.Checkpointer(workdir, every=2).restore(4, abstract)
  assert not [w for w in caught if 'Sharding' in str(w.message)]
  with pytest.raises(ValueError, match='no sharding for'):  # never orbax's saved-topology guess
    train.Checkpointer(workdir, every=2).restore(4, jax.eval_shape(lambda: saved.state))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(saved.state))
  kernel = restored.params['params']['dense_0']['kernel']
  assert kernel.sharding.spec == P(None, 'model') and len(kernel.sharding.device_set) == 2
  # fit itself resumes the 8-device checkpoint on the 2-device mesh.
  resumed = _fit(workdir, num_steps=6, mesh=two, param_rules=rules)
  assert resumed.resumed_from == 4
  assert len(resumed.state.params['params']['head']['kernel'].sharding.device_set) == 2
