"""llama.cpp GGUF metadata -> a Hugging Face `config.json` dict: llama, qwen2 and gemma3 files.

A GGUF file keeps a model's hyperparameters as metadata under `{arch}.*` keys,
`{arch}` being `general.architecture` (ggml docs/gguf.md, "Standardized
key-value pairs"); llama.cpp's convert_hf_to_gguf.py writes them from the
checkpoint's config.json. `hf_config` inverts that for the architectures
lossland runs, so that `lossland.interop.hf_config.from_hf_config` builds the
same `CausalLMConfig` the Hugging Face folder of the model gives, and
`lossland.interop.hf.save` writes the model back as such a folder:

  {arch}.block_count                       num_hidden_layers
  {arch}.embedding_length                  hidden_size
  {arch}.feed_forward_length               intermediate_size
  {arch}.attention.head_count              num_attention_heads
  {arch}.attention.head_count_kv           num_key_value_heads (default: head_count)
  {arch}.attention.key_length              head_dim (default: embedding_length / head_count)
  {arch}.attention.layer_norm_rms_epsilon  rms_norm_eps
  {arch}.context_length                    max_position_embeddings
  {arch}.rope.freq_base                    rope_theta (default 10000, as in llama.cpp)
  {arch}.rope.scaling.type, .factor        rope_scaling {'rope_type': 'linear', 'factor'}
  tensor rope_freqs.weight                 rope_scaling llama3 (see `_llama3_rope`)
  tensor output.weight absent              tie_word_embeddings
  rows of tensor token_embd.weight         vocab_size ({arch}.vocab_size must agree)
  tokenizer.ggml.{bos,eos,padding}_token_id  bos/eos/pad_token_id

Gemma 3 files (arch 'gemma3', convert_hf_to_gguf.py `Gemma3Model`) become a
`gemma3_text` config; llama.cpp keeps some of its settings in code rather than
metadata, and they are read with its defaults (llama.cpp src/llama-model.cpp,
LLM_ARCH_GEMMA3):

  {arch}.attention.sliding_window          sliding_window (absent: no local layers)
  {arch}.attention.sliding_window_pattern  layer_types (an int n: layers i with
                                           (i + 1) % n != 0 slide; or a per-layer
                                           bool array); default 6
  {arch}.rope.freq_base_swa                rope_local_base_freq (default 10000)
  {arch}.final_logit_softcapping           final_logit_softcapping (default none)
  {arch}.attention.key_length              query_pre_attn_scalar, except for the 62-block
                                           (27B) model: embedding_length / head_count

and its norm gains are stored as 1 + w (`gguf.load` subtracts the 1 again, as
transformers' GGUF loader does).

`{arch}.rope.dimension_count` must equal the head width (lossland rotates whole
heads). Anything else the file sets that changes the forward pass and lossland
does not implement (mixture of experts, YaRN rope scaling, differing key and
value widths) is a `ValueError` naming the key.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from lossland.models.hf_lm import CausalLMConfig, rope_inv_frequencies

# general.architecture -> Hugging Face model_type (and its `architectures` entry).
ARCHITECTURES = {'llama': ('llama', 'LlamaForCausalLM'), 'qwen2': ('qwen2', 'Qwen2ForCausalLM'),
                 'gemma3': ('gemma3_text', 'Gemma3ForCausalLM')}
# llama.cpp's hard-coded Gemma 3 settings (src/llama-model.cpp) where the metadata has none.
GEMMA3_DEFAULTS = {'sliding_window_pattern': 6, 'rope_local_base_freq': 10000.0}
ROPE_FREQS = 'rope_freqs.weight'
# convert_hf_to_gguf.py's defaults for the Llama-3.1 rope rescaling, which it bakes into
# rope_freqs.weight without writing them as metadata.
LLAMA3_DEFAULTS = {'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                   'original_max_position_embeddings': 8192}


def _get(metadata: Mapping[str, Any], arch: str, key: str, default: Any = None,
         required: bool = False) -> Any:
  name = f'{arch}.{key}'
  if name not in metadata:
    if required:
      raise ValueError(f'GGUF metadata has no {name!r}, which a {arch} model needs; the file is '
                       'incomplete (re-convert it with llama.cpp convert_hf_to_gguf.py)')
    return default
  return metadata[name]


def _f32(value: Any) -> float:
  """A float32 metadata value as the shortest decimal rounding to it (1e-05, not 9.99999975e-06)."""
  return float(str(np.float32(value)))


def _one(value: Any, name: str) -> int:
  """A per-layer array (as some converters write head counts) that must hold one value."""
  if isinstance(value, (list, tuple, np.ndarray)):
    values = {int(v) for v in value}
    if len(values) != 1:
      raise ValueError(f'GGUF metadata {name!r} differs between layers ({sorted(values)}); '
                       'lossland builds models whose layers all have one shape')
    return values.pop()
  return int(value)


def _llama3_rope(rope_freqs: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
  """The llama3 rope_scaling whose per-frequency divisors are `rope_freqs`.

  convert_hf_to_gguf.py (`LlamaModel.generate_extra_tensors`) turns the
  Llama-3.1 rescaling into `rope_freqs.weight`, one divisor of each rotary
  frequency (llama.cpp divides the frequency by it): 1 for wavelengths below
  original_max / high_freq_factor, `factor` above original_max /
  low_freq_factor, 1 / ((1 - s) / factor + s) between. Only `factor` (the
  largest divisor) can be read back; the others are taken to be the defaults it
  uses (`LLAMA3_DEFAULTS`, those of every Llama 3.1-3.3 release) and checked to
  reproduce the tensor.
  """
  freqs = np.asarray(rope_freqs, np.float64).reshape(-1)
  if freqs.shape != (head_dim // 2,):
    raise ValueError(f'GGUF tensor {ROPE_FREQS!r} has {freqs.size} entries, but a rotary head of '
                     f'width {head_dim} has {head_dim // 2} frequencies')
  rope = {'rope_type': 'llama3', 'factor': _f32(freqs.max()), **LLAMA3_DEFAULTS}
  base = CausalLMConfig(vocab_size=1, d_model=head_dim, num_layers=1, num_heads=1, num_kv_heads=1,
                        head_dim=head_dim, mlp_dim=1, rope_theta=theta)
  scaled = dataclasses.replace(
      base, rope_type='llama3', rope_factor=rope['factor'],
      rope_low_freq_factor=rope['low_freq_factor'],
      rope_high_freq_factor=rope['high_freq_factor'],
      rope_original_max_positions=rope['original_max_position_embeddings'])
  implied = rope_inv_frequencies(base).astype(np.float64) / rope_inv_frequencies(scaled)
  if not np.allclose(freqs, implied, rtol=1e-4, atol=0):
    raise ValueError(f'GGUF tensor {ROPE_FREQS!r} holds rotary divisors that are not the Llama-3.1 '
                     f'rescaling with factor {rope["factor"]:g} and {LLAMA3_DEFAULTS}; lossland '
                     'implements rope scaling types default, linear and llama3 only')
  return rope


def _rope_scaling(metadata: Mapping[str, Any], arch: str, theta: float, head_dim: int,
                  rope_freqs: np.ndarray | None) -> dict[str, Any] | None:
  kind = _get(metadata, arch, 'rope.scaling.type', 'none')
  if rope_freqs is not None:
    if kind != 'none':
      raise ValueError(f'GGUF file has both {arch}.rope.scaling.type={kind!r} and the tensor '
                       f'{ROPE_FREQS!r}; lossland reads one kind of rope scaling')
    return _llama3_rope(rope_freqs, theta, head_dim)
  if kind == 'none':
    return None
  if kind == 'linear':
    factor = _f32(_get(metadata, arch, 'rope.scaling.factor', required=True))
    return None if factor == 1.0 else {'rope_type': 'linear', 'factor': factor}
  raise ValueError(f'GGUF metadata {arch}.rope.scaling.type={kind!r} is not supported by lossland; '
                   "it implements 'none', 'linear' and the llama3 rescaling (rope_freqs.weight)")


def _gemma3(metadata: Mapping[str, Any], arch: str, hf: Mapping[str, Any]) -> dict[str, Any]:
  """The gemma3_text keys of a Gemma 3 file (module docstring)."""
  layers, heads = hf['num_hidden_layers'], hf['num_attention_heads']
  window = _get(metadata, arch, 'attention.sliding_window')
  pattern = _get(metadata, arch, 'attention.sliding_window_pattern',
                 GEMMA3_DEFAULTS['sliding_window_pattern'])
  if window is None:
    sliding = [False] * layers
  elif isinstance(pattern, (list, tuple, np.ndarray)):
    sliding = [bool(v) for v in pattern]
    if len(sliding) != layers:
      raise ValueError(f'GGUF metadata {arch}.attention.sliding_window_pattern has {len(sliding)} '
                       f'entries for {layers} blocks')
  else:
    sliding = [bool((i + 1) % int(pattern)) for i in range(layers)]
  scalar = hf['hidden_size'] // heads if layers == 62 else hf['head_dim']  # llama.cpp: 27B
  final_cap = _get(metadata, arch, 'final_logit_softcapping')
  attn_cap = _get(metadata, arch, 'attn_logit_softcapping')
  return {
      'hidden_activation': 'gelu_pytorch_tanh',
      'query_pre_attn_scalar': int(scalar),
      'sliding_window': None if window is None else int(window),
      'layer_types': ['sliding_attention' if s else 'full_attention' for s in sliding],
      'rope_local_base_freq': _f32(_get(metadata, arch, 'rope.freq_base_swa',
                                        GEMMA3_DEFAULTS['rope_local_base_freq'])),
      'final_logit_softcapping': None if final_cap is None else _f32(final_cap),
      'attn_logit_softcapping': None if attn_cap is None else _f32(attn_cap),
      'attention_bias': False, 'use_bidirectional_attention': False,
  }


def hf_config(metadata: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]],
              rope_freqs: np.ndarray | None = None) -> dict[str, Any]:
  """The Hugging Face config.json dict of a GGUF file (module docstring for the mapping).

  Args:
    metadata: the file's key-value pairs (`lossland.interop.gguf.read_metadata`).
    tensor_shapes: tensor name -> shape in numpy (row-major) order, i.e. ggml's
      `ne` reversed: token_embd.weight is [vocab, d_model].
    rope_freqs: the values of rope_freqs.weight, when the file has it.

  Raises:
    ValueError: for an architecture other than `ARCHITECTURES`, a missing size,
      or a feature lossland does not implement, naming the key.
  """
  arch = metadata.get('general.architecture')
  if arch not in ARCHITECTURES:
    raise ValueError(f'GGUF general.architecture={arch!r} is not supported by lossland; it reads '
                     f'{tuple(ARCHITECTURES)} (llama.cpp names; SmolLM, Llama 1-3, Mistral 7B and '
                     'TinyLlama are llama, Qwen2 / Qwen2.5 are qwen2, Gemma 3 text models gemma3)')
  model_type, architecture = ARCHITECTURES[arch]
  experts = int(_get(metadata, arch, 'expert_count', 0) or 0)
  if experts:
    raise ValueError(f'GGUF metadata {arch}.expert_count={experts}: mixture-of-experts models '
                     '(e.g. Mixtral) are not supported by lossland')
  d_model = int(_get(metadata, arch, 'embedding_length', required=True))
  heads = _one(_get(metadata, arch, 'attention.head_count', required=True),
               f'{arch}.attention.head_count')
  kv_heads = _one(_get(metadata, arch, 'attention.head_count_kv', heads),
                  f'{arch}.attention.head_count_kv')
  head_dim = int(_get(metadata, arch, 'attention.key_length', d_model // heads))
  value_dim = int(_get(metadata, arch, 'attention.value_length', head_dim))
  if value_dim != head_dim:
    raise ValueError(f'GGUF metadata {arch}.attention.value_length={value_dim} differs from '
                     f'key_length={head_dim}; lossland uses one head width for keys and values')
  if 'token_embd.weight' not in tensor_shapes:
    raise ValueError("GGUF file has no tensor 'token_embd.weight' (the token embedding)")
  vocab = int(tensor_shapes['token_embd.weight'][0])
  stated = _get(metadata, arch, 'vocab_size')
  if stated is not None and int(stated) != vocab:
    raise ValueError(f'GGUF metadata {arch}.vocab_size={stated} disagrees with the {vocab} rows of '
                     "'token_embd.weight'")
  theta = _f32(_get(metadata, arch, 'rope.freq_base', 10000.0))
  hf: dict[str, Any] = {
      'model_type': model_type, 'architectures': [architecture], 'vocab_size': vocab,
      'hidden_size': d_model, 'intermediate_size': int(
          _get(metadata, arch, 'feed_forward_length', required=True)),
      'num_hidden_layers': int(_get(metadata, arch, 'block_count', required=True)),
      'num_attention_heads': heads, 'num_key_value_heads': kv_heads, 'head_dim': head_dim,
      'hidden_act': 'silu',
      'rms_norm_eps': _f32(_get(metadata, arch, 'attention.layer_norm_rms_epsilon',
                                required=True)),
      'max_position_embeddings': int(_get(metadata, arch, 'context_length', 2048)),
      'rope_theta': theta,
      'rope_scaling': _rope_scaling(metadata, arch, theta, head_dim, rope_freqs),
      'tie_word_embeddings': 'output.weight' not in tensor_shapes,
  }
  rotary = int(_get(metadata, arch, 'rope.dimension_count', head_dim))
  if rotary != head_dim:
    raise ValueError(f'GGUF metadata {arch}.rope.dimension_count={rotary} differs from the head '
                     f'width {head_dim}: partial rotary is not supported by lossland')
  if model_type == 'llama':
    hf.update(attention_bias='blk.0.attn_q.bias' in tensor_shapes, mlp_bias=False)
  elif model_type == 'qwen2':
    hf.update(use_sliding_window=False)
  else:
    del hf['hidden_act']
    hf.update(_gemma3(metadata, arch, hf))
  for key, name in (('bos_token_id', 'bos_token_id'), ('eos_token_id', 'eos_token_id'),
                    ('pad_token_id', 'padding_token_id')):
    if f'tokenizer.ggml.{name}' in metadata:
      hf[key] = int(metadata[f'tokenizer.ggml.{name}'])
  return hf
