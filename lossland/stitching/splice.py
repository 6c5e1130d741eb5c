"""Capture named layer activations of any linen model, and splice a stitch into one.

Model stitching (Balogh & Jelasity, "How not to Stitch Representations to
Measure Similarity", AAAI 2025, Sec. 3) joins the front of model A, up to
layer i, to the back of model B, from layer j, through a stitching layer T:
`B_{>j}(T(A_{<=i}(x)))`. A "layer" here is any submodule of a linen model,
named by its '/'-joined module path (e.g. 'dense_2', 'block_1/mlp'); its
representation is the output of that submodule's `__call__`. Everything goes
through `lossland.taps`, so nothing is needed from the model. A layer called
more than once per forward pass contributes every call as samples, joined
along the leading axis in call order (`taps.join_calls`); `replace_layer`
replaces every call; stitching from or into such a layer is refused, since
its representation is not one array per example.

Under `jax.jit`, the unused tail of A and head of B are dead code and are
removed by XLA, so a stitched forward costs one partial pass of each model.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

from lossland import taps


def layer_names(model: nn.Module, params, x: jax.Array, *,
                apply_kwargs: dict | None = None) -> list[str]:
  """Every submodule path called by `model.apply(params, x)`, in call order.

  Runs `jax.eval_shape` once. Use it to discover the names that `capture` and
  `stitched_apply` accept.
  """
  return list(taps.find_layers(model.apply, params, x, types=None, **(apply_kwargs or {})))


def _missing(requested: Sequence[str], found, model: nn.Module, params, x, apply_kwargs) -> None:
  missing = [n for n in requested if n not in found]
  if missing:
    available = layer_names(model, params, x, apply_kwargs=apply_kwargs)
    raise KeyError(f'{type(model).__name__} has no layer(s) {missing}; available layers: '
                   f'{available}')


def capture(model: nn.Module, params, x: jax.Array, layers: Sequence[str],
            *, apply_kwargs: dict | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs `model.apply(params, x)` and returns (output, {layer: activation}).

  Jit-safe; `model` and `layers` must be static (closed over). The activation
  of a layer is the output of the submodule with that path; a layer called k
  times gives its k outputs joined along the leading axis.

  Raises:
    KeyError: a requested layer was never called; the message lists the available ones.
  """
  layers = list(layers)
  out, got = taps.capture(model.apply, params, x, select=layers, types=None,
                          **(apply_kwargs or {}))
  _missing(layers, got.outputs, model, params, x, apply_kwargs)
  return out, {name: taps.join_calls(got.outputs[name]) for name in layers}


def replace_layer(model: nn.Module, params, x: jax.Array, layer: str,
                  make_output: Callable[[jax.Array], jax.Array],
                  *, apply_kwargs: dict | None = None) -> jax.Array:
  """Runs the model with each output of `layer` replaced by `make_output(original_output)`.

  The original output is passed only for its shape (under jit it is dead code
  unless `make_output` uses it). Jit-safe with `model`, `layer` static.

  Raises:
    KeyError: `layer` was never called; the message lists the available layers.
  """
  calls = []

  def replace(call, y):
    calls.append(call)
    return make_output(y)

  out = taps.replace_outputs(model.apply, params, x, replace=replace, select=[layer], types=None,
                             **(apply_kwargs or {}))
  _missing([layer], {c.path for c in calls}, model, params, x, apply_kwargs)
  return out


def stitched_apply(model_a: nn.Module, params_a, model_b: nn.Module, params_b, x: jax.Array,
                   *, layer_a: str, layer_b: str, stitch: Callable[[jax.Array, Any], jax.Array]
                   ) -> jax.Array:
  """`B_{>layer_b}(stitch(A_{<=layer_a}(x), target))`: the stitched network's output.

  Args:
    model_a, params_a: the front network (frozen: wrap params in stop_gradient
      if you differentiate through this).
    model_b, params_b: the back network.
    x: inputs [batch, ...].
    layer_a: source layer of A; layer_b: receiving layer of B, whose output is replaced.
    stitch: `(a_activation, target ShapeDtypeStruct) -> replacement activation`,
      e.g. `functools.partial(lossland.stitching.apply_stitch, stitch_params)`.

  Returns the output of B (e.g. logits). Jit-safe with models and layer names static.

  Raises:
    KeyError: a layer was never called. ValueError: a layer is called more than once.
  """
  _, got = taps.capture(model_a.apply, params_a, x, select=[layer_a], types=None)
  _missing([layer_a], got.outputs, model_a, params_a, x, None)
  if len(got.outputs[layer_a]) > 1:
    raise ValueError(f'layer {layer_a!r} of {type(model_a).__name__} is called '
                     f'{len(got.outputs[layer_a])} times per forward pass; stitch from a layer '
                     'called once')
  source = got.outputs[layer_a][0]
  calls = []

  def replace(call, target):
    calls.append(call)
    if call.index:
      raise ValueError(f'layer {layer_b!r} of {type(model_b).__name__} is called more than once '
                       'per forward pass; stitch into a layer called once')
    return stitch(source, target)

  out = taps.replace_outputs(model_b.apply, params_b, x, replace=replace, select=[layer_b],
                             types=None)
  _missing([layer_b], {c.path for c in calls}, model_b, params_b, x, None)
  return out
