"""GGUF files in: logits, dequantization, tokenizer and config against transformers and llama.cpp.

The fixtures in tests/fixtures/gguf/ and their transformers references are
written by scripts/make_gguf_fixtures.py (which documents each one); nothing
here needs torch. Files with one thing changed are written on the fly with
`gguf.GGUFWriter`.
"""
import functools
import math
import pathlib
import re

import gguf as gguf_py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import logit_tolerance
from jax.sharding import NamedSharding, PartitionSpec as P

from lossland import parallel
from lossland.interop import gguf, gguf_config, gguf_tokenizer, hf
from lossland.interop.hf_tensors import Source, sources
from lossland.parallel import path_name

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / 'fixtures' / 'gguf'
NAMES = ('llama_gqa', 'qwen2_tied', 'llama_spm', 'gemma3_swa')
ARCH = {'llama_gqa': 'llama', 'qwen2_tied': 'qwen2', 'llama_spm': 'llama', 'gemma3_swa': 'gemma3'}
MODEL_TYPE = {'llama': 'llama', 'qwen2': 'qwen2', 'gemma3': 'gemma3_text'}
T = gguf_py.GGMLQuantizationType


@functools.cache
def checkpoint(name: str) -> hf.Checkpoint:
  """The fixture `name` loaded once per session (treat it as read-only)."""
  return gguf.load(FIXTURES / f'{name}.gguf')


@functools.cache
def forward(name: str):
  return jax.jit(checkpoint(name).model.apply)


def reference(name: str):
  return np.load(FIXTURES / f'{name}.npz')


@pytest.mark.parametrize('name', NAMES)
def test_logits_match_transformers(name):
  ref = reference(name)
  got = np.asarray(forward(name)(checkpoint(name).params, jnp.asarray(ref['tokens'])))
  assert got.shape == ref['logits'].shape
  np.testing.assert_allclose(got, ref['logits'], rtol=0, atol=logit_tolerance(ref['logits']))


EXPECTED = {
    'llama_gqa': dict(vocab_size=320, num_layers=3, num_heads=8, num_kv_heads=2, head_dim=20,
                      mlp_dim=256, rope_theta=500000.0, norm_eps=1e-5, max_positions=256,
                      qkv_bias=False, tie_embeddings=False),
    'qwen2_tied': dict(vocab_size=322, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       mlp_dim=96, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True, out_bias=False,
                       tie_embeddings=True),
    'llama_spm': dict(vocab_size=356, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=16,
                      rope_theta=10000.0, tie_embeddings=True),
    'gemma3_swa': dict(vocab_size=366, d_model=32, num_layers=6, num_heads=2, num_kv_heads=1,
                       head_dim=256, mlp_dim=64, rope_theta=1e6, rope_local_theta=1e4,
                       norm_eps=1e-6, max_positions=128, tie_embeddings=True,
                       norm_placement='sandwich', norm_offset=1.0, qk_norm=True,
                       qk_norm_per_head=True, scale_embeddings=True, activation='gelu_tanh',
                       query_pre_attn_scalar=256.0, final_softcap=None, sliding_window=4,
                       layer_types=('sliding',) * 5 + ('full',)),
}


