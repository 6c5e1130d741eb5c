"""Attention-map losses and aggregation checked against hand computations on tiny maps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lossland import guidance as G


def test_segregation_loss_exact():
  a = np.array([[1.0, 0.0], [0.5, 0.0]])
  b = np.array([[0.0, 1.0], [0.5, 0.0]])
  maps = jnp.asarray(np.stack([a, b], -1))  # [2, 2, 2]
  # Σ min = 0.5; Σ (a + b) = 3.0
  np.testing.assert_allclose(G.segregation_loss(maps), 0.5 / 3.0, rtol=1e-6)
  # three maps: the sum over the three pairs
  c = np.array([[0.0, 0.0], [0.0, 2.0]])
  maps3 = jnp.asarray(np.stack([a, b, c], -1))
  np.testing.assert_allclose(G.segregation_loss(maps3), 0.5 / 3.0 + 0.0 + 0.0, rtol=1e-6)
  assert float(G.segregation_loss(maps[..., :1])) == 0.0  # one concept: no pairs
  same = jnp.asarray(np.stack([a, a], -1))
  np.testing.assert_allclose(G.segregation_loss(same), 0.5, rtol=1e-6)


def test_retention_loss_exact_and_mask_gets_no_gradient():
  maps = jnp.asarray(np.array([[0.2, 0.6], [0.0, 0.4]])[..., None])
  masks = jnp.asarray(np.array([[0.0, 1.0], [0.0, 1.0]])[..., None])
  # Σ min = 0.6 + 0.4 = 1.0; Σ (A + B) = 1.2 + 2 = 3.2
  np.testing.assert_allclose(G.retention_loss(maps, masks), 1 - 1.0 / 3.2, rtol=1e-6)
  g = jax.grad(lambda m: G.retention_loss(maps, m))(masks)
  assert float(jnp.abs(g).max()) == 0.0
  g_maps = jax.grad(lambda a: G.retention_loss(a, masks))(maps)
  assert float(jnp.abs(g_maps).max()) > 0.0


def _otsu_reference(values, num_bins=64):
  lo, hi = values.min(), values.max()
  x = (values - lo) / (hi - lo)
  best, best_cut = -1.0, None
  for k in range(1, num_bins):
    cut = k / num_bins
    below = x < cut
    w0 = below.mean()
    if w0 in (0.0, 1.0):
      var = 0.0
    else:
      var = w0 * (1 - w0) * (x[below].mean() - x[~below].mean()) ** 2
    if var > best:
      best, best_cut = var, cut
  return lo + best_cut * (hi - lo)


def test_otsu_matches_reference_and_splits_bimodal_maps():
  rng = np.random.default_rng(0)
  values = np.concatenate([rng.normal(0.1, 0.02, 200), rng.normal(0.8, 0.05, 56)])
  np.testing.assert_allclose(G.otsu_threshold(jnp.asarray(values, jnp.float32)),
                             _otsu_reference(values), rtol=1e-5)
  maps = np.zeros((16, 16, 1), np.float32) + 0.05
  maps[4:8, 4:8, 0] = 0.9
  mask = np.asarray(G.binarize(jnp.asarray(maps), 'otsu'))
  np.testing.assert_array_equal(mask[..., 0], maps[..., 0] > 0.5)


def test_topq_keeps_the_top_fraction():
  maps = jnp.arange(100, dtype=jnp.float32).reshape(10, 10, 1)
  mask = G.binarize(maps, 'topq', q=0.2)
  assert int(mask.sum()) == 20 and float(mask[9, 9, 0]) == 1.0 and float(mask[0, 0, 0]) == 0.0
  with pytest.raises(ValueError, match='available: otsu, topq'):
    G.binarize(maps, 'kmeans')


def test_attend_excite_loss_is_worst_token():
  maps = np.zeros((4, 4, 2), np.float32)
  maps[0, 0, 0] = 0.9
  maps[1, 1, 1] = 0.3
  np.testing.assert_allclose(G.attend_excite_loss(jnp.asarray(maps)), 0.7, rtol=1e-6)


def test_total_variation_and_jsd():
  m = np.array([[0.0, 1.0], [1.0, 1.0]], np.float32)[..., None]
  # vertical |1-0| + |1-1| = 1; horizontal |1-0| + |1-1| = 1
  np.testing.assert_allclose(G.total_variation(jnp.asarray(m)), [2.0])
  np.testing.assert_allclose(G.divide_bind_attendance(jnp.asarray(m)), -2.0)
  p = jnp.asarray([[1.0, 0.0], [0.0, 0.0]])
  q = jnp.asarray([[0.0, 0.0], [0.0, 1.0]])
  np.testing.assert_allclose(G.jensen_shannon(p, q), np.log(2.0), rtol=1e-5)
  assert abs(float(G.jensen_shannon(p, p))) < 1e-6
  both = jnp.stack([p, p], -1)
  np.testing.assert_allclose(G.divide_bind_binding(both, jnp.stack([q, p], -1)), np.log(2.0),
                             rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_loss_properties(seed):
  rng = np.random.default_rng(seed)
  maps = jnp.asarray(rng.random((8, 8, 3)), jnp.float32)
  seg = float(G.segregation_loss(maps))
  assert 0.0 <= seg <= 1.5 + 1e-6  # each pair in [0, 1/2]
  # invariant to swapping concepts and to transposing the image
  np.testing.assert_allclose(G.segregation_loss(maps[..., ::-1]), seg, rtol=1e-5)
  np.testing.assert_allclose(G.segregation_loss(jnp.swapaxes(maps, 0, 1)), seg, rtol=1e-5)
  p, q = maps[..., 0], maps[..., 1]
  np.testing.assert_allclose(G.jensen_shannon(p, q), G.jensen_shannon(q, p), rtol=1e-5,
                             atol=1e-7)
  assert 0.0 <= float(G.jensen_shannon(p, q)) <= np.log(2.0) + 1e-6


def test_gaussian_smoothing():
  k = G.gaussian_kernel(3, 0.5)
  np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-6)
  g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * 0.25))
  np.testing.assert_allclose(k, np.outer(g, g) / np.outer(g, g).sum(), rtol=1e-6)
  const = jnp.full((2, 5, 5, 3), 0.25)
  np.testing.assert_allclose(G.gaussian_smooth(const), const, rtol=1e-6)
  delta = np.zeros((1, 5, 5, 1), np.float32)
  delta[0, 2, 2, 0] = 1.0
  np.testing.assert_allclose(np.asarray(G.gaussian_smooth(jnp.asarray(delta)))[0, 1:4, 1:4, 0],
                             k, rtol=1e-6)


def test_token_maps_renormalize_without_start_token():
  # attention [b=1, H=1, W=2, T=5]: start, w1, w2, end, pad
  attn = jnp.asarray([[[[0.5, 0.2, 0.1, 0.2, 0.0], [0.7, 0.05, 0.15, 0.1, 0.0]]]])
  mask = jnp.asarray([[False, True, True, False, False]])
  idx = np.array([[1, 2]])
  out = G.token_maps(attn, mask, idx, scale=None, smooth_sigma=None)
  np.testing.assert_allclose(out[0, 0], [[2 / 3, 1 / 3], [0.25, 0.75]], rtol=1e-6)
  out = G.token_maps(attn, mask, idx, scale=100.0, smooth_sigma=None)
  e = np.exp(100 * np.array([0.2, 0.1]))
  np.testing.assert_allclose(out[0, 0, 0], e / e.sum(), rtol=1e-5)
  with pytest.raises(ValueError, match='out of range'):
    G.token_maps(attn, mask, np.array([[1, 7]]))


def test_average_maps_and_resolution_error():
  rng = np.random.default_rng(0)
  a16 = rng.random((2, 4, 256, 6)).astype(np.float32)
  b16 = rng.random((2, 4, 256, 6)).astype(np.float32)
  a8 = rng.random((2, 4, 64, 6)).astype(np.float32)
  records = [a16, a8, b16]  # one per layer call, as apply_with_attention returns them
  out = G.average_maps(records, 16)
  np.testing.assert_allclose(out, ((a16.mean(1) + b16.mean(1)) / 2).reshape(2, 16, 16, 6),
                             rtol=1e-6)
  assert G.available_resolutions(records) == {8: 1, 16: 2}
  with pytest.raises(ValueError, match=r'available resolutions \(res: layers\): \{8: 1, 16: 2\}'):
    G.average_maps(records, 32)
  self_attention = rng.random((2, 4, 256, 256)).astype(np.float32)
  with pytest.raises(ValueError, match='self-attention is mixed in'):
    G.average_maps(records + [self_attention], 16)


def test_concept_tokens_found_and_bad_prompts_rejected():
  from lossland.data import shapes
  tokens = np.stack([shapes.tokenize('a red circle and a blue square'),
                     shapes.tokenize('a green square and a red square')])
  idx = G.concept_indices(tokens, [['circle', 'square'], ['square', 'square']], shapes.VOCAB)
  np.testing.assert_array_equal(idx, [[3, 7], [3, 7]])
  mask = G.text_mask(tokens, start_id=1, end_id=2)
  np.testing.assert_array_equal(mask[0], [0, 1, 1, 1, 1, 1, 1, 1, 0, 0])
  with pytest.raises(ValueError, match="concept 'triangle' is not a token of prompt 0"):
    G.concept_indices(tokens[:1], [['triangle', 'square']], shapes.VOCAB)
  with pytest.raises(ValueError, match='same number of concepts'):
    G.concept_indices(tokens, [['circle'], ['square', 'square']], shapes.VOCAB)
  with pytest.raises(ValueError, match='no end token'):
    G.text_mask(np.array([[1, 3, 9]]), start_id=1, end_id=2)


def test_token_index_check_names_the_prompt_words():
  from lossland.data import shapes
  from lossland.guidance import tokens as tokens_lib
  tokens = np.stack([shapes.tokenize('a red circle')])
  mask = G.text_mask(tokens, start_id=1, end_id=2)
  tokens_lib.check_token_indices(tokens, mask, [[3]], shapes.VOCAB)  # 'circle': fine
  with pytest.raises(ValueError, match=r"position 4, the start token, end token or padding.*"
                                       r"\[0:<s>, 1:a, 2:red, 3:circle, 4:</s>, 5:<pad>"):
    tokens_lib.check_token_indices(tokens, mask, [[4]], shapes.VOCAB)
  with pytest.raises(ValueError, match=r'must be \[batch, M\]'):
    tokens_lib.check_token_indices(tokens, mask, [3], shapes.VOCAB)
