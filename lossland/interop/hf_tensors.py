"""Where each lossland param lives in a Hugging Face state dict, and how to read a slice of it.

A `Source` names the checkpoint tensor of one lossland param and the
transform between the two layouts:

- `torch.nn.Linear` weights are `[out, in]`; lossland kernels are `[in, out]`
  (`transpose=True`).
- GPT-2's `Conv1D` weights are already `[in, out]`; its fused `c_attn` holds
  query, key and value side by side on the last axis (`parts=3`, `part` 0/1/2),
  its bias likewise.
- Embeddings, norm gains and biases are copied as they are.

`hf_index` turns the index of a shard of the lossland param (what
`jax.make_array_from_callback` asks for) into the index of the checkpoint
tensor to read, so each device's shard is read without the rest.
"""
from __future__ import annotations

import dataclasses

from lossland.models.hf_lm import CausalLMConfig

# Checkpoint tensors that carry no weights lossland needs (buffers saved by old versions).
IGNORED_SUFFIXES = ('.rotary_emb.inv_freq', '.attn.bias', '.attn.masked_bias')


@dataclasses.dataclass(frozen=True)
class Source:
  """One lossland param's checkpoint tensor `name`; see the module docstring."""
  name: str
  transpose: bool = False
  parts: int = 1
  part: int = 0

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint tensor's shape for a lossland param of `shape`."""
    shape = tuple(reversed(shape)) if self.transpose else tuple(shape)
    return shape[:-1] + (shape[-1] * self.parts,)

  def hf_index(self, index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The checkpoint slice holding `param[index]` (read it, then transpose if `transpose`)."""
    bounds = [s.indices(dim)[:2] for s, dim in zip(index, shape)]
    if self.transpose:
      bounds, shape = bounds[::-1], tuple(reversed(shape))
    start, stop = bounds[-1]
    offset = self.part * shape[-1]
    bounds[-1] = (start + offset, stop + offset)
    return tuple(slice(a, b) for a, b in bounds)


def _linear(name: str, bias: bool, transpose: bool = True) -> dict[str, Source]:
  out = {'kernel': Source(f'{name}.weight', transpose=transpose)}
  if bias:
    out['bias'] = Source(f'{name}.bias')
  return out


def _norm(name: str, bias: bool) -> dict[str, Source]:
  out = {'scale': Source(f'{name}.weight')}
  if bias:
    out['bias'] = Source(f'{name}.bias')
  return out


def _llama_block(c: CausalLMConfig, i: int, model_type: str) -> dict:
  pre = f'model.layers.{i}'
  attn = {name: _linear(f'{pre}.self_attn.{hf}_proj', bias)
          for name, hf, bias in (('query', 'q', c.qkv_bias), ('key', 'k', c.qkv_bias),
                                 ('value', 'v', c.qkv_bias), ('out', 'o', c.out_bias))}
  mlp = {name: _linear(f'{pre}.mlp.{name}_proj', c.mlp_bias) for name in ('gate', 'up', 'down')}
  block = {'attn': attn, 'mlp': mlp}
  if model_type == 'olmo2':
    attn['query_norm'] = _norm(f'{pre}.self_attn.q_norm', False)
    attn['key_norm'] = _norm(f'{pre}.self_attn.k_norm', False)
    block['post_attn_norm'] = _norm(f'{pre}.post_attention_layernorm', False)
    block['post_mlp_norm'] = _norm(f'{pre}.post_feedforward_layernorm', False)
  else:
    block['attn_norm'] = _norm(f'{pre}.input_layernorm', False)
    block['mlp_norm'] = _norm(f'{pre}.post_attention_layernorm', False)
  return block


def _gpt2_block(i: int, prefix: str) -> dict:
  pre = f'{prefix}h.{i}'

  def fused(part: int) -> dict[str, Source]:  # query, key, value side by side in c_attn
    return {'kernel': Source(f'{pre}.attn.c_attn.weight', parts=3, part=part),
            'bias': Source(f'{pre}.attn.c_attn.bias', parts=3, part=part)}

  return {'attn_norm': _norm(f'{pre}.ln_1', True),
          'attn': {'query': fused(0), 'key': fused(1), 'value': fused(2),
                   'out': _linear(f'{pre}.attn.c_proj', True, transpose=False)},
          'mlp_norm': _norm(f'{pre}.ln_2', True),
          'mlp': {'up': _linear(f'{pre}.mlp.c_fc', True, transpose=False),
                  'down': _linear(f'{pre}.mlp.c_proj', True, transpose=False)}}


def sources(config: CausalLMConfig, model_type: str, gpt2_prefix: str = 'transformer.') -> dict:
  """The params tree of `CausalLM(config)` (under 'params') with a `Source` at each leaf.

  Args:
    config: the architecture.
    model_type: 'llama', 'qwen2', 'olmo2' or 'gpt2'.
    gpt2_prefix: 'transformer.' for GPT2LMHeadModel checkpoints, '' for bare
      GPT2Model ones.
  """
  if model_type == 'gpt2':
    tree = {'embed': {'embedding': Source(f'{gpt2_prefix}wte.weight')},
            'pos_embed': {'embedding': Source(f'{gpt2_prefix}wpe.weight')},
            'final_norm': _norm(f'{gpt2_prefix}ln_f', True)}
    tree.update({f'block_{i}': _gpt2_block(i, gpt2_prefix) for i in range(config.num_layers)})
  else:
    tree = {'embed': {'embedding': Source('model.embed_tokens.weight')},
            'final_norm': _norm('model.norm', False)}
    tree.update({f'block_{i}': _llama_block(config, i, model_type)
                 for i in range(config.num_layers)})
  if not config.tie_embeddings:
    tree['head'] = {'kernel': Source('lm_head.weight', transpose=True)}
  return {'params': tree}
