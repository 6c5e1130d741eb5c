"""torch state dicts (diffusers and transformers safetensors) onto linen params trees, by name.

lossland's Stable Diffusion modules (`lossland.models.sd_unet`, `sd_vae`,
`clip_text`) name their submodules as the torch modules are named, with a
`ModuleList` index `.0` written as the suffix `_0` (`down_blocks_1` is
`down_blocks.1`, `to_out_0` is `to_out.0`). So the torch name of every linen
leaf follows from its path; `torch_names` lists the candidates (a segment such
as `linear_1` may also be a torch name as it is) and the state dict decides.

Layouts:

- Dense kernels are `[in, out]`, `torch.nn.Linear` weights `[out, in]`.
- Conv kernels are `[kh, kw, in, out]`, `torch.nn.Conv2d` weights `[out, in, kh, kw]`
  (a 1x1 Conv2d may also feed a Dense kernel, as SD 1.x's proj_in does not but
  some conversions do).
- GroupNorm/LayerNorm `scale` is torch's `weight`; Embed's `embedding` is its `weight`.
- Everything else (biases, position tables stored as params) is copied as it is.
"""
from __future__ import annotations

import itertools
import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import safetensors.numpy

_INDEX = re.compile(r'^(.*)_(\d+)$')
_RENAMED = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}


def weights_file(folder: str | os.PathLike, stem: str) -> str:
  """`stem`.safetensors in `folder`, else `stem`.fp16.safetensors (diffusers' fp16 variant)."""
  folder = os.fspath(folder)
  for name in (f'{stem}.safetensors', f'{stem}.fp16.safetensors'):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  have = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  hint = ('; it has PyTorch pickles, which lossland does not read: save the model with '
          'safe_serialization=True' if any(f.endswith(('.bin', '.pt', '.ckpt')) for f in have)
          else '')
  raise FileNotFoundError(f'{folder} has neither {stem}.safetensors nor {stem}.fp16.safetensors'
                          f' (it has {have}){hint}')


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file as numpy arrays (float16/bfloat16 stay as stored)."""
  try:
    return dict(safetensors.numpy.load_file(os.fspath(path)))
  except (TypeError, ValueError) as e:  # e.g. float8 or an integer dtype numpy lacks
    raise ValueError(f'cannot read {path} as numpy arrays ({e}); save it in float32, float16 '
                     'or bfloat16') from e


def torch_names(path: Sequence[str]) -> list[str]:
  """Candidate torch names (dotted, leaf renamed) of a linen leaf at `path`, most likely first."""
  *modules, leaf = path
  options = []
  for seg in modules:
    m = _INDEX.match(seg)
    options.append([f'{m.group(1)}.{m.group(2)}', seg] if m else [seg])
  leaf = _RENAMED.get(leaf, leaf)
  return ['.'.join(list(choice) + [leaf]) for choice in itertools.product(*options)]


def _convert(tensor: np.ndarray, leaf: str, shape: tuple[int, ...]) -> np.ndarray:
  if leaf == 'kernel' and tensor.ndim == 4 and len(shape) == 4:
    tensor = tensor.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
  elif leaf == 'kernel' and tensor.ndim == 4 and len(shape) == 2:
    tensor = tensor[:, :, 0, 0].T  # a 1x1 Conv2d as a Dense kernel
  elif leaf == 'kernel' and tensor.ndim == 2:
    tensor = tensor.T
  return tensor


def params_from_state_dict(shapes: Any, state: Mapping[str, np.ndarray], *, prefix: str = '',
                           ignore: Sequence[str] = (), what: str = 'model') -> Any:
  """The params tree shaped like `shapes` (e.g. `jax.eval_shape(module.init, ...)['params']`).

  Each leaf is read from `state` under `prefix` + its torch name. Raises one
  ValueError listing every leaf with no tensor (with the candidate names),
  every tensor of the wrong shape, and every tensor no leaf used, except
  names matching a regex in `ignore` (buffers such as CLIP's `position_ids`).
  """
  used, missing, mismatched = set(), [], []

  def read(keypath, leaf):
    path = [getattr(k, 'key', str(k)) for k in keypath]
    candidates = [prefix + n for n in torch_names(path)]
    name = next((n for n in candidates if n in state), None)
    if name is None:
      missing.append(f'{"/".join(path)} (as {candidates[0]})')
      return None
    used.add(name)
    tensor = _convert(np.asarray(state[name]), path[-1], tuple(leaf.shape))
    if tuple(tensor.shape) != tuple(leaf.shape):
      mismatched.append(f'{name} {tuple(state[name].shape)} for {"/".join(path)} '
                        f'{tuple(leaf.shape)}')
    return tensor

  params = jax.tree_util.tree_map_with_path(read, shapes)
  unused = sorted(n for n in state if n not in used
                  and not any(re.search(p, n) for p in ignore))
  problems = [f'{len(found)} {kind}: {found[:8]}' + (' ...' if len(found) > 8 else '')
              for kind, found in (('params have no tensor', missing),
                                  ('tensors have another shape', mismatched),
                                  ('tensors are not used', unused)) if found]
  if problems:
    raise ValueError(f'the {what} checkpoint does not match its config: ' + '; '.join(problems))
  return params
