"""Capture named layer activations of any linen model, and splice a stitch into one.

Model stitching (Balogh & Jelasity, "How not to Stitch Representations to
Measure Similarity", AAAI 2025, Sec. 3) joins the front of model A, up to
layer i, to the back of model B, from layer j, through a stitching layer T:
`B_{>j}(T(A_{<=i}(x)))`. A "layer" here is any submodule of a linen model,
named by its '/'-joined module path (e.g. 'dense_2', 'block_1/mlp'); its
representation is the output of that submodule's `__call__`. Both functions
work through `nn.intercept_methods`, so they need nothing from the model.

Under `jax.jit`, the unused tail of A and head of B are dead code and are
removed by XLA, so a stitched forward costs one partial pass of each model.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax


def _path(module: nn.Module) -> str:
  return '/'.join(str(p) for p in module.path)


def layer_names(model: nn.Module, params, x: jax.Array) -> list[str]:
  """Every submodule path called by `model.apply(params, x)`, in call order.

  Not jit-safe (runs `jax.eval_shape` once). Use it to discover the names that
  `capture` and `stitched_apply` accept.
  """
  names: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and context.module.path:
      name = _path(context.module)
      if name not in names:
        names.append(name)
    return next_fun(*args, **kwargs)

  def run(p, x):
    with nn.intercept_methods(interceptor):
      return model.apply(p, x)

  jax.eval_shape(run, params, x)
  return names


def _missing(requested: Sequence[str], found: Sequence[str], model: nn.Module) -> None:
  missing = [n for n in requested if n not in found]
  if missing:
    raise KeyError(f'{type(model).__name__} has no layer(s) {missing}; available layers: '
                   f'{list(found)}')


def capture(model: nn.Module, params, x: jax.Array, layers: Sequence[str],
            *, apply_kwargs: dict | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs `model.apply(params, x)` and returns (output, {layer: activation}).

  Jit-safe; `model` and `layers` must be static (closed over). The activation
  of a layer is the output of the submodule with that path on its first call.

  Raises:
    KeyError: a requested layer was never called; the message lists the available ones.
  """
  layers = list(layers)
  acts: dict[str, jax.Array] = {}
  seen: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and context.module.path:
      name = _path(context.module)
      seen.append(name)
      if name in layers and name not in acts:
        acts[name] = out
    return out

  with nn.intercept_methods(interceptor):
    out = model.apply(params, x, **(apply_kwargs or {}))
  _missing(layers, seen, model)
  return out, acts


def replace_layer(model: nn.Module, params, x: jax.Array, layer: str,
                  make_output: Callable[[jax.Array], jax.Array],
                  *, apply_kwargs: dict | None = None) -> jax.Array:
  """Runs the model with `layer`'s output replaced by `make_output(original_output)`.

  The original output is passed only for its shape (under jit it is dead code
  unless `make_output` uses it). Jit-safe with `model`, `layer` static.

  Raises:
    KeyError: `layer` was never called; the message lists the available layers.
  """
  seen: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and context.module.path:
      name = _path(context.module)
      seen.append(name)
      if name == layer and seen.count(name) == 1:
        return make_output(next_fun(*args, **kwargs))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    out = model.apply(params, x, **(apply_kwargs or {}))
  _missing([layer], seen, model)
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
  """
  _, acts = capture(model_a, params_a, x, [layer_a])
  source = acts[layer_a]
  return replace_layer(model_b, params_b, x, layer_b, lambda target: stitch(source, target))
