"""Trust on the launchers' surfaces (issue 27): outputs written whole, analysis runs locked and
config-checked, checkpoints never restored unverified, the stored config never lost or rewritten
by a refused run, bad topologies and vocabulary sizes named, user errors as one line, and no
libtpu noise on a CPU machine."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from launch import analyze, atomic, common
from launch import compile as compile_lib
from launch import train as train_launch
from launch import bench as bench_launch
from lossland import models, parallel, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISY = 'configs/curvature/noisy_labels.py:runlocal'
LIBTPU_NOISE = ('unexpected worker hostname', 'could not determine TPU', 'InitGoogle')


# ------------------------------------------------------------------- outputs written whole

# A child process that publishes new outputs (a folder of three files, a figure and
# results.json) over old ones, counting every file write, rename and removal, and killing
# itself with SIGKILL at step `kill_at` (0: never).
KILLED_WRITER = '''
import os, shutil, signal, sys
sys.path.insert(0, {root!r})
from launch import atomic

workdir, kill_at = sys.argv[1], int(sys.argv[2])
count = [0]

def step():
  count[0] += 1
  if count[0] == kill_at:
    os.kill(os.getpid(), signal.SIGKILL)

def counted(original):
  def wrapped(*args, **kwargs):
    step()
    return original(*args, **kwargs)
  return wrapped

os.rename, os.replace, os.remove = counted(os.rename), counted(os.replace), counted(os.remove)
shutil.rmtree = counted(shutil.rmtree)

with atomic.Publication(workdir) as outputs:
  with atomic.staged(os.path.join(workdir, 'edited')) as tmp:
    os.makedirs(tmp)
    for i in range(3):
      step()
      with open(os.path.join(tmp, f'part{{i}}.txt'), 'w') as f:
        f.write('new')
  with atomic.staged(os.path.join(workdir, 'figure.png')) as tmp:
    step()
    with open(tmp, 'w') as f:
      f.write('new')
  outputs.publish({{'tag': 'new'}})
print(count[0])
'''

OLD = {'edited': {'part0.txt': 'old', 'part1.txt': 'old', 'only_old.txt': 'old'},
       'figure.png': 'old', 'results.json': {'tag': 'old'}}
NEW = {'edited': {f'part{i}.txt': 'new' for i in range(3)}, 'figure.png': 'new',
       'results.json': {'tag': 'new'}}


def _write_old(workdir):
  os.makedirs(os.path.join(workdir, 'edited'))
  for name, text in OLD['edited'].items():
    with open(os.path.join(workdir, 'edited', name), 'w') as f:
      f.write(text)
  with open(os.path.join(workdir, 'figure.png'), 'w') as f:
    f.write('old')
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(OLD['results.json'], f)


def _outputs(workdir) -> dict:
  """The visible outputs; a torn results.json reads as its text."""
  state = {}
  folder = os.path.join(workdir, 'edited')
  if os.path.isdir(folder):
    state['edited'] = {n: open(os.path.join(folder, n)).read() for n in os.listdir(folder)}
  for name in ('figure.png', 'results.json'):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      text = open(path).read()
      try:
        state[name] = json.loads(text) if name.endswith('.json') else text
      except ValueError:
        state[name] = text
  return state


def _run_writer(workdir, kill_at):
  code = KILLED_WRITER.format(root=ROOT)
  return subprocess.run([sys.executable, '-c', code, workdir, str(kill_at)], capture_output=True,
                        text=True, timeout=60)


def test_a_publication_killed_at_any_step_leaves_the_old_or_the_new_outputs_whole(tmp_path):
  reference = str(tmp_path / 'reference')
  _write_old(reference)
  done = _run_writer(reference, 0)
  assert done.returncode == 0, done.stderr
  steps = int(done.stdout.strip())
  assert _outputs(reference) == NEW and not [n for n in os.listdir(reference) if n[0] == '.']
  outcomes = []
  for kill_at in range(1, steps + 1):
    workdir = str(tmp_path / f'killed_{kill_at}')
    _write_old(workdir)
    proc = _run_writer(workdir, kill_at)
    assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr)
    # Right after the kill every output that is there is whole (old or new, never torn).
    for name, value in _outputs(workdir).items():
      assert value in (OLD[name], NEW[name]), (kill_at, name, value)
    atomic.recover(workdir)  # what the next run on the workdir does first
    state = _outputs(workdir)
    assert state in (OLD, NEW), (kill_at, state)
    assert not [n for n in os.listdir(workdir) if n[0] == '.'], (kill_at, os.listdir(workdir))
    outcomes.append('old' if state == OLD else 'new')
  assert outcomes[0] == 'old' and outcomes[-1] == 'new'  # the kills did land on both sides


def test_a_writer_that_raises_leaves_the_old_output(tmp_path):
  workdir = str(tmp_path)
  _write_old(workdir)
  with pytest.raises(RuntimeError, match='disk on fire'):
    with atomic.staged(os.path.join(workdir, 'edited')) as tmp:
      os.makedirs(tmp)
      open(os.path.join(tmp, 'part0.txt'), 'w').write('new')
      raise RuntimeError('disk on fire')
  assert _outputs(workdir) == OLD and not [n for n in os.listdir(workdir) if n[0] == '.']
  with atomic.staged(os.path.join(workdir, 'figure.png')) as tmp:  # outside a Publication:
    open(tmp, 'w').write('new')  # replaced at once
  assert _outputs(workdir)['figure.png'] == 'new'


# ------------------------------------------------------- launch.analyze: lock, stored config


def _stub_experiment(monkeypatch, tag='new', fail=False):
  """noisy_labels' `run` replaced by one that stages an `edited/` folder (and may fail)."""
  from launch.experiments import curvature_noisy_labels

  def run(config, workdir):
    with atomic.staged(os.path.join(workdir, 'edited')) as tmp:
      os.makedirs(tmp)
      with open(os.path.join(tmp, 'part0.txt'), 'w') as f:
        f.write(tag)
    if fail:
      raise ValueError('the stub experiment failed: pass --config.stub=ok')
    return {'tag': tag, 'flip_fraction': config.data.flip_fraction}

  monkeypatch.setattr(curvature_noisy_labels, 'run', run)


