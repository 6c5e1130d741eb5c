"""A sparse mixture-of-experts MLP whose experts are separate Dense layers (Qwen3-MoE, OLMoE).

Shazeer et al. (2017), "Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer", eq. 1-3 with top-k softmax gating; the form of
Qwen3-MoE (Yang et al. 2025, transformers' `Qwen3MoeSparseMoeBlock`): a router
`router` (a bias-free linear map to `num_experts` logits) gives per-token
probabilities `p = softmax(router(x))` (in float32); each token goes to its
`top_k` most probable experts with weights `p_e` (divided by their sum when
`normalize`), and the output is `sum_e w_e(x) * expert_e(x)` over the chosen
experts, each expert a SwiGLU MLP `down(act(gate(x)) * up(x))` without biases
(Shazeer 2020).

Layers. Every expert's projections are their own `nn.Dense` layers,
'experts_{e}/gate', 'experts_{e}/up' and 'experts_{e}/down' under this
module (e.g. 'block_0/mlp/experts_3/gate'), plus 'router', so that every
lossland method finds them as linear layers (`lossland.taps`). An expert is
applied at every token position with the positions not routed to it set to
zero, and its layers are `ExpertDense` layers whose `sample_mask` attribute
marks the routed positions: K-FAC (`lossland.curvature.capture`) counts only
those as the layer's samples, so an expert's factors are averages over the
tokens it sees. Zero rows add nothing to E[a aᵀ], and the gradient at an
expert's outputs is exactly zero at positions it does not serve (their
weight is 0), so the factors are exact.

Cost. The routing is exact (no capacity, no dropped tokens), computed
densely: each expert runs on every position, `num_experts / top_k` times the
multiply-adds of a sparse dispatch. Fine for analysis of small and mid-size
models; a grouped-matmul dispatch would be the way to scale it.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class ExpertDense(nn.Dense):
  """`nn.Dense` of one expert; `sample_mask` ([batch, seq] bool) marks the positions it serves.

  The layer computes what `nn.Dense` does; `sample_mask` is read by
  `lossland.curvature.capture`, which weights each sample (input row) by it.
  """
  sample_mask: Any = None


class SparseMoE(nn.Module):
  """`x [batch, seq, d] -> [batch, seq, d]`: top-k routed SwiGLU experts (module docstring).

  Attributes:
    num_experts: experts 'experts_0' ... 'experts_{num_experts-1}'.
    top_k: experts per token.
    mlp_dim: hidden width of each expert.
    normalize: divide the chosen experts' probabilities by their sum
      (transformers' `norm_topk_prob`).
    activation: the gate's activation.
    dtype: compute dtype (the router probabilities are float32).
  """
  num_experts: int
  top_k: int
  mlp_dim: int
  normalize: bool
  activation: Callable[[jax.Array], jax.Array] = nn.silu
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)
    logits = nn.Dense(self.num_experts, use_bias=False, dtype=self.dtype, kernel_init=init,
                      name='router')(x)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, index = jax.lax.top_k(probs, self.top_k)  # [batch, seq, k], most probable first
    if self.normalize:
      top = top / jnp.sum(top, axis=-1, keepdims=True)
    top = top.astype(logits.dtype)
    self.sow('intermediates', 'router_probs', probs)
    out = jnp.zeros_like(x)
    for e in range(self.num_experts):  # in expert order, as transformers adds them up
      chosen = index == e
      routed = jnp.any(chosen, axis=-1)  # [batch, seq]
      weight = jnp.sum(jnp.where(chosen, top, 0), axis=-1)  # 0 where not routed
      y = _Expert(self.mlp_dim, self.activation, self.dtype, name=f'experts_{e}')(
          jnp.where(routed[..., None], x, 0), routed)
      out = out + (y * weight[..., None].astype(y.dtype)).astype(out.dtype)  # + 0 if not routed
    return out


class _Expert(nn.Module):
  """One expert: `down(act(gate(x)) * up(x))`, each an `ExpertDense` masked to `routed`."""
  mlp_dim: int
  activation: Callable[[jax.Array], jax.Array]
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, routed: jax.Array) -> jax.Array:
    def dense(features, name):
      return ExpertDense(features, use_bias=False, dtype=self.dtype, sample_mask=routed,
                         kernel_init=nn.initializers.normal(0.02), name=name)

    hidden = self.activation(dense(self.mlp_dim, 'gate')(x)) * dense(self.mlp_dim, 'up')(x)
    return dense(x.shape[-1], 'down')(hidden)
