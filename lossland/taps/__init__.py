"""Finding, capturing and replacing layers of any JAX model: one contract for every method.

A model is a Flax linen Module (or its `apply`), a Flax NNX Module (or
`graphdef, state`), or a plain `apply_fn(params, *args, **kwargs)` over a
pytree (`lossland.taps.models`). Layers are reached in one of two ways,
with the same names, selectors and call rules:

- linen models (a `model.apply`, or a function that calls one) are tapped
  at module calls (`lossland.taps.linen`,
  `nn.intercept_methods`): a layer is a Dense/DenseGeneral/Einsum/Conv
  module (or any module, for `types=None`) named by its module path, e.g.
  'block_0/mlp/gate';
- NNX modules, plain functions and linen models whose layers sit inside
  `nn.scan`/`nn.remat` are tapped in their traced program
  (`lossland.taps.program`): a layer is a matrix product or convolution
  whose weight is a parameter leaf, named by that leaf's path ('params',
  'kernel' and NNX's '.value' dropped: linen's 'block_0/mlp/gate', NNX's
  'blocks/0/mlp/gate', a dict's 'w1'); scanned weights give one layer per
  step, 'blocks/mlp/up[3]'. Its output includes the bias added to it.

Selection. `select` is None (every layer), a regex that must match the
whole name, a list of names, or a callable `name -> bool`.

Layers called more than once. A layer applied several times in one forward
pass (a shared layer, a loop, a weight read whole in every step of a scan)
yields one record per call, numbered 0, 1, ... in program order; every call
is a sample. `join_calls` concatenates a layer's records in that order.

The functions here (`find_layers`, `capture`, `output_gradients`,
`replace_outputs`) take `(apply_fn, variables, *args, **apply_kwargs)` for
every model form and choose the way in; all are jit-safe with `select`,
`types` and the keyword arguments static.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lossland.taps import linen as _linen
from lossland.taps import program as _program
from lossland.taps.linen import (LINEAR_TYPES, AttentionWeights, Call, Captured, Handler,
                                 LayerInfo, Selector, first_array, first_input, intercept,
                                 join_calls, layer_params, make_selector, module_path,
                                 swap_layers)
from lossland.taps.models import as_function, like_input, nnx_apply, params_tree
from lossland.taps.program import LayerCall, Program, leaf_name

__all__ = [
    'LINEAR_TYPES', 'AttentionWeights', 'Call', 'Captured', 'Handler', 'LayerCall', 'LayerInfo',
    'Program', 'Selector', 'as_function', 'capture', 'find_layers', 'first_array',
    'first_input', 'intercept', 'join_calls', 'layer_params', 'leaf_name',
    'like_input', 'make_selector', 'module_path', 'nnx_apply', 'output_gradients',
    'params_tree', 'program_for', 'replace_outputs', 'swap_layers',
]


def program_for(apply_fn: Callable, variables, args: tuple,
                kwargs: Mapping[str, Any]) -> Program | None:
  """The traced program when the model's layers are tapped there; None for module taps.

  A model that calls linen modules (`model.apply`, or a function wrapping it)
  uses module taps, unless one of its layers is inside a scan or remat body,
  where module taps cannot reach.
  """
  linen_calls = []

  def note(next_fun, args, kwargs, context):
    if not linen_calls:
      linen_calls.append(type(context.module).__name__)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(note):
    program = Program(apply_fn, variables, tuple(args), kwargs)
  if linen_calls and not any(s.lifted for s in program.ctx.sites.values()):
    return None
  return program


def find_layers(apply_fn: Callable, variables, *args, select: Selector = None,
                types: tuple | None = LINEAR_TYPES, **apply_kwargs) -> dict[str, LayerInfo]:
  """The selected layers that `apply_fn(variables, *args, **apply_kwargs)` calls, in call order.

  Nothing is computed. Raises a ValueError listing every layer when the
  selection matches none, or naming the parameter of a selected layer that
  is not one matrix.
  """
  program = program_for(apply_fn, variables, args, apply_kwargs)
  if program is None:
    return _linen.find_layers(apply_fn, variables, *args, select=select, types=types,
                              **apply_kwargs)
  found = {}
  for name, calls in program.chosen(select).items():
    site = calls[0].site
    found[name] = LayerInfo(name, 'conv' if site.kind == 'conv' else 'dot', len(calls),
                            site.x_shape, site.y_shape, site.y_dtype)
  return found


def _stacked_perturbations(program: Program, calls: Mapping[str, Sequence[LayerCall]],
                           perturbations: Mapping[str, Sequence[jax.Array]]):
  """Per-call perturbations placed in arrays stacked like each site's records."""
  out: dict = {}
  for name, layer_calls in calls.items():
    if name not in perturbations:
      continue
    for call, value in zip(layer_calls, perturbations[name]):
      site = call.site
      if not site.levels:
        out[site.key] = out.get(site.key, 0) + value
        continue
      shape = tuple(n for n, _ in site.levels) + site.y_shape
      base = out.get(site.key, jnp.zeros(shape, value.dtype))
      out[site.key] = base.at[call.steps].add(value)
  return out


