"""Hugging Face `config.json` <-> `CausalLMConfig`, for the families in `MODEL_TYPES`.

Keys that change the forward pass are read (or checked to have the value
lossland implements); keys that do not (dropout rates, token ids,
`initializer_range`, `use_cache`, ...) are ignored. A `model_type`, a rope
type or a feature lossland does not implement is one `UserError` that names
the key and its value; so is a size that is not a positive integer or a rate
that is not a number (read in one place, `_int` and `_float`). Every message
starts with `config.json`; `lossland.interop.hf.load` prefixes the folder.
Defaults of absent keys are those of transformers 5's config classes (e.g.
Gemma 2's soft-caps 50 and 30, GPT-NeoX's `rotary_pct` 0.25, Gemma 3's
`sliding_window_pattern` 6).

Both spellings of the rotary settings are read: transformers >= 5 writes
`rope_parameters` ({'rope_type', 'rope_theta', ...}; for Gemma 3 and OLMo-3 one
such dict per layer type, {'full_attention': ..., 'sliding_attention': ...}),
earlier versions and most published checkpoints `rope_theta` plus
`rope_scaling` ({'rope_type' or 'type', 'factor', ...}), with Gemma 3's local
base in `rope_local_base_freq` and GPT-NeoX's in `rotary_emb_base` /
`rotary_pct`. Read in the earlier spelling, OLMo-3's sliding layers get base
500000 whatever `rope_theta` says, as transformers 5 gives them.
`to_hf_config` writes the spelling of the base config it is given, and the
earlier one (read by every version) when there is none and it can express the
config.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from lossland.errors import UserError
from lossland.models.hf_lm import ROPE_TYPES, CausalLMConfig

MODEL_TYPES = ('llama', 'qwen2', 'olmo2', 'gpt2', 'gemma3_text', 'qwen3', 'mistral', 'olmo3',
               'gemma2', 'phi3', 'gpt_neox', 'qwen3_moe')
ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
                 'olmo2': 'Olmo2ForCausalLM', 'gpt2': 'GPT2LMHeadModel',
                 'gemma3_text': 'Gemma3ForCausalLM', 'qwen3': 'Qwen3ForCausalLM',
                 'mistral': 'MistralForCausalLM', 'olmo3': 'Olmo3ForCausalLM',
                 'gemma2': 'Gemma2ForCausalLM', 'phi3': 'Phi3ForCausalLM',
                 'gpt_neox': 'GPTNeoXForCausalLM', 'qwen3_moe': 'Qwen3MoeForCausalLM'}
HIDDEN_ACTS = {'silu': 'silu', 'swish': 'silu', 'gelu': 'gelu', 'gelu_new': 'gelu_tanh',
               'gelu_pytorch_tanh': 'gelu_tanh'}
_ACT_NAMES = {'silu': 'silu', 'gelu': 'gelu', 'gelu_tanh': 'gelu_new'}
GEMMA = ('gemma2', 'gemma3_text')
# Families whose rotary settings are kept per layer type.
LAYERED_ROPE = ('gemma3_text', 'olmo3')
# Families with rotary on part of each head (their apply_rotary_pos_emb passes the rest through).
PARTIAL_ROTARY = ('phi3', 'gpt_neox')
_LAYER_TYPES = {'full_attention': 'full', 'sliding_attention': 'sliding'}
_HF_LAYER_TYPES = {v: k for k, v in _LAYER_TYPES.items()}
_DEFAULT_THETA = {'gemma3_text': 1_000_000.0, 'olmo3': 500_000.0}
_EPS = {'olmo2': 1e-5, 'olmo3': 1e-5, 'phi3': 1e-5}


_REQUIRED = object()


def _unsupported(key: str, value: Any, hint: str) -> UserError:
  return UserError(f'config.json: {key}={value!r} is not supported by lossland; {hint}')


def _require(hf: Mapping[str, Any], key: str):
  if hf.get(key) is None:
    raise UserError(f'config.json has no {key!r}, which a {hf.get("model_type")} config needs; '
                    'add it')
  return hf[key]


def _absent(hf: Mapping[str, Any], default: Any, label: str) -> Any:
  """`default` for an absent or null key; a UserError when the key is required."""
  if default is _REQUIRED:
    raise UserError(f'config.json has no {label!r}, which a {hf.get("model_type")} config '
                    'needs; add it')
  return default


def _int(hf: Mapping[str, Any], key: str, default: Any = _REQUIRED, *, minimum: int = 1,
         label: str | None = None) -> Any:
  """`hf[key]` as an int of at least `minimum` (`default` when absent or null).

  The one place where config sizes are read: a missing required key, a value
  that is not an integer (a string, a bool, 4.5) or one below `minimum` (0
  heads) is a `UserError` naming the key, not a TypeError or a
  ZeroDivisionError further on. `label` names a nested key ('rope_scaling.x').
  """
  label = label or key
  value = hf.get(key)
  if value is None:
    return _absent(hf, default, label)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or \
      (isinstance(value, float) and not value.is_integer()):
    raise UserError(f'config.json: {label}={value!r} is not an integer; set it to a whole number '
                    f'(at least {minimum})')
  if value < minimum:
    raise UserError(f'config.json: {label}={value!r} must be at least {minimum}; set it to the '
                    "model's real size")
  return int(value)


def _float(hf: Mapping[str, Any], key: str, default: Any = _REQUIRED, *, positive: bool = False,
           label: str | None = None) -> Any:
  """`hf[key]` as a float (`default` when absent or null); `_int`'s checks for rates and bases."""
  label = label or key
  value = hf.get(key)
  if value is None:
    return _absent(hf, default, label)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise UserError(f'config.json: {label}={value!r} is not a number; set it to one')
  if positive and not value > 0:
    raise UserError(f'config.json: {label}={value!r} must be positive')
  return float(value)


