"""An NNX decoder LM written the way tunix and bonsai write Llama, through every method.

`nnx.List` of decoder layers, RMSNorm, rotary embeddings, grouped-query
attention with bias-free q/k/v/o projections, a SwiGLU MLP (gate/up/down)
and the output head tied to the embedding (`embedding.attend`-style einsum).
Each method is checked against a computation that does not use it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lossland import curvature, lowrank, taps
from lossland import stitching as st

VOCAB, D, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, SEQ = 32, 16, 4, 2, 4, 24, 3, 8


def rope(x, positions):
  """Rotary embedding over the last axis (half split), as Llama applies it to q and k."""
  half = x.shape[-1] // 2
  freq = 1.0 / (10000.0 ** (jnp.arange(half) / half))
  angle = positions[:, :, None, None] * freq
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * jnp.cos(angle) - x2 * jnp.sin(angle),
                          x2 * jnp.cos(angle) + x1 * jnp.sin(angle)], -1)


class Attention(nnx.Module):
  def __init__(self, rngs):
    self.q_proj = nnx.Linear(D, HEADS * HEAD_DIM, use_bias=False, rngs=rngs)
    self.k_proj = nnx.Linear(D, KV_HEADS * HEAD_DIM, use_bias=False, rngs=rngs)
    self.v_proj = nnx.Linear(D, KV_HEADS * HEAD_DIM, use_bias=False, rngs=rngs)
    self.o_proj = nnx.Linear(HEADS * HEAD_DIM, D, use_bias=False, rngs=rngs)

  def __call__(self, x, positions):
    b, t, _ = x.shape
    q = rope(self.q_proj(x).reshape(b, t, HEADS, HEAD_DIM), positions)
    k = rope(self.k_proj(x).reshape(b, t, KV_HEADS, HEAD_DIM), positions)
    v = self.v_proj(x).reshape(b, t, KV_HEADS, HEAD_DIM)
    k, v = (jnp.repeat(a, HEADS // KV_HEADS, axis=2) for a in (k, v))  # GQA
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(HEAD_DIM)
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
    out = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits), v)
    return self.o_proj(out.reshape(b, t, HEADS * HEAD_DIM))


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.gate_proj = nnx.Linear(D, FFN, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(D, FFN, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(FFN, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, rngs):
    self.input_layernorm = nnx.RMSNorm(D, rngs=rngs)
    self.attn = Attention(rngs)
    self.post_attention_layernorm = nnx.RMSNorm(D, rngs=rngs)
    self.mlp = MLP(rngs)

  def __call__(self, x, positions):
    x = x + self.attn(self.input_layernorm(x), positions)
    return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
  def __init__(self, rngs):
    self.embedder = nnx.Embed(VOCAB, D, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(rngs) for _ in range(LAYERS)])
    self.final_norm = nnx.RMSNorm(D, rngs=rngs)

  def __call__(self, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.embedder(tokens)
    for layer in self.layers:
      x = layer(x, positions)
    return self.embedder.attend(self.final_norm(x))  # tied head


@pytest.fixture(scope='module')
def llama():
  model = Llama(nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (8, SEQ), 0, VOCAB)
  return model, {'inputs': tokens, 'labels': jnp.roll(tokens, -1, axis=1)}


def test_every_projection_and_the_tied_head_are_layers(llama):
  model, batch = llama
  found = taps.find_layers(*taps.as_function(model), batch['inputs'])
  per_layer = ['attn/q_proj', 'attn/k_proj', 'attn/v_proj', 'attn/o_proj', 'mlp/gate_proj',
               'mlp/up_proj', 'mlp/down_proj']
  assert list(found) == [f'layers/{i}/{p}' for i in range(LAYERS) for p in per_layer] + [
      'embedder/embedding']  # the tied head: the embedding read as a matrix (its lookup is not)
  assert found['embedder/embedding'].output_shape == (8, SEQ, VOCAB)


def _mlp_inputs_and_output_gradients(model, batch, layer: int):
  """By hand: the MLP's input rows and ∂L/∂gate_proj(x) of the summed empirical NLL."""
  tokens = batch['inputs']
  positions = jnp.broadcast_to(jnp.arange(SEQ), tokens.shape)
  x = model.embedder(tokens)
  for block in model.layers[:layer]:
    x = block(x, positions)
  block = model.layers[layer]
  h = x + block.attn(block.input_layernorm(x), positions)
  a = block.post_attention_layernorm(h)

  def loss_of_gate(gate):
    mlp = block.mlp
    y = h + mlp.down_proj(nnx.silu(gate) * mlp.up_proj(a))
    for later in model.layers[layer + 1:]:
      y = later(y, positions)
    logits = model.embedder.attend(model.final_norm(y))
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, batch['labels'][..., None], -1).sum()

  g = jax.grad(loss_of_gate)(block.mlp.gate_proj(a))
  return np.asarray(a, np.float64).reshape(-1, D), np.asarray(g, np.float64).reshape(-1, FFN)


