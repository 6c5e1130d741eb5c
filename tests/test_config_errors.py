"""Bad command-line input stops at parse time with one message that names the key.

In process through `config_cli.parse` and the launchers' `main(argv)` (no subprocesses), so
each case costs milliseconds; conftest's 8 fake CPU devices are the job's devices.
"""
import os

import pytest

from launch import config_cli
from launch import train as train_launch

LM = '--config=configs/lm/pydoc_byte.py:runlocal'
CURVATURE = '--config=configs/curvature/noisy_labels.py:runlocal'


def _parse_error(*argv) -> str:
  with pytest.raises(SystemExit) as e:
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
