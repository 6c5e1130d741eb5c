"""Eigenbasis edits, controls, analysis bands and recitation metrics."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lossland import models, parallel
from lossland.curvature import analysis, edit, eigen, factors, layer_views, metrics


def _basis(d_in=6, d_out=5, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(40, d_in))
  g = rng.normal(size=(40, d_out)) * np.linspace(2, 0.1, d_out)
  view = layer_views.view_of('w', nn.Dense(d_out), (1, d_in))
  return eigen.LayerBasis(*eigen.layer_eigenbasis(jnp.asarray(a.T @ a / 40, jnp.float32),
                                                  jnp.asarray(g.T @ g / 40, jnp.float32)),
                          view=view)


def test_eigenbasis_is_descending_orthonormal_and_clamped():
  b = _basis()
  assert np.all(np.diff(np.asarray(b.lam)) <= 0) and np.all(np.asarray(b.mu) >= 0)
  np.testing.assert_allclose(b.UA.T @ b.UA, np.eye(6), atol=1e-5)
  _, neg_lam, _, _ = eigen.layer_eigenbasis(-jnp.eye(3), jnp.eye(2))
  assert np.all(np.asarray(neg_lam) == 0.0)


def test_eigh_method_qr_is_the_cpu_default_and_unknown_methods_are_refused():
  a = np.random.default_rng(1).normal(size=(30, 6)).astype(np.float32)
  A, G = jnp.asarray(a.T @ a), jnp.asarray(a[:, :4].T @ a[:, :4])
  for got, want in zip(eigen.layer_eigenbasis(A, G, 'qr'), eigen.layer_eigenbasis(A, G)):
    np.testing.assert_array_equal(got, want)  # 'auto' is LAPACK's syevd on CPU, as is 'qr'
  with pytest.raises(NotImplementedError, match='Jacobi'):  # the method reaches jax's eigh
    eigen.layer_eigenbasis(A, G, 'jacobi')
  with pytest.raises(ValueError, match=r"eigh method 'lapack' is not one of \('auto', 'qr'"):
    eigen.layer_eigenbasis(A, G, 'lapack')
  with pytest.raises(ValueError, match='eigh method'):
    eigen.eigenbasis({}, method='lapack')


def test_rho_one_returns_the_kernel():
  b = _basis()
  kernel = jax.random.normal(jax.random.key(0), (6, 5))
  out = edit.apply_mask(kernel, b.UA, b.UG, edit.mass_mask(eigen.pair_mass(b), 1.0))
  np.testing.assert_allclose(out, kernel, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 0.99))
def test_mass_mask_is_the_smallest_top_set_reaching_rho(seed, rho):
  mass = jnp.asarray(np.random.default_rng(seed).exponential(size=(7, 4)) ** 3, jnp.float32)
  mask = np.asarray(edit.mass_mask(mass, rho))
  m = np.asarray(mass)
  kept = m[mask].sum()
  assert kept >= rho * m.sum() * (1 - 1e-6)
  assert m[mask].min() >= m[~mask].max() if (~mask).any() else True  # a top set
  assert kept - m[mask].min() < rho * m.sum() * (1 + 1e-6)  # minimal
  # Invariant to rescaling either factor (uniform scale of all masses).
  np.testing.assert_array_equal(np.asarray(edit.mass_mask(mass * 7.5, rho)), mask)


def test_edit_zeroes_exactly_the_dropped_coefficients():
  b = _basis()
  kernel = jax.random.normal(jax.random.key(1), (6, 5))
  mask = edit.mass_mask(eigen.pair_mass(b), 0.7)
  out = edit.apply_mask(kernel, b.UA, b.UG, mask)
  c_before, c_after = eigen.coefficients(kernel, b.UA, b.UG), eigen.coefficients(out, b.UA, b.UG)
  np.testing.assert_allclose(c_after, c_before * mask, atol=1e-5)


def test_controls_keep_the_same_count():
  b = _basis()
  mass = eigen.pair_mass(b)
  count = int(edit.mass_mask(mass, 0.6).sum())
  rnd = edit.random_mask(jax.random.key(0), (6, 5), count)
  inv = edit.inverted_mask(mass, count)
  assert int(rnd.sum()) == count and int(inv.sum()) == count
  assert np.asarray(mass)[np.asarray(inv)].max() <= np.asarray(mass)[~np.asarray(inv)].min()
  kernel = jax.random.normal(jax.random.key(1), (6, 5))
  assert np.linalg.matrix_rank(np.asarray(edit.svd_truncate(kernel, 2))) == 2


def test_curvature_edit_is_pure_and_bad_rho_is_an_error():
  model = models.MLP(features=(6,), num_classes=5)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  x = jax.random.normal(jax.random.key(1), (16, 4))
  mesh = parallel.make_mesh({'data': 1}, jax.devices()[:1])
  f = factors.estimate_factors(model.apply, params, [{'inputs': x}], rng=jax.random.key(2),
                               select=['dense_0', 'head'], mesh=mesh)
  bases = eigen.eigenbasis(f)
  before = jax.tree.map(np.array, params)
  same = edit.curvature_edit(params, bases, 1.0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), same, params)
  edited = edit.curvature_edit(params, bases, 0.5)
  jax.tree.map(np.testing.assert_array_equal, params, before)  # input untouched
  assert not np.allclose(edited['params']['head']['kernel'], params['params']['head']['kernel'])
  np.testing.assert_array_equal(edited['params']['head']['bias'], params['params']['head']['bias'])
  for rho in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match=r'rho=.* is outside \(0, 1\]'):
      edit.curvature_edit(params, bases, rho)
  nan = {'head': bases['head'].replace(lam=bases['head'].lam * jnp.nan)}
  with pytest.raises(ValueError, match="layer 'head' is not finite"):
    edit.curvature_edit(params, nan, 0.5)
  other = models.MLP(features=(7,), num_classes=5)
  other_params = other.init(jax.random.key(0), jnp.zeros((1, 4)))
  with pytest.raises(ValueError, match="layer 'dense_0' has a kernel of shape .4, 7. but its "
                                       "eigenbasis is for .4, 6."):
    edit.curvature_edit(other_params, bases, 0.5)


def test_band_masks_partition_pairs():
  b = _basis()
  masks = np.asarray(analysis.band_masks(eigen.pair_mass(b)))
  assert masks.shape == (4, 6, 5)
  np.testing.assert_array_equal(masks.sum(0), np.ones((6, 5)))
  kernel = jax.random.normal(jax.random.key(1), (6, 5))
  x = jax.random.normal(jax.random.key(2), (8, 6))
  np.testing.assert_allclose(analysis.activation_ratio(kernel, b, x, x), np.ones(4), rtol=1e-6)
  # Band outputs add up: the bands partition C, so their outputs sum to x @ kernel.
  per_band = jnp.einsum('ni,bij->bnj', x @ b.UA,
                        eigen.coefficients(kernel, b.UA, b.UG)[None] * masks)
  np.testing.assert_allclose(per_band.sum(0) @ b.UG.T, x @ kernel, rtol=1e-4, atol=1e-4)


def test_levenshtein_and_recitation_scores():
  assert metrics.levenshtein([1, 2, 3], [1, 2, 3]) == 0
  assert metrics.levenshtein([1, 2, 3], [1, 3]) == 1
  assert metrics.levenshtein([1, 2, 3, 4], [4, 3, 2, 1]) == 4
  suffix = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
  gen = np.array([[1, 2, 3, 4], [1, 2, 9, 4]])
  s = metrics.recitation_scores(gen, suffix)
  assert s == {'strict': 0.5, 'loose': 1.0, 'levenshtein': 0.125}
  assert metrics.perplexity(np.log(3.0) * 10, 10) == pytest.approx(3.0)


def test_greedy_decode_matches_a_python_loop():
  model = models.TransformerLM(vocab_size=11, d_model=16, num_layers=1, num_heads=2, mlp_dim=16)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  prefix = jnp.array([[1, 2, 3], [4, 5, 6]])
  out = jax.jit(metrics.greedy_decode, static_argnums=(0, 3))(model.apply, params, prefix, 3)
  apply = jax.jit(model.apply)
  seq = prefix
  for _ in range(3):
    nxt = apply(params, seq)[:, -1].argmax(-1)
    seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
  np.testing.assert_array_equal(out, seq[:, 3:])


def test_greedy_decode_uses_the_kv_cache_of_a_causal_lm():
  """CausalLM: the cached decode (the default for its apply) equals the full re-run per token."""
  config = models.CausalLMConfig(vocab_size=37, d_model=16, num_layers=1, num_heads=4,
                                 num_kv_heads=2, head_dim=4, mlp_dim=24)
  model = models.CausalLM(config)
  params = jax.jit(model.init)(jax.random.key(4), jnp.zeros((1, 4), jnp.int32))
  prefixes = jax.random.randint(jax.random.key(5), (3, 5), 0, 37)
  assert metrics.cache_model(model.apply) is model
  cached = metrics.greedy_decode(model.apply, params, prefixes, 6)
  uncached = metrics.greedy_decode(model.apply, params, prefixes, 6, use_cache=False)
  np.testing.assert_array_equal(cached, uncached)


def test_greedy_decode_without_a_cache_for_other_models():
  model = models.TransformerLM(vocab_size=11, d_model=16, num_layers=1, num_heads=2, mlp_dim=16)
  assert metrics.cache_model(model.apply) is None and metrics.cache_model(lambda p, x: x) is None
  with pytest.raises(ValueError, match='use_cache=True needs a lossland.models.CausalLM'):
    metrics.greedy_decode(model.apply, None, jnp.zeros((1, 2), jnp.int32), 2, use_cache=True)