def test_analyze_takes_the_workdir_lock(tmp_path, monkeypatch):
  _stub_experiment(monkeypatch)
  workdir = tmp_path / 'busy'
  workdir.mkdir()
  code = ('import fcntl, json, os, socket, time\n'
          f'fd = os.open({str(workdir / "lock")!r}, os.O_RDWR | os.O_CREAT)\n'
          'fcntl.flock(fd, fcntl.LOCK_EX)\n'
          'os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())\n'
          'print("locked", flush=True)\n'
          'time.sleep(60)\n')
  holder = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(SystemExit, match=f'is in use by pid {holder.pid}'):
      analyze.main([f'--config={NOISY}', f'--workdir={workdir}'])
  finally:
    holder.kill()
    holder.wait()
  assert sorted(os.listdir(workdir)) == ['lock']  # nothing of the run was written


def test_analyze_refuses_a_changed_config_and_leaves_everything_as_it_was(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'w')
  _stub_experiment(monkeypatch, tag='first')
  analyze.main([f'--config={NOISY}', f'--workdir={workdir}'])
  with open(os.path.join(workdir, 'config.json')) as f:
    stored = json.load(f)
  assert stored['data']['flip_fraction'] == 0.15
  before = _outputs(workdir)
  assert before == {'edited': {'part0.txt': 'first'},
                    'results.json': {'tag': 'first', 'flip_fraction': 0.15}}

  _stub_experiment(monkeypatch, tag='second')
  with pytest.raises(SystemExit) as e:
    analyze.main([f'--config={NOISY}', '--config.data.flip_fraction=0.3', f'--workdir={workdir}'])
  message = str(e.value.code)
  assert 'changed: data.flip_fraction: 0.15 -> 0.3.' in message
  assert '--allow_config_change' in message and '\n' not in message
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f) == stored  # not rewritten by the refused run
  assert _outputs(workdir) == before

  analyze.main([f'--config={NOISY}', '--config.progress=true', f'--workdir={workdir}'])  # free

  # An allowed change whose run fails: the old outputs stay, whole; the error is one line.
  _stub_experiment(monkeypatch, tag='third', fail=True)
  with pytest.raises(SystemExit, match=r'^error: the stub experiment failed: pass --config.stub'):
    analyze.main([f'--config={NOISY}', '--config.data.flip_fraction=0.3',
                  '--allow_config_change', f'--workdir={workdir}'])
  assert _outputs(workdir)['edited'] == {'part0.txt': 'second'}
  assert not [n for n in os.listdir(workdir) if n.startswith('.')]

  _stub_experiment(monkeypatch, tag='fourth')
  analyze.main([f'--config={NOISY}', '--config.data.flip_fraction=0.3', '--allow_config_change',
                f'--workdir={workdir}'])
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['data']['flip_fraction'] == 0.3
  assert _outputs(workdir) == {'edited': {'part0.txt': 'fourth'},
                               'results.json': {'tag': 'fourth', 'flip_fraction': 0.3}}


