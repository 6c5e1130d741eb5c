"""The KV-cache decode against decoding without a cache, and against transformers' generate."""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import (FIXTURES, NAMES, SLIDING, checkpoint, forward, logit_tolerance,
                         reference)

from lossland.curvature import greedy_decode as uncached_greedy_decode
from lossland.models import hf_lm

PREFILL = 12


@functools.partial(jax.jit, static_argnames='model')
def incremental_logits(model, params, tokens):
  """Logits of `tokens` from a cache: PREFILL positions at once, then one position per step."""
  cache = hf_lm.init_cache(model.config, tokens.shape[0], tokens.shape[1])
  first, cache = model.apply(params, tokens[:, :PREFILL], cache=cache)

  def step(cache, token):
    logits, cache = model.apply(params, token[:, None], cache=cache)
    return cache, logits[:, 0]

  cache, rest = jax.lax.scan(step, cache, tokens[:, PREFILL:].T)
  return jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], axis=1), cache['index']


@pytest.mark.parametrize('name', NAMES)
def test_cached_steps_give_full_forward_logits(name):
  tokens, _ = reference(name)
  ckpt = checkpoint(name)
  want = np.asarray(forward(name)(ckpt.params, tokens))
  got, index = incremental_logits(ckpt.model, ckpt.params, tokens)
  assert int(index) == tokens.shape[1]
  np.testing.assert_allclose(got, want, rtol=0, atol=logit_tolerance(want))


@pytest.mark.parametrize('name', ['llama3_gqa', 'gpt2', *SLIDING, 'gpt_neox'])
def test_cached_greedy_decode_equals_uncached(name):
  """Rotary and learned positions; sliding windows of 5-8 over 18 positions; partial rotary."""
  tokens, _ = reference(name)
  ckpt = checkpoint(name)
  prefixes = jnp.asarray(tokens[:, :6])
  want = uncached_greedy_decode(ckpt.model.apply, ckpt.params, prefixes, 12, use_cache=False)
  got = hf_lm.greedy_decode(ckpt.model, ckpt.params, prefixes, 12)
  np.testing.assert_array_equal(got, want)
  assert len(set(np.asarray(got).ravel().tolist())) > 2  # not a constant continuation


GENERATED = [n for n in NAMES if 'greedy' in np.load(FIXTURES / n / 'reference.npz')]


@pytest.mark.parametrize('name', GENERATED)
def test_greedy_decode_equals_transformers_generate(name):
  """The tokens transformers' generate picks (with its own, sliding-window-aware cache)."""
  ref = np.load(FIXTURES / name / 'reference.npz')
  want = ref['greedy']
  ckpt = checkpoint(name)
  prefixes = jnp.asarray(ref['tokens'][:, :6])  # make_hf_fixtures.py's PREFIX
  np.testing.assert_array_equal(hf_lm.greedy_decode(ckpt.model, ckpt.params, prefixes,
                                                    want.shape[1]), want)


def test_sliding_window_layers_see_only_the_window():
  """Changing a token outside every window leaves the last position's logits of an
  all-sliding model (mistral, window 7) unchanged, and changes them without the window."""
  ckpt = checkpoint('mistral')
  tokens, _ = reference('mistral')
  edited = tokens.copy()
  edited[:, 0] = (edited[:, 0] + 1) % 320
  apply = forward('mistral')
  # Two layers of window 7 reach back 12 positions: position 19 sees position 7 onwards.
  np.testing.assert_array_equal(apply(ckpt.params, tokens)[:, -1],
                                apply(ckpt.params, edited)[:, -1])
  wide = hf_lm.CausalLM(dataclasses.replace(ckpt.config, sliding_window=None))
  assert not np.allclose(wide.apply(ckpt.params, tokens)[:, -1],
                         wide.apply(ckpt.params, edited)[:, -1])


def test_cache_step_compiles_once():
  ckpt = checkpoint('llama_tied')
  step = jax.jit(chex.assert_max_traces(n=1)(
      lambda p, x, c: ckpt.model.apply(p, x, cache=c)))
  cache = hf_lm.init_cache(ckpt.config, 2, 4)
  for i in range(3):
    _, cache = step(ckpt.params, jnp.full((2, 1), i, jnp.int32), cache)
  assert int(cache['index']) == 3


def test_learned_positions_bound_the_length():
  ckpt = checkpoint('gpt2')
  with pytest.raises(ValueError, match='exceeds the 64 learned positions'):
    hf_lm.init_cache(ckpt.config, 1, 65)
  with pytest.raises(ValueError, match='65 tokens exceed the 64 learned positions'):
    ckpt.model.apply(ckpt.params, jnp.zeros((1, 65), jnp.int32))


def test_padding_mask_with_cache_is_refused():
  ckpt = checkpoint('llama_tied')
  cache = hf_lm.init_cache(ckpt.config, 1, 4)
  with pytest.raises(ValueError, match='padding_mask is not supported with a KV cache'):
    ckpt.model.apply(ckpt.params, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool),
                     cache=cache)
