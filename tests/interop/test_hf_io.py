"""Hugging Face folders: import -> export round trips, and one clear error per bad input."""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
from hf_fixtures import FIXTURES, NAMES, checkpoint

from lossland.interop import hf
from lossland.models.hf_lm import CausalLMConfig


def state_dict(folder) -> dict[str, np.ndarray]:
  folder = pathlib.Path(folder)
  out = {}
  for file in sorted(set(hf.weight_map(folder).values())):
    out.update(safetensors.numpy.load_file(folder / file))
  return out


def assert_bit_equal(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
    assert got[key].tobytes() == want[key].tobytes(), key


@pytest.mark.parametrize('name', NAMES)
def test_import_export_is_bit_exact(name, tmp_path):
  source = FIXTURES / name
  ckpt = hf.load(source)  # stored dtypes
  has_tokenizer = (source / 'tokenizer.json').is_file()
  hf.save(tmp_path, ckpt.params, ckpt.config, base_config=ckpt.hf_config,
          tokenizer_from=source if has_tokenizer else None)
  assert_bit_equal(state_dict(tmp_path), state_dict(source))
  assert hf.from_hf_config(hf.read_config(tmp_path)) == ckpt.config
  if has_tokenizer:
    for file in ('tokenizer.json', 'tokenizer_config.json', 'generation_config.json'):
      assert (tmp_path / file).read_bytes() == (source / file).read_bytes()


def test_sharded_export_and_overwrite(tmp_path):
  ckpt = hf.load(FIXTURES / 'llama_tied')
  hf.save(tmp_path, ckpt.params, ckpt.config, base_config=ckpt.hf_config, max_shard_bytes=50_000)
  index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
  shards = sorted(set(index['weight_map'].values()))
  assert len(shards) >= 3 and not (tmp_path / hf.WEIGHTS_FILE).exists()
  for shard in shards:  # at most the limit, unless one tensor is larger on its own
    tensors = safetensors.numpy.load_file(tmp_path / shard)
    assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 50_000
  assert_bit_equal(state_dict(tmp_path), state_dict(FIXTURES / 'llama_tied'))
  with pytest.raises(FileExistsError, match='already holds weights'):
    hf.save(tmp_path, ckpt.params, ckpt.config)
  hf.save(tmp_path, ckpt.params, ckpt.config, overwrite=True)
  assert sorted(p.name for p in tmp_path.glob('*.safetensors')) == [hf.WEIGHTS_FILE]
  assert not (tmp_path / hf.INDEX_FILE).exists()
  assert_bit_equal(state_dict(tmp_path), state_dict(FIXTURES / 'llama_tied'))


def test_tokenizer_round_trip():
  tok = checkpoint('gpt2').tokenizer
  text = 'The quick brown fox jumps over the lazy dog.'
  ids = tok.encode(text).ids
  assert 0 < len(ids) < len(text) and max(ids) < 320  # merges were learned
  assert tok.decode(ids) == text


# --- bad input --------------------------------------------------------------------------------


def copy_fixture(name, tmp_path) -> pathlib.Path:
  folder = tmp_path / name
  shutil.copytree(FIXTURES / name, folder)
  return folder


def edit_config(folder, **changes):
  config = json.loads((folder / 'config.json').read_text())
  config.update(changes)
  (folder / 'config.json').write_text(json.dumps(config))


def edit_weights(folder, fn):
  tensors = safetensors.numpy.load_file(folder / hf.WEIGHTS_FILE)
  fn(tensors)
  safetensors.numpy.save_file(tensors, folder / hf.WEIGHTS_FILE, metadata={'format': 'pt'})


def test_missing_folder_and_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='is not a folder'):
    hf.load(tmp_path / 'nowhere')
  folder = copy_fixture('llama_tied', tmp_path)
  (folder / 'config.json').unlink()
  with pytest.raises(FileNotFoundError, match='has no config.json'):
    hf.load(folder)
  folder = copy_fixture('qwen2', tmp_path)
  (folder / hf.WEIGHTS_FILE).rename(folder / 'pytorch_model.bin')
  with pytest.raises(FileNotFoundError, match='neither model.safetensors nor .*PyTorch pickles'):
    hf.load(folder)