# ------------------------------------------------------------------------------ checkpoints

MLP = models.MLP(features=(256,), num_classes=3)  # wide enough for out-of-line array data
X = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
Y = np.arange(16) % 3
PARAMS = MLP.init(jax.random.key(0), X[:1])


def batch_fn(step):
  rows = (np.arange(4) + 4 * step) % 16
  return {'inputs': X[rows], 'labels': Y[rows]}


def _fit(workdir, num_steps, *, data_seed=0, params=None, learning_rate=1e-2, **kw):
  optimizer = train.adamw(learning_rate=train.warmup_cosine(learning_rate, 2, 12, 1e-3))
  mesh = parallel.make_mesh({'data': 2, 'model': 1}, jax.devices()[:2])
  return train.fit(params=params or PARAMS, loss_fn=train.classification_loss(MLP.apply),
                   optimizer=optimizer, batch_fn=batch_fn, num_steps=num_steps, mesh=mesh,
                   rng=jax.random.key(1), data_seed=data_seed, workdir=workdir,
                   checkpoint_every=2 if workdir else 0, steps_per_block=2, show_progress=False,
                   **kw)


def _flip_a_bit(step_dir):
  """Flips one bit in the middle of the largest array-data file(s): orbax reads it unawares."""
  data = [f for f in glob.glob(f'{step_dir}/state/**/d/*', recursive=True) if os.path.isfile(f)]
  largest = max(map(os.path.getsize, data))
  for path in data:
    if os.path.getsize(path) == largest:
      content = bytearray(open(path, 'rb').read())
      content[len(content) // 2] ^= 0x04
      open(path, 'wb').write(content)


def test_a_checkpoint_without_its_checksums_is_never_restored_unverified(tmp_path):
  workdir = str(tmp_path / 'run')
  saved = _fit(workdir, num_steps=6)  # checkpoints 4 and 6
  step_dir = os.path.join(workdir, 'checkpoints', '6')
  shutil.rmtree(os.path.join(step_dir, 'integrity'))
  _flip_a_bit(step_dir)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          saved.state)
  with pytest.raises(train.CorruptCheckpointError, match='integrity/ .* is missing'):
    train.Checkpointer(workdir, every=2).restore(6, abstract)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    resumed = _fit(workdir, num_steps=8)
  ours = [str(w.message) for w in caught if 'checkpoint 6' in str(w.message)]
  assert len(ours) == 1 and 'integrity/' in ours[0] and 'falling back to checkpoint 4' in ours[0]
  assert not any('without verifying' in str(w.message) for w in caught)
  assert resumed.resumed_from == 4
  uninterrupted = _fit(None, num_steps=8)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
               jax.device_get(uninterrupted.state.params))


CONFIG = {'train': {'learning_rate': 1e-2, 'num_steps': 4}, 'model': {'features': [256]}}
OTHER_LR = {'train': {'learning_rate': 3e-2, 'num_steps': 4}, 'model': {'features': [256]}}


