"""Capture named layer activations of any JAX model, and splice a stitch into one.

Model stitching (Balogh & Jelasity, "How not to Stitch Representations to
Measure Similarity", AAAI 2025, Sec. 3) joins the front of model A, up to
layer i, to the back of model B, from layer j, through a stitching layer T:
`B_{>j}(T(A_{<=i}(x)))`. A "layer" here is any submodule of a linen model,
named by its '/'-joined module path (e.g. 'dense_2', 'block_1/mlp'); its
representation is the output of that submodule's `__call__` (the first
element when it returns a tuple, e.g. a transformer block's `(hidden,
cache)`). For an NNX module, a plain function, or linen layers inside
`nn.scan`, a layer is a matrix product of a parameter (with its bias), named
by the parameter's path (`lossland.taps`). Everything goes through
`lossland.taps`, so nothing is needed from the model. A layer called more
than once per forward pass contributes every call as samples, joined along
the leading axis in call order
(`taps.join_calls`); `replace_layer` replaces every call; stitching from or
into such a layer is refused, since its representation is not one array per
example.

Models. Every entry point takes the model as a linen `nn.Module` (its `apply`
is used), an NNX module (params None for its own state, or an `nnx.State`)
or an `apply_fn(variables, inputs, **apply_kwargs)`, plus `apply_kwargs`
(e.g. `{'train': False}` or `{'rngs': ...}`), the calling
convention of every lossland method.

Under `jax.jit`, the unused tail of A and head of B are dead code and are
removed by XLA, so a stitched forward costs one partial pass of each model.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, Union

import flax.linen as nn
import jax

from lossland import taps

Model = Union[nn.Module, Callable[..., Any]]


def apply_fn_of(model: Model) -> Callable[..., Any]:
  """`model.apply` for a linen module, `nnx.merge(graphdef, state)(...)` for an NNX module,
  `model` itself for an apply function (`lossland.taps.as_function`)."""
  return taps.as_function(model)[0]


def params_of(model: Model, params):
  """The params pytree: for an NNX module, its own state when `params` is None."""
  return taps.as_function(model, params)[1]


def model_name(model: Model) -> str:
  if isinstance(model, nn.Module):
    return type(model).__name__
  return getattr(model, '__qualname__', None) or type(model).__name__


def called_paths(model: Model, params, x: jax.Array, *, select: taps.Selector = None,
                 apply_kwargs: Mapping[str, Any] | None = None) -> list[str]:
  """The submodule paths chosen by `select` (a `taps` selector) that the model calls on `x`.

  In call order, each path once. Runs under `jax.eval_shape` (nothing is
  computed); any module counts, whatever its outputs (a block returning
  `(hidden, cache)` too).

  Raises:
    ValueError: `select` matches none of the called modules (the message lists them).
  """
  return list(taps.find_layers(apply_fn_of(model), params_of(model, params), x, select=select,
                               types=None,
                               **dict(apply_kwargs or {})))


def layer_names(model: Model, params, x: jax.Array, *,
                apply_kwargs: Mapping[str, Any] | None = None) -> list[str]:
  """Every submodule path called by the model on `x`, in call order.

  Runs `jax.eval_shape` once. Use it to discover the names that `capture` and
  `stitched_apply` accept.
  """
  return called_paths(model, params, x, apply_kwargs=apply_kwargs)


def _missing(requested: Sequence[str], found, model: Model, params, x, apply_kwargs) -> None:
  missing = [n for n in requested if n not in found]
  if missing:
    available = layer_names(model, params, x, apply_kwargs=apply_kwargs)
    raise KeyError(f'{model_name(model)} has no layer(s) {missing}; available layers: '
                   f'{available}')


def capture(model: Model, params, x: jax.Array, layers: Sequence[str],
            *, apply_kwargs: Mapping[str, Any] | None = None
            ) -> tuple[Any, dict[str, jax.Array]]:
  """Runs the model on `x` and returns (output, {layer: activation}).

  Jit-safe; `model` and `layers` must be static (closed over). The activation
  of a layer is the output of the submodule with that path (the first element
  of a tuple output); a layer called k times gives its k outputs joined along
  the leading axis.

  Raises:
    KeyError: a requested layer was never called; the message lists the available ones.
  """
  layers = list(layers)
  out, got = taps.capture(apply_fn_of(model), params_of(model, params), x, select=layers,
                          types=None,
                          **dict(apply_kwargs or {}))
  _missing(layers, got.outputs, model, params, x, apply_kwargs)
  return out, {name: taps.join_calls([taps.first_array(o) for o in got.outputs[name]]) for name in layers}


def _replacing(make_output):
  """`replace(call, y)` that swaps the representation of a tuple output, keeping the rest."""
  def replace(call, y):
    if isinstance(y, (tuple, list)):
      return type(y)((make_output(call, y[0]), *y[1:]))
    return make_output(call, y)
  return replace


def replace_layer(model: Model, params, x: jax.Array, layer: str,
                  make_output: Callable[[jax.Array], jax.Array],
                  *, apply_kwargs: Mapping[str, Any] | None = None) -> jax.Array:
  """Runs the model with each output of `layer` replaced by `make_output(original_output)`.

  The original output is passed only for its shape (under jit it is dead code
  unless `make_output` uses it). Jit-safe with `model`, `layer` static.

  Raises:
    KeyError: `layer` was never called; the message lists the available layers.
  """
  calls = []

  def make(call, y):
    calls.append(call)
    return make_output(y)

  out = taps.replace_outputs(apply_fn_of(model), params_of(model, params), x,
                             replace=_replacing(make), select=[layer], types=None,
                             **dict(apply_kwargs or {}))
  _missing([layer], {c.path for c in calls}, model, params, x, apply_kwargs)
  return out


def stitched_apply(model_a: Model, params_a, model_b: Model, params_b, x: jax.Array,
                   *, layer_a: str, layer_b: str, stitch: Callable[[jax.Array, Any], jax.Array],
                   apply_kwargs: Mapping[str, Any] | None = None,
                   apply_kwargs_b: Mapping[str, Any] | None = None) -> jax.Array:
  """`B_{>layer_b}(stitch(A_{<=layer_a}(x), target))`: the stitched network's output.

  Args:
    model_a, params_a: the front network (frozen: wrap params in stop_gradient
      if you differentiate through this).
    model_b, params_b: the back network.
    x: inputs [batch, ...].
    layer_a: source layer of A; layer_b: receiving layer of B, whose output is replaced.
    stitch: `(a_activation, target ShapeDtypeStruct) -> replacement activation`,
      e.g. `functools.partial(lossland.stitching.apply_stitch, stitch_params)`.
    apply_kwargs: keyword arguments of A's apply (and of B's unless `apply_kwargs_b`).

  Returns the output of B (e.g. logits). Jit-safe with models and layer names static.

  Raises:
    KeyError: a layer was never called. ValueError: a layer is called more than once.
  """
  kwargs_a = dict(apply_kwargs or {})
  kwargs_b = dict(kwargs_a if apply_kwargs_b is None else apply_kwargs_b)
  _, got = taps.capture(apply_fn_of(model_a), params_of(model_a, params_a), x, select=[layer_a],
                        types=None, **kwargs_a)
  _missing([layer_a], got.outputs, model_a, params_a, x, kwargs_a)
  if len(got.outputs[layer_a]) > 1:
    raise ValueError(f'layer {layer_a!r} of {model_name(model_a)} is called '
                     f'{len(got.outputs[layer_a])} times per forward pass; stitch from a layer '
                     'called once')
  source = taps.first_array(got.outputs[layer_a][0])
  calls = []

  def make(call, target):
    calls.append(call)
    if call.index:
      raise ValueError(f'layer {layer_b!r} of {model_name(model_b)} is called more than once '
                       'per forward pass; stitch into a layer called once')
    return stitch(source, target)

  out = taps.replace_outputs(apply_fn_of(model_b), params_of(model_b, params_b), x,
                             replace=_replacing(make), select=[layer_b], types=None, **kwargs_b)
  _missing([layer_b], {c.path for c in calls}, model_b, params_b, x, kwargs_b)
  return out
