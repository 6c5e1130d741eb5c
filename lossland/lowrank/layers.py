"""Linen layers that replace `nn.Dense` with low-rank (+ sparse) parameterizations.

Every layer takes `nn.Dense`'s call signature
`Layer(features, use_bias=..., dtype=..., name=..., kernel_init=...)` and
learns d_in at call time, so `functools.partial(LostDense, param_fraction=0.5)`
is a valid `dense` factory of `lossland.models.TransformerLM` (or of any model
that builds its linear maps through such a factory).

- `LowRankDense`: y = (x A) B, A B from the SVD of W0 (√Σ split) or Xavier.
- `ColaDense`: y = σ(x A) B with σ = SiLU (Liu et al. 2024, "CoLA").
- `SLTrainDense`: y = x (A B·α/r + S), S on a fixed random support (Han et al.
  2024, "SLTrain", eq. 3), densified inside jit as in the reference.
- `LostDense`: y = γ·lowrank(x) + (1 − γ)·x[..., idx] W_s (LOST, Li et al.
  2025, Sec. 3, eqs. 4-6), with A, B, W_s and idx from the SVD of W0.

Initialization follows every flax layer: W0 is drawn from the layer's
`params` rng with the dense layer's `kernel_init` (so `init(key(0))` and
`init(key(123))` differ), factorized in-graph (jit-safe). LOST's kept input
channels depend on W0, so they are stored with the variables, in the
`constants` collection (the analogue of a PyTorch buffer), as float32 whole
numbers read through `stop_gradient`: `model.apply(variables, x)` and
`lossland.train.fit(params=variables, ...)` work unchanged, their gradient is
exactly zero, so Adam-type updates leave them unchanged, and lossland's
optimizers decay matrices only. An optimizer that decays vectors must mask the
`constants` collection. SLTrain's support is a fixed random pattern chosen by
`seed` and the layer path (a constant of the compiled program, fixed once as
in the reference); its values and factors come from the `params` rng.
Biases default to `use_bias=True`, as in `nn.Dense`.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lossland import taps
from lossland.lowrank import budget
from lossland.lowrank import factorize

Initializer = Callable[..., jax.Array]
_ACTIVATIONS = {None: None, 'none': None, 'silu': nn.silu, 'gelu': nn.gelu, 'relu': nn.relu}


CONSTANTS = 'constants'  # the collection of LOST's channel indices


def _activation(name: str | None, layer: str) -> Callable | None:
  if name not in _ACTIVATIONS:
    raise ValueError(f'layer {layer!r}: unknown activation {name!r}; choose one of '
                     f'{[k for k in _ACTIVATIONS if k]}')
  return _ACTIVATIONS[name]


def _once(fn: Callable[[], Any]) -> Callable[[], Any]:
  """`fn` evaluated on the first call only: the factors are drawn once per layer init."""
  cache = []
  def get():
    if not cache:
      cache.append(fn())
    return cache[0]
  return get


class _Factorized(nn.Module):
  """Fields shared by every factorized layer (those of `nn.Dense`, its defaults, plus the budget).

  `seed` is folded into the layer's `params` rng (the init key decides W0 and the
  factors) and chooses SLTrain's fixed sparse support.
  """
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.linear.default_kernel_init
  bias_init: Initializer = nn.initializers.zeros
  rank: int | None = None
  param_fraction: float | None = 0.5
  seed: int = 0

  def _path(self) -> str:
    return taps.module_path(self) or (self.name or type(self).__name__)

  def _init_key(self) -> jax.Array:
    """This layer's key from the `params` rng (`seed` folded in). Only during init."""
    return jax.random.fold_in(self.make_rng('params'), self.seed)

  def _factor_param(self, name: str, shape: tuple[int, ...],
                    value: Callable[[], jax.Array]) -> jax.Array:
    """A param initialized to `value()` (factors shared by several params, drawn once).

    Outside init, flax only checks the stored param's shape against an init
    function, which must then not draw from the `params` rng: zeros of `shape`.
    """
    if self.is_initializing():
      return self.param(name, lambda rng: value().astype(self.param_dtype))
    return self.param(name, nn.initializers.zeros, shape, self.param_dtype)

  def _initial_weight(self, d_in: int) -> jax.Array:
    """W0 [d_in, d_out] as the dense layer would draw it (float32)."""
    return self.kernel_init(self._init_key(), (d_in, self.features), jnp.float32)

  def _bias(self, y: jax.Array) -> jax.Array:
    if not self.use_bias:
      return y
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
    return y + bias.astype(y.dtype)

  def _cast(self, x: jax.Array, *params: jax.Array):
    dtype = self.dtype or jnp.result_type(x, *params)
    return (x.astype(dtype),) + tuple(p.astype(dtype) for p in params)


