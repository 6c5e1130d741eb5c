"""The evaluation protocol pieces of `lossland.guidance.runner` and checkpoint folders."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import guidance as G
from lossland.data import shapes
from lossland.guidance import checkpoints, runner as R
from lossland.models import TextUNet

ARM = dict(loss='astar', num_guided_steps=3, scales=(1.0, 4.0), refine_steps=(0,),
           refine_targets=(0.5,), max_refine_iters=2, smooth_sigma=0.0, threshold='topq')


def test_two_object_prompts_hold_out_pairs_and_are_distinct():
  held = R.two_object_prompts(20, seed=0)
  seen = R.two_object_prompts(20, seed=0, held_out=False)
  assert len(held) == len(set(held)) == 20
  for (a, b) in held + seen:
    assert a[0] != b[0] and a[1] != b[1]
  assert all(a in shapes.HELD_OUT_PAIRS or b in shapes.HELD_OUT_PAIRS for a, b in held)
  assert not any(a in shapes.HELD_OUT_PAIRS or b in shapes.HELD_OUT_PAIRS for a, b in seen)
  assert R.two_object_prompts(5, seed=0) == held[:5]  # one permutation per seed
  assert R.two_object_prompts(5, seed=1) != held[:5]


def test_paired_noise_is_the_same_in_every_arm_and_differs_by_prompt():
  p, q = (('red', 'circle'),), (('blue', 'square'),)
  a = R.seed_noise(np.array([0, 1]), np.array([R.prompt_id(p)] * 2))
  b = R.seed_noise(np.array([1, 1]), np.array([R.prompt_id(p), R.prompt_id(q)]))
  np.testing.assert_array_equal(a[1], b[0])  # the same (seed, prompt) in another batch
  assert float(jnp.abs(b[0] - b[1]).max()) > 0.1


def test_make_guidance_and_paired_arms():
  g = R.make_guidance(ARM, 8)
  assert g == G.Guidance('astar', num_guided_steps=3, resolution=8, smooth_sigma=None,
                         threshold='topq', refine_steps=(0,), refine_targets=(0.5,),
                         max_refine_iters=2)
  arms = R.paired_arms({'astar': g}, {'astar': 4.0})
  assert list(arms) == ['baseline', 'astar', 'astar_non_concept']
  assert arms['astar_non_concept'][2]((('red', 'circle'), ('blue', 'square'))) == ['a', 'a']
  assert arms['astar'][2]((('red', 'circle'), ('blue', 'square'))) == ['circle', 'square']
  assert list(R.paired_arms({}, {})) == ['baseline']


def test_summarize_scores_and_mcnemar():
  prompts = R.two_object_prompts(2, seed=0)
  base = {'success': np.array([1., 0, 0, 0]), 'presence': np.array([1., .5, .5, 0]),
          'binding': np.array([1., np.nan, 1, np.nan])}
  guided = {'success': np.array([1., 1, 1, 0]), 'presence': np.ones(4),
            'binding': np.full(4, np.nan)}
  scores, tests = R.summarize({'baseline': base, 'astar': guided}, {'baseline': base},
                              prompts, seeds_per_prompt=2)
  assert scores['two_object_success'] == {'baseline': 0.25, 'astar': 0.75}
  assert scores['binding_accuracy']['baseline'] == 1.0
  assert np.isnan(scores['binding_accuracy']['astar'])
  per_prompt = scores['two_object_success_per_prompt']['astar']
  assert list(per_prompt.values()) == [1.0, 0.5]
  assert tests['mcnemar_astar_vs_baseline'] == {'only_a': 2, 'only_b': 0, 'p': 0.5}


def test_checkpoint_round_trip_and_missing_files(tmp_path):
  kwargs = checkpoints.model_kwargs(dict(channels=(8, 16), attention_resolutions=(16,),
                                         text_width=8, text_layers=1, text_heads=1, num_heads=1))
  net = TextUNet(**kwargs)
  shapes_ = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                           jnp.zeros((1,)), jnp.zeros((1, shapes.MAX_TOKENS), jnp.int32))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes_)
  assert not G.has_trained(str(tmp_path))
  with pytest.raises(ValueError, match=r"lacks \['params.msgpack', 'model.json'\]"):
    G.load_trained(str(tmp_path))
  G.save_trained(str(tmp_path), params, kwargs)
  assert G.has_trained(str(tmp_path))
  loaded = G.load_trained(str(tmp_path))
  assert loaded.model == net
  jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
