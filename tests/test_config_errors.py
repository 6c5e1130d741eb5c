"""Bad command-line input stops at parse time with one message that names the key.

In process through `config_cli.parse` and the launchers' `main(argv)` (no subprocesses), so
each case costs milliseconds; conftest's 8 fake CPU devices are the job's devices.
"""
import os

import pytest

from launch import config_cli
from launch import train as train_launch
from lossland import UserError

LM = '--config=configs/lm/pydoc_byte.py:runlocal'
CURVATURE = '--config=configs/curvature/noisy_labels.py:runlocal'
CHAR = '--config=configs/lm/shakespeare_char.py:runlocal'


def _parse_error(*argv) -> str:
  with pytest.raises(UserError) as e:
    config_cli.parse(list(argv), 'test')
  return str(e.value)


@pytest.mark.parametrize('argv,needle', [
    ((CURVATURE, '--config.curvature.rhos=0.9'),
     "--config.curvature.rhos: expected a tuple such as '(0.95, 0.75)' or '0.95,0.75', got the "
     "scalar '0.9'; for one element write (0.9,) or 0.9,"),
    ((CURVATURE, '--config.model.features=64'),
     "--config.model.features: expected a tuple such as '(32, 32)' or '32,32', got the scalar "
     "'64'"),
    ((CURVATURE, '--config.model.features=64,0.5'), "element 0.5 of '64,0.5' is a float"),
    ((CURVATURE, '--config.curvature.rhos=(0.9'), "expected a tuple such as"),
])
def test_tuple_key_given_a_scalar_shows_the_expected_form(argv, needle):
  assert needle in _parse_error(*argv)


def test_tuple_key_takes_both_forms():
  for text in ('(0.9,)', '0.9,', '[0.9]'):
    _, config = config_cli.parse([CURVATURE, f'--config.curvature.rhos={text}'], 'test')
    assert config.curvature.rhos == (0.9,)
  _, config = config_cli.parse([CURVATURE, '--config.curvature.rhos=1,0.9'], 'test')
  assert config.curvature.rhos == (1, 0.9)  # an int is a fine float
  _, config = config_cli.parse([CURVATURE, '--config.model.features=64,64'], 'test')
  assert config.model.features == (64, 64)


@pytest.mark.parametrize('key', ['model.dtype', 'model.matmul_dtype'])
def test_unknown_dtype_lists_the_allowed_names(key):
  message = _parse_error(LM, f'--config.{key}=float64')
  assert f"{key}='float64' is not a dtype" in message
  assert "allowed: ['bfloat16', 'float16', 'float32'" in message


def test_matmul_dtype_auto_is_allowed():
  _, config = config_cli.parse([LM, '--config.model.matmul_dtype=auto'], 'test')
  assert config.model.matmul_dtype == 'auto'


@pytest.mark.parametrize('key', ['train.batch_size', 'eval.num_batches', 'eval.batch_size',
                                 'train.seq_len'])
def test_zero_sizes_name_the_key(key):
  assert f'{key}=0 must be at least 1; set --config.{key}' in _parse_error(LM, f'--config.{key}=0')


def test_mesh_larger_than_the_device_count_is_clear():
  message = _parse_error(LM, '--config.mesh.model=16')
  assert 'mesh.model=16 exceeds the 8 devices of this job' in message
  message = _parse_error(LM, '--config.mesh.data=4', '--config.mesh.model=4')
  assert 'mesh.data=4 x mesh.model=4 needs 16 devices but this job has 8' in message
  assert 'mesh.model=0 must be a positive number' in _parse_error(LM, '--config.mesh.model=0')


@pytest.mark.parametrize('rules,needle', [
    ("(('.*kernel', (None, 'modle')),)", "names mesh axis 'modle'; the mesh axes are ('data', "
                                         "'model')"),
    ("('.*kernel', (None, 'model'))", "param_rules entry '.*kernel' is not a (regex, spec) pair"),
    ("(('.*kernel', 'model'),)", "is not a (regex, spec) pair"),
    ("(('*kernel', (None, 'model')),)", "param_rules pattern '*kernel' is not a valid regex"),
])
def test_malformed_param_rules_are_clear(rules, needle):
  assert needle in _parse_error(LM, f'--config.param_rules={rules}')


def test_valid_param_rules_pass():
  rules = "(('.*/mlp/up/kernel', (None, 'model')),)"
  _, config = config_cli.parse([LM, f'--config.param_rules={rules}'], 'test')
  assert config.param_rules == (('.*/mlp/up/kernel', (None, 'model')),)


def test_every_shipped_config_validates():
  import glob
  import re
  for path in sorted(glob.glob('configs/*/*.py')):
    if os.path.basename(path).startswith('_'):  # __init__.py and shared helpers (_base.py)
      continue
    for arg in [None] + sorted(set(re.findall(r"arg == '(\w+)'", open(path).read()))):
      config = config_cli.load_config_file(path + (f':{arg}' if arg else ''))
      config_cli.validate(config, num_devices=8)


