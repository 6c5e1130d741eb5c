"""The map-mask localization diagnostic: exact on ground-truth renders and a planted model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import guidance, parallel
from lossland.data import shapes
from lossland.guidance import localization


@pytest.fixture(scope='module')
def scenes():
  return shapes.render_dataset(8, seed=3, two_object_fraction=1.0)


def test_object_masks_cover_each_object(scenes):
  masks = localization.object_masks(scenes['image'], scenes['objects'], 32)
  for image, objects, mask in zip(scenes['image'], scenes['objects'], masks):
    for m in range(2):
      colour = shapes.COLORS[shapes.COLOR_NAMES[objects[m, 0]]]
      np.testing.assert_array_equal(mask[m], np.all(image == colour, -1))
  pooled = localization.object_masks(scenes['image'], scenes['objects'], 8)
  np.testing.assert_allclose(pooled, masks.reshape(8, 2, 8, 4, 8, 4).mean((3, 5)))
  with pytest.raises(ValueError, match='multiple of the map resolution'):
    localization.object_masks(scenes['image'], scenes['objects'], 5)
  single = shapes.render_dataset(4, seed=0, two_object_fraction=0.0)
  with pytest.raises(ValueError, match='two-object scenes'):
    localization.object_masks(single['image'], single['objects'], 8)


def test_pearson():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 4))
  np.testing.assert_allclose(localization.pearson(x, 2 * x + 1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(localization.pearson(x, -x), -1.0, rtol=1e-12)
  assert np.isnan(localization.pearson(np.ones((4, 4)), x[0]))


def test_localization_of_a_planted_model(scenes):
  """Noun maps equal to the object masks give r = 1; colour maps 1 - mask give r = -1.

  The planted model sows its maps (a user's model) and scales them by its params: the
  correlations do not change, and the second params reuse the first trace."""
  n, res = 8, 8
  masks = localization.object_masks(scenes['image'], scenes['objects'], res)
  nouns = guidance.concept_indices(
      scenes['tokens'], [[shapes.SHAPES[o[m, 1]] for m in range(2)] for o in scenes['objects']],
      shapes.VOCAB)
  colours = guidance.concept_indices(
      scenes['tokens'], [[shapes.COLOR_NAMES[o[m, 0]] for m in range(2)]
                         for o in scenes['objects']], shapes.VOCAB)
  planted = np.full((n, res, res, shapes.MAX_TOKENS), 0.1, np.float32)
  for b in range(n):
    for m in range(2):
      planted[b, ..., nouns[b, m]] = masks[b, m]
      planted[b, ..., colours[b, m]] = 1 - masks[b, m]
  planted = planted.reshape(n, 1, res * res, -1)  # [b, heads, HW, tokens]

  def apply_fn(params, x, t, tokens, mutable):
    del t, mutable
    del tokens
    probs = params * jnp.asarray(planted) + 0 * x.mean()
    return x, {'intermediates': {'attn': {'cross_attention': (probs,)}}}

  source = guidance.AttentionSource(sown='cross_attention')
  mesh = parallel.make_mesh({'data': 1}, jax.devices()[:1])  # the planted rows are global
  kwargs = dict(timesteps=(500, 300), resolution=res, rng=jax.random.key(0), attention=source,
                mesh=mesh)
  out = localization.map_localization(apply_fn, jnp.float32(1.0), guidance.linear_schedule(1000),
                                      scenes, **kwargs)
  assert isinstance(out, guidance.Localization)
  assert out.noun[500] == pytest.approx(1.0, abs=1e-5)
  assert out.colour[500] == pytest.approx(-1.0, abs=1e-5)
  assert out.start_token_mass[500] == pytest.approx(0.1)
  assert out.as_dict()['t300'] == {'colour': out.colour[300], 'noun': out.noun[300]}
  traces = localization._noised_attention._cache_size()
  twice = localization.map_localization(apply_fn, jnp.float32(2.0),
                                        guidance.linear_schedule(1000), scenes, **kwargs)
  assert twice.noun[500] == pytest.approx(1.0, abs=1e-5)
  assert twice.start_token_mass[500] == pytest.approx(0.2)
  assert localization._noised_attention._cache_size() == traces  # params are an argument
