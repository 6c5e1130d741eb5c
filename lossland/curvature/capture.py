"""Find the linear layers of any Flax linen model and capture what K-FAC needs.

K-FAC (Martens & Grosse 2015, sec. 3) approximates the Fisher block of a
linear layer `y = x W` by `E[a aᵀ] ⊗ E[g gᵀ]`, with `a` the layer input and
`g = ∂L/∂y` the gradient at its output. Both are captured generically:
`nn.intercept_methods` wraps every `nn.Dense.__call__` whose module path
matches a regex, records its input and adds a zero `perturbation` to its
output, so that one `jax.grad` with respect to the perturbations returns
`g` for all selected layers at once (the `Module.perturb` idea without
editing the model). No per-example Kronecker product is ever formed.

Layer names are the module paths joined with '/', e.g. 'block_0/mlp/gate',
which is also where the layer's `kernel` lives under `params['params']`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """A selected linear layer: kernel [d_in, d_out], applied at `positions` (leading dims)."""
  name: str
  d_in: int
  d_out: int
  positions: tuple[int, ...]  # leading shape of its input, e.g. (batch, seq)
  dtype: Any


def module_name(module: nn.Module) -> str:
  return '/'.join(str(p) for p in module.path)


def _is_linear_call(context) -> bool:
  return context.method_name == '__call__' and isinstance(context.module, nn.Dense)


def capture(apply_fn: Callable, params, inputs, *, select: Callable[[str], bool],
            perturbations: Mapping[str, jax.Array] | None = None):
  """Runs `apply_fn(params, inputs)` recording the inputs of selected Dense layers.

  Args:
    apply_fn: `(params, inputs) -> outputs`, typically `model.apply`.
    params: the variables passed to `apply_fn`.
    inputs: model inputs.
    select: layer name -> whether to capture it.
    perturbations: optional layer name -> array added to that layer's output
      (zeros, so that the gradient with respect to it is ∂L/∂y).

  Returns:
    (outputs, {name: layer input}). jit-safe.
  """
  recorded: dict[str, jax.Array] = {}

  def interceptor(next_fun, args, kwargs, context):
    if not _is_linear_call(context):
      return next_fun(*args, **kwargs)
    name = module_name(context.module)
    if not select(name):
      return next_fun(*args, **kwargs)
    if name in recorded:
      raise ValueError(f'layer {name!r} is called more than once per forward pass; K-FAC '
                       'factors of shared layers are not supported, exclude it from the regex')
    recorded[name] = args[0]
    out = next_fun(*args, **kwargs)
    if perturbations is not None:
      out = out + perturbations[name].astype(out.dtype)
    return out

  with nn.intercept_methods(interceptor):
    outputs = apply_fn(params, inputs)
  return outputs, recorded


def find_layers(apply_fn: Callable, params, inputs, pattern: str) -> dict[str, LayerInfo]:
  """The Dense layers whose name fully matches the regex `pattern`, in call order.

  Uses `jax.eval_shape`, so nothing is computed. Raises a ValueError that lists
  every Dense layer of the model when nothing matches.
  """
  regex = re.compile(pattern)
  seen: list[str] = []

  def select(name):
    seen.append(name)
    return regex.fullmatch(name) is not None

  _, recorded = jax.eval_shape(lambda p, x: capture(apply_fn, p, x, select=select),
                               params, inputs)
  if not recorded:
    raise ValueError(f'the layer regex {pattern!r} selects no nn.Dense layer; the model has '
                     f'{sorted(set(seen))}. Change the regex (it must match the whole name).')
  kernels = kernel_tree(params)
  out = {}
  for name, x in recorded.items():
    kernel = get_kernel(kernels, name)
    out[name] = LayerInfo(name, int(kernel.shape[0]), int(kernel.shape[1]),
                          tuple(x.shape[:-1]), x.dtype)
  return out


def kernel_tree(params):
  """`params['params']` when `params` is a variables dict, else `params`."""
  return params['params'] if isinstance(params, Mapping) and 'params' in params else params


def get_kernel(params, name: str) -> jax.Array:
  """The [d_in, d_out] kernel of layer `name` ('block_0/mlp/gate')."""
  node = kernel_tree(params)
  for part in name.split('/'):
    if part not in node:
      raise ValueError(f'layer {name!r} has no parameters at {part!r}; is it a Dense layer of '
                       'this model?')
    node = node[part]
  if 'kernel' not in node or node['kernel'].ndim != 2:
    raise ValueError(f'layer {name!r} has no 2-D kernel; only nn.Dense layers can be edited')
  return node['kernel']


def replace_kernels(params, new_kernels: Mapping[str, jax.Array]):
  """A copy of `params` with the kernels of the named layers replaced (pure; jit-safe)."""
  wrapped = isinstance(params, Mapping) and 'params' in params

  def rebuild(node, path):
    if not isinstance(node, Mapping):
      return node
    out = {}
    for key, value in node.items():
      sub = path + (key,)
      name = '/'.join(sub[:-1])
      if key == 'kernel' and name in new_kernels:
        new = new_kernels[name]
        if new.shape != value.shape:
          raise ValueError(f'new kernel of {name!r} has shape {new.shape}, expected {value.shape}')
        out[key] = new.astype(value.dtype)
      else:
        out[key] = rebuild(value, sub)
    return type(node)(out) if not isinstance(node, dict) else out

  missing = [n for n in new_kernels if n]
  for name in missing:
    get_kernel(params, name)  # raises with a clear message if absent
  if wrapped:
    return {**params, 'params': rebuild(params['params'], ())}
  return rebuild(params, ())


def zeros_like_outputs(layers: Mapping[str, LayerInfo]) -> dict[str, jax.Array]:
  return {n: jnp.zeros(l.positions + (l.d_out,), jnp.float32) for n, l in layers.items()}
