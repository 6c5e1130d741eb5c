"""Malformed Hugging Face folders give one UserError naming the file (GitHub issue 27).

And `hf.save` writes a folder whole: a save that fails midway leaves no folder
at a new target and the old folder intact at an existing one.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hf_fixtures import FIXTURES

from lossland import UserError
from lossland.interop import hf

SHARD = 'model-00002-of-00003.safetensors'


def copy_fixture(name, tmp_path):
  folder = tmp_path / name
  shutil.copytree(FIXTURES / name, folder)
  return folder


def edit_config(folder, **changes):
  config = json.loads((folder / hf.CONFIG_FILE).read_text())
  config.update(changes)
  (folder / hf.CONFIG_FILE).write_text(json.dumps(config))


def load_error(folder) -> str:
  with pytest.raises(UserError) as info:
    hf.load(folder)
  return str(info.value)


def truncate(file, size):
  data = file.read_bytes()
  file.write_bytes(data[:size])


# --- safetensors files -----------------------------------------------------------------------


@pytest.mark.parametrize('size', [0, 1000, -5000], ids=['empty', 'header', 'data'])
def test_truncated_single_file(tmp_path, size):
  folder = copy_fixture('llama_tied', tmp_path)
  file = folder / hf.WEIGHTS_FILE
  truncate(file, size if size >= 0 else file.stat().st_size + size)
  message = load_error(folder)
  assert str(file) in message and 'truncated or empty' in message and 'copy it' in message


@pytest.mark.parametrize('size', [0, -100], ids=['empty', 'data'])
def test_truncated_shard(tmp_path, size):
  folder = copy_fixture('llama3_gqa', tmp_path)
  file = folder / SHARD
  truncate(file, size if size >= 0 else file.stat().st_size + size)
  message = load_error(folder)
  assert str(file) in message and 'not a readable safetensors file' in message


def test_weight_map_sending_a_tensor_to_the_wrong_shard(tmp_path):
  folder = copy_fixture('llama3_gqa', tmp_path)
  index = json.loads((folder / hf.INDEX_FILE).read_text())
  name = 'model.layers.0.mlp.down_proj.weight'
  assert index['weight_map'][name] == SHARD
  index['weight_map'][name] = 'model-00001-of-00003.safetensors'
  (folder / hf.INDEX_FILE).write_text(json.dumps(index))
  message = load_error(folder)
  assert str(folder / hf.INDEX_FILE) in message
  assert f"{name!r} in 'model-00001-of-00003.safetensors', which does not contain it" in message
  assert f'it is in {SHARD!r}: point its weight_map entry there' in message


# --- JSON files --------------------------------------------------------------------------------


@pytest.mark.parametrize('file', [hf.CONFIG_FILE, hf.INDEX_FILE, hf.TOKENIZER_FILE])
def test_invalid_json(tmp_path, file):
  folder = copy_fixture('llama3_gqa', tmp_path)
  truncate(folder / file, 40)  # a cut-off download
  message = load_error(folder)
  assert message.startswith(f'{folder / file} is not valid JSON')


def test_a_tokenizer_json_that_is_not_a_tokenizer(tmp_path):
  folder = copy_fixture('llama3_gqa', tmp_path)
  (folder / hf.TOKENIZER_FILE).write_text('{"model": 3}')
  message = load_error(folder)
  assert message.startswith(f'{folder / hf.TOKENIZER_FILE} is JSON but not a tokenizers tokenizer')


@pytest.mark.parametrize('file', [hf.CONFIG_FILE, hf.INDEX_FILE])
def test_json_that_is_not_an_object(tmp_path, file):
  folder = copy_fixture('llama3_gqa', tmp_path)
  (folder / file).write_text('[1, 2]')
  message = load_error(folder)
  assert message == (f'{folder / file} holds an array, not a JSON object ({{...}}); replace it '
                     "with the checkpoint's own file")


# --- config values ----------------------------------------------------------------------------


@pytest.mark.parametrize('changes, message', [
    ({'hidden_size': 'big'}, "config.json: hidden_size='big' is not an integer"),
    ({'hidden_size': 64.5}, 'config.json: hidden_size=64.5 is not an integer'),
    ({'num_hidden_layers': True}, 'config.json: num_hidden_layers=True is not an integer'),
    ({'num_attention_heads': 0}, 'config.json: num_attention_heads=0 must be at least 1'),
    ({'num_key_value_heads': 3}, 'config.json: num_key_value_heads=3 does not divide '
                                 'num_attention_heads=4'),
    ({'rms_norm_eps': 'tiny'}, "config.json: rms_norm_eps='tiny' is not a number"),
    ({'rope_parameters': {'rope_type': 'default', 'rope_theta': -1}},
     'config.json: rope_scaling.rope_theta=-1 must be positive'),
    ({'model_type': None}, "config.json has no 'model_type'; add the checkpoint's family"),
    ({'head_dim': 15}, 'config.json describes a model lossland cannot build: '
                       'CausalLMConfig.head_dim=15 must be even'),
])
def test_bad_config_values(tmp_path, changes, message):
  folder = copy_fixture('llama3_gqa', tmp_path)
  edit_config(folder, **changes)
  got = load_error(folder)
  assert got.startswith(f'{folder}/{message}'), got


def test_bad_gpt2_sizes(tmp_path):
  folder = copy_fixture('gpt2', tmp_path)
  edit_config(folder, n_head=0)
  assert load_error(folder).startswith(f'{folder}/config.json: n_head=0 must be at least 1')


# --- save writes the folder whole -------------------------------------------------------------


def failing_save_shard(monkeypatch, after: int):
  calls = []
  real = hf._save_shard

  def save_shard(tensors, file, metadata):
    calls.append(file)
    if len(calls) > after:
      raise OSError('disk full (test)')
    real(tensors, file, metadata)

  monkeypatch.setattr(hf, '_save_shard', save_shard)
  return calls


def listing(folder):
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_save_leaves_no_folder(tmp_path, monkeypatch):
  ckpt = hf.load(FIXTURES / 'llama_tied')
  calls = failing_save_shard(monkeypatch, after=1)
  target = tmp_path / 'out' / 'edited'
  with pytest.raises(OSError, match='disk full'):
    hf.save(target, ckpt.params, ckpt.config, max_shard_bytes=50_000)
  assert len(calls) == 2  # one shard was written (in the temporary folder)
  assert not target.exists() and os.listdir(tmp_path / 'out') == []


def test_a_failed_save_keeps_the_old_folder(tmp_path, monkeypatch):
  ckpt = hf.load(FIXTURES / 'llama3_gqa')
  target = copy_fixture('llama3_gqa', tmp_path)
  before = listing(target)
  failing_save_shard(monkeypatch, after=1)
  with pytest.raises(OSError, match='disk full'):
    hf.save(target, ckpt.params, ckpt.config, base_config=ckpt.hf_config, overwrite=True,
            tokenizer_from=target, max_shard_bytes=50_000)
  assert listing(target) == before
  assert sorted(os.listdir(tmp_path)) == ['llama3_gqa']


def test_save_replaces_a_folder_keeping_its_other_files(tmp_path):
  ckpt = hf.load(FIXTURES / 'llama_tied')
  target = copy_fixture('llama3_gqa', tmp_path)  # sharded: its shards and index must go
  (target / 'README.md').write_text('notes')
  (target / 'chat_template.jinja').write_text('{{ messages }}')
  source = copy_fixture('llama3_gqa', tmp_path / 'src')
  (source / 'chat_template.jinja').write_text('{% for m in messages %}{{ m }}{% endfor %}')
  os.chmod(target, 0o750)
  hf.save(target, ckpt.params, ckpt.config, base_config=ckpt.hf_config, overwrite=True,
          tokenizer_from=source)
  assert sorted(p.name for p in target.iterdir()) == sorted([
      'README.md', 'chat_template.jinja', 'config.json', 'generation_config.json',
      'model.safetensors', 'reference.npz', 'tokenizer.json', 'tokenizer_config.json'])
  assert (target / 'README.md').read_text() == 'notes'
  assert (target / 'chat_template.jinja').read_bytes() == \
      (source / 'chat_template.jinja').read_bytes()
  assert target.stat().st_mode & 0o777 == 0o750
  assert sorted(os.listdir(tmp_path)) == ['llama3_gqa', 'src']
  got = hf.load(target)
  assert hf.from_hf_config(hf.read_config(target)) == ckpt.config
  np.testing.assert_array_equal(got.params['params']['embed']['embedding'],
                                ckpt.params['params']['embed']['embedding'])


def test_a_killed_save_is_cleaned_up_by_the_next(tmp_path):
  ckpt = hf.load(FIXTURES / 'llama_tied')
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True).stdout.strip()
  partial = tmp_path / f'.gone.saving-{dead}-abc_1234'  # for a name no save uses again
  partial.mkdir()
  (partial / hf.WEIGHTS_FILE).write_bytes(b'half')
  old = tmp_path / f'.other.saving-{dead}-xyz_1234.old'  # killed between the two renames
  shutil.copytree(FIXTURES / 'llama_tied', old)
  (old / f'.saving-{dead}-inside12').mkdir()  # a killed in-place save of it
  hf.save(tmp_path / 'edited', ckpt.params, ckpt.config)
  assert sorted(os.listdir(tmp_path)) == ['edited', 'other']
  assert (tmp_path / 'other' / 'reference.npz').read_bytes() == \
      (FIXTURES / 'llama_tied' / 'reference.npz').read_bytes()  # the old folder came back
  hf.save(tmp_path / 'other', ckpt.params, ckpt.config, overwrite=True)
  assert sorted(os.listdir(tmp_path / 'other')) == ['config.json', 'generation_config.json',
                                                    'model.safetensors', 'reference.npz']


def test_a_folder_that_cannot_be_renamed_is_staged_inside_itself(tmp_path, monkeypatch):
  """A mount point (or a read-only parent): a failed save still keeps it as it was."""
  from lossland.interop import whole_folder
  monkeypatch.setattr(whole_folder, '_in_place', lambda folder: folder.is_dir())
  ckpt = hf.load(FIXTURES / 'llama_tied')
  target = copy_fixture('llama3_gqa', tmp_path)
  before = listing(target)
  with monkeypatch.context() as m:
    failing_save_shard(m, after=0)
    with pytest.raises(OSError, match='disk full'):
      hf.save(target, ckpt.params, ckpt.config, overwrite=True)
  assert listing(target) == before and sorted(os.listdir(tmp_path)) == ['llama3_gqa']
  hf.save(target, ckpt.params, ckpt.config, base_config=ckpt.hf_config, overwrite=True)
  assert sorted(p.name for p in target.iterdir()) == sorted([
      'config.json', 'generation_config.json', 'model.safetensors', 'reference.npz',
      'tokenizer.json', 'tokenizer_config.json'])
  assert hf.from_hf_config(hf.load(target).hf_config) == ckpt.config
