"""The SD UNet's blocked self-attention and its recomputing backward pass.

`sd_unet.self_attention` computes softmax(q kᵀ/√d) v over blocks of queries and
has a hand-written VJP (FlashAttention's algorithm 4). Both must equal
`jax.nn.dot_product_attention` and its autodiff gradients: with and without
blocking, with a last block padded with zero queries, and in bfloat16.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland.models import sd_unet


def _qkv(n, m, dtype=jnp.float32, b=2, h=3, d=8):
  keys = jax.random.split(jax.random.key(n * 31 + m), 4)
  q = jax.random.normal(keys[0], (b, n, h, d)) * 1.5
  k = jax.random.normal(keys[1], (b, m, h, d)) * 1.5
  v = jax.random.normal(keys[2], (b, m, h, d))
  d_out = jax.random.normal(keys[3], (b, n, h, d))
  return [x.astype(dtype) for x in (q, k, v)], d_out.astype(dtype)


def _reference(q, k, v):
  return jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                      v.astype(jnp.float32))


@pytest.mark.parametrize('n,m,block', [(40, 40, 256), (77, 77, 32), (300, 300, 128), (64, 77, 16)])
def test_forward_and_gradients_equal_dot_product_attention(n, m, block):
  (q, k, v), d_out = _qkv(n, m)
  ours, vjp = jax.vjp(lambda *a: sd_unet.self_attention(*a, block), q, k, v)
  ref, ref_vjp = jax.vjp(_reference, q, k, v)
  np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=1e-5)
  for got, want, name in zip(vjp(d_out), ref_vjp(d_out), 'qkv'):
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, atol=2e-6 * scale, rtol=1e-5, err_msg=f'd{name}')


def test_jit_and_grad_of_a_loss_through_blocks():
  (q, k, v), _ = _qkv(300, 300)
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.tanh(fn(q, k, v)) ** 2)
  ours = jax.jit(jax.grad(loss(lambda *a: sd_unet.self_attention(*a, 128)), argnums=(0, 1, 2)))
  ref = jax.grad(loss(_reference), argnums=(0, 1, 2))
  for got, want in zip(ours(q, k, v), ref(q, k, v)):
    np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.abs(want).max()), rtol=1e-5)


def test_bfloat16_inputs_keep_dtype_and_agree_with_float32():
  (q, k, v), d_out = _qkv(300, 300, jnp.bfloat16)
  ours, vjp = jax.vjp(lambda *a: sd_unet.self_attention(*a, 128), q, k, v)
  assert ours.dtype == jnp.bfloat16
  grads = vjp(d_out)
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  ref, ref_vjp = jax.vjp(_reference, q, k, v)
  np.testing.assert_allclose(ours.astype(jnp.float32), ref, atol=3e-2)
  for got, want in zip(grads, ref_vjp(d_out.astype(jnp.float32))):
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2 * scale)


def test_forward_mode_is_refused_with_jax_error():
  (q, k, v), _ = _qkv(40, 40)
  with pytest.raises(TypeError):
    jax.jvp(lambda q: sd_unet.self_attention(q, k, v), (q,), (q,))