def test_deleting_config_json_does_not_let_a_changed_run_resume(tmp_path):
  workdir = str(tmp_path / 'run')
  _fit(workdir, num_steps=4, run_config=CONFIG)
  os.remove(os.path.join(workdir, 'config.json'))
  with pytest.raises(ValueError, match=r'changed: train.learning_rate: 0.01 -> 0.03\.'):
    _fit(workdir, num_steps=4, run_config=OTHER_LR, learning_rate=3e-2)
  assert not os.path.exists(os.path.join(workdir, 'config.json'))  # refused: nothing written
  again = _fit(workdir, num_steps=4, run_config=CONFIG)  # the original config still resumes
  assert again.already_finished
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f) == CONFIG  # stored again from the run that was accepted


def test_without_any_stored_config_a_resume_is_refused_with_what_to_do(tmp_path):
  workdir = str(tmp_path / 'run')
  _fit(workdir, num_steps=4)  # a caller that stored no config: checkpoints carry none
  with pytest.raises(ValueError, match=r'config.json is missing .* Put config.json back, use a '
                                       r'fresh workdir, or allow the change'):
    _fit(workdir, num_steps=4, run_config=OTHER_LR)
  with pytest.warns(UserWarning, match='without a stored config'):
    _fit(workdir, num_steps=4, run_config=OTHER_LR, allow_config_change=True)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f) == OTHER_LR


def test_a_refused_allowed_config_change_leaves_config_json_as_it_was(tmp_path):
  workdir = str(tmp_path / 'run')
  _fit(workdir, num_steps=4, run_config=CONFIG)
  path = os.path.join(workdir, 'config.json')
  before = open(path).read()
  # Allowed, but then refused by the checkpoint: another data seed, or another model.
  with pytest.raises(ValueError, match='data seed 0 but this run uses 5'):
    _fit(workdir, num_steps=6, run_config=OTHER_LR, allow_config_change=True, data_seed=5)
  assert open(path).read() == before
  narrower = models.MLP(features=(32,), num_classes=3).init(jax.random.key(0), X[:1])
  with pytest.raises(train.IncompatibleCheckpointError):
    _fit(workdir, num_steps=6, run_config={**OTHER_LR, 'model': {'features': [32]}},
         allow_config_change=True, params=narrower)
  assert open(path).read() == before


# -------------------------------------------------------------------------- launch.compile

needs_libtpu = pytest.mark.skipif(not compile_lib.libtpu_available(),
                                  reason='libtpu is not installed (pip install -e ".[tpu]")')


@needs_libtpu
@pytest.mark.parametrize('topology,valid', [
    ('v5e:2x2x2', 'valid v5e topologies: v5e:2x2, v5e:2x4, v5e:4x4'),
    ('v6e:2x2x1', 'valid v6e topologies: v6e:2x2, v6e:2x4'),
    ('v4:2x2', 'valid v4 topologies: v4:2x2x1, v4:2x2x2'),
    ('v5e:0x2', 'valid v5e topologies: v5e:2x2'),
])
def test_a_topology_of_the_wrong_shape_for_its_chip_is_refused(topology, valid):
  with pytest.raises(compile_lib.CompileError, match=valid):
    compile_lib.topology_devices(topology)


@pytest.mark.parametrize('argv,line', [
    (['--config=configs/lm/pydoc_byte.py', '--vocab_size=0'],
     'error: --vocab_size=0 must be at least 1: the number of tokens'),
    (['--config=configs/compile/llama_1b_dense.py', '--config.compile.vocab_size=0'],
     'error: compile.vocab_size=0 must be a positive number of tokens; set '
     '--config.compile.vocab_size=N'),
])
def test_a_zero_vocabulary_is_refused_in_one_line_naming_it(argv, line, capsys):
  with pytest.raises(SystemExit) as e:
    compile_lib.main([*argv, '--topology=v5e:2x2'])
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith(line) and err.count('\n') == 1