def _program_capture(program: Program, variables, args, select, perturbations=None,
                     replacements=None):
  calls = program.chosen(select)
  record = {c.site.key for cs in calls.values() for c in cs}
  out, records = program.evaluate(
      variables, args, record=record,
      perturbations=_stacked_perturbations(program, calls, perturbations or {}),
      replacements=replacements)
  inputs, outputs = {}, {}
  for name, layer_calls in calls.items():
    pairs = [_program.call_record(records, c) for c in layer_calls]
    inputs[name] = tuple(x for x, _ in pairs)
    outputs[name] = tuple(y for _, y in pairs)
  return out, Captured(inputs, outputs)


def capture(apply_fn: Callable, variables, *args, select: Selector = None,
            types: tuple | None = LINEAR_TYPES,
            perturbations: Mapping[str, Sequence[jax.Array]] | None = None,
            **apply_kwargs) -> tuple[Any, Captured]:
  """Runs the model, recording each selected layer's input and output, per call.

  Args:
    apply_fn: `(variables, *args, **apply_kwargs) -> outputs` (any model form
      after `as_function`).
    variables: the model's params pytree.
    *args: model inputs.
    select, types: which layers (see the module docstring; `types` applies to
      module taps only).
    perturbations: optional name -> one array per call, added to that call's
      output before the model continues (zeros, so that the gradient with
      respect to them is ∂L/∂output; see `output_gradients`). The recorded
      output is the perturbed one.
    **apply_kwargs: passed to `apply_fn` (e.g. `train=False`, `rngs=...`).

  Returns:
    (model outputs, Captured).
  """
  program = program_for(apply_fn, variables, args, apply_kwargs)
  if program is None:
    return _linen.capture(apply_fn, variables, *args, select=select, types=types,
                          perturbations=perturbations, **apply_kwargs)
  return _program_capture(program, variables, args, select, perturbations)


def output_gradients(loss_fn: Callable[[Any], jax.Array], apply_fn: Callable, variables, *args,
                     select: Selector = None, types: tuple | None = LINEAR_TYPES,
                     **apply_kwargs) -> tuple[jax.Array, Captured, dict[str, tuple]]:
  """∂ loss_fn(model outputs) / ∂(each selected layer's output), per call, in one backward pass.

  A zero perturbation is added to every selected output (the `Module.perturb`
  idea, without editing the model) and one `jax.grad` with respect to the
  perturbations returns all output gradients at once.

  Returns:
    (loss, Captured of the forward pass, name -> one gradient per call).
  """
  layers = find_layers(apply_fn, variables, *args, select=select, types=types, **apply_kwargs)
  shapes = jax.eval_shape(
      lambda: capture(apply_fn, variables, *args, select=list(layers), types=types,
                      **apply_kwargs)[1].outputs)
  zeros = {path: tuple(jnp.zeros(s.shape, s.dtype) for s in calls)
           for path, calls in shapes.items()}

  def loss_of(perturbations):
    out, captured = capture(apply_fn, variables, *args, select=list(layers), types=types,
                            perturbations=perturbations, **apply_kwargs)
    return loss_fn(out), captured

  (loss, captured), grads = jax.value_and_grad(loss_of, has_aux=True)(zeros)
  return loss, captured, grads


def replace_outputs(apply_fn: Callable, variables, *args,
                    replace: Callable[[Any, jax.Array], jax.Array], select: Selector = None,
                    types: tuple | None = LINEAR_TYPES, **apply_kwargs):
  """Runs the model with each selected call's output `y` replaced by `replace(call, y)`.

  `call` is a `Call` (module taps) or a `LayerCall` (program taps); it has
  `.path`/`.name` and `.index`.
  """
  program = program_for(apply_fn, variables, args, apply_kwargs)
  if program is None:
    return _linen.replace_outputs(apply_fn, variables, *args, replace=replace, select=select,
                                  types=types, **apply_kwargs)
  calls = program.chosen(select)
  replacements = {}
  for layer_calls in calls.values():
    for call in layer_calls:
      if call.site.levels:
        raise ValueError(f'layer {call.name!r} is inside a scan; its output cannot be replaced '
                         '(choose a layer outside the scan)')
      replacements[call.site.key] = lambda x, y, extra, call=call: replace(call, y)
  out, _ = program.evaluate(variables, args, replacements=replacements)
  return out