def _expect(hf: Mapping[str, Any], key: str, supported: Any, default: Any) -> None:
  value = hf.get(key, default)
  if value is None:
    value = default
  if value != supported:
    raise _unsupported(key, value, f'only {supported!r} is implemented')


def _rope_sets(hf: Mapping[str, Any]) -> tuple[dict, dict | None, str]:
  """(rope parameters of full-attention layers, of sliding layers or None, key name for errors)."""
  model_type = hf['model_type']
  params = hf.get('rope_parameters')
  if params is not None:
    layered = 'full_attention' in params or 'sliding_attention' in params
    if layered != (model_type in LAYERED_ROPE):
      how = 'one dict per layer type' if model_type in LAYERED_ROPE else 'a single dict'
      raise _unsupported('rope_parameters', params, f'a {model_type} config has {how}')
    if not layered:
      return dict(params), None, 'rope_scaling'
    return (dict(params.get('full_attention') or {'rope_type': 'default'}),
            dict(params.get('sliding_attention') or {'rope_type': 'default'}),
            'rope_parameters.full_attention')
  full = dict(hf.get('rope_scaling') or {})
  theta_key = 'rotary_emb_base' if model_type == 'gpt_neox' else 'rope_theta'
  full.setdefault('rope_theta', hf.get(theta_key) or _DEFAULT_THETA.get(model_type, 10000.0))
  if model_type == 'gpt_neox':
    full.setdefault('partial_rotary_factor', hf.get('rotary_pct', 0.25))
  sliding = None
  if model_type == 'gemma3_text':
    sliding = {'rope_type': 'default', 'rope_theta': hf.get('rope_local_base_freq', 10000.0)}
  elif model_type == 'olmo3':  # transformers 5 gives them the class default, not rope_theta
    sliding = {'rope_type': 'default', 'rope_theta': _DEFAULT_THETA['olmo3']}
  return full, sliding, 'rope_scaling'


