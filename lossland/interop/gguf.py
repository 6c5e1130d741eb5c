"""llama.cpp GGUF files in: a `CausalLM`, its params, config and tokenizer, as `hf.load` gives them.

A GGUF file (ggml docs/gguf.md) holds a model's hyperparameters and tokenizer
as key-value metadata and its weights as tensors named `token_embd`,
`blk.N.attn_{norm,q,k,v,output}`, `blk.N.ffn_{norm,gate,up,down}`,
`output_norm`, `output` (absent when the head is tied), each stored in one of
ggml's types: plain floats (F32, F16, BF16) or blocks of quantized values with
per-block scales (Q8_0, Q4_K, ...). The file is read with the maintained `gguf`
package (llama.cpp's gguf-py), and `load`

1. maps the metadata to the config.json the model's Hugging Face folder would
   have (`lossland.interop.gguf_config`), so `hf_config.from_hf_config` gives
   the same `CausalLMConfig` and `hf.save` can export the model;
2. dequantizes each tensor to float32 with `gguf.quants.dequantize` (numpy
   ports of llama.cpp's `dequantize_row_*`), giving ggml's `[ne1, ne0]` =
   torch's `[out, in]` layout;
3. undoes, for the llama architecture, the row permutation that
   convert_hf_to_gguf.py (`LlamaModel.permute`) applies to q_proj / k_proj
   (weights and biases) so that llama.cpp's rotary can rotate adjacent channel
   pairs (2i, 2i+1) instead of Hugging Face's halves (i, i + head_dim/2), and,
   for gemma3, the +1 it adds to every norm gain (`Gemma3Model.norm_shift`:
   Hugging Face stores w of a `(1 + w)` gain, llama.cpp the gain itself);
4. places each tensor where `hf_tensors.sources` puts its Hugging Face
   counterpart (GGUF names come from gguf's own `TensorNameMap`), with
   `hf.place_params`, so a mesh and param rules work as in `hf.load`;
5. rebuilds the tokenizer from the metadata (`lossland.interop.gguf_tokenizer`).

Usage:

  from lossland.interop import gguf, hf
  ckpt = gguf.load('SmolLM2-135M-Instruct.Q4_1.gguf')
  logits = ckpt.model.apply(ckpt.params, tokens)
  ids = ckpt.tokenizer.encode('The capital of France is').ids
  hf.save('/ckpts/smollm2', ckpt.params, ckpt.config, base_config=ckpt.hf_config)
  gguf.save_tokenizer('/ckpts/smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf')

Each process dequantizes whole tensors on the host (one at a time) and places
only its devices' slices. None of these functions is jit-safe (they read files).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from jax.sharding import Mesh, PartitionSpec

from lossland.interop import gguf_config, gguf_tokenizer
from lossland.interop.hf import Checkpoint, place_params
from lossland.interop.hf_config import from_hf_config
from lossland.interop.hf_tensors import Source, sources
from lossland.models.hf_lm import CausalLM
from lossland.parallel.rules import path_name

MAGIC = b'GGUF'
# ggml types lossland dequantizes (all through gguf.quants.dequantize): plain floats, llama.cpp's
# legacy 32-value blocks, the 256-value K-quant super-blocks, and the non-linear IQ4 codebooks.
SUPPORTED_TYPES = ('F32', 'F16', 'BF16', 'Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'Q8_0', 'Q2_K', 'Q3_K',
                   'Q4_K', 'Q5_K', 'Q6_K', 'IQ4_NL', 'IQ4_XS')
ARCHITECTURES = tuple(gguf_config.ARCHITECTURES)
# Tensors the file may hold beyond the model's params: llama3 rope divisors (read into the config).
EXTRA_TENSORS = (gguf_config.ROPE_FREQS,)
# Architectures whose converter writes RMSNorm gains as 1 + w (Gemma's norms multiply by 1 + w).
NORM_SHIFTED = ('gemma3',)


def _open(path) -> gguf.GGUFReader:
  file = pathlib.Path(path)
  if file.is_dir():
    raise ValueError(f'{file} is a folder; pass a .gguf file (a Hugging Face folder loads with '
                     'lossland.interop.hf.load)')
  if not file.is_file():
    raise FileNotFoundError(f'{file} does not exist; pass the path of a llama.cpp .gguf file')
  with open(file, 'rb') as f:
    magic = f.read(4)
  if magic != MAGIC:
    raise ValueError(f'{file} is not a GGUF file: it starts with {magic!r}, not {MAGIC!r}. Pass a '
                     'llama.cpp .gguf file (Hugging Face folders load with interop.hf.load)')
  try:
    return gguf.GGUFReader(file)
  except (ValueError, IndexError, KeyError, OSError) as e:
    raise ValueError(f'{file} starts like a GGUF file but cannot be read ({e}); it may be '
                     'truncated or of an unsupported GGUF version (2 and 3 are read)') from e


def read_metadata(path) -> dict[str, Any]:
  """The key-value metadata of the GGUF file `path` as Python values (arrays as lists).

  The `GGUF.*` entries that describe the file itself (version, counts) are left out.
  """
  return _metadata(_open(path))


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
  return {key: field.contents() for key, field in reader.fields.items()
          if not key.startswith('GGUF.')}


def _flat(tree) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, Source))[0]
  return {path_name(path): leaf for path, leaf in flat}


def _shape(tensor) -> tuple[int, ...]:
  """A tensor's shape in numpy (row-major) order: ggml's `ne` reversed."""
  return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def dequantize(tensor) -> np.ndarray:
  """A GGUF tensor (`GGUFReader.tensors[i]`) as a float32 array of numpy-order shape.

  Raises:
    ValueError: for a ggml type outside `SUPPORTED_TYPES`, naming the tensor.
  """
  kind = tensor.tensor_type.name
  if kind not in SUPPORTED_TYPES:
    raise ValueError(f'GGUF tensor {tensor.name!r} is stored as {kind}, which lossland does not '
                     f'dequantize; it reads {SUPPORTED_TYPES} (re-quantize the model with '
                     'llama.cpp llama-quantize to one of them)')
  values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  return np.array(values, dtype=np.float32).reshape(_shape(tensor))  # a copy, not the file's map


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of convert_hf_to_gguf.py `LlamaModel.permute` on the rows of q/k weights or biases.

  llama.cpp stores each head's rows as interleaved pairs (0, half, 1, half + 1,
  ...) so its rotary rotates adjacent rows; this restores Hugging Face's order
  (first half, then second half), which lossland's `apply_rope` rotates.
  """
  rows = w.shape[0]
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_names(config, arch: str, names: Sequence[str]) -> dict[str, str]:
  """Hugging Face tensor name -> GGUF tensor name, from gguf's `TensorNameMap` for `arch`."""
  kind = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
  table = gguf.get_tensor_name_map(kind, config.num_layers)
  out = {}
  for name in names:
    stem, _, suffix = name.rpartition('.')
    mapped = table.get_name(stem)
    if mapped is None:
      raise ValueError(f'the gguf package has no GGUF name for the {arch} tensor {name!r}; '
                       'upgrade it')
    out[name] = f'{mapped}.{suffix}'
  return out


