"""Finding, capturing and replacing layers of Flax linen models at their module calls.

The module taps of `lossland.taps` (which chooses them for linen models), so
every method works on a user's own linen code and on imported checkpoints
without editing them.
Everything rests on `nn.intercept_methods`: a handler sees each selected
module's `__call__`, with its canonical path, its call number and its
arguments.

Paths. A module's path is `Module.path` joined with '/', e.g.
'block_0/mlp/gate' or 'Dense_1' for auto-named submodules; it is also where
the module's parameters live under `variables['params']`
(`lossland.parallel.path_name` spells a pytree key path the same way).

Selection. `select` is None (every layer of the given types), a regex that
must match the whole path, a list of paths, or a callable `path -> bool`;
`types` is a tuple of module classes (default `LINEAR_TYPES`: Dense,
DenseGeneral, Einsum, Conv) or None for every module.

Layers called more than once. A layer applied several times in one forward
pass (a shared layer, a loop over it, tied weights) yields one record per
call, numbered 0, 1, ... in the order the calls execute; every call is a
sample. `join_calls` concatenates a layer's records along the leading axis in
that order. Modules inside `nn.scan` or `nn.remat` bodies are traced in a
nested transform and cannot be tapped this way: `lossland.taps` taps such
models in their traced program (`lossland.taps.program`) instead.

Attention probabilities. A linen model usually computes them inline
(`jax.nn.softmax(logits)`), where no tap can see them. A model that computes
them with `AttentionWeights` exposes them as a layer output:
`capture(..., types=(AttentionWeights,))` records them, one record per call
(`lossland.guidance` reads cross-attention maps this way).

All functions are jit-safe; `select`, `types` and the keyword arguments of the
model are static.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv)

Selector = None | str | Sequence[str] | Callable[[str], bool]


def module_path(module: nn.Module) -> str:
  """'/'-joined path of a bound module, e.g. 'block_0/mlp/gate'."""
  return '/'.join(str(p) for p in module.path)


def make_selector(select: Selector) -> Callable[[str], bool]:
  """`select` (None, regex, list of paths, or `path -> bool`) as a predicate on paths."""
  if select is None:
    return lambda path: True
  if isinstance(select, str):
    regex = re.compile(select)
    return lambda path: regex.fullmatch(path) is not None
  if callable(select):
    return select
  paths = frozenset(select)
  return lambda path: path in paths


@dataclasses.dataclass(frozen=True)
class Call:
  """One call of a selected layer: its path, call number and the bound module."""
  path: str
  index: int  # 0 for the first call of this path in this forward pass, then 1, 2, ...
  module: nn.Module


Handler = Callable[[Call, Callable[..., Any], tuple, dict], Any]


@contextlib.contextmanager
def intercept(handler: Handler, *, select: Selector = None,
              types: tuple[type[nn.Module], ...] | None = LINEAR_TYPES) -> Iterator[None]:
  """Routes every `__call__` of a selected module through `handler(call, next_fun, args, kwargs)`.

  The handler returns the module's output; `next_fun(*args, **kwargs)` runs the
  module itself. Call numbers restart with each `with` block.
  """
  chosen = make_selector(select)
  counts: dict[str, int] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or (types is not None and not isinstance(module, types)):
      return next_fun(*args, **kwargs)
    path = module_path(module)
    if not path or not chosen(path):  # the root module has the empty path
      return next_fun(*args, **kwargs)
    index = counts.get(path, 0)
    counts[path] = index + 1
    return handler(Call(path, index, module), next_fun, args, kwargs)

  with nn.intercept_methods(interceptor):
    yield


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """A layer found in a forward pass; shapes are those of its first call."""
  path: str
  kind: str  # the module's class name, e.g. 'Dense'
  calls: int
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  dtype: Any  # of the output (None when it holds no array)


def first_array(value) -> jax.Array:
  """`value` itself, or the first array leaf of a tuple/dict output such as `(hidden, cache)`."""
  leaves = jax.tree.leaves(value)
  if not leaves:
    raise ValueError(f'a module returned {value!r}, which holds no array')
  return jnp.asarray(leaves[0])


def find_layers(apply_fn: Callable, variables, *args, select: Selector = None,
                types: tuple[type[nn.Module], ...] | None = LINEAR_TYPES,
                **apply_kwargs) -> dict[str, LayerInfo]:
  """The selected layers that `apply_fn(variables, *args, **apply_kwargs)` calls, in call order.

  Runs under `jax.eval_shape`: nothing is computed. Raises a ValueError listing
  every layer of the given types when the selection matches none of them.
  """
  every: dict[str, str] = {}
  found: dict[str, LayerInfo] = {}

  def record_all(call, next_fun, args, kwargs):
    every.setdefault(call.path, type(call.module).__name__)
    return next_fun(*args, **kwargs)

  def record(call, next_fun, args, kwargs):
    out = next_fun(*args, **kwargs)
    if call.path in found:
      found[call.path] = dataclasses.replace(found[call.path], calls=call.index + 1)
    else:
      x = jax.tree.leaves(first_input(args, kwargs)) if args or kwargs else []
      y = jax.tree.leaves(out)  # the first array of a tuple output such as (hidden, cache)
      found[call.path] = LayerInfo(call.path, type(call.module).__name__, 1,
                                   tuple(jnp.shape(x[0])) if x else (),
                                   tuple(jnp.shape(y[0])) if y else (),
                                   jnp.result_type(y[0]) if y else None)
    return out

  def run():
    with intercept(record_all, types=types), intercept(record, select=select, types=types):
      apply_fn(variables, *args, **apply_kwargs)

  jax.eval_shape(run)
  if not found:
    kinds = 'modules' if types is None else '/'.join(t.__name__ for t in types) + ' layers'
    raise ValueError(f'the selection {select!r} matches none of the model\'s {kinds}: '
                     f'{sorted(every)}. Change the selection (a regex must match the whole path).')
  return found


class AttentionWeights(nn.Module):
  """Attention probabilities softmax_k(logits) over the last axis, as a layer taps can capture.

  `mask` (broadcastable to `logits`, True = attend) sets masked logits to the
  dtype's minimum first, so masked keys get probability 0 (exactly 0 once any
  key is unmasked). The output has the logits' shape, e.g. [batch, heads,
  queries, keys]. No parameters: adding it to a model leaves its params tree
  unchanged.
  """

  @nn.compact
  def __call__(self, logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    return jax.nn.softmax(logits, axis=-1)


class Captured(NamedTuple):
  """What a forward pass recorded: path -> one array per call, in call order."""
  inputs: dict[str, tuple[jax.Array, ...]]
  outputs: dict[str, tuple[jax.Array, ...]]


def join_calls(records: Sequence[jax.Array]) -> jax.Array:
  """A layer's per-call records concatenated along the leading (sample) axis, in call order."""
  return records[0] if len(records) == 1 else jnp.concatenate(records, axis=0)


