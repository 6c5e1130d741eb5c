"""Loading onto an 8-device mesh: each param in its rule's sharding, read slice by slice."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import FIXTURES, checkpoint
from jax.sharding import NamedSharding, PartitionSpec as P

from lossland import parallel
from lossland.interop import hf
from lossland.parallel import path_name

RULES = [
    ('.*/attn/(query|key|value)/kernel', P(None, 'model')),
    ('.*/attn/(query|key|value)/bias', P('model')),
    ('.*/attn/out/kernel', P('model', None)),
    ('.*/mlp/(experts_\\d+/)?(gate|up)/kernel', P(None, 'model')),
    ('.*/mlp/(experts_\\d+/)?down/kernel', P('model', None)),
    ('params/embed/embedding', P('model', None)),
    ('params/head/kernel', P(None, 'model')),
]


@pytest.fixture(scope='module')
def mesh():
  return parallel.make_mesh({'data': 2, 'model': 4}, jax.devices())


def expected_spec(path: str) -> P:
  for pattern, spec in RULES:
    if re.fullmatch(pattern, path):
      return spec
  return P()


@pytest.mark.parametrize('name', ['llama3_gqa', 'gpt2', 'llama_tied', 'gemma3', 'qwen3', 'mistral',
                                  'olmo3', 'gemma2', 'phi3', 'gpt_neox', 'qwen3_moe'])
def test_sharded_load_equals_unsharded(name, mesh):
  """llama3_gqa: index + shards, GQA key/value; gpt2: fused c_attn slices; llama_tied: bf16;
  phi3: fused qkv_proj of unequal widths and gate_up_proj; gpt_neox: query_key_value fused per
  head (a shard of 1 head of 4 reads its run of the tensor); gemma3 / qwen3: per-head QK-norm;
  qwen3_moe: every expert's projections, 5 query heads of 12 channels split over 4 devices."""
  sharded = hf.load(FIXTURES / name, mesh=mesh, param_rules=RULES, dtype=jnp.float32)
  plain = checkpoint(name)
  flat = jax.tree_util.tree_flatten_with_path(sharded.params)[0]
  assert len(flat) == len(jax.tree.leaves(plain.params))
  sharded_kinds = set()
  for path, leaf in flat:
    key = path_name(path)
    spec = expected_spec(key)
    assert leaf.sharding == NamedSharding(mesh, spec), key
    assert leaf.dtype == jnp.float32
    if spec != P():
      sharded_kinds.add(key.split('/')[-2])
      shard_shape = tuple(d // (4 if axis == 'model' else 1) for d, axis in
                          zip(leaf.shape, tuple(spec) + (None,) * leaf.ndim))
      assert all(s.data.shape == shard_shape for s in leaf.addressable_shards), key
    want = plain.params
    for part in key.split('/'):
      want = want[part]
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want), err_msg=key)
  assert {'query', 'key', 'value', 'out', 'up', 'down'} <= sharded_kinds


@pytest.mark.parametrize('name, tensor, width', [
    ('phi3', 'model.layers.0.self_attn.qkv_proj.weight', 64 + 32 + 32),
    ('gpt_neox', 'gpt_neox.layers.0.attention.query_key_value.weight', 3 * 64),
])
def test_fused_tensors_are_read_in_slices(name, tensor, width, mesh, monkeypatch):
  """Each model shard of query, key and value reads a quarter of its own rows of the fused
  tensor (phi3: one contiguous block; gpt_neox: the one head's run of q, k, v rows it spans)."""
  reads = []
  read = hf._read

  def recording(tensor_slice, source, index, shape, dtype):
    out = read(tensor_slice, source, index, shape, dtype)
    reads.append((source.name, source.offset, out.size))
    return out

  monkeypatch.setattr(hf, '_read', recording)
  hf.load(FIXTURES / name, mesh=mesh, param_rules=RULES)
  sizes = {}
  for src, offset, size in reads:
    if src == tensor:
      sizes.setdefault(offset, set()).add(size)
  assert len(sizes) == 3  # query, key and value, each read in model shards
  assert sum(next(iter(s)) for s in sizes.values()) * 4 == width * 64
  assert all(len(s) == 1 for s in sizes.values())


def test_each_device_reads_only_its_slice(mesh, monkeypatch):
  reads = []
  read = hf._read

  def recording(tensor, source, index, shape, dtype):
    out = read(tensor, source, index, shape, dtype)
    reads.append((source.name, out.size))
    return out

  monkeypatch.setattr(hf, '_read', recording)
  ckpt = hf.load(FIXTURES / 'llama3_gqa', mesh=mesh, param_rules=RULES)
  up = [size for name, size in reads if name == 'model.layers.0.mlp.up_proj.weight']
  assert len(up) >= 4 and set(up) == {96 * 64 // 4}  # a quarter per read, one per model shard
  norm = [size for name, size in reads if name == 'model.norm.weight']
  assert norm and set(norm) == {64}  # a replicated param is read whole
  assert ckpt.params['params']['block_0']['mlp']['up']['kernel'].shape == (64, 96)
