"""Hugging Face `config.json` <-> `CausalLMConfig`, for llama, qwen2, olmo2 and gpt2.

Keys that change the forward pass are read (or checked to have the value
lossland implements); keys that do not (dropout rates, token ids,
`initializer_range`, `use_cache`, ...) are ignored. A `model_type`, a rope
type or a feature lossland does not implement is one `ValueError` that names
the key and its value.

Both spellings of the rotary settings are read: transformers >= 5 writes
`rope_parameters` ({'rope_type', 'rope_theta', ...}), earlier versions and most
published checkpoints `rope_theta` plus `rope_scaling` ({'rope_type' or
'type', 'factor', ...}). `to_hf_config` writes the spelling of the base
config it is given, and the earlier one (read by every version) when there is
none.
"""
from __future__ import annotations

from typing import Any, Mapping

from lossland.models.hf_lm import ROPE_TYPES, CausalLMConfig

MODEL_TYPES = ('llama', 'qwen2', 'olmo2', 'gpt2')
ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
                 'olmo2': 'Olmo2ForCausalLM', 'gpt2': 'GPT2LMHeadModel'}
HIDDEN_ACTS = {'silu': 'silu', 'swish': 'silu', 'gelu': 'gelu', 'gelu_new': 'gelu_tanh',
               'gelu_pytorch_tanh': 'gelu_tanh'}
_ACT_NAMES = {'silu': 'silu', 'gelu': 'gelu', 'gelu_tanh': 'gelu_new'}


def _unsupported(key: str, value: Any, hint: str) -> ValueError:
  return ValueError(f'config.json: {key}={value!r} is not supported by lossland; {hint}')


def _require(hf: Mapping[str, Any], key: str):
  if hf.get(key) is None:
    raise ValueError(f'config.json has no {key!r}, which a {hf.get("model_type")} config needs')
  return hf[key]


def _expect(hf: Mapping[str, Any], key: str, supported: Any, default: Any) -> None:
  value = hf.get(key, default)
  if value is None:
    value = default
  if value != supported:
    raise _unsupported(key, value, f'only {supported!r} is implemented')


def _rope(hf: Mapping[str, Any]) -> dict[str, Any]:
  params = hf.get('rope_parameters')
  if params is None:
    params = dict(hf.get('rope_scaling') or {})
    params.setdefault('rope_theta', hf.get('rope_theta', 10000.0))
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type not in ROPE_TYPES:
    raise _unsupported('rope_scaling.rope_type', rope_type, f'lossland implements {ROPE_TYPES}')
  partial = params.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  if partial != 1.0:
    raise _unsupported('partial_rotary_factor', partial, 'only full rotary (1.0) is implemented')
  out = {'rope_theta': float(params['rope_theta']), 'rope_type': rope_type}
  if rope_type in ('linear', 'llama3'):
    out['rope_factor'] = float(params['factor'])
  if rope_type == 'llama3':
    out.update(rope_low_freq_factor=float(params['low_freq_factor']),
               rope_high_freq_factor=float(params['high_freq_factor']),
               rope_original_max_positions=int(params['original_max_position_embeddings']))
  return out


def _activation(hf: Mapping[str, Any], key: str, default: str) -> str:
  value = hf.get(key) or default
  if value not in HIDDEN_ACTS:
    raise _unsupported(key, value, f'lossland implements {tuple(HIDDEN_ACTS)}')
  return HIDDEN_ACTS[value]


def _llama_like(hf: Mapping[str, Any]) -> dict[str, Any]:
  model_type = hf['model_type']
  heads = int(_require(hf, 'num_attention_heads'))
  d_model = int(_require(hf, 'hidden_size'))
  bias = bool(hf.get('attention_bias', False))
  fields = dict(
      vocab_size=int(_require(hf, 'vocab_size')), d_model=d_model,
      num_layers=int(_require(hf, 'num_hidden_layers')), num_heads=heads,
      num_kv_heads=int(hf.get('num_key_value_heads') or heads),
      head_dim=int(hf.get('head_dim') or d_model // heads),
      mlp_dim=int(_require(hf, 'intermediate_size')),
      activation=_activation(hf, 'hidden_act', 'silu'),
      norm_eps=float(hf.get('rms_norm_eps', 1e-5 if model_type == 'olmo2' else 1e-6)),
      qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get('mlp_bias', False)),
      max_positions=int(hf.get('max_position_embeddings') or 2048),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)), **_rope(hf))
  if model_type == 'qwen2':
    _expect(hf, 'use_sliding_window', False, False)
    for i, kind in enumerate(hf.get('layer_types') or ()):
      if kind != 'full_attention':
        raise _unsupported(f'layer_types[{i}]', kind, "only 'full_attention' is implemented")
    fields.update(qkv_bias=True, out_bias=False, mlp_bias=False)
  if model_type == 'olmo2':
    fields.update(norm_placement='post', qk_norm=True)
  return fields