def test_index_naming_a_missing_shard(tmp_path):
  folder = copy_fixture('llama3_gqa', tmp_path)
  (folder / 'model-00002-of-00003.safetensors').unlink()
  with pytest.raises(FileNotFoundError,
                     match="lists the shard 'model-00002-of-00003.safetensors', which is not in"):
    hf.load(folder)


def test_unsupported_dtype(tmp_path):
  folder = copy_fixture('llama_tied', tmp_path)
  edit_weights(folder, lambda t: t.update({'model.norm.weight': np.ones(64, np.float64)}))
  with pytest.raises(ValueError, match="'model.norm.weight' has dtype F64"):
    hf.load(folder)


@pytest.mark.parametrize('changes, message', [
    ({'model_type': 'mixtral'}, "model_type='mixtral' is not supported"),
    ({'model_type': 'gemma3'}, "model_type='gemma3' is not supported.*'gemma3_text'"),
    ({'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0}},
     "rope_scaling.rope_type='yarn' is not supported"),
    ({'hidden_act': 'relu'}, "hidden_act='relu' is not supported"),
    ({'use_sliding_window': True}, 'use_sliding_window=True is not supported'),
    ({'layer_types': ['full_attention', 'sliding_attention']},
     r"layer_types\[1\]='sliding_attention' is not supported"),
    ({'hidden_size': None}, "config.json has no 'hidden_size'"),
])
def test_unsupported_config(tmp_path, changes, message):
  folder = copy_fixture('qwen2', tmp_path)
  edit_config(folder, **changes)
  with pytest.raises(ValueError, match=message):
    hf.load(folder)


@pytest.mark.parametrize('name, changes, message', [
    ('gemma3', {'attn_logit_softcapping': 2.0},
     'attn_logit_softcapping=2.0 is not supported.*transformers ignores it'),
    ('gemma3', {'use_bidirectional_attention': True}, 'use_bidirectional_attention=True'),
    ('gemma3', {'rope_parameters': {'full_attention': {'rope_type': 'default', 'rope_theta': 1e4},
                                    'sliding_attention': {'rope_type': 'linear', 'factor': 2.0,
                                                          'rope_theta': 1e4}}},
     "sliding_attention.rope_type='linear' is not supported"),
    ('gemma3', {'rope_parameters': {'rope_type': 'default', 'rope_theta': 1e4}},
     'rope_parameters=.* a gemma3_text config has one dict per layer type'),
    ('gemma3', {'layer_types': ['sliding_attention', 'chunked_attention', 'full_attention']},
     r"layer_types\[1\]='chunked_attention' is not supported"),
    ('gemma2', {'sliding_window': None}, "'sliding_attention' layers but no 'sliding_window'"),
    ('qwen3', {'use_sliding_window': True}, 'use_sliding_window=True is not supported'),
    ('mistral', {'layer_types': ['full_attention', 'sliding_attention']},
     'layer_types=.* mistral models ignore it'),
    ('mistral', {'rope_parameters': {'rope_type': 'default', 'rope_theta': 1e4,
                                     'partial_rotary_factor': 0.5}},
     'partial_rotary_factor=0.5 is not supported.*for mistral'),
    ('phi3', {'rope_parameters': {'rope_type': 'longrope', 'rope_theta': 1e4}},
     "rope_type='longrope' is not supported"),
    ('qwen3_moe', {'decoder_sparse_step': 2},
     r'decoder_sparse_step/mlp_only_layers=\(2, \[\]\) is not supported.*layers \[0\] would '
     'have a dense MLP'),
    ('qwen3_moe', {'mlp_only_layers': [1]}, r'layers \[1\] would have a dense MLP'),
    ('qwen3_moe', {'num_experts_per_tok': 7},
     'num_experts_per_tok=7 exceeds num_local_experts=6'),
    ('qwen3_moe', {'use_sliding_window': True}, 'use_sliding_window=True is not supported'),
])
def test_unsupported_config_of_new_families(tmp_path, name, changes, message):
  folder = copy_fixture(name, tmp_path)
  edit_config(folder, **changes)
  with pytest.raises(ValueError, match=message):
    hf.load(folder)


def test_qwen3_moe_num_experts_spellings(tmp_path):
  """Released Qwen3-MoE configs say num_experts, transformers 5 writes num_local_experts: both
  are read, and an export keeps the spelling of its base config."""
  folder = copy_fixture('qwen3_moe', tmp_path)
  config = json.loads((folder / 'config.json').read_text())
  config['num_experts'] = config.pop('num_local_experts')
  (folder / 'config.json').write_text(json.dumps(config))
  ckpt = hf.load(folder)
  assert ckpt.config == checkpoint('qwen3_moe').config
  hf.save(tmp_path / 'out', ckpt.params, ckpt.config, base_config=ckpt.hf_config)
  written = hf.read_config(tmp_path / 'out')
  assert written['num_experts'] == 6 and 'num_local_experts' not in written


def test_unsupported_gpt2_variant(tmp_path):
  folder = copy_fixture('gpt2', tmp_path)
  edit_config(folder, scale_attn_by_inverse_layer_idx=True)
  with pytest.raises(ValueError, match='scale_attn_by_inverse_layer_idx=True is not supported'):
    hf.load(folder)


def test_tensors_not_matching_the_config(tmp_path):
  folder = copy_fixture('llama_tied', tmp_path)
  edit_weights(folder, lambda t: t.pop('model.layers.1.mlp.up_proj.weight'))
  with pytest.raises(ValueError,
                     match=r"lacks 1 tensor\(s\) .*'model.layers.1.mlp.up_proj.weight'"):
    hf.load(folder)
  folder = copy_fixture('llama_tied', tmp_path / 'spare')
  edit_weights(folder, lambda t: t.update({'model.layers.0.self_attn.q_norm.weight': np.ones(
      64, np.float32)}))  # QK-norm in a Llama checkpoint: a feature its config cannot express
  with pytest.raises(ValueError, match=r"\['model.layers.0.self_attn.q_norm.weight'\] .* have no "
                     'place in a llama model'):
    hf.load(folder)
  folder = copy_fixture('qwen2', tmp_path / 'shape')
  edit_config(folder, intermediate_size=80)
  with pytest.raises(ValueError,
                     match=r"'model.layers.0.mlp.down_proj.weight' has shape \(64, 96\)"):
    hf.load(folder)


def test_tokenizer_of_another_model(tmp_path):
  folder = copy_fixture('gpt2', tmp_path)
  vocab = {f'w{i}': i for i in range(400)}
  tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='w0')).save(
      str(folder / 'tokenizer.json'))
  with pytest.raises(ValueError, match='token ids up to 399, but the model has vocab_size=320'):
    hf.load(folder)
  assert hf.load(folder, tokenizer=False).tokenizer is None
  with pytest.raises(FileNotFoundError, match='tokenizer.json does not exist'):
    hf.load(FIXTURES / 'qwen2', tokenizer=True)


def test_param_rules_need_a_mesh():
  with pytest.raises(ValueError, match='param_rules need a mesh'):
    hf.load(FIXTURES / 'qwen2', param_rules=[('.*', jax.sharding.PartitionSpec())])


def test_export_errors(tmp_path):
  ckpt = checkpoint('llama_tied')
  params = jax.tree.map(lambda x: x, ckpt.params)
  params['params']['block_0']['mlp']['up'] = {'a': jnp.zeros((64, 4)), 'b': jnp.zeros((4, 96))}
  with pytest.raises(ValueError, match=r"unexpected \['params/block_0/mlp/up/a'"):
    hf.save(tmp_path / 'a', params, ckpt.config)
  with pytest.raises(ValueError, match="has dtype int32; Hugging Face folders hold"):
    hf.save(tmp_path / 'b', jax.tree.map(lambda x: x.astype(jnp.int32), ckpt.params), ckpt.config)
  qk = CausalLMConfig(**{**ckpt.config.__dict__, 'qk_norm': True})
  with pytest.raises(ValueError, match='qk_norm=True cannot be written as a llama config'):
    hf.save(tmp_path / 'c', ckpt.params, qk, base_config=ckpt.hf_config)