def _rope(hf: Mapping[str, Any], head_dim: int) -> dict[str, Any]:
  model_type = hf['model_type']
  params, sliding, key = _rope_sets(hf)
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type not in ROPE_TYPES:
    raise _unsupported(f'{key}.rope_type', rope_type, f'lossland implements {ROPE_TYPES}')
  default_partial = 0.25 if model_type == 'gpt_neox' else 1.0
  partial = _float(params, 'partial_rotary_factor', None, positive=True,
                   label=f'{key}.partial_rotary_factor')
  if partial is None:
    partial = _float(hf, 'partial_rotary_factor', default_partial, positive=True)
  out = {'rope_theta': _float(params, 'rope_theta', positive=True, label=f'{key}.rope_theta'),
         'rope_type': rope_type}
  if partial != 1.0:
    if model_type not in PARTIAL_ROTARY:
      raise _unsupported('partial_rotary_factor', partial, f'only full rotary (1.0) is implemented '
                         f'for {model_type}; partial rotary for {PARTIAL_ROTARY}')
    out['rotary_dim'] = int(head_dim * partial)
  if rope_type in ('linear', 'llama3'):
    out['rope_factor'] = _float(params, 'factor', positive=True, label=f'{key}.factor')
  if rope_type == 'llama3':
    out.update(rope_low_freq_factor=_float(params, 'low_freq_factor',
                                           label=f'{key}.low_freq_factor'),
               rope_high_freq_factor=_float(params, 'high_freq_factor',
                                            label=f'{key}.high_freq_factor'),
               rope_original_max_positions=_int(
                   params, 'original_max_position_embeddings',
                   label=f'{key}.original_max_position_embeddings'))
  if sliding is not None:
    kind = sliding.get('rope_type', sliding.get('type', 'default'))
    if kind != 'default':
      raise _unsupported('rope_parameters.sliding_attention.rope_type', kind,
                         "sliding-window layers use plain rotary ('default') in lossland")
    out['rope_local_theta'] = _float(sliding, 'rope_theta', _DEFAULT_THETA.get(model_type, 10000.0),
                                     positive=True, label='rope local base (sliding layers)')
  return out


def _activation(hf: Mapping[str, Any], key: str, default: str) -> str:
  value = hf.get(key) or default
  if value not in HIDDEN_ACTS:
    raise _unsupported(key, value, f'lossland implements {tuple(HIDDEN_ACTS)}')
  return HIDDEN_ACTS[value]


def _no_sliding(hf: Mapping[str, Any]) -> None:
  _expect(hf, 'use_sliding_window', False, False)
  for i, kind in enumerate(hf.get('layer_types') or ()):
    if kind != 'full_attention':
      raise _unsupported(f'layer_types[{i}]', kind, "only 'full_attention' is implemented")