@pytest.mark.parametrize('name', NAMES)
def test_config_is_the_hugging_face_one(name):
  ckpt = checkpoint(name)
  assert ckpt.config.rope_type == 'default'
  for field, value in {'d_model': 64, **EXPECTED[name]}.items():
    assert getattr(ckpt.config, field) == value, field
  assert hf.from_hf_config(ckpt.hf_config) == ckpt.config
  assert ckpt.hf_config['model_type'] == MODEL_TYPE[ARCH[name]]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """convert_hf_to_gguf.py `LlamaModel.permute` (Hugging Face rows -> llama.cpp rows)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


@pytest.mark.parametrize('name', NAMES)
def test_params_are_the_dequantized_tensors(name):
  """Each param, permuted and transposed back to llama.cpp's layout, is gguf's dequantization."""
  ckpt = checkpoint(name)
  arch = ARCH[name]
  stored = {t.name: t for t in gguf_py.GGUFReader(FIXTURES / f'{name}.gguf').tensors}
  flat = jax.tree_util.tree_flatten_with_path(
      sources(ckpt.config, MODEL_TYPE[arch]), is_leaf=lambda x: isinstance(x, Source))[0]
  params = {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(ckpt.params)[0]}
  names = gguf.gguf_names(ckpt.config, arch, [src.name for _, src in flat])
  seen = set()
  for path, src in flat:
    got = np.asarray(params[path_name(path)])
    got = got.T if src.transpose else got
    if arch == 'llama' and '.q_proj.' in src.name:
      got = llama_cpp_permute(got, ckpt.config.num_heads)
    if arch == 'llama' and '.k_proj.' in src.name:
      got = llama_cpp_permute(got, ckpt.config.num_kv_heads)
    tensor = stored[names[src.name]]
    want = gguf_py.quants.dequantize(tensor.data, tensor.tensor_type)
    if arch == 'gemma3' and tensor.name.endswith('norm.weight'):
      want = want - np.float32(1)  # stored as the gain 1 + w; the param is w
    np.testing.assert_array_equal(got, want.reshape(got.shape), err_msg=src.name)
    seen.add(tensor.tensor_type.name)
  if name == 'llama_gqa':
    assert seen == {'F32', 'F16', 'BF16', 'Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'Q8_0', 'Q4_K', 'Q5_K',
                    'Q6_K'}


def test_gemma3_norm_gains_lose_the_stored_one():
  """convert_hf_to_gguf.py stores Gemma's gain 1 + w; the param is w (about 0.2 N(0, 1) here)."""
  params = checkpoint('gemma3_swa').params['params']
  for norm in ('attn_norm', 'post_attn_norm', 'mlp_norm', 'post_mlp_norm'):
    scale = np.asarray(params['block_0'][norm]['scale'])
    assert abs(scale.mean()) < 0.15 and 0.1 < scale.std() < 0.3, norm
  assert params['block_0']['attn']['query_norm']['scale'].shape == (256,)


# --- dequantization against llama.cpp's formulas ----------------------------------------------


def f16(block: np.ndarray, at: int) -> np.float32:
  return np.float32(block[at:at + 2].view(np.float16)[0])


def q4_k_scale_min(j: int, s: np.ndarray) -> tuple[int, int]:
  """ggml-quants.c get_scale_min_k4: 6-bit scale and min of sub-block j from 12 packed bytes."""
  if j < 4:
    return int(s[j] & 63), int(s[j + 4] & 63)
  return (int((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)),
          int((s[j + 4] >> 4) | ((s[j] >> 6) << 4)))


