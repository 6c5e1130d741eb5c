"""The sparse mixture-of-experts MLP (`lossland.models.moe`) against a per-token reference."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from lossland.models.hf_lm import CausalLMConfig
from lossland.models.moe import SparseMoE


def _silu(x):
  return x / (1 + np.exp(-x))


@pytest.mark.parametrize('normalize', [True, False])
def test_output_is_the_weighted_sum_of_each_tokens_top_k_experts(normalize):
  moe = SparseMoE(num_experts=5, top_k=2, mlp_dim=6, normalize=normalize)
  x = jax.random.normal(jax.random.key(0), (2, 7, 8))
  params = moe.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p * 10.0, params)  # router logits O(1): distinct choices
  got = np.asarray(moe.apply(params, x))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params['params'])
  want = np.zeros(x.shape)
  for b in range(2):
    for t in range(7):
      v = np.asarray(x[b, t], np.float64)
      logits = v @ p['router']['kernel']
      probs = np.exp(logits - logits.max())
      probs /= probs.sum()
      top = np.argsort(-probs)[:2]
      weights = probs[top] / (probs[top].sum() if normalize else 1.0)
      for e, w in zip(top, weights):
        ex = p[f'experts_{e}']
        h = _silu(v @ ex['gate']['kernel']) * (v @ ex['up']['kernel'])
        want[b, t] += w * (h @ ex['down']['kernel'])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_expert_layers_mark_the_tokens_routed_to_them():
  moe = SparseMoE(num_experts=4, top_k=1, mlp_dim=3, normalize=False)
  x = jax.random.normal(jax.random.key(0), (3, 5, 4))
  params = moe.init(jax.random.key(1), x)
  _, state = moe.apply(params, x, mutable=['intermediates'])
  chosen = np.argmax(np.asarray(state['intermediates']['router_probs'][0]), axis=-1)
  marks = {}

  def interceptor(next_fun, args, kwargs, context):
    mark = getattr(context.module, 'sample_mask', None)
    if context.method_name == '__call__' and mark is not None:
      path = '/'.join(context.module.path)
      marks[path] = np.asarray(mark)
      assert np.all(np.asarray(args[0])[~marks[path]] == 0)  # tokens not routed are zero rows
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    moe.apply(params, x)
  assert sorted(marks) == sorted(f'experts_{e}/{p}' for e in range(4) for p in ('gate', 'up',
                                                                               'down'))
  for e in range(4):
    np.testing.assert_array_equal(marks[f'experts_{e}/gate'], chosen == e)


@pytest.mark.parametrize('changes, message', [
    ({'experts_per_token': 5}, 'experts_per_token in 1..4'),
    ({'expert_mlp_dim': 0}, 'expert_mlp_dim >= 1'),
    ({'mlp': 'plain'}, "num_experts needs mlp='gated'"),
])
def test_bad_expert_configs(changes, message):
  base = dict(vocab_size=8, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
              mlp_dim=8, num_experts=4, experts_per_token=2, expert_mlp_dim=4)
  with pytest.raises(ValueError, match=message):
    CausalLMConfig(**{**base, **changes})
