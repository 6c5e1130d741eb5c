"""Decoder-only LMs of the Llama, Gemma, Qwen, Mistral, OLMo, Phi-3, GPT-NeoX and GPT-2 families.

One linen module, `CausalLM`, configured by a frozen `CausalLMConfig`, covers
the architectures that `lossland.interop.hf` imports from Hugging Face folders:

- Llama 1-3 (Touvron et al. 2023; Grattafiori et al. 2024): pre-norm RMSNorm
  (Zhang & Sennrich 2019), rotary positions (Su et al. 2021, eq. 34) with
  `rope_theta` and the Llama-3 frequency rescaling, grouped-query attention
  (Ainslie et al. 2023: `num_kv_heads` key/value heads, each shared by
  `num_heads // num_kv_heads` query heads), a SwiGLU MLP (Shazeer 2020),
  tied or untied output head.
- Qwen2 (Yang et al. 2024): Llama with biases on the query/key/value maps.
- OLMo-2 (OLMo et al. 2025): RMSNorm on the full query and key projections
  before rotary (QK-norm), and norms on the *outputs* of the attention and
  MLP branches (`x + norm(attn(x))`, `x + norm(mlp(x))`) instead of their inputs.
- GPT-2 (Radford et al. 2019): LayerNorm, learned absolute positions, a
  plain `down(gelu(up(x)))` MLP, biases everywhere, tied head.
- Gemma 2 and 3 (Gemma Team 2024, 2025): RMSNorm with gain `1 + w`
  computed in float32, embeddings scaled by sqrt(d_model), norms both before
  and after each branch (`x + post(attn(pre(x)))`), a GeGLU MLP (tanh gelu),
  attention scaled by `query_pre_attn_scalar ** -0.5`, local sliding-window
  layers (Beltagy et al. 2020) interleaved with global ones, each kind with its
  own rotary base, tanh soft-capping of attention and output logits
  (`cap * tanh(x / cap)`, Gemma 2), and (Gemma 3) RMSNorm on each query and key
  head.
- Qwen3 (Yang et al. 2025): Llama with RMSNorm on each query and key head.
- Mistral (Jiang et al. 2023): Llama with a sliding window on every layer.
- OLMo-3: OLMo-2 with sliding-window layers (three in four).
- Phi-3 (Abdin et al. 2024): Llama with fused query/key/value and gate/up
  weights (a checkpoint layout only) and optionally partial rotary.
- GPT-NeoX / Pythia (Black et al. 2022; Biderman et al. 2023): LayerNorm with
  bias, rotary on the first `rotary_dim` channels of each head, a parallel
  residual `x + attn(ln1(x)) + mlp(ln2(x))`, a plain gelu MLP, untied head.
- Qwen3-MoE (Yang et al. 2025): Qwen3 with a sparse mixture-of-experts MLP in
  every block (`num_experts` SwiGLU experts, `experts_per_token` per token by
  a softmax router; `lossland.models.moe`).

A sliding-window layer lets the query at position i see keys j with
i - sliding_window < j <= i (transformers' `sliding_window_overlay`), with or
without a KV cache.

Layer names match `TransformerLM`, so every lossland method finds the same
layers: `embed`, `pos_embed` (learned positions), `block_i/attn_norm`,
`block_i/attn/{query,key,value,out}` (nn.Dense; `query_norm`/`key_norm` for
QK-norm), `block_i/mlp_norm`, `block_i/mlp/{gate,up,down}` (no `gate` in the
plain MLP; with experts `block_i/mlp/router` and
`block_i/mlp/experts_{e}/{gate,up,down}` instead), `block_i/post_attn_norm` /
`block_i/post_mlp_norm` (post-norm placement; both, with `attn_norm`/`mlp_norm`,
for Gemma's sandwich placement), `final_norm`, `head` (untied).
`config_from_transformer_lm(lm)` is the Llama-shaped config that computes what
a `TransformerLM` computes, on the same param tree, so its params export as a
Llama folder.

Decoding. `model.apply(params, tokens)` returns logits `[batch, seq, vocab]`.
With `cache=init_cache(config, batch, max_len)` it instead treats `tokens` as
the next positions after `cache['index']`, attends to every cached position
before them, and returns `(logits, new_cache)`. `greedy_decode` prefills the
cache with the prefixes and then runs one token per step, so each generated
token costs one position instead of a pass over the whole sequence; it
produces the same tokens as `lossland.curvature.greedy_decode(model.apply,
...)`, which re-runs the full buffer every step.

Usage:

  config = CausalLMConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, mlp_dim=128)
  model = CausalLM(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  logits = model.apply(params, tokens)                       # [batch, seq, vocab]
  generated = greedy_decode(model, params, prefixes, 16)     # [batch, 16]
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lossland.models.moe import SparseMoE
from lossland.models.transformer import TransformerLM

DenseFactory = Callable[..., nn.Module]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'silu': nn.silu,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),
}
ROPE_TYPES = ('default', 'linear', 'llama3')
NORM_PLACEMENTS = ('pre', 'post', 'sandwich')
LAYER_TYPES = ('full', 'sliding')


@dataclasses.dataclass(frozen=True)
class CausalLMConfig:
  """Shape and variant of a `CausalLM` (hashable, so it can be a static argument).

  Attributes:
    vocab_size: number of token ids (rows of the embedding).
    d_model: residual width.
    num_layers: decoder blocks `block_0` ... `block_{num_layers-1}`.
    num_heads: query heads.
    num_kv_heads: key/value heads; divides `num_heads` (grouped-query attention
      when smaller).
    head_dim: width of one head (`num_heads * head_dim` need not equal d_model).
    mlp_dim: hidden width of the MLP.
    mlp: 'gated' for down(act(gate(x)) * up(x)), 'plain' for down(act(up(x))).
    activation: 'silu', 'gelu' (erf) or 'gelu_tanh' (the tanh approximation).
    norm: 'rms' (RMSNorm) or 'layer' (LayerNorm with bias).
    norm_eps: epsilon of every norm.
    norm_placement: 'pre' (norm the branch input), 'post' (norm the branch
      output before the residual add, as OLMo-2 does) or 'sandwich' (both, as
      Gemma 2/3 do: `x + post_norm(branch(pre_norm(x)))`).
    norm_offset: RMSNorm gains are `norm_offset + scale`; Gemma's 1.0 also
      computes the norm in float32 whatever the compute dtype. 0 is a plain
      RMSNorm (`nn.RMSNorm`).
    qk_norm: RMSNorm on the query and key projections before rotary.
    qk_norm_per_head: the QK-norm normalizes each head's `head_dim` channels
      (Qwen3, Gemma 3) instead of the full projection (OLMo-2/3).
    qkv_bias: biases on query/key/value.
    out_bias: bias on the attention output map.
    mlp_bias: biases on the MLP maps.
    positions: 'rope' (rotary) or 'learned' (an absolute position table).
    max_positions: rows of the learned position table.
    rope_theta: rotary wavelength base.
    rope_type: 'default', 'linear' (frequencies / rope_factor) or 'llama3'.
    rope_factor: the scaling factor of 'linear' and 'llama3'.
    rope_low_freq_factor: 'llama3' only.
    rope_high_freq_factor: 'llama3' only.
    rope_original_max_positions: 'llama3' only: the pre-training context length.
    tie_embeddings: the embedding matrix is also the output head.
    scale_embeddings: multiply the token embeddings by sqrt(d_model), rounded
      to the compute dtype (Gemma).
    query_pre_attn_scalar: attention logits are scaled by this ** -0.5; None
      uses head_dim.
    attn_softcap: `cap * tanh(logits / cap)` on the scaled attention logits
      (before the mask); None for none.
    final_softcap: the same on the output logits.
    sliding_window: the window of sliding-window layers (see the module
      docstring); None for none.
    layer_types: per layer 'full' or 'sliding'; None makes every layer sliding
      when `sliding_window` is set, else full.
    rope_local_theta: rotary base of the sliding layers, which then use plain
      rotary (no rescaling); None gives them the global layers' rotary.
    rotary_dim: rotary acts on the first `rotary_dim` channels of each head
      (half-split within them); None for all `head_dim`.
    parallel_residual: `x + attn(attn_norm(x)) + mlp(mlp_norm(x))` (GPT-NeoX)
      instead of sequential branches; needs norm_placement 'pre'.
    num_experts: 0 for a dense MLP in every block; else every block's MLP is
      a mixture of this many gated experts (`lossland.models.moe`), and
      `mlp_dim` is not used by the model (Qwen3-MoE's `intermediate_size`,
      kept for its config).
    experts_per_token: experts each token is routed to (top-k).
    expert_mlp_dim: hidden width of each expert.
    normalize_expert_weights: the chosen experts' router probabilities are
      divided by their sum (transformers' `norm_topk_prob`).
  """
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  mlp: str = 'gated'
  activation: str = 'silu'
  norm: str = 'rms'
  norm_eps: float = 1e-6
  norm_placement: str = 'pre'
  qk_norm: bool = False
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  positions: str = 'rope'
  max_positions: int = 2048
  rope_theta: float = 10000.0
  rope_type: str = 'default'
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  tie_embeddings: bool = False
  norm_offset: float = 0.0
  qk_norm_per_head: bool = False
  scale_embeddings: bool = False
  query_pre_attn_scalar: float | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  rope_local_theta: float | None = None
  rotary_dim: int | None = None
  parallel_residual: bool = False
  num_experts: int = 0
  experts_per_token: int = 0
  expert_mlp_dim: int = 0
  normalize_expert_weights: bool = False

  def __post_init__(self):
    if self.layer_types is not None and not isinstance(self.layer_types, tuple):
      object.__setattr__(self, 'layer_types', tuple(self.layer_types))  # hashable
    choices = {'mlp': ('gated', 'plain'), 'activation': tuple(ACTIVATIONS),
               'norm': ('rms', 'layer'), 'norm_placement': NORM_PLACEMENTS,
               'positions': ('rope', 'learned'), 'rope_type': ROPE_TYPES}
    for field, allowed in choices.items():
      if getattr(self, field) not in allowed:
        raise ValueError(f'CausalLMConfig.{field}={getattr(self, field)!r} is not one of {allowed}')
    if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
      raise ValueError(f'CausalLMConfig.num_kv_heads={self.num_kv_heads} must divide '
                       f'num_heads={self.num_heads}')
    rotary = self.head_dim if self.rotary_dim is None else self.rotary_dim
    if self.rotary_dim is not None and not 0 < self.rotary_dim <= self.head_dim:
      raise ValueError(f'CausalLMConfig.rotary_dim={self.rotary_dim} must be in 1..head_dim='
                       f'{self.head_dim}')
    if self.positions == 'rope' and rotary % 2:
      field = 'head_dim' if self.rotary_dim is None else 'rotary_dim'
      raise ValueError(f'CausalLMConfig.{field}={rotary} must be even for rotary positions')
    for field in ('query_pre_attn_scalar', 'attn_softcap', 'final_softcap', 'sliding_window',
                  'rope_local_theta'):
      value = getattr(self, field)
      if value is not None and not value > 0:
        raise ValueError(f'CausalLMConfig.{field}={value!r} must be positive or None')
    if self.layer_types is not None:
      bad = [t for t in self.layer_types if t not in LAYER_TYPES]
      if bad or len(self.layer_types) != self.num_layers:
        raise ValueError(f'CausalLMConfig.layer_types={self.layer_types!r} must hold one of '
                         f'{LAYER_TYPES} for each of the {self.num_layers} layers')
      if 'sliding' in self.layer_types and self.sliding_window is None:
        raise ValueError("CausalLMConfig.layer_types has 'sliding' layers but sliding_window is "
                         'None; set the window')
    if self.norm_offset and self.norm != 'rms':
      raise ValueError(f'CausalLMConfig.norm_offset={self.norm_offset} needs norm=\'rms\'')
    if self.qk_norm_per_head and not self.qk_norm:
      raise ValueError('CausalLMConfig.qk_norm_per_head=True needs qk_norm=True')
    if self.parallel_residual and self.norm_placement != 'pre':
      raise ValueError('CausalLMConfig.parallel_residual=True needs norm_placement=\'pre\', not '
                       f'{self.norm_placement!r}')
    if self.num_experts:
      if not 0 < self.experts_per_token <= self.num_experts or self.expert_mlp_dim < 1:
        raise ValueError(f'CausalLMConfig with num_experts={self.num_experts} needs '
                         f'experts_per_token in 1..{self.num_experts} (got '
                         f'{self.experts_per_token}) and expert_mlp_dim >= 1 (got '
                         f'{self.expert_mlp_dim})')
      if self.mlp != 'gated' or self.mlp_bias:
        raise ValueError("CausalLMConfig.num_experts needs mlp='gated' and mlp_bias=False (the "
                         'experts are bias-free SwiGLU MLPs)')

  def is_sliding(self, layer: int) -> bool:
    """Whether layer `layer` attends within `sliding_window` only."""
    if self.layer_types is None:
      return self.sliding_window is not None
    return self.layer_types[layer] == 'sliding'


def config_from_transformer_lm(model: TransformerLM) -> CausalLMConfig:
  """The `CausalLMConfig` under which `CausalLM` runs a `TransformerLM`'s params unchanged.

  `TransformerLM` is a Llama: pre-norm RMSNorm (flax's epsilon 1e-6), rotary
  base 10000 on half-split channels, multi-head attention without biases,
  SwiGLU MLP. Only its default `dense` layers have the Llama param layout.
  """
  if model.d_model % model.num_heads:
    raise ValueError(f'TransformerLM d_model={model.d_model} is not divisible by '
                     f'num_heads={model.num_heads}')
  return CausalLMConfig(vocab_size=model.vocab_size, d_model=model.d_model,
                        num_layers=model.num_layers, num_heads=model.num_heads,
                        num_kv_heads=model.num_heads, head_dim=model.d_model // model.num_heads,
                        mlp_dim=model.mlp_dim, norm_eps=1e-6, rope_theta=10000.0,
                        tie_embeddings=model.tie_embeddings)


def rope_inv_frequencies(config: CausalLMConfig, local: bool = False) -> np.ndarray:
  """Rotary inverse frequencies `[rotary_dim // 2]` (float32), with the configured rescaling.

  'llama3' follows the Llama-3.1 rule: wavelengths shorter than
  original_max / high_freq_factor are kept, longer than original_max /
  low_freq_factor are divided by the factor, and the band between is
  interpolated linearly in original_max / wavelength. `local=True` gives the
  frequencies of sliding-window layers: plain rotary of base
  `rope_local_theta` when that is set.
  """
  dim = config.head_dim if config.rotary_dim is None else config.rotary_dim
  if local and config.rope_local_theta is not None:
    inv = 1.0 / config.rope_local_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    return inv.astype(np.float32)
  inv = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  if config.rope_type == 'linear':
    inv = inv / config.rope_factor
  elif config.rope_type == 'llama3':
    factor, old = config.rope_factor, config.rope_original_max_positions
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates channel i with channel i + r/2 by `position * inv_freq[i]`, r = 2 * len(inv_freq).

  Channels from r on (partial rotary, GPT-NeoX's `rotary_pct`) pass unchanged.

  Args:
    x: [batch, seq, heads, head_dim].
    positions: [seq] integer positions.
    inv_freq: [r // 2] float32 frequencies, r <= head_dim.
  """
  angles = positions[:, None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, :]  # [seq, half]
  sin = jnp.sin(angles)[None, :, None, :].astype(x.dtype)
  cos = jnp.cos(angles)[None, :, None, :].astype(x.dtype)
  half = len(inv_freq)
  x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """`cap * tanh(x / cap)` (Gemma 2's logit soft-capping); `x` when cap is None."""
  return x if cap is None else jnp.tanh(x / cap) * cap


class OffsetRMSNorm(nn.Module):
  """RMSNorm with gain `offset + scale`, computed in float32 (Gemma's `Gemma3RMSNorm`).

  `x * rsqrt(mean(x^2) + epsilon) * (offset + scale)` in float32, cast to
  `dtype` at the end; `scale` starts at zero.
  """
  epsilon: float
  offset: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    y = x.astype(jnp.float32)
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.epsilon)
    return (y * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)


def _rms_norm(config: CausalLMConfig, name: str, dtype) -> nn.Module:
  if config.norm_offset:
    return OffsetRMSNorm(epsilon=config.norm_eps, offset=config.norm_offset, dtype=dtype, name=name)
  return nn.RMSNorm(epsilon=config.norm_eps, dtype=dtype, name=name)


def _norm(config: CausalLMConfig, name: str, dtype) -> nn.Module:
  if config.norm == 'rms':
    return _rms_norm(config, name, dtype)
  return nn.LayerNorm(epsilon=config.norm_eps, use_fast_variance=False, dtype=dtype, name=name)


def init_cache(config: CausalLMConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
  """An empty KV cache for `max_len` positions: {'index': 0, 'block_i': {'key', 'value'}}.

  Keys and values are `[batch, max_len, num_kv_heads, head_dim]`, for
  sliding-window layers too (their queries are masked to the window). jit-safe;
  all arguments but `dtype`'s values are static.
  """
  if config.positions == 'learned' and max_len > config.max_positions:
    raise ValueError(f'cache length {max_len} exceeds the {config.max_positions} learned '
                     'positions of this model; decode fewer tokens or use shorter prefixes')
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  cache: dict[str, Any] = {'index': jnp.zeros((), jnp.int32)}
  for i in range(config.num_layers):
    cache[f'block_{i}'] = {'key': jnp.zeros(shape, dtype), 'value': jnp.zeros(shape, dtype)}
  return cache


class CausalAttention(nn.Module):
  """Grouped-query causal attention; sows its probabilities as `attention_weights`.

  `__call__(x, positions, allowed, cache)`: x [batch, t, d_model], positions
  [t], allowed [batch or 1, t, s] (True where query t may see key s; the
  caller narrows it to the window of a sliding layer), cache None or this
  block's {'key', 'value'} with the write offset `positions[0]`. Returns
  (output [batch, t, d_model], updated cache or None). `sliding` picks the
  rotary of sliding-window layers (`rope_inv_frequencies(local=True)`).
  """
  config: CausalLMConfig
  dense: DenseFactory = nn.Dense
  dtype: Any = jnp.float32
  sliding: bool = False

  @nn.compact
  def __call__(self, x, positions, allowed, cache=None):
    c = self.config
    batch, t, _ = x.shape
    groups = c.num_heads // c.num_kv_heads
    init = nn.initializers.normal(0.02)
    dense = functools.partial(self.dense, dtype=self.dtype, kernel_init=init)
    q = dense(c.num_heads * c.head_dim, use_bias=c.qkv_bias, name='query')(x)
    k = dense(c.num_kv_heads * c.head_dim, use_bias=c.qkv_bias, name='key')(x)
    v = dense(c.num_kv_heads * c.head_dim, use_bias=c.qkv_bias, name='value')(x)
    if c.qk_norm and not c.qk_norm_per_head:  # over the whole projection (OLMo-2/3)
      q = _rms_norm(c, 'query_norm', self.dtype)(q)
      k = _rms_norm(c, 'key_norm', self.dtype)(k)
    q = q.reshape(batch, t, c.num_heads, c.head_dim)
    k = k.reshape(batch, t, c.num_kv_heads, c.head_dim)
    v = v.reshape(batch, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm and c.qk_norm_per_head:  # over each head's channels (Qwen3, Gemma 3)
      q = _rms_norm(c, 'query_norm', self.dtype)(q)
      k = _rms_norm(c, 'key_norm', self.dtype)(k)
    if c.positions == 'rope':
      inv_freq = rope_inv_frequencies(c, local=self.sliding)
      q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    new_cache = None
    if cache is not None:
      start = (0, positions[0], 0, 0)
      k = jax.lax.dynamic_update_slice(cache['key'], k.astype(cache['key'].dtype), start)
      v = jax.lax.dynamic_update_slice(cache['value'], v.astype(cache['value'].dtype), start)
      new_cache = {'key': k, 'value': v}
    # Query head h uses key/value head h // groups.
    q = q.reshape(batch, t, c.num_kv_heads, groups, c.head_dim)
    logits = jnp.einsum('btkgd,bskd->bkgts', q, k.astype(q.dtype)).astype(jnp.float32)
    if c.query_pre_attn_scalar is None:
      logits = logits / jnp.sqrt(jnp.float32(c.head_dim))
    else:
      logits = logits * np.float32(c.query_pre_attn_scalar ** -0.5)
    logits = softcap(logits, c.attn_softcap)
    logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)  # [batch, kv_heads, groups, t, s]
    self.sow('intermediates', 'attention_weights', probs.reshape(batch, c.num_heads, t, -1))
    out = jnp.einsum('bkgts,bskd->btkgd', probs.astype(self.dtype), v.astype(self.dtype))
    out = out.reshape(batch, t, c.num_heads * c.head_dim)
    return dense(c.d_model, use_bias=c.out_bias, name='out')(out), new_cache


class FeedForward(nn.Module):
  """down(act(gate(x)) * up(x)) ('gated') or down(act(up(x))) ('plain')."""
  config: CausalLMConfig
  dense: DenseFactory = nn.Dense
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dense = functools.partial(self.dense, use_bias=c.mlp_bias, dtype=self.dtype,
                              kernel_init=nn.initializers.normal(0.02))
    act = ACTIVATIONS[c.activation]
    up = dense(c.mlp_dim, name='up')
    if c.mlp == 'gated':
      hidden = act(dense(c.mlp_dim, name='gate')(x)) * up(x)
    else:
      hidden = act(up(x))
    return dense(c.d_model, name='down')(hidden)


class Block(nn.Module):
  """One decoder block: pre-, post- or sandwich-norm branches, sequential or parallel."""
  config: CausalLMConfig
  dense: DenseFactory = nn.Dense
  dtype: Any = jnp.float32
  sliding: bool = False

  @nn.compact
  def __call__(self, x, positions, allowed, cache=None):
    c = self.config
    attn = CausalAttention(c, dense=self.dense, dtype=self.dtype, sliding=self.sliding,
                           name='attn')
    if c.num_experts:
      mlp = SparseMoE(c.num_experts, c.experts_per_token, c.expert_mlp_dim,
                      c.normalize_expert_weights, ACTIVATIONS[c.activation], dtype=self.dtype,
                      name='mlp')
    else:
      mlp = FeedForward(c, dense=self.dense, dtype=self.dtype, name='mlp')
    norm = functools.partial(_norm, c, dtype=self.dtype)
    if c.parallel_residual:  # GPT-NeoX: both branches read the block input
      h, cache = attn(norm('attn_norm')(x), positions, allowed, cache)
      return mlp(norm('mlp_norm')(x)) + h + x, cache
    if c.norm_placement == 'pre':
      h, cache = attn(norm('attn_norm')(x), positions, allowed, cache)
      x = x + h
      return x + mlp(norm('mlp_norm')(x)), cache
    if c.norm_placement == 'sandwich':
      h, cache = attn(norm('attn_norm')(x), positions, allowed, cache)
      x = x + norm('post_attn_norm')(h)
      return x + norm('post_mlp_norm')(mlp(norm('mlp_norm')(x))), cache
    h, cache = attn(x, positions, allowed, cache)
    x = x + norm('post_attn_norm')(h)
    return x + norm('post_mlp_norm')(mlp(x)), cache


class CausalLM(nn.Module):
  """`apply(params, tokens[batch, seq]) -> logits[batch, seq, vocab]` (float32).

  Attributes:
    config: the architecture (`CausalLMConfig`).
    dense: factory of the attention and dense-MLP linear maps (default nn.Dense); experts
      are always `moe.ExpertDense` layers.
    dtype: compute dtype; params may be stored in another dtype (e.g. bfloat16
      checkpoints run in float32).

  Call arguments:
    tokens: [batch, seq] int token ids.
    padding_mask: optional [batch, seq], True for real tokens (no cache only).
    cache: optional KV cache from `init_cache`; then `tokens` are the positions
      `cache['index'] ...` and the call returns `(logits, new_cache)`.
  """
  config: CausalLMConfig
  dense: DenseFactory = nn.Dense
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, padding_mask: jax.Array | None = None,
               cache: dict | None = None):
    c = self.config
    _, t = tokens.shape
    if cache is None and c.positions == 'learned' and t > c.max_positions:
      raise ValueError(f'{t} tokens exceed the {c.max_positions} learned positions of this model; '
                       'pass shorter sequences')
    embed = nn.Embed(c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(0.02),
                     dtype=self.dtype, name='embed')
    start = jnp.zeros((), jnp.int32) if cache is None else cache['index']
    positions = start + jnp.arange(t, dtype=jnp.int32)  # [t]
    if cache is None:
      key_positions = jnp.arange(t, dtype=jnp.int32)
    else:
      if padding_mask is not None:
        raise ValueError('padding_mask is not supported with a KV cache; decode unpadded prefixes')
      key_positions = jnp.arange(cache['block_0']['key'].shape[1], dtype=jnp.int32)
    allowed = (key_positions[None, :] <= positions[:, None])[None]  # [1, t, s]
    if padding_mask is not None:
      allowed = allowed & padding_mask[:, None, :].astype(bool)
    local = None
    if c.sliding_window is not None:  # key j is in the window of query i when i - w < j
      local = allowed & (key_positions[None, :] > positions[:, None] - c.sliding_window)[None]
    x = embed(tokens)  # [batch, t, d_model]
    if c.scale_embeddings:  # sqrt(d_model) rounded to the compute dtype, as transformers does
      x = x * jnp.asarray(np.float32(math.sqrt(c.d_model)), dtype=x.dtype)
    if c.positions == 'learned':
      x = x + nn.Embed(c.max_positions, c.d_model, embedding_init=nn.initializers.normal(0.01),
                       dtype=self.dtype, name='pos_embed')(positions)[None]
    new_cache = None if cache is None else {'index': start + t}
    for i in range(c.num_layers):
      block_cache = None if cache is None else cache[f'block_{i}']
      sliding = c.is_sliding(i)
      x, block_cache = Block(c, dense=self.dense, dtype=self.dtype, sliding=sliding,
                             name=f'block_{i}')(x, positions, local if sliding else allowed,
                                                block_cache)
      if cache is not None:
        new_cache[f'block_{i}'] = block_cache
    x = _norm(c, 'final_norm', self.dtype)(x)
    if c.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(c.vocab_size, use_bias=False, kernel_init=nn.initializers.normal(0.02),
                        dtype=self.dtype, name='head')(x)
    logits = softcap(logits.astype(jnp.float32), c.final_softcap)
    return logits if cache is None else (logits, new_cache)


@functools.partial(jax.jit, static_argnames=('model', 'num_tokens'))
def greedy_decode(model: CausalLM, params, prefixes: jax.Array, num_tokens: int) -> jax.Array:
  """Greedy continuation of `prefixes` [n, P] by `num_tokens` tokens -> [n, num_tokens].

  Prefills a KV cache of P + num_tokens positions with the prefixes, then
  feeds one token per step. jit-compiled once per (model, shapes, num_tokens);
  `model` and `num_tokens` are static.
  """
  n, plen = prefixes.shape
  cache = init_cache(model.config, n, plen + num_tokens, model.dtype)
  logits, cache = model.apply(params, prefixes, cache=cache)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(prefixes.dtype)
  out = jnp.zeros((n, num_tokens), prefixes.dtype).at[:, 0].set(first)

  def body(i, carry):
    out, cache, token = carry
    logits, cache = model.apply(params, token[:, None], cache=cache)
    token = jnp.argmax(logits[:, 0], axis=-1).astype(prefixes.dtype)
    return out.at[:, i].set(token), cache, token

  out, _, _ = jax.lax.fori_loop(1, num_tokens, body, (out, cache, first))
  return out