class LowRankDense(_Factorized):
  """y = act(x A) B (+ bias): a rank-r factorization of a [d_in, d_out] kernel.

  Attributes:
    factor_init: 'svd' (A = U_r √Σ_r, B = √Σ_r V_rᵀ of W0) or 'xavier' (independent
      Glorot-uniform factors).
    activation: None (plain low-rank) or 'silu' (CoLA).
    rank / param_fraction: explicit r, or the largest r within this fraction
      of d_in·d_out parameters (see `lossland.lowrank.budget.plan`).
  """
  factor_init: str = 'svd'
  activation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    path, d_in = self._path(), x.shape[-1]
    p = budget.plan('lowrank', d_in, self.features, rank=self.rank,
                    param_fraction=self.param_fraction, layer=path)
    act = _activation(self.activation, path)
    if self.factor_init == 'svd':
      factors = _once(lambda: factorize.svd_factors(self._initial_weight(d_in), p.rank,
                                                    layer=path))
    elif self.factor_init == 'xavier':
      factors = _once(lambda: factorize.xavier_factors(self._init_key(), d_in, self.features,
                                                       p.rank, jnp.float32))
    else:
      raise ValueError(f"layer {path!r}: factor_init must be 'svd' or 'xavier', got "
                       f'{self.factor_init!r}')
    a = self._factor_param('lowrank_a', (d_in, p.rank), lambda: factors()[0])
    b = self._factor_param('lowrank_b', (p.rank, self.features), lambda: factors()[1])
    x, a, b = self._cast(x, a, b)
    h = x @ a  # [..., r]
    if act is not None:
      h = act(h)
    return self._bias(h @ b)  # [..., d_out]


class ColaDense(LowRankDense):
  """CoLA (Liu et al. 2024): y = SiLU(x A) B, Xavier-initialized by default."""
  factor_init: str = 'xavier'
  activation: str | None = 'silu'


class LostDense(_Factorized):
  """LOST (Li et al. 2025, Sec. 3): y = γ·lowrank(x) + (1 − γ)·x[..., idx] W_s.

  A, B are the top-r SVD factors of W0; `idx` holds the ⌊s·d_in⌋ input channels
  with the largest rows of W_comp = Σ_{r<i≤r+k} σ_i u_i v_iᵀ (stored in the
  `constants` collection, zero-gradient, not a parameter); W_s [n_s, d_out] starts from
  those rows of W0 (`sparse_from='w0'`) or of W_comp (`'residual'`).

  Attributes:
    sparsity: s, the fraction of input channels in the sparse part.
    residual_rank: k (default min(r, min(d_in, d_out) − r)).
    gamma: fixed mixing weight γ of the low-rank path.
    activation: None, or 'silu' inside the low-rank path (paper's ablation).
    sparse_from: 'w0' or 'residual'.
    impl: 'fused' (default: x @ [A | onehot(idx)], then @ [γB; (1 − γ)W_s], two
      matmuls, no gather/scatter) or 'gather' (x[..., idx] @ W_s, as written).
  """
  sparsity: float = 0.05
  residual_rank: int | None = None
  gamma: float = 0.5
  activation: str | None = None
  sparse_from: str = 'w0'
  impl: str = 'fused'

  def plan(self, d_in: int) -> budget.LayerPlan:
    return budget.plan('lost', d_in, self.features, rank=self.rank,
                       param_fraction=self.param_fraction, sparsity=self.sparsity,
                       residual_rank=self.residual_rank, layer=self._path())

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    path, d_in = self._path(), x.shape[-1]
    p = self.plan(d_in)
    act = _activation(self.activation, path)
    factors = _once(lambda: factorize.lost_factors(
        self._initial_weight(d_in), p.rank, p.num_channels, residual_rank=p.residual_rank,
        sparse_from=self.sparse_from, layer=path))
    a = self._factor_param('lowrank_a', (d_in, p.rank), lambda: factors().a)
    b = self._factor_param('lowrank_b', (p.rank, self.features), lambda: factors().b)
    if not p.num_channels:
      x, a, b = self._cast(x, a, b)
      h = x @ a  # [..., r]
      return self._bias(self.gamma * (act(h) if act else h) @ b)
    w_s = self._factor_param('sparse_values', (p.num_channels, self.features),
                             lambda: factors().sparse_values)  # [n_s, d_out]
    if not self.is_initializing() and not self.has_variable(CONSTANTS, 'channel_idx'):
      raise ValueError(f'layer {path!r}: LostDense keeps its input channels in the '
                       f'{CONSTANTS!r} collection; apply it with all the variables model.init '
                       f"returned (model.apply(variables, x)), not only variables['params']")
    stored = self.variable(CONSTANTS, 'channel_idx',
                           lambda: factors().channel_idx.astype(jnp.float32))  # [n_s]
    idx = jnp.round(jax.lax.stop_gradient(stored.value)).astype(jnp.int32)
    x, a, b, w_s = self._cast(x, a, b, w_s)
    if self.impl == 'gather':
      h = x @ a  # [..., r]
      x_s = jnp.take(x, idx, axis=-1)  # [..., n_s]
      y = self.gamma * ((act(h) if act else h) @ b) + (1.0 - self.gamma) * (x_s @ w_s)
      return self._bias(y)
    if self.impl != 'fused':
      raise ValueError(f"layer {path!r}: impl must be 'fused' or 'gather', got {self.impl!r}")
    # Fused: the channel selection is a constant one-hot matrix appended to A, and the two
    # output maps are stacked, so the layer is two matmuls with no gather or scatter.
    # Built in the graph from the small idx vector, so the program stays small.
    select = (jnp.arange(d_in)[:, None] == idx[None, :]).astype(x.dtype)  # [d_in, n_s]
    h = x @ jnp.concatenate([a, select], axis=1)  # [..., r + n_s]
    if act is not None:
      lowrank_cols = np.arange(p.rank + p.num_channels) < p.rank
      h = jnp.where(lowrank_cols, act(h), h)
    out = jnp.concatenate([self.gamma * b, (1.0 - self.gamma) * w_s], axis=0)  # [r + n_s, d_out]
    return self._bias(h @ out)


