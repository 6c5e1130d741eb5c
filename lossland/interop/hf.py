"""Hugging Face checkpoint folders in and out: the causal LMs of `hf_config.MODEL_TYPES`.

Llama, Qwen2/3, Qwen3-MoE, Mistral, OLMo-2/3, Gemma 2, Gemma 3 (text), Phi-3, GPT-NeoX and
GPT-2 (`lossland.models.hf_lm` for what each computes).

A folder holds `config.json`, the weights as `model.safetensors` or as shards
listed in `model.safetensors.index.json` (float32, bfloat16 or float16), and
optionally `tokenizer.json` and other tokenizer files. `load` builds the
`CausalLM` from `config.json` (`lossland.interop.hf_config`) and reads every
tensor into the lossland param tree (`lossland.interop.hf_tensors`);
`save` writes params back in the same layout, so that transformers, vLLM or
lm-eval load the result, and a load followed by a save reproduces every
tensor bit for bit.

On a mesh, every param is created with `jax.make_array_from_callback` in the
sharding that `lossland.parallel.param_shardings(params, mesh, param_rules)`
gives it, and the callback reads only the slice of the checkpoint tensor that
the requesting device holds (safetensors' `get_slice`, memory-mapped). So a
process reads only its own devices' shards and no device ever holds a full
copy of a sharded param.

Usage:

  from lossland.interop import hf
  ckpt = hf.load('/ckpts/OLMo-2-0425-1B', dtype=jnp.float32, mesh=mesh,
                 param_rules=[('.*/mlp/(gate|up)/kernel', P(None, 'model')),
                              ('.*/mlp/down/kernel', P('model', None))])
  logits = ckpt.model.apply(ckpt.params, tokens)
  ids = ckpt.tokenizer.encode('The capital of France is').ids
  hf.save('/ckpts/edited', edited_params, ckpt.config, base_config=ckpt.hf_config,
          tokenizer_from='/ckpts/OLMo-2-0425-1B')

A lossland `TransformerLM` exports as a Llama folder:
`hf.save(dir, params, models.config_from_transformer_lm(lm))`.

A malformed folder (invalid JSON in config.json, the index or tokenizer.json;
a truncated or empty safetensors file; an index that sends a tensor to a shard
that lacks it; a config size that is not a positive integer) is one
`lossland.UserError` that names the file (and key) and says what to change:
JSON is read by `read_json` and safetensors files opened by
`open_safetensors`, the two places that know the file names.

`save` writes the folder whole (`lossland.interop.whole_folder`): into a
temporary sibling, renamed into place once complete, so an error or a kill
never leaves a half-written folder.

Neither function is jit-safe (they read and write files).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import shutil
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import tokenizers
from jax.sharding import Mesh, PartitionSpec

from lossland.errors import UserError
from lossland.interop.hf_config import from_hf_config, infer_model_type, to_hf_config
from lossland.interop.hf_tensors import IGNORED_SUFFIXES, Source, assemble, head_name, sources
from lossland.interop.whole_folder import written_whole
from lossland.models.hf_lm import CausalLM, CausalLMConfig
from lossland.parallel.rules import param_shardings
from lossland.parallel.rules import path_name

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
TOKENIZER_FILE = 'tokenizer.json'
# Copied by `save` from `tokenizer_from` when present (transformers 5 writes the chat template
# to chat_template.jinja, earlier versions into tokenizer_config.json).
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'added_tokens.json', 'vocab.json', 'merges.txt', 'tokenizer.model',
                   'generation_config.json', 'chat_template.jinja')
DTYPES = {'F32': np.dtype(np.float32), 'BF16': np.dtype(jnp.bfloat16),
          'F16': np.dtype(np.float16)}
DTYPE_NAMES = {np.dtype(np.float32): 'float32', np.dtype(jnp.bfloat16): 'bfloat16',
               np.dtype(np.float16): 'float16'}


class Checkpoint(NamedTuple):
  """What `load` returns.

  Attributes:
    model: the `CausalLM`; `model.apply(params, tokens)` gives logits.
    params: {'params': tree} of jax arrays.
    config: the `CausalLMConfig` built from config.json.
    hf_config: config.json as a dict (pass it to `save` as `base_config`).
    tokenizer: a `tokenizers.Tokenizer` from tokenizer.json, or None.
  """
  model: CausalLM
  params: dict
  config: CausalLMConfig
  hf_config: dict
  tokenizer: tokenizers.Tokenizer | None


_JSON_TYPES = {list: 'an array', str: 'a string', int: 'a number', float: 'a number',
               bool: 'a boolean', type(None): 'null'}


def read_json(file) -> dict:
  """The JSON object in `file`.

  Raises:
    UserError: naming the file, when it is not UTF-8 JSON (a truncated
      download, a hand edit) or holds something other than an object.
  """
  file = pathlib.Path(file)
  try:
    with open(file, encoding='utf-8') as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f'{file} is not valid JSON ({e}); it may be truncated or hand-edited: fix '
                    'it or copy it again from the original checkpoint') from None
  if not isinstance(value, dict):
    raise UserError(f'{file} holds {_JSON_TYPES.get(type(value), type(value).__name__)}, not a '
                    'JSON object ({...}); replace it with the checkpoint\'s own file')
  return value


@contextlib.contextmanager
def open_safetensors(file) -> Iterator[Any]:
  """`safetensors.safe_open(file, 'np')`, with an unreadable file one `UserError` naming it.

  safetensors checks the header and that the data covers every tensor when it
  opens a file, so a truncated or empty file fails here, not mid-read.
  """
  try:
    opened = safetensors.safe_open(file, 'np')
  except safetensors.SafetensorError as e:
    size = os.path.getsize(file) if os.path.isfile(file) else 0
    raise UserError(f'{file} ({size} bytes) is not a readable safetensors file ({e}); it is '
                    'probably truncated or empty (an interrupted download or copy): copy it '
                    'again from the original checkpoint') from None
  with opened as f:
    yield f


def read_config(path) -> dict:
  """config.json of the folder `path` as a dict."""
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise FileNotFoundError(f'{folder} is not a folder; pass a Hugging Face checkpoint folder')
  file = folder / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f'{folder} has no {CONFIG_FILE}; a Hugging Face checkpoint folder '
                            'needs one next to its safetensors files')
  return read_json(file)


def weight_map(path) -> dict[str, str]:
  """Checkpoint tensor name -> safetensors file name, from the index file or the single file."""
  folder = pathlib.Path(path)
  index = folder / INDEX_FILE
  if index.is_file():
    names = read_json(index).get('weight_map')
    if not isinstance(names, dict):
      raise UserError(f'{index} has no "weight_map" object mapping tensor names to files; '
                      'regenerate the index')
    for shard in sorted(set(names.values()), key=str):
      if not isinstance(shard, str) or pathlib.PurePath(shard).name != shard or \
          shard in ('.', '..'):
        raise UserError(f'{index} maps tensors to {shard!r}, which is not a file name in the '
                        'folder; every shard must sit beside the index (no directories, no '
                        '"..")')
      if not (folder / shard).is_file():
        raise FileNotFoundError(f'{index} lists the shard {shard!r}, which is not in {folder}; '
                                'copy the missing shard or regenerate the index')
    return dict(names)
  single = folder / WEIGHTS_FILE
  if single.is_file():
    with open_safetensors(single) as f:
      return {name: WEIGHTS_FILE for name in f.keys()}
  hint = ''
  if list(folder.glob('*.bin')) or list(folder.glob('*.pt')):
    hint = '; it has PyTorch pickles, which lossland does not read: convert them to safetensors'
  raise FileNotFoundError(f'{folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE}{hint}')


def load_tokenizer(path, vocab_size: int | None = None) -> tokenizers.Tokenizer:
  """The `tokenizers.Tokenizer` of tokenizer.json (`path` is the file or its folder).

  Raises:
    FileNotFoundError: without tokenizer.json.
    UserError: when the file is not a valid tokenizer.json, or the tokenizer
      has ids `vocab_size` or above (it belongs to another model). A model
      vocabulary padded beyond the tokenizer's, as OLMo-2's and Qwen2's are,
      is fine.
  """
  file = pathlib.Path(path)
  if file.is_dir():
    file = file / TOKENIZER_FILE
  if not file.is_file():
    raise FileNotFoundError(f'{file} does not exist; lossland reads tokenizers from '
                            f'{TOKENIZER_FILE} (pass tokenizer=False to load without one)')
  try:
    tok = tokenizers.Tokenizer.from_file(str(file))
  except Exception as e:  # tokenizers raises a bare Exception
    read_json(file)  # invalid JSON: that error, naming the file
    raise UserError(f'{file} is JSON but not a tokenizers tokenizer ({e}); copy the '
                    "checkpoint's own tokenizer.json, or pass tokenizer=False") from None
  if vocab_size is not None:
    top = max(tok.get_vocab(with_added_tokens=True).values())
    if top >= vocab_size:
      raise UserError(f'{file} has token ids up to {top}, but the model has vocab_size='
                      f'{vocab_size} ({CONFIG_FILE}); the tokenizer belongs to another model')
  return tok


def _leaves(tree) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, Source))[0]
  return {path_name(path): leaf for path, leaf in flat}


def _gpt2_prefix(names: Mapping[str, str]) -> str:
  return '' if 'wte.weight' in names and 'transformer.wte.weight' not in names else 'transformer.'


def _check_names(wanted: Mapping[str, Source], names: Mapping[str, str], config: CausalLMConfig,
                 model_type: str, folder) -> None:
  needed = {src.name for src in wanted.values()}
  missing = sorted(needed - set(names))
  if missing:
    raise UserError(f'{folder}: the {model_type} checkpoint lacks {len(missing)} tensor(s) that '
                    f'{CONFIG_FILE} implies, e.g. {missing[:4]}')
  spare = {n for n in names if n not in needed and not n.endswith(IGNORED_SUFFIXES)}
  head = head_name(model_type)
  if config.tie_embeddings and head in spare:
    _check_stored_head_is_the_embedding(folder, names, wanted, head)
    spare.discard(head)  # a copy of the embedding when the head is tied
  if spare:
    raise UserError(f'{folder}: tensors {sorted(spare)[:4]} ({len(spare)} in all) have no place '
                    f'in a {model_type} model as lossland implements it; they belong to a '
                    'feature it does not support')


def _check_stored_head_is_the_embedding(folder, names: Mapping[str, str],
                                        wanted: Mapping[str, Source], head_tensor: str,
                                        rows: int = 4096) -> None:
  """A tied config with its own head tensor: fine when it is the embedding, else an error.

  Compared `rows` rows at a time, so a large vocabulary never holds both whole.
  """
  embedding = next(src.name for key, src in wanted.items()
                   if key.split('/')[-2:] == ['embed', 'embedding'])
  with open_safetensors(pathlib.Path(folder) / names[head_tensor]) as h, \
      open_safetensors(pathlib.Path(folder) / names[embedding]) as e:
    head, embed = h.get_slice(head_tensor), e.get_slice(embedding)
    if tuple(head.get_shape()) != tuple(embed.get_shape()):
      same = False
    else:
      total = head.get_shape()[0]
      same = all(np.array_equal(head[start:min(start + rows, total)],
                                embed[start:min(start + rows, total)])
                 for start in range(0, total, rows))
  if not same:
    raise UserError(f'{folder}: {CONFIG_FILE} sets tie_word_embeddings, so the output head is '
                    f'the embedding {embedding!r}, but the folder also stores an {head_tensor} '
                    'that differs from it. Set "tie_word_embeddings": false to use the stored '
                    f'head (transformers would ignore it), or remove {head_tensor}')


def _check_shards(files: Mapping[str, Any], needed: set[str], names: Mapping[str, str],
                  folder: pathlib.Path) -> None:
  """Each needed tensor is in the file the weight map names (an index can send it elsewhere)."""
  keys = {file: set(f.keys()) for file, f in files.items()}
  for name in sorted(needed):
    if name in keys[names[name]]:
      continue
    holders = []
    for shard in sorted(set(names.values())):
      with open_safetensors(folder / shard) as f:
        if name in f.keys():
          holders.append(shard)
    where = (f'it is in {holders[0]!r}: point its weight_map entry there' if holders else
             'no shard of the folder has it: copy the shard that does')
    raise UserError(f'{folder / INDEX_FILE}: weight_map puts tensor {name!r} in '
                    f'{names[name]!r}, which does not contain it; {where} (or regenerate the '
                    'index)')


def _read(tensor, source: Source, index: tuple[slice, ...], shape: tuple[int, ...],
          dtype) -> np.ndarray:
  """`param[index]` from the checkpoint tensor (a safetensors slice), cast to `dtype`."""
  return np.ascontiguousarray(source.read(tensor, index, shape), dtype=dtype)


def place_params(wanted: Mapping[str, Source], tensors: Mapping[str, Callable[[], Any]],
                 abstract: Mapping[str, jax.ShapeDtypeStruct], *, mesh: Mesh | None = None,
                 param_rules: Sequence[tuple[str, PartitionSpec]] = ()) -> dict:
  """The {'params': tree} of checkpoint tensors, each param created as `abstract` says.

  Args:
    wanted: flat param path ('params/block_0/mlp/up/kernel') -> its `Source`.
    tensors: the same keys -> a function returning the checkpoint tensor in
      Hugging Face layout: anything sliced by a tuple of slices (a safetensors
      slice, a numpy array). Each is called once, when its param is placed, and
      its result dropped after, so at most one whole tensor is held at a time.
    abstract: the same keys -> the param's shape and dtype.
    mesh: place each param in the sharding `param_shardings(abstract, mesh,
      param_rules)` gives it, reading only the slices this process's devices
      hold; None puts whole params on the default device.
    param_rules: see `load`.
  """
  shardings = None if mesh is None else param_shardings(abstract, mesh, param_rules)
  leaves = {}
  for key, src in wanted.items():
    a = abstract[key]
    read = functools.partial(_read, tensors[key](), src, shape=a.shape, dtype=a.dtype)
    if shardings is None:
      leaves[key] = jnp.asarray(read(tuple(slice(None) for _ in a.shape)))
    else:  # `read` is called with the index of each of this process's devices' shards
      leaves[key] = jax.make_array_from_callback(a.shape, shardings[key], read)
  return _unflatten(leaves)


def load(path, *, mesh: Mesh | None = None,
         param_rules: Sequence[tuple[str, PartitionSpec]] = (), dtype=None,
         tokenizer: bool | None = None) -> Checkpoint:
  """Reads a Hugging Face checkpoint folder into a `CausalLM` and its params.

  Args:
    path: the folder.
    mesh: place each param on this mesh, reading only the slices each of this
      process's devices holds; None puts whole params on the default device.
    param_rules: (regex over 'params/block_0/mlp/up/kernel'-style paths,
      PartitionSpec) pairs for `lossland.parallel.param_shardings`; params no
      rule matches are replicated. Needs `mesh`.
    dtype: the params' dtype (e.g. jnp.float32 for analysis); None keeps each
      tensor's stored dtype, which `save` then writes back unchanged.
    tokenizer: True requires tokenizer.json, False skips it, None loads it
      when present.

  Returns:
    A `Checkpoint`.

  Raises:
    FileNotFoundError: no config.json, no weights, an index naming a missing
      shard, or (tokenizer=True) no tokenizer.json.
    UserError: (a ValueError) a malformed file (invalid JSON, a truncated
      safetensors file, an index sending a tensor to a shard without it), an
      unsupported or invalid model_type or config key, a tensor that is
      missing, unexpected, of another shape, or of a dtype other than F32,
      BF16 or F16, or a tokenizer with ids beyond vocab_size.
  """
  folder = pathlib.Path(path)
  hf_config = read_config(folder)
  try:
    config = from_hf_config(hf_config)
  except UserError as e:  # hf_config's messages start with 'config.json': name the whole path
    message = str(e).removeprefix(CONFIG_FILE)
    raise UserError(f'{folder / CONFIG_FILE}{message}') from None
  model_type = hf_config['model_type']
  names = weight_map(folder)
  wanted = _leaves(sources(config, model_type, _gpt2_prefix(names)))
  _check_names(wanted, names, config, model_type, folder)
  if param_rules and mesh is None:
    raise ValueError('param_rules need a mesh; pass mesh= or drop param_rules')
  model = CausalLM(config)
  shapes = _leaves(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  with contextlib.ExitStack() as stack:
    files = {f: stack.enter_context(open_safetensors(folder / f))
             for f in sorted({names[src.name] for src in wanted.values()})}
    _check_shards(files, {src.name for src in wanted.values()}, names, folder)
    tensors, abstract = {}, {}
    for key, src in wanted.items():
      tensor = files[names[src.name]].get_slice(src.name)
      stored = tensor.get_dtype()
      if stored not in DTYPES:
        raise UserError(f'{folder}: tensor {src.name!r} has dtype {stored}; lossland reads '
                        f'{tuple(DTYPES)} (convert the checkpoint to one of them)')
      shape = tuple(shapes[key].shape)
      if tuple(tensor.get_shape()) != src.hf_shape(shape):
        raise UserError(f'{folder}: tensor {src.name!r} has shape {tuple(tensor.get_shape())}, '
                        f'but {CONFIG_FILE} implies {src.hf_shape(shape)}')
      tensors[key] = functools.partial(files[names[src.name]].get_slice, src.name)
      abstract[key] = jax.ShapeDtypeStruct(shape, DTYPES[stored] if dtype is None else dtype)
    params = place_params(wanted, tensors, abstract, mesh=mesh, param_rules=param_rules)
  tok = None
  if tokenizer or (tokenizer is None and (folder / TOKENIZER_FILE).is_file()):
    tok = load_tokenizer(folder, config.vocab_size)
  return Checkpoint(model, params, config, hf_config, tok)


def _unflatten(leaves: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for key, value in leaves.items():
    node = tree
    *parents, last = key.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = value
  return tree


def _host(name: str, x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    raise ValueError(f'param {name!r} spans several processes; gather it to one process (e.g. '
                     'jax.experimental.multihost_utils.process_allgather) before saving')
  arr = np.asarray(jax.device_get(x))
  if arr.dtype not in DTYPE_NAMES:
    raise ValueError(f'param {name!r} has dtype {arr.dtype}; Hugging Face folders hold '
                     f'{tuple(DTYPE_NAMES.values())}: cast the params first')
  return arr


def state_dict(params, config: CausalLMConfig, model_type: str) -> dict[str, np.ndarray]:
  """The Hugging Face state dict (name -> host array) of lossland `params`."""
  if 'params' not in params:
    params = {'params': params}
  wanted = _leaves(sources(config, model_type))
  given = _leaves(params)
  missing, spare = sorted(set(wanted) - set(given)), sorted(set(given) - set(wanted))
  if missing or spare:
    raise ValueError(f'params do not have the layout of CausalLM({config}): missing {missing[:4]}, '
                     f'unexpected {spare[:4]}; params of other layers (e.g. low-rank factors) '
                     'must be merged into dense kernels first')
  parts: dict[str, list] = {}
  for key, src in wanted.items():
    parts.setdefault(src.name, []).append((src, _host(key, given[key])))
  return {name: np.ascontiguousarray(assemble(p)) for name, p in parts.items()}


def _save_shard(tensors: Mapping[str, np.ndarray], file: pathlib.Path, metadata) -> None:
  """One safetensors file, with the mode every other file of the folder gets (0666 & ~umask).

  safetensors writes owner-only files (0600), which a shared model folder cannot be read from.
  """
  safetensors.numpy.save_file(dict(tensors), file, metadata=metadata)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(file, 0o666 & ~umask)


def _write_weights(folder: pathlib.Path, tensors: Mapping[str, np.ndarray],
                   max_shard_bytes: int) -> None:
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += tensors[name].nbytes
  metadata = {'format': 'pt'}  # what transformers expects of torch-layout safetensors
  if len(shards) == 1:
    _save_shard(shards[0], folder / WEIGHTS_FILE, metadata)
    return
  index = {'metadata': {'total_size': sum(t.nbytes for t in tensors.values())}, 'weight_map': {}}
  for i, shard in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    _save_shard(shard, folder / file, metadata)
    index['weight_map'].update({name: file for name in shard})
  with open(folder / INDEX_FILE, 'w') as f:
    json.dump(index, f, indent=2, sort_keys=True)


def save(path, params, config: CausalLMConfig, *, base_config: Mapping[str, Any] | None = None,
         tokenizer_from=None, max_shard_bytes: int = 4 * 2**30,
         overwrite: bool = False) -> pathlib.Path:
  """Writes `params` of `CausalLM(config)` as a Hugging Face folder; returns its path.

  The folder is written whole: into a temporary sibling that replaces `path`
  only once every file is complete, so an error or a kill midway leaves `path`
  as it was (absent, or the old folder). Files already in `path` other than
  its weights are kept unless `save` writes a file of the same name.

  Args:
    path: the folder (created if needed; an existing one is replaced).
    params: {'params': tree} (or the tree) of arrays, each float32, bfloat16 or
      float16; written in its own dtype.
    config: the architecture.
    base_config: the imported config.json (`Checkpoint.hf_config`): its
      model_type and other keys are kept, the architecture keys rewritten. None
      writes a fresh config (`hf_config.to_hf_config`).
    tokenizer_from: a folder whose tokenizer files (`TOKENIZER_FILES`) are copied.
    max_shard_bytes: above this total size the weights are split into shards
      with an index file, each at most this size (or one tensor).
    overwrite: replace safetensors weights already in `path`; otherwise they
      are an error.
  """
  folder = pathlib.Path(path)
  if folder.is_symlink() and folder.is_dir():
    folder = folder.resolve()  # replace the folder it points to, keep the link
  if os.path.lexists(folder) and not folder.is_dir():
    raise FileExistsError(f'{folder} exists and is not a folder; choose another path')
  if tokenizer_from is not None and not (pathlib.Path(tokenizer_from) / TOKENIZER_FILE).is_file():
    raise FileNotFoundError(f'tokenizer_from={str(tokenizer_from)!r} has no {TOKENIZER_FILE}; '
                            'nothing was written')  # checked before anything is written
  old = (sorted(folder.glob('*.safetensors')) + sorted(folder.glob(INDEX_FILE))
         if folder.is_dir() else [])
  if old and not overwrite:
    raise FileExistsError(f'{folder} already holds weights ({old[0].name}); choose an empty '
                          'folder or pass overwrite=True')
  model_type = (base_config or {}).get('model_type') or infer_model_type(config)
  to_hf_config(config, base=base_config)  # a config the family cannot express fails first
  tensors = state_dict(params, config, model_type)
  embedding = tensors[sources(config, model_type)['params']['embed']['embedding'].name]
  hf_config = to_hf_config(config, base=base_config, dtype=DTYPE_NAMES[embedding.dtype])
  stale_weights = {file.name for file in old}
  with written_whole(folder, keep=lambda name: name not in stale_weights) as tmp:
    _write_weights(tmp, tensors, max_shard_bytes)
    with open(tmp / CONFIG_FILE, 'w') as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    if tokenizer_from is not None:
      source = pathlib.Path(tokenizer_from)
      for name in TOKENIZER_FILES:
        if (source / name).is_file():
          shutil.copyfile(source / name, tmp / name)
  return pathlib.Path(path)