# ------------------------------------------------------------------- errors as one line


@pytest.mark.parametrize('main', [train_launch.main, analyze.main, bench_launch.main])
def test_every_launcher_names_a_config_that_is_not_python(main, tmp_path):
  with pytest.raises(SystemExit) as e:
    main(['--config=README.md', f'--workdir={tmp_path}'])
  assert str(e.value.code).startswith("error: config file 'README.md' is not a Python file (.py)")
  assert '\n' not in e.value.code


@pytest.mark.parametrize('main', [train_launch.main, analyze.main])
def test_a_dangling_symlink_as_workdir_is_named(main, tmp_path):
  link = tmp_path / 'results'
  link.symlink_to(tmp_path / 'gone' / 'away')
  config = NOISY if main is analyze.main else 'configs/lm/pydoc_byte.py:runlocal'
  with pytest.raises(SystemExit) as e:
    main([f'--config={config}', f'--workdir={link}'])
  assert str(e.value.code).startswith(f'error: --workdir={link} is a symlink to ')
  assert 'which does not exist' in str(e.value.code)


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch):
  from launch import config_cli
  monkeypatch.delenv('LOSSLAND_TRACEBACK', raising=False)
  cases = [
      (json.JSONDecodeError('Expecting value', 'x', 0), 'error: Expecting value: line 1 column 1'),
      (FileExistsError(17, 'File exists', '/w/edited'),
       "error: [Errno 17] File exists: '/w/edited'"),
      (KeyError("no layer 'mlp/up'; available layers: ['mlp/down']"),
       "error: no layer 'mlp/up'; available layers: ['mlp/down']"),
      (ValueError('first line\n  second line'), 'error: first line second line'),
  ]
  for error, line in cases:
    with pytest.raises(SystemExit) as e, config_cli.user_errors():
      raise error
    assert str(e.value.code).startswith(line), (error, e.value.code)
  from lossland import UserError  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e, config_cli.user_errors():
    raise UserError('set --config.a to 1\n  (it was 0)')
  assert e.value.code == 'error: set --config.a to 1 (it was 0)'
  for bug in (KeyError('params'), AttributeError('x'), ZeroDivisionError()):
    with pytest.raises(type(bug)), config_cli.user_errors():
      raise bug
  monkeypatch.setenv('LOSSLAND_TRACEBACK', '1')
  with pytest.raises(ValueError), config_cli.user_errors():
    raise ValueError('shown with its traceback')


# ------------------------------------------------------------------ no libtpu noise on CPU