def llama_cpp_dequantize(block: np.ndarray, kind: str) -> np.ndarray:
  """One block as ggml-quants.c dequantize_row_{q8_0,q4_0,q4_1,q4_K,q6_K} computes it, scalar."""
  y = np.zeros(256 if kind.endswith('_K') else 32, np.float32)
  if kind == 'Q8_0':  # {d, qs[32] int8}
    y[:] = f16(block, 0) * block[2:34].view(np.int8)
  elif kind in ('Q4_0', 'Q4_1'):  # {d, qs[16]} / {d, m, qs[16]}: low nibbles, then high ones
    qs = block[2:18] if kind == 'Q4_0' else block[4:20]
    low, high = (qs & 0xF).astype(np.float32), (qs >> 4).astype(np.float32)
    if kind == 'Q4_0':
      y[:16], y[16:] = f16(block, 0) * (low - 8), f16(block, 0) * (high - 8)
    else:
      y[:16], y[16:] = f16(block, 0) * low + f16(block, 2), f16(block, 0) * high + f16(block, 2)
  elif kind == 'Q4_K':  # {d, dmin, scales[12], qs[128]}: 64 values per 32 bytes of qs
    d, dmin, scales, qs = f16(block, 0), f16(block, 2), block[4:16], block[16:144]
    for chunk in range(4):
      q = qs[32 * chunk:32 * chunk + 32]
      for half, codes in ((0, q & 0xF), (1, q >> 4)):
        sc, m = q4_k_scale_min(2 * chunk + half, scales)
        start = 64 * chunk + 32 * half
        y[start:start + 32] = d * np.float32(sc) * codes.astype(np.float32) - dmin * np.float32(m)
  elif kind == 'Q6_K':  # {ql[128], qh[64], scales[16] int8, d}
    ql, qh, sc, d = block[:128], block[128:192], block[192:208].view(np.int8), f16(block, 208)
    for n in range(2):  # 128 values from 64 bytes of ql, 32 of qh, 8 scales
      lo, hi, s = ql[64 * n:64 * n + 64], qh[32 * n:32 * n + 32], sc[8 * n:8 * n + 8]
      for j in range(32):
        q = [(lo[j] & 0xF) | ((hi[j] & 3) << 4),
             (lo[j + 32] & 0xF) | (((hi[j] >> 2) & 3) << 4),
             (lo[j] >> 4) | (((hi[j] >> 4) & 3) << 4),
             (lo[j + 32] >> 4) | (((hi[j] >> 6) & 3) << 4)]
        for k in range(4):
          y[128 * n + j + 32 * k] = d * np.float32(s[j // 16 + 2 * k]) * np.float32(int(q[k]) - 32)
  return y


def write_gguf(path, tensors: dict, metadata: dict | None = None, arch: str = 'llama'):
  """A GGUF file holding `tensors` (name -> (array, ggml type)) and `metadata` (GGUFWriter adds)."""
  writer = gguf_py.GGUFWriter(str(path), arch)
  for key, (value, vtype, sub) in (metadata or {}).items():
    writer.add_key_value(key, value, vtype, sub)
  for name, (value, kind) in tensors.items():
    writer.add_tensor(name, value, raw_dtype=kind)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def random_blocks(rng, kind: str, rows: int, cols: int) -> np.ndarray:
  """Random bytes in `kind`'s block layout with finite fp16 scales (ggml-common.h offsets)."""
  block, size = gguf_py.GGML_QUANT_SIZES[T[kind]]
  raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
  scales = {'Q4_0': (0,), 'Q4_1': (0, 2), 'Q5_0': (0,), 'Q5_1': (0, 2), 'Q8_0': (0,),
            'Q2_K': (80, 82), 'Q3_K': (108,), 'Q4_K': (0, 2), 'Q5_K': (0, 2), 'Q6_K': (208,),
            'IQ4_NL': (0,), 'IQ4_XS': (0,)}[kind]
  for at in scales:
    raw[:, at:at + 2] = rng.uniform(-0.1, 0.1, (len(raw), 1)).astype(np.float16).view(np.uint8)
  return raw.reshape(rows, -1)


@pytest.fixture(scope='module')
def every_type(tmp_path_factory):
  """A file with one [3, 256] tensor of each supported type; returns (path, float32 originals)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 256)).astype(np.float32)
  tensors = {}
  for kind in gguf.SUPPORTED_TYPES:
    if kind in ('F32', 'F16'):
      tensors[kind] = (x.astype(np.float16 if kind == 'F16' else np.float32), T[kind])
    elif kind in ('BF16', 'Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'Q8_0'):  # what gguf can quantize
      tensors[kind] = (gguf_py.quants.quantize(x, T[kind]), T[kind])
    else:
      tensors[kind] = (random_blocks(rng, kind, 3, 256), T[kind])
  return write_gguf(tmp_path_factory.mktemp('types') / 'types.gguf', tensors), x


def test_every_supported_type_dequantizes_like_gguf(every_type):
  path, x = every_type
  reader = gguf_py.GGUFReader(path)
  assert [t.name for t in reader.tensors] == list(gguf.SUPPORTED_TYPES)
  for tensor in reader.tensors:
    got = gguf.dequantize(tensor)
    assert got.dtype == np.float32 and got.shape == (3, 256), tensor.name
    want = gguf_py.quants.dequantize(tensor.data, tensor.tensor_type)
    np.testing.assert_array_equal(got, want, err_msg=tensor.name)
    if tensor.name in ('F32', 'F16', 'BF16', 'Q8_0', 'Q4_0'):  # close to what was quantized
      bound = {'F32': 0, 'F16': 2e-3, 'BF16': 2e-2, 'Q8_0': 3e-2, 'Q4_0': 0.6}[tensor.name]
      assert np.abs(got - x).max() <= bound * np.abs(x).max(), tensor.name


@pytest.mark.parametrize('kind', ['Q8_0', 'Q4_0', 'Q4_1', 'Q4_K', 'Q6_K'])
def test_block_layout_is_llama_cpps(kind, every_type):
  """gguf's numpy dequantization (hence lossland's) equals a scalar port of ggml-quants.c."""
  tensor = next(t for t in gguf_py.GGUFReader(every_type[0]).tensors if t.name == kind)
  _, size = gguf_py.GGML_QUANT_SIZES[T[kind]]
  rows = np.asarray(tensor.data).reshape(-1, size)
  want = np.concatenate([llama_cpp_dequantize(b, kind) for b in rows]).reshape(3, 256)
  np.testing.assert_array_equal(gguf.dequantize(tensor), want)


# --- tokenizer ----------------------------------------------------------------------------------


@pytest.mark.parametrize('name', NAMES)
def test_tokenizer_encodes_like_transformers(name):
  ref = reference(name)
  tok = checkpoint(name).tokenizer
  want = np.split(ref['ids'], ref['ids_offsets'][1:-1])
  for text, ids, decoded in zip(ref['texts'], want, ref['decoded']):
    got = tok.encode(str(text)).ids
    assert got == ids.tolist(), text
    assert tok.decode(got) == str(decoded), text


def test_byte_alphabet_is_byte_levels():
  from tokenizers import pre_tokenizers
  alphabet = gguf_tokenizer.byte_alphabet()
  assert sorted(alphabet.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
  assert alphabet[ord(' ')] == 'Ġ' and alphabet[ord('\n')] == 'Ċ' and alphabet[ord('a')] == 'a'


# --- export, sharding ---------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['llama_gqa', 'llama_spm', 'gemma3_swa'])
def test_export_as_hugging_face_folder(name, tmp_path):
  """hf.save + save_tokenizer write a folder that hf.load reads back to the same model."""
  ckpt = checkpoint(name)
  hf.save(tmp_path, ckpt.params, ckpt.config, base_config=ckpt.hf_config)
  gguf.save_tokenizer(tmp_path, FIXTURES / f'{name}.gguf')
  back = hf.load(tmp_path)
  assert back.config == ckpt.config
  assert back.hf_config['model_type'] == MODEL_TYPE[ARCH[name]]
  jax.tree.map(np.testing.assert_array_equal, back.params, ckpt.params)
  ref = reference(name)
  np.testing.assert_array_equal(forward(name)(back.params, ref['tokens']),
                                forward(name)(ckpt.params, ref['tokens']))
  for text in ref['texts']:
    assert back.tokenizer.encode(str(text)).ids == ckpt.tokenizer.encode(str(text)).ids


RULES = [('.*/attn/(query|key|value)/kernel', P(None, 'model')),
         ('.*/attn/out/kernel', P('model', None)),
         ('.*/mlp/(gate|up)/kernel', P(None, 'model')),
         ('.*/mlp/down/kernel', P('model', None)),
         ('params/embed/embedding', P('model', None)),
         ('params/head/kernel', P(None, 'model'))]


def test_sharded_load_equals_unsharded():
  mesh = parallel.make_mesh({'data': 2, 'model': 4}, jax.devices())
  sharded = gguf.load(FIXTURES / 'llama_gqa.gguf', mesh=mesh, param_rules=RULES, tokenizer=False)
  plain = checkpoint('llama_gqa').params
  flat = jax.tree_util.tree_flatten_with_path(sharded.params)[0]
  assert len(flat) == len(jax.tree.leaves(plain)) and sharded.tokenizer is None
  for path, leaf in flat:
    key = path_name(path)
    spec = next((s for pattern, s in RULES if re.fullmatch(pattern, key)), P())
    assert leaf.sharding == NamedSharding(mesh, spec), key
  jax.tree.map(np.testing.assert_array_equal, sharded.params, plain)


def test_bfloat16_params():
  ckpt = gguf.load(FIXTURES / 'llama_spm.gguf', dtype=jnp.bfloat16, tokenizer=False)
  assert {x.dtype for x in jax.tree.leaves(ckpt.params)} == {jnp.dtype(jnp.bfloat16)}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)),
               ckpt.params, checkpoint('llama_spm').params)


# --- config mapping -----------------------------------------------------------------------------


@functools.cache
def metadata_and_shapes(name: str):
  reader = gguf_py.GGUFReader(FIXTURES / f'{name}.gguf')
  shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
  return gguf.read_metadata(FIXTURES / f'{name}.gguf'), shapes


def llama3_divisors(theta, head_dim, factor, low=1.0, high=4.0, old=8192):
  """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: rope_freqs.weight for llama3."""
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < old / high:
      out.append(1)
    elif wavelen > old / low:
      out.append(factor)
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, np.float32)


def test_rope_scaling():
  metadata, shapes = metadata_and_shapes('llama_spm')
  linear = {**metadata, 'llama.rope.scaling.type': 'linear', 'llama.rope.scaling.factor': 4.0}
  config = hf.from_hf_config(gguf_config.hf_config(linear, shapes))
  assert (config.rope_type, config.rope_factor) == ('linear', 4.0)
  freqs = llama3_divisors(500000.0, 16, 32.0, old=8192)
  theta = {**metadata, 'llama.rope.freq_base': 500000.0}
  config = hf.from_hf_config(gguf_config.hf_config(theta, shapes, rope_freqs=freqs))
  assert (config.rope_type, config.rope_factor, config.rope_original_max_positions) == (
      'llama3', 32.0, 8192)
  with pytest.raises(ValueError, match='not the Llama-3.1 rescaling'):
    gguf_config.hf_config(theta, shapes, rope_freqs=llama3_divisors(500000.0, 16, 32.0, old=4096))
  with pytest.raises(ValueError, match="rope.scaling.type='yarn' is not supported"):
    gguf_config.hf_config({**metadata, 'llama.rope.scaling.type': 'yarn'}, shapes)


@pytest.mark.parametrize('change, match', [
    ({'llama.expert_count': 8}, 'mixture-of-experts'),
    ({'llama.attention.value_length': 32}, 'value_length=32 differs'),
    ({'llama.rope.dimension_count': 8}, 'dimension_count=8 differs from the head width 16'),
    ({'llama.vocab_size': 999}, 'vocab_size=999 disagrees'),
    ({'llama.block_count': None}, "no 'llama.block_count'"),
    ({'general.architecture': 'gpt2'}, "architecture='gpt2' is not supported.*'llama', 'qwen2'"),
])
def test_unsupported_metadata(change, match):
  metadata, shapes = metadata_and_shapes('llama_spm')
  metadata = {k: v for k, v in {**metadata, **change}.items() if v is not None}
  with pytest.raises(ValueError, match=match):
    hf.from_hf_config(gguf_config.hf_config(metadata, shapes))


def test_gemma3_metadata():
  """llama.cpp's Gemma 3 keys and the defaults it keeps in code (gguf_config docstring)."""
  metadata, shapes = metadata_and_shapes('gemma3_swa')

  def config(**change):
    return hf.from_hf_config(gguf_config.hf_config(
        {k: v for k, v in {**metadata, **change}.items() if v is not None}, shapes))

  assert config().layer_types == ('sliding',) * 5 + ('full',)
  assert config(**{'gemma3.attention.sliding_window_pattern': 2}).layer_types == (
      'sliding', 'full') * 3
  pattern = [True, False, True, True, False, False]
  assert config(**{'gemma3.attention.sliding_window_pattern': pattern}).layer_types == (
      'sliding', 'full', 'sliding', 'sliding', 'full', 'full')
  assert config(**{'gemma3.attention.sliding_window': None}).layer_types == ('full',) * 6
  got = config(**{'gemma3.rope.freq_base_swa': 5000.0, 'gemma3.final_logit_softcapping': 30.0,
                  'gemma3.rope.scaling.type': 'linear', 'gemma3.rope.scaling.factor': 8.0})
  assert (got.rope_local_theta, got.final_softcap, got.rope_type, got.rope_factor) == (
      5000.0, 30.0, 'linear', 8.0)
  assert config(**{'gemma3.block_count': 62}).query_pre_attn_scalar == 16.0  # 27B: 32 / 2
  with pytest.raises(ValueError, match='attn_logit_softcapping=50.0 is not supported'):
    config(**{'gemma3.attn_logit_softcapping': 50.0})


def test_gemma3_cached_greedy_decode_equals_uncached():
  """Window 4 over 6 + 10 positions, through the KV cache and without it."""
  from lossland.curvature import greedy_decode as uncached_greedy_decode
  from lossland.models import hf_lm
  ckpt = checkpoint('gemma3_swa')
  prefixes = jnp.asarray(reference('gemma3_swa')['tokens'][:, :6])
  want = uncached_greedy_decode(ckpt.model.apply, ckpt.params, prefixes, 10, use_cache=False)
  np.testing.assert_array_equal(hf_lm.greedy_decode(ckpt.model, ckpt.params, prefixes, 10), want)


# --- bad files ----------------------------------------------------------------------------------


def rewrite(name: str, path, *, arch: str = 'llama', drop=(), tensors=None):
  """The fixture `name` rewritten to `path` without the keys / tensors in `drop`, plus `tensors`."""
  reader = gguf_py.GGUFReader(FIXTURES / f'{name}.gguf')
  metadata = {}
  for key, field in reader.fields.items():
    if key.startswith('GGUF.') or key == 'general.architecture' or key in drop:
      continue
    types = field.types
    metadata[key] = (field.contents(), types[0], types[-1] if len(types) > 1 else None)
  kept = {t.name: (np.asarray(t.data), t.tensor_type) for t in reader.tensors
          if t.name not in drop}
  return write_gguf(path, {**kept, **(tensors or {})}, metadata, arch)


def test_missing_folder_and_non_gguf_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    gguf.load(tmp_path / 'nowhere.gguf')
  with pytest.raises(ValueError, match='is a folder.*hf.load'):
    gguf.load(tmp_path)
  (tmp_path / 'model.safetensors').write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{}      ')
  with pytest.raises(ValueError, match="is not a GGUF file: it starts with b'\\\\x08"):
    gguf.load(tmp_path / 'model.safetensors')
  (tmp_path / 'cut.gguf').write_bytes((FIXTURES / 'llama_spm.gguf').read_bytes()[:100])
  with pytest.raises(ValueError, match='cannot be read'):
    gguf.load(tmp_path / 'cut.gguf')


def test_unsupported_tensor_type(tmp_path):
  ints = np.random.default_rng(0).integers(-8, 8, (128, 64), dtype=np.int8)
  path = rewrite('llama_spm', tmp_path / 'i8.gguf', drop=['blk.0.ffn_up.weight'],
                 tensors={'blk.0.ffn_up.weight': (ints, T.I8)})
  with pytest.raises(ValueError, match=r"stored as \['I8'\] \(e.g. 'blk.0.ffn_up.weight'\).*"
                                       r"it reads \('F32', 'F16', 'BF16'"):
    gguf.load(path)


def test_unsupported_architecture(tmp_path):
  path = rewrite('llama_spm', tmp_path / 'falcon.gguf', arch='falcon')
  with pytest.raises(ValueError, match="architecture='falcon' is not supported by lossland"):
    gguf.load(path)


def test_missing_and_unexpected_tensors(tmp_path):
  path = rewrite('llama_spm', tmp_path / 'less.gguf', drop=['blk.0.ffn_gate.weight'])
  with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\).*'blk.0.ffn_gate.weight'"):
    gguf.load(path)
  extra = {'blk.0.attn_q_norm.weight': (np.ones(16, np.float32), T.F32)}
  path = rewrite('llama_spm', tmp_path / 'more.gguf', tensors=extra)
  with pytest.raises(ValueError, match=r"tensors \['blk.0.attn_q_norm.weight'\].*no place"):
    gguf.load(path)


def test_tokenizer_errors(tmp_path):
  keys = [k for k in gguf.read_metadata(FIXTURES / 'llama_spm.gguf') if k.startswith('tokenizer.')]
  path = rewrite('llama_spm', tmp_path / 'bare.gguf', drop=keys)
  assert gguf.load(path).tokenizer is None
  with pytest.raises(ValueError, match='has no tokenizer'):
    gguf.load(path, tokenizer=True)
  bert = {'tokenizer.ggml.model': ('bert', gguf_py.GGUFValueType.STRING, None)}
  path = write_gguf(tmp_path / 'bert.gguf', {}, bert)
  with pytest.raises(ValueError, match=r"tokenizer.ggml.model='bert' is not supported.*tokenizer="):
    gguf_tokenizer.from_metadata(gguf.read_metadata(path))
