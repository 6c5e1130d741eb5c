"""Decoder-only transformer language model (LLaMA-style).

RMSNorm (Zhang & Sennrich 2019), rotary position embeddings (Su et al. 2021,
eq. 34), causal multi-head attention whose probabilities are sown into the
`intermediates` collection, and a gated MLP (Shazeer 2020, SwiGLU:
down(silu(gate(x)) * up(x))) with separate `gate`, `up` and `down` layers.

Every linear map is created through the `dense` field (default `nn.Dense`),
so analyses find them with `nn.intercept_methods` and `lossland.lowrank` can
swap in factorized layers by config. The embedding and output head always stay
dense.

`matmul_dtype=jnp.bfloat16` is mixed precision for the matrix products only:
params, activations, norms, softmax and the loss stay float32, while the
Dense layers (when `dense` is the default) and the two attention products
feed bfloat16 operands to dots that accumulate in float32, forward and
backward (`mixed_dense_dot_general`, `mixed_bmm`, `mixed_bmm_nt`). On XLA:CPU
these run as YNNPACK bfloat16 dots (AMX/AVX512-BF16), about twice as fast as
float32 ones. Their hand-written VJPs keep every backward dot in the
row-major `[m, k] x [k, n]` form that XLA:CPU accepts for bfloat16 (a
transposed operand is materialized by a transpose plus a rank-changing
reshape); left to autodiff, the weight-gradient dots would contract the
token axis of a transposed operand, which XLA upcasts to slow float32 dots.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

DenseFactory = Callable[..., nn.Module]

_BF16 = jnp.bfloat16
_F32 = jnp.float32


def _dot(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int, batch: int) -> jax.Array:
  """bfloat16-operand dot with float32 accumulation and output; `batch` leading batch axes."""
  axes = tuple(range(batch))
  return jax.lax.dot_general(a.astype(_BF16), b.astype(_BF16),
                             (((contract_a,), (contract_b,)), (axes, axes)),
                             preferred_element_type=_F32)


def _transposed_rows(x: jax.Array) -> jax.Array:
  """`x[..., k]` -> bfloat16 `[k, prod(...)]`, row-major for XLA.

  The transpose alone would keep a column-major layout that XLA:CPU refuses
  for bfloat16 dots; the rank-changing reshape after it gives a row-major
  operand, and XLA materializes the transpose in a fusion.
  """
  if x.ndim == 2:
    x = x[:, None, :]
  perm = (x.ndim - 1,) + tuple(range(x.ndim - 1))
  return jnp.transpose(x.astype(_BF16), perm).reshape(x.shape[-1], -1)


@jax.custom_vjp
def mixed_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x[..., k] @ w[k, n]` with bfloat16 operands, float32 accumulation, `x.dtype` result."""
  y = _dot(x.reshape(-1, x.shape[-1]), w, 1, 0, 0)
  return y.reshape(*x.shape[:-1], w.shape[1]).astype(x.dtype)


def _mixed_matmul_fwd(x, w):
  return mixed_matmul(x, w), (x, w)


def _mixed_matmul_bwd(res, g):
  x, w = res
  g2 = g.reshape(-1, g.shape[-1]).astype(_BF16)
  dx = _dot(g2, w, 1, 1, 0).reshape(x.shape)  # g @ w^T, w read as [n, k] rows
  dw = _dot(_transposed_rows(x), g2, 1, 0, 0)  # x^T @ g
  return dx.astype(x.dtype), dw.astype(w.dtype)


mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def mixed_dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                            preferred_element_type=None):
  """A `dot_general` for `nn.Dense`: `mixed_matmul` for its `[..., k] x [k, n]` contraction."""
  del precision, preferred_element_type
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and rhs.ndim == 2
      and not lhs_batch and not rhs_batch):
    return mixed_matmul(lhs, rhs)
  return jax.lax.dot_general(lhs.astype(_BF16), rhs.astype(_BF16), dimension_numbers,
                             preferred_element_type=_F32).astype(lhs.dtype)


MixedDense = functools.partial(nn.Dense, dot_general=mixed_dense_dot_general)


def _heads_rows(x: jax.Array) -> jax.Array:
  """`[b, h, m, k]` -> bfloat16 `[b*h, m, k]` (a rank-changing reshape: row-major for XLA)."""
  return x.astype(_BF16).reshape(-1, *x.shape[2:])


def _heads_rows_t(x: jax.Array) -> jax.Array:
  """`[b, h, m, k]` -> bfloat16 `[b*h, k, m]`, row-major."""
  return jnp.swapaxes(x.astype(_BF16), 2, 3).reshape(-1, x.shape[3], x.shape[2])