def test_train_main_names_a_directory_or_non_utf8_data_path(tmp_path, data_dir):
  del data_dir
  file_args = [LM, '--config.data.source=file', '--config.data.vocab=char',
               f'--workdir={tmp_path / "w"}']
  with pytest.raises(SystemExit, match='is a directory; set --config.data.path'):
    train_launch.main(file_args + [f'--config.data.path={tmp_path}'])
  bad = tmp_path / 'bad.txt'
  bad.write_bytes(b'hello \xff world')
  with pytest.raises(SystemExit, match=r"bad.txt' is not UTF-8: byte 6 \(0xff\)"):
    train_launch.main(file_args + [f'--config.data.path={bad}'])


def test_user_error_is_a_value_error_exported_lazily():
  import subprocess
  import sys
  import lossland
  assert issubclass(lossland.UserError, ValueError) and lossland.UserError is UserError
  assert 'UserError' in dir(lossland)
  out = subprocess.run([sys.executable, '-c', 'import sys, lossland; lossland.UserError; '
                        'print("jax" in sys.modules)'], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == 'False'  # the error type costs no jax import


def _one_line(main, argv) -> str:
  """The launcher's exit message for `argv`: `error: <message>`, a single line."""
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert isinstance(e.value.code, str), e.value.code  # printed to stderr, exit status 1
  assert e.value.code.startswith('error: ') and '\n' not in e.value.code, e.value.code
  return e.value.code


@pytest.mark.parametrize('argv,needle', [
    ([LM, '--config.train.nope=1'], "error: unknown config key 'train.nope': train has no 'nope'"),
    ([LM, '--stray'], "error: unrecognized argument '--stray'"),
    (['--config=configs/lm/nope.py'], "error: config file 'configs/lm/nope.py' does not exist"),
    ([CHAR, '--config.data.path={text}', '--config.model.name=gpt'],
     "error: unknown model.name 'gpt' (config key model.name)"),
    ([CHAR, '--config.task=nope'], "error: unknown task 'nope' (config key task)"),
    ([CHAR, '--config.data.path='], 'error: data.source is "file" but data.path is empty'),
])
def test_a_bad_argument_to_launch_train_is_one_line(argv, needle, monkeypatch, tmp_path):
  monkeypatch.delenv('LOSSLAND_TRACEBACK', raising=False)
  text = tmp_path / 'text.txt'
  text.write_text('to be or not to be, that is the question\n' * 20)
  argv = [a.replace('{text}', str(text)) for a in argv]
  assert _one_line(train_launch.main, [*argv, f'--workdir={tmp_path / "w"}']).startswith(needle)


def test_every_launcher_prints_a_user_error_as_one_line(monkeypatch, tmp_path, capsys):
  from launch import analyze, bench  # pylint: disable=g-import-not-at-top
  from launch import compile as compile_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv('LOSSLAND_TRACEBACK', raising=False)
  bad = '--config.model.nope=1'
  for main, extra in ((train_launch.main, [f'--workdir={tmp_path}']),
                      (analyze.main, [f'--workdir={tmp_path}']), (bench.main, [])):
    config = CURVATURE if main is analyze.main else LM
    assert _one_line(main, [config, bad, *extra]).startswith("error: unknown config key")
  message = _one_line(analyze.main, [LM, f'--workdir={tmp_path}'])
  assert message.startswith("error: configs/lm/pydoc_byte.py:runlocal has no `experiment` key")
  with pytest.raises(SystemExit) as e:  # launch.compile prints the line itself
    compile_lib.main([LM, bad, '--topology=v5e:2x2'])
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith("error: unknown config key 'model.nope'") and err.count('\n') == 1


def test_a_seq_len_past_learned_positions_names_the_key_before_training(monkeypatch):
  from launch import bench, common, tasks  # pylint: disable=g-import-not-at-top
  from lossland import models  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv('LOSSLAND_TRACEBACK', raising=False)
  gpt2 = models.CausalLM(models.CausalLMConfig(  # GPT-2's layout, 16 learned positions
      vocab_size=65, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
      mlp_dim=32, mlp='plain', activation='gelu_tanh', norm='layer', positions='learned',
      max_positions=16))
  assert common.learned_positions(gpt2) == 16
  assert common.learned_positions(models.TransformerLM(vocab_size=65)) is None  # rotary
  _, config = config_cli.parse([CHAR, '--config.data.path=/nonexistent.txt'], 'test')
  line = ("train.seq_len=64 is longer than the 16 learned positions of this model (CausalLM "
          "with positions='learned'); set --config.train.seq_len to at most 16")
  with pytest.raises(UserError) as e:  # before the (missing) text is read or anything compiles
    tasks.build_task(config, model=gpt2)
  assert str(e.value) == line
  with pytest.raises(SystemExit) as e, config_cli.user_errors():  # launch.bench's path
    bench.time_train_step(config, model=gpt2)
  assert e.value.code == f'error: {line}'
  common.check_seq_len(gpt2, 16, 'train.seq_len')  # at the limit: fine