def _bare_env(data_dir):
  """The environment of a user's shell: no JAX/TPU settings that tests or launchers made."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_PLATFORMS', 'XLA_FLAGS', *common.NO_TPU_HOST_ENV)}
  env.update(LOSSLAND_DATA_DIR=data_dir, OPENBLAS_NUM_THREADS='1')
  return env


def _no_accelerators():
  found = common._visible_accelerators()  # pylint: disable=protected-access
  return found is not None and not found[0] and not found[1]


@pytest.mark.skipif(not _no_accelerators(), reason='checks a machine without TPUs or GPUs')
def test_a_launcher_on_a_cpu_machine_prints_one_line_and_no_libtpu_errors(tmp_path, data_dir):
  # batch_size=0 is refused after jax has counted its devices (the backend started).
  proc = subprocess.run(
      [sys.executable, '-m', 'launch.train', '--config=configs/lm/pydoc_byte.py:runlocal',
       '--config.train.batch_size=0', f'--workdir={tmp_path}'], cwd=ROOT,
      env=_bare_env(data_dir), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert not [n for n in LIBTPU_NOISE if n in proc.stderr], proc.stderr
  assert proc.stderr.strip().splitlines() == [
      'error: train.batch_size=0 must be at least 1; set --config.train.batch_size to a positive '
      'size']


@needs_libtpu
@pytest.mark.skipif(not _no_accelerators(), reason='checks a machine without TPUs or GPUs')
def test_launch_compile_loads_libtpu_quietly(tmp_path, data_dir):
  # libtpu loads for the topology (and refuses its shape): still a single line on stderr.
  proc = subprocess.run(
      [sys.executable, '-m', 'launch.compile', '--config=configs/lm/pydoc_byte.py',
       '--topology=v5e:3x3'], cwd=ROOT, env=_bare_env(data_dir), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1
  assert not [n for n in LIBTPU_NOISE if n in proc.stderr], proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: libtpu does not know topology 'v5e:3x3'")


# ------------------------------------------------------- hf_edit: a killed re-run (slow)


@pytest.mark.slow  # ~60 s: two runs of hf_edit, then three re-runs each killed at another point
def test_a_killed_hf_edit_rerun_leaves_the_old_or_the_new_outputs_whole(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, 'tests', 'curvature'))
  try:
    import test_hf_edit as hf_edit_test  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  from lossland.interop import hf, tiny
  lm = models.TransformerLM(vocab_size=256, d_model=32, num_layers=2, num_heads=2, mlp_dim=48,
                            tie_embeddings=True)
  params = jax.jit(lm.init)(jax.random.key(3), np.zeros((1, 8), np.int32))
  folder = hf.save(tmp_path / 'lm', params, models.config_from_transformer_lm(lm))
  tiny.byte_tokenizer().save(str(folder / hf.TOKENIZER_FILE))
  text, _, _ = hf_edit_test.write_inputs(tmp_path)
  args = ['--config=configs/curvature/hf_edit.py:runlocal', f'--config.model.path={folder}',
          f'--config.data.path={text}']
  first = tmp_path / 'first'
  analyze.main([*args, '--config.curvature.rho=0.8', f'--workdir={first}'])
  reference = tmp_path / 'reference'  # what the re-run at rho 0.5 writes
  analyze.main([*args, '--config.curvature.rho=0.5', f'--workdir={reference}'])

  def files(workdir):
    edited = workdir / 'edited'
    return {n: (edited / n).read_bytes() for n in sorted(os.listdir(edited))}

  old, new = files(first), files(reference)
  assert old != new
  # Each re-run at rho 0.5 is killed at another point: once the edited folder is written but
  # nothing is published (the old outputs stay), right after edited/ moved into place, and
  # right after results.json did (both rolled forward to all the new outputs).
  code = ('import os, signal, sys\n'
          'from launch import analyze, atomic\n'
          'from lossland.interop import hf\n'
          'at = os.environ["KILL_AT"]\n'
          'save, move = hf.save, atomic._move_into_place\n'
          'def killed_save(*a, **k):\n'
          '  out = save(*a, **k)\n'
          '  os.kill(os.getpid(), signal.SIGKILL)\n'
          'def killed_move(new, target, old):\n'
          '  move(new, target, old)\n'
          '  if target.endswith(at):\n'
          '    os.kill(os.getpid(), signal.SIGKILL)\n'
          'if at == "writing":\n'
          '  hf.save = killed_save\n'
          'atomic._move_into_place = killed_move\n'
          'analyze.main(sys.argv[1:])\n')
  for at, expected_rho, expected_files in (('writing', 0.8, old), ('edited', 0.5, new),
                                           ('results.json', 0.5, new)):
    workdir = tmp_path / f'killed_{at}'
    shutil.copytree(first, workdir)
    env = dict(os.environ, KILL_AT=at,
               XLA_FLAGS='--xla_force_host_platform_device_count=8')  # as in-process
    proc = subprocess.run([sys.executable, '-c', code, *args, '--config.curvature.rho=0.5',
                           '--allow_config_change', f'--workdir={workdir}'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (at, proc.stderr[-2000:])
    atomic.recover(str(workdir))  # what the next run on the workdir does first
    results = json.loads((workdir / 'results.json').read_text())
    assert results['rho'] == expected_rho and files(workdir) == expected_files, at
    assert hf.load(workdir / 'edited').tokenizer is not None
    leftovers = [n for n in os.listdir(workdir) if n.startswith('.')]
    assert not leftovers, (at, leftovers)