def test_kfac_factors_of_a_middle_mlp_are_the_second_moments_computed_by_hand(llama):
  model, batch = llama
  f = curvature.estimate_factors(model, None, [batch], rng=jax.random.key(2),
                                 select=r'layers/\d/mlp/gate_proj', fisher_type='empirical')
  assert list(f) == [f'layers/{i}/mlp/gate_proj' for i in range(LAYERS)]
  a, g = _mlp_inputs_and_output_gradients(model, batch, 1)
  got = f['layers/1/mlp/gate_proj']
  assert got.count == len(a) == 8 * SEQ
  np.testing.assert_allclose(got.A, a.T @ a / len(a), rtol=1e-4,
                             atol=1e-6 * float(np.abs(a).max()) ** 2)
  np.testing.assert_allclose(got.G, g.T @ g / len(g), rtol=1e-3,
                             atol=1e-5 * float(np.abs(g).max()) ** 2)


def test_the_edit_changes_only_the_chosen_kernels_and_comes_back_as_a_module(llama):
  model, batch = llama
  chosen = r'layers/(1|2)/mlp/(gate|up)_proj'
  f = curvature.estimate_factors(model, None, [batch], rng=jax.random.key(2), select=chosen)
  edited = curvature.curvature_edit(model, curvature.eigenbasis(f), rho=0.7)
  assert isinstance(edited, Llama)
  before = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  after = dict(jax.tree_util.tree_flatten_with_path(nnx.state(edited, nnx.Param))[0])
  changed = {taps.leaf_name(p) for p, v in before if not np.array_equal(v, after[p])}
  assert changed == {f'layers/{i}/mlp/{m}_proj' for i in (1, 2) for m in ('gate', 'up')}
  logits = edited(batch['inputs'])
  assert np.isfinite(logits).all() and not np.allclose(logits, model(batch['inputs']))


def test_cka_between_two_llamas_and_lowrank_at_full_rank(llama):
  model, batch = llama
  other = Llama(nnx.Rngs(5))
  layers = ['layers/0/mlp/down_proj', 'layers/2/mlp/down_proj']
  same = st.layer_similarity(model, None, model, None, batch, layers_a=layers,
                             layers_b=layers)['linear_cka'].values
  np.testing.assert_allclose(np.diag(same), 1.0, atol=1e-5)
  cross = st.layer_similarity(model, None, other, None, batch, layers_a=layers,
                              layers_b=layers)['linear_cka'].values
  assert np.all(cross < 0.999)
  fm = lowrank.replace_dense(model, 'lowrank', select=r'layers/\d/mlp/(gate|up)_proj',
                             rank=D)
  variables = fm.convert(batch['inputs'])
  assert variables['params']['layers'][0]['mlp']['up_proj']['kernel']['lowrank_b'].shape == (
      D, FFN)
  np.testing.assert_allclose(fm.apply(variables, batch['inputs']), model(batch['inputs']),
                             atol=1e-4)