def _hf_tensor(tensor, hf_name: str, arch: str, config) -> np.ndarray:
  """The dequantized GGUF tensor in its Hugging Face layout (q/k rows unpermuted for llama,
  the 1 taken off Gemma's norm gains)."""
  w = dequantize(tensor)
  if arch in NORM_SHIFTED and tensor.name.endswith('norm.weight'):
    w = w - np.float32(1)  # convert_hf_to_gguf.py stores 1 + w; float32, as transformers does
  if arch == 'llama':
    if '.self_attn.q_proj.' in hf_name:
      w = unpermute_rows(w, config.num_heads)
    elif '.self_attn.k_proj.' in hf_name:
      w = unpermute_rows(w, config.num_kv_heads)
  return w


def load(path, *, dtype=jnp.float32, mesh: Mesh | None = None,
         param_rules: Sequence[tuple[str, PartitionSpec]] = (),
         tokenizer: bool | None = None) -> Checkpoint:
  """Reads a llama.cpp GGUF file into a `CausalLM`, its params, config and tokenizer.

  Args:
    path: the .gguf file (one file; split `-00001-of-0000N.gguf` files are not read).
    dtype: the params' dtype. Dequantized values are exact in float32 (the
      default); bfloat16 halves the memory and rounds them.
    mesh: place each param on this mesh, each process putting only its devices'
      slices there; None puts whole params on the default device.
    param_rules: (regex over 'params/block_0/mlp/up/kernel'-style paths,
      PartitionSpec) pairs, as in `hf.load`. Needs `mesh`.
    tokenizer: True requires a tokenizer in the metadata, False skips it, None
      builds it when the file has one.

  Returns:
    An `hf.Checkpoint`: `hf_config` is the config.json dict the model's Hugging
    Face folder would have (pass it to `hf.save` as `base_config`).

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: a folder or a file that is not GGUF; an architecture other than
      `ARCHITECTURES`; a tensor type outside `SUPPORTED_TYPES`; a tensor that is
      missing, unexpected or of another shape than the metadata implies; a
      feature lossland does not implement; an unsupported tokenizer (unless
      tokenizer=False).
  """
  file = pathlib.Path(path)
  reader = _open(file)
  metadata = _metadata(reader)
  tensors = {t.name: t for t in reader.tensors}
  shapes = {name: _shape(t) for name, t in tensors.items()}
  rope_freqs = None
  if gguf_config.ROPE_FREQS in tensors:
    rope_freqs = dequantize(tensors[gguf_config.ROPE_FREQS])
  try:
    hf_config = gguf_config.hf_config(metadata, shapes, rope_freqs)
    config = from_hf_config(hf_config)
  except ValueError as e:
    raise ValueError(f'{file}: {e}') from e
  arch, model_type = metadata['general.architecture'], hf_config['model_type']
  if param_rules and mesh is None:
    raise ValueError('param_rules need a mesh; pass mesh= or drop param_rules')
  wanted = _flat(sources(config, model_type))
  names = gguf_names(config, arch, sorted({src.name for src in wanted.values()}))
  missing = sorted(n for n in names.values() if n not in tensors)
  if missing:
    raise ValueError(f'{file}: the {arch} file lacks {len(missing)} tensor(s) that its metadata '
                     f'implies, e.g. {missing[:4]}')
  spare = sorted(set(tensors) - set(names.values()) - set(EXTRA_TENSORS))
  if spare:
    raise ValueError(f'{file}: tensors {spare[:4]} ({len(spare)} in all) have no place in a '
                     f'{arch} model as lossland implements it; they belong to a feature it does '
                     'not support')
  bad = sorted({t.tensor_type.name for t in tensors.values()} - set(SUPPORTED_TYPES))
  if bad:
    first = next(t.name for t in tensors.values() if t.tensor_type.name == bad[0])
    raise ValueError(f'{file}: tensors are stored as {bad} (e.g. {first!r}), which lossland does '
                     f'not dequantize; it reads {SUPPORTED_TYPES} (re-quantize the model with '
                     'llama.cpp llama-quantize to one of them)')
  model = CausalLM(config)
  params_shape = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  abstract, readers = {}, {}
  for key, leaf in _flat(params_shape).items():
    src = wanted[key]
    gguf_name = names[src.name]
    if shapes[gguf_name] != src.hf_shape(leaf.shape):
      raise ValueError(f'{file}: tensor {gguf_name!r} has shape {shapes[gguf_name]} (numpy order), '
                       f'but the metadata implies {src.hf_shape(leaf.shape)}')
    abstract[key] = jax.ShapeDtypeStruct(leaf.shape, dtype)
    readers[key] = (lambda t=tensors[gguf_name], n=src.name:
                    _hf_tensor(t, n, arch, config))
  params = place_params(wanted, readers, abstract, mesh=mesh, param_rules=param_rules)
  tok = None
  if tokenizer and 'tokenizer.ggml.model' not in metadata:
    raise ValueError(f'{file} has no tokenizer (no tokenizer.ggml.model in its metadata); pass '
                     'tokenizer=None or False to load the model without one')
  if tokenizer or (tokenizer is None and 'tokenizer.ggml.model' in metadata):
    try:
      tok = gguf_tokenizer.from_metadata(metadata)
    except ValueError as e:
      raise ValueError(f'{file}: {e}') from e
    top = max(tok.get_vocab(with_added_tokens=True).values())
    if top >= config.vocab_size:
      raise ValueError(f'{file}: the tokenizer has ids up to {top}, but token_embd.weight has '
                       f'{config.vocab_size} rows')
  return Checkpoint(model, params, config, hf_config, tok)


def save_tokenizer(folder, path) -> pathlib.Path:
  """Writes the tokenizer of the GGUF file `path` into `folder` as Hugging Face files.

  `tokenizer.json` (the tokenizer `load` builds) and `tokenizer_config.json`
  (special tokens, whether BOS/EOS are added, the chat template), so that
  `hf.load(folder)` and transformers' `AutoTokenizer.from_pretrained(folder)`
  tokenize as the GGUF file does. Returns `folder`.
  """
  out = pathlib.Path(folder)
  out.mkdir(parents=True, exist_ok=True)
  metadata = read_metadata(path)
  tok: tokenizers.Tokenizer = gguf_tokenizer.from_metadata(metadata)
  tok.save(str(out / 'tokenizer.json'))
  with open(out / 'tokenizer_config.json', 'w') as f:
    json.dump(gguf_tokenizer.tokenizer_config(metadata), f, indent=2, sort_keys=True)
  return out