def first_input(args: tuple, kwargs: Mapping[str, Any]):
  """A layer's input: its first positional argument, or its first keyword argument
  (`nn.Dense(8)(inputs=x)`)."""
  if args:
    return args[0]
  if kwargs:
    return next(iter(kwargs.values()))
  raise ValueError('a layer was called without arguments; taps record a layer\'s first input')


def _append(store: dict, path: str, value) -> None:
  store[path] = store.get(path, ()) + (value,)


def capture(apply_fn: Callable, variables, *args, select: Selector = None,
            types: tuple[type[nn.Module], ...] | None = LINEAR_TYPES,
            perturbations: Mapping[str, Sequence[jax.Array]] | None = None,
            **apply_kwargs) -> tuple[Any, Captured]:
  """Runs the model, recording each selected layer's first positional input and its output.

  Args:
    apply_fn: `(variables, *args, **apply_kwargs) -> outputs`, e.g. `model.apply`.
    variables: the model's variables.
    *args: model inputs.
    select, types: which layers (see the module docstring).
    perturbations: optional path -> one array per call, added to that call's
      output before the model continues (zeros, so that the gradient with
      respect to them is ∂L/∂output; see `output_gradients`). The recorded
      output is the perturbed one.
    **apply_kwargs: passed to `apply_fn` (e.g. `train=False`, `rngs=...`).

  Returns:
    (model outputs, Captured).
  """
  inputs: dict[str, tuple] = {}
  outputs: dict[str, tuple] = {}

  def record(call, next_fun, args, kwargs):
    out = next_fun(*args, **kwargs)
    if perturbations is not None and call.path in perturbations:
      out = out + perturbations[call.path][call.index].astype(out.dtype)
    _append(inputs, call.path, first_input(args, kwargs))
    _append(outputs, call.path, out)
    return out

  with intercept(record, select=select, types=types):
    result = apply_fn(variables, *args, **apply_kwargs)
  return result, Captured(inputs, outputs)


def replace_outputs(apply_fn: Callable, variables, *args,
                    replace: Callable[[Call, jax.Array], jax.Array], select: Selector = None,
                    types: tuple[type[nn.Module], ...] | None = LINEAR_TYPES, **apply_kwargs):
  """Runs the model with each selected call's output `y` replaced by `replace(call, y)`."""
  def handler(call, next_fun, args, kwargs):
    return replace(call, next_fun(*args, **kwargs))

  with intercept(handler, select=select, types=types):
    return apply_fn(variables, *args, **apply_kwargs)


@contextlib.contextmanager
def swap_layers(make_layer: Callable[[Call], nn.Module | None], *, select: Selector = None,
                types: tuple[type[nn.Module], ...] | None = LINEAR_TYPES) -> Iterator[None]:
  """Inside the block, each selected layer runs as `make_layer(call)` instead (None keeps it).

  The replacement shares the original layer's scope (`nn.share_scope`), so its
  parameters live at the original path, e.g. `params['block_0']['mlp']['up']
  ['lowrank_a']` for a factorized 'block_0/mlp/up'. Use it around both
  `model.init` and `model.apply`; the model's code is not touched.
  """
  def handler(call, next_fun, args, kwargs):
    layer = make_layer(call)
    if layer is None:
      return next_fun(*args, **kwargs)
    layer = layer.clone(parent=call.module, name='swapped')
    nn.share_scope(call.module, layer)
    return layer(*args, **kwargs)

  with intercept(handler, select=select, types=types):
    yield


def layer_params(variables, path: str) -> Mapping[str, Any]:
  """The parameter dict of the layer at `path` (from `variables['params']` or a bare params tree)."""
  node = variables['params'] if isinstance(variables, Mapping) and 'params' in variables \
      else variables
  for part in path.split('/'):
    if not isinstance(node, Mapping) or part not in node:
      raise ValueError(f'no parameters at {path!r} (missing {part!r}); the top level has '
                       f'{sorted(node) if isinstance(node, Mapping) else type(node).__name__}')
    node = node[part]
  return node