def _attention_pattern(hf: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """sliding_window and layer_types of the families that have them."""
  model_type = hf['model_type']
  window = hf.get('sliding_window')
  if model_type in ('mistral', 'phi3'):  # one window on every layer, or none
    if hf.get('layer_types') is not None:
      raise _unsupported('layer_types', hf['layer_types'], f'{model_type} models ignore it in '
                         'transformers (every layer slides when sliding_window is set)')
    return {} if window is None else {'sliding_window': _int(hf, 'sliding_window')}
  if model_type not in ('gemma2', 'gemma3_text', 'olmo3'):
    return {}
  types = hf.get('layer_types')
  if types is None:  # the config classes' defaults
    if model_type == 'gemma3_text':
      pattern = _int(hf, 'sliding_window_pattern', 6)
      types = ['sliding_attention' if (i + 1) % pattern else 'full_attention'
               for i in range(num_layers)]
    else:
      every = 2 if model_type == 'gemma2' else 4
      types = ['sliding_attention' if (i + 1) % every else 'full_attention'
               for i in range(num_layers)]
  if len(types) != num_layers:
    raise UserError(f'config.json: layer_types has {len(types)} entries for {num_layers} layers '
                    '(num_hidden_layers); give one per layer')
  for i, kind in enumerate(types):
    if kind not in _LAYER_TYPES:
      raise _unsupported(f'layer_types[{i}]', kind, f'lossland implements {tuple(_LAYER_TYPES)}')
  kinds = tuple(_LAYER_TYPES[k] for k in types)
  if window is None and 'sliding' in kinds:
    raise UserError("config.json has 'sliding_attention' layers but no 'sliding_window'; set the "
                    'window')
  return {'layer_types': kinds, 'sliding_window': _int(hf, 'sliding_window', None)}


def _llama_like(hf: Mapping[str, Any]) -> dict[str, Any]:
  model_type = hf['model_type']
  gemma = model_type in GEMMA
  heads = _int(hf, 'num_attention_heads')
  d_model = _int(hf, 'hidden_size')
  head_dim = _int(hf, 'head_dim', d_model // heads)  # transformers' default, rounded down too
  num_layers = _int(hf, 'num_hidden_layers')
  kv_heads = _int(hf, 'num_key_value_heads', heads)
  if heads % kv_heads:
    raise UserError(f'config.json: num_key_value_heads={kv_heads} does not divide '
                    f'num_attention_heads={heads}; each key/value head serves a whole group of '
                    'query heads')
  bias = bool(hf.get('attention_bias', False))
  fields = dict(
      vocab_size=_int(hf, 'vocab_size'), d_model=d_model, num_layers=num_layers,
      num_heads=heads, num_kv_heads=kv_heads,
      head_dim=head_dim, mlp_dim=_int(hf, 'intermediate_size'),
      activation=(_activation(hf, 'hidden_activation', 'gelu_pytorch_tanh') if gemma else
                  _activation(hf, 'hidden_act', 'silu')),
      norm_eps=_float(hf, 'rms_norm_eps', _EPS.get(model_type, 1e-6)),
      qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get('mlp_bias', False)),
      max_positions=_int(hf, 'max_position_embeddings', 2048),
      tie_embeddings=bool(hf.get('tie_word_embeddings', gemma)), **_rope(hf, head_dim),
      **_attention_pattern(hf, num_layers))
  if model_type != 'llama':
    fields.update(mlp_bias=False)
  if model_type in ('qwen2', 'qwen3', 'qwen3_moe'):
    _no_sliding(hf)
  if model_type == 'qwen2':
    fields.update(qkv_bias=True, out_bias=False)
  if model_type in ('mistral', 'phi3'):  # bias-free whatever attention_bias says
    fields.update(qkv_bias=False, out_bias=False)
  if model_type in ('qwen3', 'qwen3_moe'):
    fields.update(qk_norm=True, qk_norm_per_head=True)
  if model_type == 'qwen3_moe':
    fields.update(_experts(hf, num_layers))
  if model_type in ('olmo2', 'olmo3'):
    fields.update(norm_placement='post', qk_norm=True)
  if gemma:
    _expect(hf, 'use_bidirectional_attention', False, False)
    two = model_type == 'gemma2'
    attn_cap = hf.get('attn_logit_softcapping', 50.0 if two else None)
    if attn_cap is not None and not two:  # Gemma3Attention never passes it to the attention
      raise _unsupported('attn_logit_softcapping', attn_cap, 'transformers ignores it for '
                         'gemma3_text (Gemma 3 has none); set it to null')
    final_cap = hf.get('final_logit_softcapping', 30.0 if two else None)
    fields.update(norm_placement='sandwich', norm_offset=1.0, scale_embeddings=True,
                  query_pre_attn_scalar=_float(hf, 'query_pre_attn_scalar', 256.0, positive=True),
                  attn_softcap=_float(hf, 'attn_logit_softcapping', attn_cap, positive=True),
                  final_softcap=_float(hf, 'final_logit_softcapping', final_cap, positive=True),
                  qk_norm=not two, qk_norm_per_head=not two)
  return fields


def _experts(hf: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """Qwen3-MoE's expert keys; every layer sparse (its released models' layout)."""
  key = 'num_experts' if hf.get('num_experts') is not None else 'num_local_experts'
  experts = _int(hf, key, 128)  # transformers' default when neither spelling is given
  top_k = _int(hf, 'num_experts_per_tok', 8)
  if top_k > experts:
    raise UserError(f'config.json: num_experts_per_tok={top_k} exceeds {key}={experts}; route '
                    'each token to at most every expert')
  step = _int(hf, 'decoder_sparse_step', 1)
  dense = [i for i in range(num_layers) if (i + 1) % step] + list(hf.get('mlp_only_layers') or [])
  if dense:
    raise _unsupported('decoder_sparse_step/mlp_only_layers',
                       (step, hf.get('mlp_only_layers')), f'layers {sorted(set(dense))} would '
                       'have a dense MLP; lossland implements Qwen3-MoE with experts in every '
                       'layer (decoder_sparse_step 1, mlp_only_layers [])')
  return dict(num_experts=experts, experts_per_token=top_k,
              expert_mlp_dim=_int(hf, 'moe_intermediate_size', 768),
              normalize_expert_weights=bool(hf.get('norm_topk_prob', False)))


def _gpt2(hf: Mapping[str, Any]) -> dict[str, Any]:
  _expect(hf, 'scale_attn_weights', True, True)
  _expect(hf, 'scale_attn_by_inverse_layer_idx', False, False)
  _expect(hf, 'add_cross_attention', False, False)
  d_model, heads = _int(hf, 'n_embd'), _int(hf, 'n_head')
  if d_model % heads:
    raise UserError(f'config.json: n_embd={d_model} is not divisible by n_head={heads}')
  return dict(
      vocab_size=_int(hf, 'vocab_size'), d_model=d_model,
      num_layers=_int(hf, 'n_layer'), num_heads=heads, num_kv_heads=heads,
      head_dim=d_model // heads, mlp_dim=_int(hf, 'n_inner', 4 * d_model), mlp='plain',
      activation=_activation(hf, 'activation_function', 'gelu_new'), norm='layer',
      norm_eps=_float(hf, 'layer_norm_epsilon', 1e-5), qkv_bias=True, out_bias=True,
      mlp_bias=True, positions='learned', max_positions=_int(hf, 'n_positions', 1024),
      tie_embeddings=bool(hf.get('tie_word_embeddings', True)))


def _gpt_neox(hf: Mapping[str, Any]) -> dict[str, Any]:
  d_model, heads = _int(hf, 'hidden_size'), _int(hf, 'num_attention_heads')
  if d_model % heads:
    raise UserError(f'config.json: hidden_size={d_model} is not divisible by '
                    f'num_attention_heads={heads}')
  bias = bool(hf.get('attention_bias', True))
  return dict(
      vocab_size=_int(hf, 'vocab_size'), d_model=d_model,
      num_layers=_int(hf, 'num_hidden_layers'), num_heads=heads, num_kv_heads=heads,
      head_dim=d_model // heads, mlp_dim=_int(hf, 'intermediate_size'), mlp='plain',
      activation=_activation(hf, 'hidden_act', 'gelu'), norm='layer',
      norm_eps=_float(hf, 'layer_norm_eps', 1e-5), qkv_bias=bias, out_bias=bias,
      mlp_bias=True, max_positions=_int(hf, 'max_position_embeddings', 2048),
      parallel_residual=bool(hf.get('use_parallel_residual', True)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)), **_rope(hf, d_model // heads))


def from_hf_config(hf: Mapping[str, Any]) -> CausalLMConfig:
  """The `CausalLMConfig` of a parsed `config.json`.

  Raises:
    UserError: naming the key, for an unsupported or missing `model_type`,
      rope type, activation or attention variant, or a size that is missing
      or not a positive integer.
  """
  model_type = hf.get('model_type')
  if model_type is None:
    raise UserError(f"config.json has no 'model_type'; add the checkpoint's family, one of "
                    f'{MODEL_TYPES} (transformers needs it too)')
  if model_type == 'gemma3':
    raise _unsupported('model_type', model_type, 'that is the image-text Gemma 3 '
                       "(Gemma3ForConditionalGeneration); lossland reads its text model, "
                       "model_type 'gemma3_text' (Gemma3ForCausalLM)")
  if model_type not in MODEL_TYPES:
    raise _unsupported('model_type', model_type, f'lossland reads {MODEL_TYPES}')
  if model_type == 'gpt2':
    fields = _gpt2(hf)
  elif model_type == 'gpt_neox':
    fields = _gpt_neox(hf)
  else:
    fields = _llama_like(hf)
  try:
    return CausalLMConfig(**fields)
  except ValueError as e:  # e.g. an odd head_dim under rotary
    raise UserError(f'config.json describes a model lossland cannot build: {e}') from None


def infer_model_type(config: CausalLMConfig) -> str:
  """The Hugging Face family whose layout matches `config` ('llama' unless a feature says else)."""
  if config.num_experts:
    return 'qwen3_moe'
  if config.positions == 'learned':
    return 'gpt2'
  if config.parallel_residual or config.norm == 'layer':
    return 'gpt_neox'
  if config.norm_placement == 'sandwich':
    return 'gemma3_text' if config.qk_norm else 'gemma2'
  if config.qk_norm and config.qk_norm_per_head:
    return 'qwen3'
  if config.qk_norm or config.norm_placement == 'post':
    return 'olmo3' if config.sliding_window is not None else 'olmo2'
  if config.rotary_dim is not None:
    return 'phi3'
  if config.sliding_window is not None:
    return 'mistral'
  if config.qkv_bias and not config.out_bias:
    return 'qwen2'
  return 'llama'


def _act_name(hf: Mapping[str, Any], key: str, activation: str) -> str:
  """The base config's spelling of `activation` when it has one (gelu_new and
  gelu_pytorch_tanh round differently), else Gemma's or lossland's default name."""
  current = hf.get(key)
  if current in HIDDEN_ACTS and HIDDEN_ACTS[current] == activation:
    return current
  if activation == 'gelu_tanh' and hf.get('model_type') in GEMMA:
    return 'gelu_pytorch_tanh'
  return _ACT_NAMES[activation]


def _rope_fields(config: CausalLMConfig) -> dict[str, Any]:
  rope: dict[str, Any] = {'rope_type': config.rope_type, 'rope_theta': config.rope_theta}
  if config.rope_type in ('linear', 'llama3'):
    rope['factor'] = config.rope_factor
  if config.rope_type == 'llama3':
    rope.update(low_freq_factor=config.rope_low_freq_factor,
                high_freq_factor=config.rope_high_freq_factor,
                original_max_position_embeddings=config.rope_original_max_positions)
  return rope


def _write_rope(hf: dict[str, Any], config: CausalLMConfig, model_type: str) -> None:
  rope = _rope_fields(config)
  partial = None if config.rotary_dim is None else config.rotary_dim / config.head_dim
  if model_type == 'gpt_neox' and partial is None:
    partial = 1.0  # its default is 0.25
  local = config.rope_local_theta
  if model_type in LAYERED_ROPE:
    local = config.rope_theta if local is None else local
    legacy_ok = model_type == 'gemma3_text' or local == _DEFAULT_THETA['olmo3']
    if 'rope_parameters' in hf or not legacy_ok:
      hf['rope_parameters'] = {'full_attention': rope, 'sliding_attention': {
          'rope_type': 'default', 'rope_theta': local}}
      for key in ('rope_theta', 'rope_scaling', 'rope_local_base_freq'):
        hf.pop(key, None)
      return
    if model_type == 'gemma3_text':
      hf['rope_local_base_freq'] = local
  if 'rope_parameters' in hf:
    if partial is not None:
      rope['partial_rotary_factor'] = partial
    hf['rope_parameters'] = rope
    return
  theta = rope.pop('rope_theta')
  if model_type == 'gpt_neox':
    hf.update(rotary_emb_base=theta, rotary_pct=partial)
  else:
    hf['rope_theta'] = theta
    if partial is not None:
      hf['partial_rotary_factor'] = partial
  hf['rope_scaling'] = None if rope['rope_type'] == 'default' else rope


def _write_llama_like(hf: dict[str, Any], config: CausalLMConfig, model_type: str) -> None:
  hf.update(hidden_size=config.d_model, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim, intermediate_size=config.mlp_dim,
            rms_norm_eps=config.norm_eps, max_position_embeddings=config.max_positions)
  key = 'hidden_activation' if model_type in GEMMA else 'hidden_act'
  hf[key] = _act_name(hf, key, config.activation)
  if model_type not in ('qwen2', 'mistral', 'phi3'):
    hf.update(attention_bias=config.qkv_bias)
  if model_type == 'llama':
    hf.update(mlp_bias=config.mlp_bias)
  if model_type in GEMMA:
    scalar = config.query_pre_attn_scalar  # an int in transformers' (strict) config classes
    hf.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
              attn_logit_softcapping=config.attn_softcap,
              final_logit_softcapping=config.final_softcap)
  if model_type in ('mistral', 'phi3'):
    hf.update(sliding_window=config.sliding_window)
  if model_type == 'qwen3_moe':
    hf['num_local_experts' if 'num_local_experts' in hf else 'num_experts'] = config.num_experts
    hf.update(num_experts_per_tok=config.experts_per_token,
              moe_intermediate_size=config.expert_mlp_dim,
              norm_topk_prob=config.normalize_expert_weights)
  if model_type in ('gemma2', 'gemma3_text', 'olmo3'):
    types = config.layer_types or (('sliding' if config.sliding_window else 'full'),) * \
        config.num_layers
    hf.update(sliding_window=config.sliding_window,
              layer_types=[_HF_LAYER_TYPES[t] for t in types])
  _write_rope(hf, config, model_type)


def to_hf_config(config: CausalLMConfig, *, base: Mapping[str, Any] | None = None,
                 dtype: str = 'float32') -> dict[str, Any]:
  """A `config.json` dict for `config`: `base`'s keys, with every architecture key rewritten.

  Args:
    config: the architecture.
    base: the config.json the model was imported from (keeps its model_type,
      token ids and other keys); None writes a fresh config of the family
      `infer_model_type` picks, with no special token ids.
    dtype: the weights' dtype name ('float32', 'bfloat16', 'float16').

  Raises:
    ValueError: when `config` has a feature the family's config cannot express
      (checked by reading the written config back).
  """
  hf = dict(base or {})
  model_type = hf.get('model_type') or infer_model_type(config)
  if model_type not in MODEL_TYPES:
    raise _unsupported('model_type', model_type, f'lossland writes {MODEL_TYPES}')
  if base is None:  # no special tokens rather than the config class's (Phi-3's pad id is 32000)
    hf.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
  hf.update(model_type=model_type, architectures=[ARCHITECTURES[model_type]],
            vocab_size=config.vocab_size, tie_word_embeddings=config.tie_embeddings)
  hf['dtype' if 'dtype' in hf else 'torch_dtype'] = dtype  # transformers >= 5 writes 'dtype'
  if model_type == 'gpt2':
    hf.update(n_embd=config.d_model, n_layer=config.num_layers, n_head=config.num_heads,
              n_inner=config.mlp_dim, n_positions=config.max_positions,
              activation_function=_act_name(hf, 'activation_function', config.activation),
              layer_norm_epsilon=config.norm_eps)
  elif model_type == 'gpt_neox':
    hf.update(hidden_size=config.d_model, num_hidden_layers=config.num_layers,
              num_attention_heads=config.num_heads, intermediate_size=config.mlp_dim,
              hidden_act=_act_name(hf, 'hidden_act', config.activation),
              layer_norm_eps=config.norm_eps,
              max_position_embeddings=config.max_positions,
              use_parallel_residual=config.parallel_residual, attention_bias=config.qkv_bias)
    _write_rope(hf, config, model_type)
  else:
    _write_llama_like(hf, config, model_type)
  try:
    back = from_hf_config(hf)
  except ValueError as e:
    raise ValueError(f'CausalLMConfig cannot be written as a {model_type} config: {e}') from e
  for field in dataclasses.fields(config):
    want, got = getattr(config, field.name), getattr(back, field.name)
    if want != got:
      raise ValueError(f'CausalLMConfig.{field.name}={want!r} cannot be written as a '
                       f'{model_type} config, which has {field.name}={got!r}')
  return hf
