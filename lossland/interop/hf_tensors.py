"""Where each lossland param lives in a Hugging Face state dict, and how to read a slice of it.

A `Source` names the checkpoint tensor of one lossland param and the
transform between the two layouts:

- `torch.nn.Linear` weights are `[out, in]`; lossland kernels are `[in, out]`
  (`transpose=True`).
- GPT-2's `Conv1D` weights are already `[in, out]`.
- A fused tensor holds several params side by side on its output axis (the
  lossland param's last axis): GPT-2's `c_attn` and Phi-3's `qkv_proj` hold
  query, key and value one after the other (under grouped-query attention
  Phi-3's three have different widths), Phi-3's `gate_up_proj` the gate and
  up maps, GPT-NeoX's `query_key_value` query, key and value interleaved per
  head (`[heads, 3, head_dim]`). A param takes `size = n / groups` channels at
  `offset` of each of `groups` consecutive runs of `stride` channels:
  param channel j is channel `(j // size) * stride + offset + j % size`.
- Embeddings, norm gains and biases are copied as they are.
- Mixture-of-experts blocks (Qwen3-MoE) hold the router `mlp.gate` and each
  expert's `mlp.experts.{e}.{gate,up,down}_proj`, the per-expert layout
  transformers' `save_pretrained` writes (and the released checkpoints have);
  transformers 5 fuses them into 3D `mlp.experts.gate_up_proj` / `down_proj`
  in memory only.

`Source.read` reads the slice of the checkpoint tensor that a shard of the
lossland param needs (what `jax.make_array_from_callback` asks for), so each
device's shard is read without the rest of the tensor (for a param spread
over several runs, the runs it touches).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from lossland.models.hf_lm import CausalLMConfig

# Checkpoint tensors that carry no weights lossland needs (buffers saved by old versions).
IGNORED_SUFFIXES = ('.rotary_emb.inv_freq', '.attn.bias', '.attn.masked_bias',
                    '.attention.bias', '.attention.masked_bias')


@dataclasses.dataclass(frozen=True)
class Source:
  """One lossland param's checkpoint tensor `name`; see the module docstring.

  Attributes:
    name: the checkpoint tensor.
    transpose: the tensor is the param transposed (`nn.Linear` weights).
    offset: where the param's channels start in each run of the fused axis.
    stride: the length of each run of the fused axis; None when the tensor is
      the param alone.
    groups: the number of runs (the param's last axis is `groups` blocks).
  """
  name: str
  transpose: bool = False
  offset: int = 0
  stride: int | None = None
  groups: int = 1

  def _size(self, shape: tuple[int, ...]) -> int:
    return shape[-1] // self.groups

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint tensor's shape for a lossland param of `shape`."""
    fused = self.groups * (self.stride or self._size(shape))
    shape = tuple(shape[:-1]) + (fused,)
    return tuple(reversed(shape)) if self.transpose else shape

  def channels(self, shape: tuple[int, ...]) -> np.ndarray:
    """The fused-axis index of each channel of the param's last axis."""
    size = self._size(shape)
    stride = self.stride or size
    return (np.arange(self.groups)[:, None] * stride + self.offset +
            np.arange(size)[None, :]).reshape(-1)

  def read(self, tensor, index: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    """`param[index]` (lossland layout) read from `tensor` (a safetensors slice or an array).

    Reads one contiguous block of the checkpoint tensor: exactly the slice when
    the param's channels there are contiguous in it, else the runs they span.
    """
    bounds = [s.indices(dim)[:2] for s, dim in zip(index, shape)]
    lo, hi = bounds[-1]
    size = self._size(shape)
    stride = self.stride or size
    first, last = lo // size, max(hi - 1, lo) // size
    if first == last:  # inside one run: contiguous in the checkpoint
      start = first * stride + self.offset + lo - first * size
      fused, keep = (start, start + hi - lo), None
    else:
      fused, keep = (first * stride, (last + 1) * stride), (first, last)
    hf = [slice(a, b) for a, b in bounds[:-1]] + [slice(*fused)]
    part = np.asarray(tensor[tuple(reversed(hf)) if self.transpose else tuple(hf)])
    if self.transpose:
      part = part.T
    if keep is not None:  # [..., runs * stride] -> this param's channels of those runs -> crop
      runs = part.reshape(*part.shape[:-1], keep[1] - keep[0] + 1, stride)
      part = runs[..., self.offset:self.offset + size].reshape(*part.shape[:-1], -1)
      part = part[..., lo - first * size:hi - first * size]
    return part


def assemble(parts: list[tuple[Source, np.ndarray]]) -> np.ndarray:
  """The checkpoint tensor made of `(source, param)` pairs that all name it (the inverse of read).

  Raises:
    ValueError: when the params leave channels of the fused axis unset or set
      twice, or disagree in dtype.
  """
  first_src, first = parts[0]
  shape = first_src.hf_shape(first.shape)
  dtypes = {arr.dtype for _, arr in parts}
  if len(dtypes) != 1:
    raise ValueError(f'params fused into {first_src.name!r} have different dtypes '
                     f'{sorted(map(str, dtypes))}; cast them to one dtype first')
  if len(parts) == 1 and first_src.stride is None:
    return first.T if first_src.transpose else first
  out = np.zeros(shape, first.dtype)
  count = np.zeros(shape[0] if first_src.transpose else shape[-1], np.int32)
  for src, arr in parts:
    channels = src.channels(arr.shape)
    if src.transpose:
      out[channels, :] = arr.T
    else:
      out[..., channels] = arr
    np.add.at(count, channels, 1)
  if not np.all(count == 1):
    raise ValueError(f'the params fused into {first_src.name!r} do not tile it; their shapes do '
                     'not match the config')
  return out


def _linear(name: str, bias: bool, transpose: bool = True, **fused) -> dict[str, Source]:
  out = {'kernel': Source(f'{name}.weight', transpose=transpose, **fused)}
  if bias:
    out['bias'] = Source(f'{name}.bias', **fused)
  return out


def _norm(name: str, bias: bool) -> dict[str, Source]:
  out = {'scale': Source(f'{name}.weight')}
  if bias:
    out['bias'] = Source(f'{name}.bias')
  return out


def _attention(c: CausalLMConfig, pre: str, model_type: str) -> dict:
  if model_type == 'phi3':  # qkv_proj: [q | k | v] rows of widths heads * hd, kv * hd, kv * hd
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    fused = f'{pre}.self_attn.qkv_proj'
    attn = {name: _linear(fused, False, offset=offset, stride=q + 2 * kv)
            for name, offset in (('query', 0), ('key', q), ('value', q + kv))}
    attn['out'] = _linear(f'{pre}.self_attn.o_proj', False)
    return attn
  return {name: _linear(f'{pre}.self_attn.{hf}_proj', bias)
          for name, hf, bias in (('query', 'q', c.qkv_bias), ('key', 'k', c.qkv_bias),
                                 ('value', 'v', c.qkv_bias), ('out', 'o', c.out_bias))}


def _llama_block(c: CausalLMConfig, i: int, model_type: str) -> dict:
  """llama, qwen2/3(-moe), mistral, olmo2/3, gemma2/3 and phi3 blocks under `model.layers.i`."""
  pre = f'model.layers.{i}'
  attn = _attention(c, pre, model_type)
  if model_type == 'phi3':  # gate_up_proj: [gate | up] rows
    mlp = {name: _linear(f'{pre}.mlp.gate_up_proj', False, offset=offset, stride=2 * c.mlp_dim)
           for name, offset in (('gate', 0), ('up', c.mlp_dim))}
    mlp['down'] = _linear(f'{pre}.mlp.down_proj', False)
  elif c.num_experts:  # Qwen3-MoE: the router is mlp.gate; experts as save_pretrained writes them
    mlp = {'router': _linear(f'{pre}.mlp.gate', False)}
    for e in range(c.num_experts):
      mlp[f'experts_{e}'] = {name: _linear(f'{pre}.mlp.experts.{e}.{name}_proj', False)
                             for name in ('gate', 'up', 'down')}
  else:
    mlp = {name: _linear(f'{pre}.mlp.{name}_proj', c.mlp_bias) for name in ('gate', 'up', 'down')}
  block = {'attn': attn, 'mlp': mlp}
  if c.qk_norm:
    attn['query_norm'] = _norm(f'{pre}.self_attn.q_norm', False)
    attn['key_norm'] = _norm(f'{pre}.self_attn.k_norm', False)
  if c.norm_placement in ('pre', 'sandwich'):
    block['attn_norm'] = _norm(f'{pre}.input_layernorm', False)
  if c.norm_placement == 'pre':
    block['mlp_norm'] = _norm(f'{pre}.post_attention_layernorm', False)
  else:  # OLMo-2/3 and Gemma 2/3 name the norm after the attention branch alike
    block['post_attn_norm'] = _norm(f'{pre}.post_attention_layernorm', False)
    block['post_mlp_norm'] = _norm(f'{pre}.post_feedforward_layernorm', False)
  if c.norm_placement == 'sandwich':
    block['mlp_norm'] = _norm(f'{pre}.pre_feedforward_layernorm', False)
  return block


def _gpt2_block(i: int, prefix: str) -> dict:
  pre = f'{prefix}h.{i}'  # query, key and value (in c_attn) are added by `sources`
  return {'attn_norm': _norm(f'{pre}.ln_1', True),
          'attn': {'out': _linear(f'{pre}.attn.c_proj', True, transpose=False)},
          'mlp_norm': _norm(f'{pre}.ln_2', True),
          'mlp': {'up': _linear(f'{pre}.mlp.c_fc', True, transpose=False),
                  'down': _linear(f'{pre}.mlp.c_proj', True, transpose=False)}}


def _neox_block(c: CausalLMConfig, i: int) -> dict:
  pre = f'gpt_neox.layers.{i}'
  hd = c.head_dim
  attn = {name: _linear(f'{pre}.attention.query_key_value', c.qkv_bias, offset=part * hd,
                        stride=3 * hd, groups=c.num_heads)  # [heads, (q, k, v), head_dim] rows
          for part, name in enumerate(('query', 'key', 'value'))}
  attn['out'] = _linear(f'{pre}.attention.dense', c.out_bias)
  return {'attn_norm': _norm(f'{pre}.input_layernorm', True), 'attn': attn,
          'mlp_norm': _norm(f'{pre}.post_attention_layernorm', True),
          'mlp': {'up': _linear(f'{pre}.mlp.dense_h_to_4h', c.mlp_bias),
                  'down': _linear(f'{pre}.mlp.dense_4h_to_h', c.mlp_bias)}}


def sources(config: CausalLMConfig, model_type: str, gpt2_prefix: str = 'transformer.') -> dict:
  """The params tree of `CausalLM(config)` (under 'params') with a `Source` at each leaf.

  Args:
    config: the architecture.
    model_type: a `lossland.interop.hf_config.MODEL_TYPES` entry.
    gpt2_prefix: 'transformer.' for GPT2LMHeadModel checkpoints, '' for bare
      GPT2Model ones.
  """
  head = 'lm_head.weight'
  if model_type == 'gpt2':
    tree = {'embed': {'embedding': Source(f'{gpt2_prefix}wte.weight')},
            'pos_embed': {'embedding': Source(f'{gpt2_prefix}wpe.weight')},
            'final_norm': _norm(f'{gpt2_prefix}ln_f', True)}
    for i in range(config.num_layers):
      block = _gpt2_block(i, gpt2_prefix)
      c_attn = f'{gpt2_prefix}h.{i}.attn.c_attn'
      for part, name in enumerate(('query', 'key', 'value')):
        block['attn'][name] = _linear(c_attn, True, transpose=False, offset=part * config.d_model,
                                      stride=3 * config.d_model)
      tree[f'block_{i}'] = block
  elif model_type == 'gpt_neox':
    tree = {'embed': {'embedding': Source('gpt_neox.embed_in.weight')},
            'final_norm': _norm('gpt_neox.final_layer_norm', True)}
    tree.update({f'block_{i}': _neox_block(config, i) for i in range(config.num_layers)})
    head = 'embed_out.weight'
  else:
    tree = {'embed': {'embedding': Source('model.embed_tokens.weight')},
            'final_norm': _norm('model.norm', False)}
    tree.update({f'block_{i}': _llama_block(config, i, model_type)
                 for i in range(config.num_layers)})
  if not config.tie_embeddings:
    tree['head'] = {'kernel': Source(head, transpose=True)}
  return {'params': tree}


def head_name(model_type: str) -> str:
  """The checkpoint name of the (untied) output head of `model_type`."""
  return 'embed_out.weight' if model_type == 'gpt_neox' else 'lm_head.weight'