def _gpt2(hf: Mapping[str, Any]) -> dict[str, Any]:
  _expect(hf, 'scale_attn_weights', True, True)
  _expect(hf, 'scale_attn_by_inverse_layer_idx', False, False)
  _expect(hf, 'add_cross_attention', False, False)
  d_model, heads = int(_require(hf, 'n_embd')), int(_require(hf, 'n_head'))
  if d_model % heads:
    raise ValueError(f'config.json: n_embd={d_model} is not divisible by n_head={heads}')
  return dict(
      vocab_size=int(_require(hf, 'vocab_size')), d_model=d_model,
      num_layers=int(_require(hf, 'n_layer')), num_heads=heads, num_kv_heads=heads,
      head_dim=d_model // heads, mlp_dim=int(hf.get('n_inner') or 4 * d_model), mlp='plain',
      activation=_activation(hf, 'activation_function', 'gelu_new'), norm='layer',
      norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)), qkv_bias=True, out_bias=True,
      mlp_bias=True, positions='learned', max_positions=int(hf.get('n_positions') or 1024),
      tie_embeddings=bool(hf.get('tie_word_embeddings', True)))


def from_hf_config(hf: Mapping[str, Any]) -> CausalLMConfig:
  """The `CausalLMConfig` of a parsed `config.json`.

  Raises:
    ValueError: naming the key, for an unsupported `model_type`, rope type,
      activation or attention variant, or a missing size.
  """
  model_type = hf.get('model_type')
  if model_type not in MODEL_TYPES:
    raise _unsupported('model_type', model_type, f'lossland reads {MODEL_TYPES}')
  fields = _gpt2(hf) if model_type == 'gpt2' else _llama_like(hf)
  return CausalLMConfig(**fields)


def infer_model_type(config: CausalLMConfig) -> str:
  """The Hugging Face family whose layout matches `config` ('llama' unless a feature says else)."""
  if config.positions == 'learned':
    return 'gpt2'
  if config.qk_norm or config.norm_placement == 'post':
    return 'olmo2'
  if config.qkv_bias and not config.out_bias:
    return 'qwen2'
  return 'llama'


def _check_expressible(config: CausalLMConfig, model_type: str) -> None:
  want: dict[str, Any]
  if model_type == 'gpt2':
    want = dict(positions='learned', norm='layer', norm_placement='pre', mlp='plain',
                qk_norm=False, qkv_bias=True, out_bias=True, mlp_bias=True,
                num_kv_heads=config.num_heads, head_dim=config.d_model // config.num_heads)
  else:
    want = dict(positions='rope', norm='rms', mlp='gated',
                norm_placement='post' if model_type == 'olmo2' else 'pre',
                qk_norm=model_type == 'olmo2')
    if model_type == 'qwen2':
      want.update(qkv_bias=True, out_bias=False, mlp_bias=False)
    else:
      want.update(out_bias=config.qkv_bias)  # one attention_bias flag for all four maps
  for field, value in want.items():
    if getattr(config, field) != value:
      raise ValueError(f'CausalLMConfig.{field}={getattr(config, field)!r} cannot be written as '
                       f'a {model_type} config, which has {field}={value!r}')


def _rope_fields(config: CausalLMConfig) -> dict[str, Any]:
  rope: dict[str, Any] = {'rope_type': config.rope_type, 'rope_theta': config.rope_theta}
  if config.rope_type in ('linear', 'llama3'):
    rope['factor'] = config.rope_factor
  if config.rope_type == 'llama3':
    rope.update(low_freq_factor=config.rope_low_freq_factor,
                high_freq_factor=config.rope_high_freq_factor,
                original_max_position_embeddings=config.rope_original_max_positions)
  return rope


def to_hf_config(config: CausalLMConfig, *, base: Mapping[str, Any] | None = None,
                 dtype: str = 'float32') -> dict[str, Any]:
  """A `config.json` dict for `config`: `base`'s keys, with every architecture key rewritten.

  Args:
    config: the architecture.
    base: the config.json the model was imported from (keeps its model_type,
      token ids and other keys); None writes a fresh config of the family
      `infer_model_type` picks.
    dtype: the weights' dtype name ('float32', 'bfloat16', 'float16').

  Raises:
    ValueError: when `config` has a feature the family's config cannot express.
  """
  hf = dict(base or {})
  model_type = hf.get('model_type') or infer_model_type(config)
  if model_type not in MODEL_TYPES:
    raise _unsupported('model_type', model_type, f'lossland writes {MODEL_TYPES}')
  _check_expressible(config, model_type)
  hf.update(model_type=model_type, architectures=[ARCHITECTURES[model_type]],
            vocab_size=config.vocab_size, tie_word_embeddings=config.tie_embeddings)
  hf['dtype' if 'dtype' in hf else 'torch_dtype'] = dtype  # transformers >= 5 writes 'dtype'
  if model_type == 'gpt2':
    hf.update(n_embd=config.d_model, n_layer=config.num_layers, n_head=config.num_heads,
              n_inner=config.mlp_dim, n_positions=config.max_positions,
              activation_function=_ACT_NAMES[config.activation],
              layer_norm_epsilon=config.norm_eps)
    return hf
  hf.update(hidden_size=config.d_model, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim, intermediate_size=config.mlp_dim,
            hidden_act=_ACT_NAMES[config.activation], rms_norm_eps=config.norm_eps,
            max_position_embeddings=config.max_positions)
  if model_type != 'qwen2':
    hf.update(attention_bias=config.qkv_bias)
  if model_type == 'llama':
    hf.update(mlp_bias=config.mlp_bias)
  rope = _rope_fields(config)
  if 'rope_parameters' in hf:
    hf['rope_parameters'] = rope
  else:
    hf['rope_theta'] = rope.pop('rope_theta')
    hf['rope_scaling'] = None if rope['rope_type'] == 'default' else rope
  return hf