class SLTrainDense(_Factorized):
  """SLTrain (Han et al. 2024, eq. 3): y = x (A B·α/r + S), S on a fixed random support.

  A is Kaiming-uniform, B starts at zero, S's values are U(±1/√d_in) on
  ⌊δ·d_in·d_out⌉ positions drawn once from the layer's seed (a static
  constant). As in the reference, W is densified inside jit every step: the
  saving is in stored parameters and optimizer state, not in compute.

  Attributes:
    density: δ, the fraction of nonzeros in S.
    alpha: the scale α of the low-rank part.
  """
  density: float = 0.03
  alpha: float = 32.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    path, d_in = self._path(), x.shape[-1]
    p = budget.plan('sltrain', d_in, self.features, rank=self.rank,
                    param_fraction=self.param_fraction, density=self.density, layer=path)
    support = sltrain_layer_support(self.seed, path, d_in, self.features, p.nnz)  # [nnz] numpy
    bound = 1.0 / np.sqrt(d_in)
    a = self.param('lowrank_a', lambda rng: nn.initializers.kaiming_uniform()(
        jax.random.fold_in(rng, self.seed), (d_in, p.rank), self.param_dtype))
    b = self.param('lowrank_b', nn.initializers.zeros, (p.rank, self.features), self.param_dtype)
    values = self.param('sparse_values', lambda rng: jax.random.uniform(
        jax.random.fold_in(rng, self.seed), (p.nnz,), self.param_dtype, -bound, bound))
    x, a, b, values = self._cast(x, a, b, values)
    w = (a @ b) * (self.alpha / p.rank)  # [d_in, d_out]
    w = w.reshape(-1).at[support].add(values, unique_indices=True, indices_are_sorted=True)
    return self._bias(x @ w.reshape(d_in, self.features))


@functools.lru_cache(maxsize=4096)
def sltrain_layer_support(seed: int, path: str, d_in: int, d_out: int, nnz: int) -> np.ndarray:
  """The fixed support of the SLTrain layer at `path` (flat positions, ascending), from `seed`."""
  rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
  return factorize.sltrain_support(rng, d_in, d_out, nnz)


LAYERS = {'dense': nn.Dense, 'lowrank': LowRankDense, 'cola': ColaDense, 'lost': LostDense,
          'sltrain': SLTrainDense}


def layer_class(kind: str, fields: dict[str, Any]) -> type[nn.Module]:
  """The layer class of `kind`, after checking that it has every field in `fields`.

  Raises:
    ValueError: for an unknown kind or a field the layer does not have.
  """
  if kind not in LAYERS:
    raise ValueError(f'unknown low-rank kind {kind!r}; choose one of {sorted(LAYERS)}')
  cls = LAYERS[kind]
  known = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'{cls.__name__} has no field(s) {unknown}; available: {sorted(known)}')
  return cls
