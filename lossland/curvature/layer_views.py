"""Linear layers of every linen type as one matrix product, the form K-FAC needs.

K-FAC (Martens & Grosse 2015, sec. 3) treats a layer as `y = a W`: one row `a`
of inputs and one row `g = ∂L/∂y` of output gradients per sample, giving the
factors E[a aᵀ] and E[g gᵀ]. `MatrixView` records, for one layer, how its
input, its output gradient and its kernel map onto that form:

- `nn.Dense`, `nn.DenseGeneral` (any `axis`, multi-axis `features`, no
  `batch_dims`): the contracted input axes flattened into `d_in`, the feature
  axes into `d_out`; every other input position is a sample.
- `nn.Einsum`: the kernel axes that are summed against the input form `d_in`,
  those that reach the output form `d_out` (in output order); input axes the
  kernel does not touch are sample axes. Axes shared by input, kernel and
  output (a batched kernel) are not a single matrix and are refused.
- `nn.Conv` (KFC, Grosse & Martens 2016, sec. 3): each output position is a
  sample whose input row is the receptive-field patch (`cin`-major, as
  `lax.conv_general_dilated_patches` orders it), so `d_in = cin·kh·kw`.
  Strides, dilation and SAME/VALID/explicit padding are supported; grouped,
  CIRCULAR and CAUSAL convolutions are refused.

Bias. With `homogeneous=True` every input row gets a trailing 1 and the
kernel matrix a trailing bias row (Martens & Grosse 2015, sec. 3: the
homogeneous coordinate), so the factors and the edit cover the bias too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
from flax.linen import linear as linear_lib

SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv)


@dataclasses.dataclass(frozen=True)
class MatrixView:
  """How one layer is `rows(inputs) @ W`; pure data, safe to close over in jit."""
  path: str
  kind: str  # 'dense' (Dense, DenseGeneral), 'einsum' or 'conv'
  kernel_shape: tuple[int, ...]
  d_in: int  # rows of W without the bias row
  d_out: int
  has_bias: bool
  homogeneous: bool  # a trailing 1 on inputs and the bias as the last row of W
  sample_shape: tuple[int, ...]  # leading shape of the samples, e.g. (batch, seq)
  # dense/einsum: the input permutation that puts sample axes first, then d_in axes.
  input_perm: tuple[int, ...] = ()
  # einsum: kernel permutation to (d_in axes..., d_out axes in output order);
  # output permutation to (sample axes..., d_out axes).
  kernel_perm: tuple[int, ...] = ()
  output_perm: tuple[int, ...] = ()
  # conv
  window: tuple[int, ...] = ()
  strides: tuple[int, ...] = ()
  padding: tuple[tuple[int, int], ...] | str = ()
  input_dilation: tuple[int, ...] = ()
  kernel_dilation: tuple[int, ...] = ()
  # layers found in the traced program (`taps.program`): where the weight and bias live in
  # the params pytree. None for linen module layers (params at `path`, 'kernel'/'bias').
  kernel_ref: Any = None
  bias_ref: Any = None

  @property
  def rows_in(self) -> int:
    """Width of an input row: d_in, plus one for the homogeneous coordinate."""
    return self.d_in + int(self.homogeneous and self.has_bias)


def _tuple(value, n: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * n
  return (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)


def _dense_view(path, module, x_shape, homogeneous) -> MatrixView:
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ValueError(f'layer {path!r}: DenseGeneral with batch_dims={module.batch_dims} has a '
                       'kernel per batch index, not one matrix; select other layers')
    axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    features = module.features if isinstance(module.features, tuple) else (module.features,)
  else:
    axes, features = (-1,), (module.features,)
  ndim = len(x_shape)
  axes = tuple(a % ndim for a in axes)
  others = tuple(i for i in range(ndim) if i not in axes)
  d_in = int(np.prod([x_shape[a] for a in axes]))
  return MatrixView(path, 'dense', tuple(x_shape[a] for a in axes) + tuple(features), d_in,
                    int(np.prod(features)), module.use_bias, homogeneous,
                    tuple(x_shape[i] for i in others), input_perm=others + axes)


def _einsum_view(path, module, x_shape, einsum_str, homogeneous) -> MatrixView:
  spec = (einsum_str or module.einsum_str).replace(' ', '')
  operands, result, _ = opt_einsum.parser.parse_einsum_input(
      (spec, np.empty(x_shape, np.float32), np.empty(module.shape, np.float32)))
  lhs, rhs = operands.split(',')
  shared = [c for c in rhs if c in lhs and c in result]
  dangling = [c for c in rhs if c not in lhs and c not in result] + \
      [c for c in lhs if c not in rhs and c not in result]
  if shared or dangling:
    raise ValueError(f'layer {path!r}: einsum {spec!r} is not one matrix product (axes '
                     f'{shared + dangling} are batched or summed alone); select other layers')
  contracted = [c for c in rhs if c in lhs]
  outs = [c for c in result if c in rhs]
  samples = [c for c in lhs if c not in rhs]
  size = dict(zip(rhs, module.shape)) | dict(zip(lhs, x_shape))
  return MatrixView(
      path, 'einsum', tuple(module.shape), int(np.prod([size[c] for c in contracted])),
      int(np.prod([size[c] for c in outs])), module.use_bias, homogeneous,
      tuple(size[c] for c in samples),
      input_perm=tuple(lhs.index(c) for c in samples + contracted),
      kernel_perm=tuple(rhs.index(c) for c in contracted + outs),
      output_perm=tuple(result.index(c) for c in samples + outs))


def _conv_view(path, module, x_shape, homogeneous) -> MatrixView:
  window = tuple(module.kernel_size)
  n = len(window)
  if module.feature_group_count != 1:
    raise ValueError(f'layer {path!r}: grouped convolutions (feature_group_count='
                     f'{module.feature_group_count}) are not one matrix; select other layers')
  if isinstance(module.padding, str) and module.padding.upper() in ('CIRCULAR', 'CAUSAL'):
    raise ValueError(f'layer {path!r}: padding {module.padding!r} is not supported; use SAME, '
                     'VALID or explicit padding')
  if len(x_shape) != n + 2:
    raise ValueError(f'layer {path!r}: Conv input of shape {x_shape} needs a batch axis')
  padding = linear_lib.canonicalize_padding(module.padding, n)
  if not isinstance(padding, str):
    padding = tuple(tuple(int(v) for v in p) for p in padding)
  strides = _tuple(module.strides, n)
  input_dilation, kernel_dilation = _tuple(module.input_dilation, n), \
      _tuple(module.kernel_dilation, n)
  cin = x_shape[-1]
  out = jax.eval_shape(lambda x: _patches(x, window, strides, padding, input_dilation,
                                          kernel_dilation),
                       jax.ShapeDtypeStruct(x_shape, jnp.float32))
  return MatrixView(path, 'conv', window + (cin, module.features), cin * int(np.prod(window)),
                    module.features, module.use_bias, homogeneous, tuple(out.shape[:-1]),
                    window=window, strides=strides, padding=padding,
                    input_dilation=input_dilation, kernel_dilation=kernel_dilation)


def _patches(x, window, strides, padding, input_dilation, kernel_dilation):
  n = len(window)
  spatial = ''.join('HWDXYZ'[:n])
  numbers = (f'N{spatial}C', f'{spatial}IO', f'N{spatial}C')
  return jax.lax.conv_general_dilated_patches(
      x, window, strides, padding, lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
      dimension_numbers=numbers)


def view_of(path: str, module: nn.Module, x_shape: tuple[int, ...], *, einsum_str=None,
            homogeneous: bool = False) -> MatrixView:
  """The `MatrixView` of a bound layer called on inputs of shape `x_shape`."""
  x_shape = tuple(int(d) for d in x_shape)
  if isinstance(module, nn.Conv):
    return _conv_view(path, module, x_shape, homogeneous)
  if isinstance(module, nn.Einsum):
    return _einsum_view(path, module, x_shape, einsum_str, homogeneous)
  if isinstance(module, (nn.Dense, nn.DenseGeneral)):
    return _dense_view(path, module, x_shape, homogeneous)
  raise ValueError(f'layer {path!r} is a {type(module).__name__}; K-FAC supports '
                   f'{[t.__name__ for t in SUPPORTED]}')


def view_of_product(name: str, program, call, homogeneous: bool = False) -> MatrixView:
  """The `MatrixView` of a layer call found in a traced program (`taps.program`).

  A `dot_general` whose weight has no batch dimensions is the 'einsum' form
  (contracted axes -> d_in, the weight's other axes -> d_out, the input's
  other axes are samples); a `conv_general_dilated` of any dimension numbers
  is the 'conv' form after transposing to NHWC/HWIO.
  """
  from lossland.taps import program as program_lib  # taps depends on nothing here
  site = call.site
  axes = program_lib.product_axes(site)
  kernel_ref, bias_ref = program.weight_ref(call), program.bias_ref(call)
  x, w, y = site.x_shape, site.w_shape, site.y_shape
  if site.kind == 'dot':
    return MatrixView(
        name, 'einsum', w, int(np.prod([x[a] for a in axes.x_contract])),
        int(np.prod([w[a] for a in axes.w_out])), bias_ref is not None, homogeneous,
        tuple(x[a] for a in axes.x_samples), input_perm=axes.x_samples + axes.x_contract,
        kernel_perm=axes.w_contract + axes.w_out, output_perm=axes.y_samples + axes.y_out,
        kernel_ref=kernel_ref, bias_ref=bias_ref)
  p = dict(site.params)
  window = tuple(w[a] for a in axes.w_contract[:-1])
  cin, cout = w[axes.w_contract[-1]], w[axes.w_out[0]]
  return MatrixView(
      name, 'conv', w, cin * int(np.prod(window)), cout, bias_ref is not None, homogeneous,
      tuple(y[a] for a in axes.y_samples), input_perm=axes.x_samples + axes.x_contract,
      kernel_perm=axes.w_contract + axes.w_out, output_perm=axes.y_samples + axes.y_out,
      window=window, strides=tuple(p['window_strides']),
      padding=tuple(tuple(int(v) for v in pad) for pad in p['padding']),
      input_dilation=tuple(p['lhs_dilation']), kernel_dilation=tuple(p['rhs_dilation']),
      kernel_ref=kernel_ref, bias_ref=bias_ref)


def input_rows(view: MatrixView, x: jax.Array) -> jax.Array:
  """[samples, rows_in] input rows `a` (with the trailing 1 when homogeneous)."""
  if view.kind == 'conv':
    if view.input_perm:  # program layers: to NHWC first
      x = jnp.transpose(x, view.input_perm)
    rows = _patches(x, view.window, view.strides, view.padding, view.input_dilation,
                    view.kernel_dilation).reshape(-1, view.d_in)
  else:
    rows = jnp.transpose(x, view.input_perm).reshape(-1, view.d_in)
  if view.homogeneous and view.has_bias:
    rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)
  return rows


def output_rows(view: MatrixView, g: jax.Array) -> jax.Array:
  """[samples, d_out] rows of an output-shaped array (e.g. the gradient ∂L/∂y)."""
  if view.output_perm:
    g = jnp.transpose(g, view.output_perm)
  return g.reshape(-1, view.d_out)


def kernel_matrix(view: MatrixView, layer_params: Mapping[str, jax.Array]) -> jax.Array:
  """W [rows_in, d_out] with `input_rows(x) @ W` = the layer's output rows."""
  kernel = layer_params['kernel']
  if view.kind == 'conv':
    n = len(view.window)
    if view.kernel_perm:  # program layers: to HWIO first
      kernel = jnp.transpose(kernel, view.kernel_perm)
    kernel = jnp.transpose(kernel, (n,) + tuple(range(n)) + (n + 1,))  # cin-major rows
  elif view.kind == 'einsum':
    kernel = jnp.transpose(kernel, view.kernel_perm)
  w = kernel.reshape(view.d_in, view.d_out)
  if view.homogeneous and view.has_bias:
    w = jnp.concatenate([w, layer_params['bias'].reshape(1, view.d_out).astype(w.dtype)], 0)
  return w


def params_from_matrix(view: MatrixView, w: jax.Array,
                       layer_params: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The layer's params with kernel (and bias, when homogeneous) taken from `w`."""
  out = dict(layer_params)
  if view.homogeneous and view.has_bias:
    out['bias'] = w[-1].reshape(layer_params['bias'].shape).astype(layer_params['bias'].dtype)
    w = w[:-1]
  kernel = layer_params['kernel']
  if view.kind == 'conv':
    n = len(view.window)
    cin = view.d_in // int(np.prod(view.window))
    k = w.reshape((cin,) + view.window + (view.d_out,))
    k = jnp.transpose(k, tuple(range(1, n + 1)) + (0, n + 1))
    if view.kernel_perm:
      k = jnp.transpose(k, tuple(np.argsort(view.kernel_perm)))
  elif view.kind == 'einsum':
    permuted = tuple(view.kernel_shape[i] for i in view.kernel_perm)
    k = jnp.transpose(w.reshape(permuted), tuple(np.argsort(view.kernel_perm)))
  else:
    k = w.reshape(kernel.shape)
  out['kernel'] = k.astype(kernel.dtype)
  return out