@jax.custom_vjp
def mixed_bmm_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a[b, h, m, k] . b[b, h, n, k] -> [b, h, m, n]` (float32), bfloat16 operands."""
  return _dot(_heads_rows(a), _heads_rows(b), 2, 2, 1).reshape(*a.shape[:3], b.shape[2])


def _mixed_bmm_nt_fwd(a, b):
  return mixed_bmm_nt(a, b), (a, b)


def _mixed_bmm_nt_bwd(res, g):
  a, b = res
  da = _dot(_heads_rows(g), _heads_rows(b), 2, 1, 1).reshape(a.shape)
  db = _dot(_heads_rows_t(g), _heads_rows(a), 2, 1, 1).reshape(b.shape)
  return da.astype(a.dtype), db.astype(b.dtype)


mixed_bmm_nt.defvjp(_mixed_bmm_nt_fwd, _mixed_bmm_nt_bwd)


@jax.custom_vjp
def mixed_bmm(p: jax.Array, v: jax.Array) -> jax.Array:
  """`p[b, h, m, n] @ v[b, h, n, d] -> [b, h, m, d]` (float32), bfloat16 operands."""
  return _dot(_heads_rows(p), _heads_rows(v), 2, 1, 1).reshape(*p.shape[:3], v.shape[3])


def _mixed_bmm_fwd(p, v):
  return mixed_bmm(p, v), (p, v)


def _mixed_bmm_bwd(res, g):
  p, v = res
  g_rows = _heads_rows(g)
  dp = _dot(g_rows, _heads_rows(v), 2, 2, 1).reshape(p.shape)
  dv = _dot(_heads_rows_t(p), g_rows, 2, 1, 1).reshape(v.shape)
  return dp.astype(p.dtype), dv.astype(v.dtype)


mixed_bmm.defvjp(_mixed_bmm_fwd, _mixed_bmm_bwd)


def _is_bf16(dtype) -> bool:
  if dtype is None:
    return False
  if jnp.dtype(dtype) == jnp.dtype(_BF16):
    return True
  if jnp.dtype(dtype) != jnp.dtype(_F32):
    raise ValueError(f'matmul_dtype must be None, float32 or bfloat16, got {dtype}')
  return False


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotates pairs of channels by position-dependent angles (RoFormer eq. 34).

  Args:
    x: [batch, seq, heads, head_dim] with an even head_dim.
    positions: [seq] integer positions.
    base: the wavelength base.
  """
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  angles = positions[:, None].astype(jnp.float32) * freqs[None, :]  # [seq, half]
  sin = jnp.sin(angles)[None, :, None, :].astype(x.dtype)
  cos = jnp.cos(angles)[None, :, None, :].astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nn.Module):
  """Multi-head attention; sows its probabilities as `attention_weights`.

  Attributes:
    num_heads: number of heads; the model width must divide evenly.
    causal: mask future positions.
    rotary: apply rotary position embeddings to queries and keys.
    dense: factory for the query/key/value/out linear maps.
    out_init: initializer of the output projection.
    matmul_dtype: None, or bfloat16 for the attention products with bfloat16
      operands and float32 accumulation (see the module docstring).
  """
  num_heads: int
  causal: bool = True
  rotary: bool = True
  dense: DenseFactory = nn.Dense
  kernel_init: Callable = nn.initializers.normal(0.02)
  out_init: Callable = nn.initializers.normal(0.02)
  dtype: Any = jnp.float32
  matmul_dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
    batch, seq, width = x.shape
    if width % self.num_heads:
      raise ValueError(f'model width {width} is not divisible by num_heads={self.num_heads}')
    head_dim = width // self.num_heads
    dense = functools.partial(self.dense, use_bias=False, dtype=self.dtype)
    split = lambda y: y.reshape(batch, seq, self.num_heads, head_dim)
    q = split(dense(width, name='query', kernel_init=self.kernel_init)(x))
    k = split(dense(width, name='key', kernel_init=self.kernel_init)(x))
    v = split(dense(width, name='value', kernel_init=self.kernel_init)(x))
    if self.rotary:
      positions = jnp.arange(seq)
      q, k = rotary_embedding(q, positions), rotary_embedding(k, positions)
    mixed = _is_bf16(self.matmul_dtype)
    heads = lambda y: jnp.transpose(y, (0, 2, 1, 3))  # [batch, heads, seq, head_dim]
    if mixed:
      logits = mixed_bmm_nt(heads(q), heads(k)) / jnp.sqrt(jnp.float32(head_dim))
    else:
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    allowed = jnp.ones((seq, seq), bool)
    if self.causal:
      allowed = jnp.tril(allowed)
    allowed = allowed[None, None]
    if padding_mask is not None:  # [batch, seq], True = real token
      allowed = allowed & padding_mask[:, None, None, :].astype(bool)
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)  # [batch, heads, q, k]
    self.sow('intermediates', 'attention_weights', probs)
    if mixed:
      out = jnp.transpose(mixed_bmm(probs, heads(v)).astype(self.dtype), (0, 2, 1, 3))
      out = out.reshape(batch, seq, width)
    else:
      out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), v).reshape(batch, seq, width)
    return dense(width, name='out', kernel_init=self.out_init)(out)


class GatedMLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
  hidden_dim: int
  dense: DenseFactory = nn.Dense
  kernel_init: Callable = nn.initializers.normal(0.02)
  out_init: Callable = nn.initializers.normal(0.02)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(self.dense, use_bias=False, dtype=self.dtype)
    gate = dense(self.hidden_dim, name='gate', kernel_init=self.kernel_init)(x)
    up = dense(self.hidden_dim, name='up', kernel_init=self.kernel_init)(x)
    return dense(x.shape[-1], name='down', kernel_init=self.out_init)(nn.silu(gate) * up)


class DecoderBlock(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x))."""
  num_heads: int
  mlp_dim: int
  num_layers: int
  dense: DenseFactory = nn.Dense
  dtype: Any = jnp.float32
  matmul_dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
    # GPT-2 style: residual-branch outputs start smaller by 1/sqrt(2 * num_layers).
    out_init = nn.initializers.normal(0.02 / (2 * self.num_layers) ** 0.5)
    h = nn.RMSNorm(name='attn_norm', dtype=self.dtype)(x)
    x = x + Attention(self.num_heads, dense=self.dense, out_init=out_init, dtype=self.dtype,
                      matmul_dtype=self.matmul_dtype, name='attn')(h, padding_mask)
    h = nn.RMSNorm(name='mlp_norm', dtype=self.dtype)(x)
    return x + GatedMLP(self.mlp_dim, dense=self.dense, out_init=out_init, dtype=self.dtype,
                        name='mlp')(h)


class TransformerLM(nn.Module):
  """Decoder-only LM. `apply(params, tokens[batch, seq]) -> logits[batch, seq, vocab]`.

  Attributes:
    vocab_size: number of token ids.
    d_model: residual width.
    num_layers: number of decoder blocks, named `block_0`, `block_1`, ...
    num_heads: attention heads per block.
    mlp_dim: hidden width of the gated MLP.
    tie_embeddings: use the embedding matrix as the output head.
    dense: factory for attention and MLP linear maps (see `lossland.lowrank`).
    dtype: compute dtype (params stay float32).
    matmul_dtype: None (matrix products in `dtype`) or bfloat16: mixed-precision
      matrix products with float32 accumulation (module docstring). With the
      default `dense` the linear maps become `MixedDense` (an `nn.Dense` with a
      custom `dot_general`: same module names and params); another factory is
      kept as given. The embedding lookup and the tied output head stay float32.
    residual_sharding: None (XLA's sharding propagation from the params and
      the batch decides), or a `jax.sharding.NamedSharding` of the
      [batch, seq, d_model] residual stream, e.g.
      `NamedSharding(mesh, P('data', None, None))`: Megatron's layout (Shoeybi
      et al. 2019, sec. 3), batch-sharded and replicated over `model` between
      the tensor-parallel blocks. It is applied with
      `jax.lax.with_sharding_constraint` after the embedding and after every
      block; a batch the sharding's batch axes do not divide (e.g. `init` on
      one example) is left unconstrained. The math is unchanged. On a 4 data x
      4 model mesh of v5e chips the constraint did not help XLA
      (docs/results/pod_compile.md), so None is the default.
  """
  vocab_size: int
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 512
  tie_embeddings: bool = False
  dense: DenseFactory = nn.Dense
  dtype: Any = jnp.float32
  matmul_dtype: Any = None
  residual_sharding: Any = None

  def _constrain(self, x: jax.Array) -> jax.Array:
    s = self.residual_sharding
    if s is None:
      return x
    if not isinstance(s, jax.sharding.NamedSharding):
      raise ValueError(f'residual_sharding must be a jax.sharding.NamedSharding, e.g. '
                       f"NamedSharding(mesh, P('data', None, None)); got {s!r}")
    batch_axes = s.spec[0] if s.spec else None
    names = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)
    ways = 1
    for name in names:
      ways *= s.mesh.shape[name] if name is not None else 1
    return jax.lax.with_sharding_constraint(x, s) if x.shape[0] % ways == 0 else x

  @nn.compact
  def __call__(self, tokens: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
    dense = self.dense
    if _is_bf16(self.matmul_dtype) and dense is nn.Dense:
      dense = MixedDense
    embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=nn.initializers.normal(0.02),
                     dtype=self.dtype, name='embed')
    x = self._constrain(embed(tokens))  # [batch, seq, d_model]
    for i in range(self.num_layers):
      x = self._constrain(DecoderBlock(self.num_heads, self.mlp_dim, self.num_layers, dense=dense,
                                       dtype=self.dtype, matmul_dtype=self.matmul_dtype,
                                       name=f'block_{i}')(x, padding_mask))
    x = nn.RMSNorm(name='final_norm', dtype=self.dtype)(x)
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(self.vocab_size, use_bias=False, kernel_init=nn.initializers.normal(0.02),
                        dtype=self.dtype, name='head')(x)
    return logits.astype(jnp.float32)
