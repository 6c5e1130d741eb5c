"""Where a model's cross-attention probabilities come from: `lossland.taps`, or sown values.

Attention guidance (Attend-and-Excite, Chefer et al. 2023, sec. 3.1; A-STAR,
Agarwal et al. ICCV 2023, sec. 3) reads the cross-attention probabilities
[batch, heads, queries, tokens] of every cross-attention layer. An
`AttentionSource` says how to get them from a linen model without editing it:

* `AttentionSource()` (the default): the outputs of the model's
  `taps.AttentionWeights` layers, captured with `lossland.taps` (lossland's
  `TextUNet` computes its probabilities there, at '<block>/probs'). `select`
  (a regex over module paths, a list of paths or a callable, as in taps)
  narrows them, e.g. to the cross-attention of a model that also has
  self-attention; `types` names other module classes whose output is the
  probabilities.
* `AttentionSource(sown=NAME)`: for models that `sow` their probabilities into
  the `intermediates` collection (lossland's `TextUNet` sows 'cross_attention';
  flax's `MultiHeadDotProductAttention(sow_weights=True)` sows
  'attention_weights').

NNX models (a module, or its graphdef with the state as params) are read the
NNX way: their attention sows the probabilities as `nnx.Intermediate`
(`nnx.MultiHeadAttention(...)(x, context, sow_weights=True)` sows
'attention_weights'), and `AttentionSource(sown=NAME)` reads them from the
module after the call; stale values from an earlier eager call are dropped
first.

Layers called more than once (taps' policy): every call is one map, layers in
the order of their first call and each layer's calls in call order; every
call weighs the same in the average over layers (`maps.average_maps`). Sown
values: every sown value is one map, in the flattened order of
`intermediates` (module names sorted).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
from flax import nnx

from lossland import taps


@dataclasses.dataclass(frozen=True)
class AttentionSource:
  """How to read cross-attention probabilities from a model (hashable: a jit static).

  Attributes:
    types: module classes whose `__call__` output is [batch, heads, queries,
      tokens] probabilities (default: `taps.AttentionWeights`).
    select: which of those modules (a taps selector; a list is kept as a tuple).
    sown: read the `intermediates` values sown under this name instead of
      tapping modules (`types` and `select` are then unused).
  """
  types: tuple[type[nn.Module], ...] = (taps.AttentionWeights,)
  select: taps.Selector = None
  sown: str | None = None

  def __post_init__(self):
    if isinstance(self.select, list):
      object.__setattr__(self, 'select', tuple(self.select))
    types = self.types if isinstance(self.types, tuple) else (self.types,)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
      raise TypeError(f'AttentionSource.types must be linen Module classes, got {self.types!r}')
    object.__setattr__(self, 'types', types)
    if self.sown is not None and not (isinstance(self.sown, str) and self.sown):
      raise TypeError(f'AttentionSource.sown must be a sown name (e.g. "cross_attention"), got '
                      f'{self.sown!r}')

  def describe(self) -> str:
    if self.sown is not None:
      return f'values sown into intermediates as {self.sown!r}'
    kinds = '/'.join(t.__name__ for t in self.types)
    return f'outputs of {kinds} layers' + ('' if self.select is None
                                            else f' selected by {self.select!r}')


def _leaves_named(intermediates: Any, name: str) -> list[jax.Array]:
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    if name in [getattr(k, 'key', getattr(k, 'name', None)) for k in path]:
      found.append(leaf)
  return found


def _nnx_graphdef(apply_fn) -> nnx.GraphDef | None:
  if isinstance(apply_fn, nnx.Module):
    return nnx.split(apply_fn)[0]
  return apply_fn if isinstance(apply_fn, nnx.GraphDef) else None


def _no_records(source: AttentionSource, nnx_model: bool) -> ValueError:
  if nnx_model:
    return ValueError(f'the NNX model produced no cross-attention probabilities as '
                      f'{source.describe()}; call its attention with sow_weights=True (or sow '
                      'them as nnx.Intermediate) and name them with AttentionSource(sown=NAME)')
  hint = ("AttentionSource(sown='cross_attention') for a model that sows them"
          if source.sown is None else 'AttentionSource() for taps.AttentionWeights layers')
  return ValueError(f'the model produced no cross-attention probabilities as '
                    f'{source.describe()}; compute them with taps.AttentionWeights, select '
                    f'the modules whose output they are, or use {hint}')


def apply_with_attention(apply_fn: Callable, source: AttentionSource = AttentionSource(),
                         apply_kwargs: Mapping[str, Any] | None = None) -> Callable:
  """`f(params, *args) -> (apply_fn(params, *args, **apply_kwargs), [probs per layer call])`.

  `apply_fn` is a linen `apply` (or any function of params), or an NNX
  module or graphdef (then `params` is its state, e.g. `nnx.state(model)`).
  Jit-safe. Raises ValueError (at trace time) naming the source when the
  model produced no probabilities that way.
  """
  kwargs = dict(apply_kwargs or {})
  graphdef = _nnx_graphdef(apply_fn)
  if graphdef is not None and source.sown is None:
    raise ValueError('an NNX model gives its attention probabilities as sown values: call its '
                     'attention with sow_weights=True and pass '
                     "AttentionSource(sown='attention_weights')")

  def f(params, *args):
    if graphdef is not None:
      module = nnx.merge(graphdef, params)
      nnx.pop(module, nnx.Intermediate)  # values sown by an earlier eager call
      out = module(*args, **kwargs)
      records = _leaves_named(nnx.state(module, nnx.Intermediate), source.sown)
    elif source.sown is not None:
      out, state = apply_fn(params, *args, mutable=['intermediates'], **kwargs)
      records = _leaves_named(state.get('intermediates', {}), source.sown)
    else:
      out, captured = taps.capture(apply_fn, params, *args, select=source.select,
                                   types=source.types, **kwargs)
      records = [probs for calls in captured.outputs.values() for probs in calls]
    if not records:
      raise _no_records(source, graphdef is not None)
    return out, records

  return f
