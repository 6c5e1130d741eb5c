"""Task loss matching (TLM): train stitching layers on the task loss, both halves frozen.

Balogh & Jelasity (AAAI 2025), Sec. 3.1: T is trained by cross-entropy of the
stitched network B_{>j}(T(A_{<=i}(x))) with A and B frozen; the paper uses
Adam (lr 1e-3, weight decay 1e-5), batch 256, and initializes T randomly,
with the DM (pseudo-inverse) solution, or with the identity.

`make_tlm_trainer` trains many stitches at once: the loss is the sum of every
stitch's own cross-entropy, the stitches share no parameters, and Adam(W) is
coordinate-wise, so each stitch follows exactly the trajectory it would alone
(no global-norm clipping, which would couple them). One jitted block of steps
(`lax.scan`) runs per host call; frozen params are arguments, not constants.
On multi-device CPU each call waits for its block (`parallel.settle`), so a
host loop over blocks never has two blocks' all-reduces in flight.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh

from lossland.parallel import dispatch
from lossland.parallel import mesh as mesh_lib
from lossland.stitching import splice as capture_lib
from lossland.stitching import matching
from lossland.stitching.pairwise import pair_key


def tlm_optimizer(learning_rate: float = 1e-3, weight_decay: float = 1e-5
                  ) -> optax.GradientTransformation:
  """The paper's optimizer: AdamW(lr 1e-3, weight decay 1e-5), no clipping."""
  return optax.adamw(learning_rate, weight_decay=weight_decay)


def stitched_losses(model_a: nn.Module, params_a, model_b: nn.Module, params_b, stitches: dict,
                    pairs: Sequence[tuple[str, str]], x: jax.Array, labels: jax.Array
                    ) -> dict[str, jax.Array]:
  """{pair_key: mean cross-entropy of that stitched network}. Jit-safe; A's pass is shared."""
  params_a = jax.lax.stop_gradient(params_a)
  params_b = jax.lax.stop_gradient(params_b)
  _, acts_a = capture_lib.capture(model_a, params_a, x, sorted({a for a, _ in pairs}))
  out = {}
  for a, b in pairs:
    k = pair_key(a, b)
    logits = capture_lib.replace_layer(
        model_b, params_b, x, b,
        lambda target, a=a, k=k: matching.apply_stitch(stitches[k], acts_a[a], target))
    out[k] = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return out


def make_tlm_trainer(model_a: nn.Module, model_b: nn.Module, pairs: Sequence[tuple[str, str]],
                     optimizer: optax.GradientTransformation, *, mesh: Mesh):
  """Returns (init, train_block).

  `init(stitches) -> opt_state`; `train_block(stitches, opt_state, params_a, params_b,
  xs, labels) -> (stitches, opt_state, losses {pair: [steps]})` where xs: [steps, batch, ...]
  and labels: [steps, batch] host arrays (sharded on `data` here). Jitted once per shape.
  """
  pairs = list(pairs)

  def total(stitches, params_a, params_b, x, labels):
    losses = stitched_losses(model_a, params_a, model_b, params_b, stitches, pairs, x, labels)
    return sum(losses.values()), losses

  def one_step(carry, batch, params_a, params_b):
    stitches, opt_state = carry
    x, labels = batch
    (_, losses), grads = jax.value_and_grad(total, has_aux=True)(
        stitches, params_a, params_b, x, labels)
    updates, opt_state = optimizer.update(grads, opt_state, stitches)
    return (optax.apply_updates(stitches, updates), opt_state), losses

  rep = mesh_lib.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=(rep, rep, rep))
  def block(stitches, opt_state, params_a, params_b, xs, labels):
    (stitches, opt_state), losses = jax.lax.scan(
        lambda c, b: one_step(c, b, params_a, params_b), (stitches, opt_state), (xs, labels))
    return stitches, opt_state, losses

  def train_block(stitches, opt_state, params_a, params_b, xs, labels):
    xs, labels = mesh_lib.shard_batch((xs, labels), mesh, leading_axes=1)
    stitches, opt_state, params_a, params_b = jax.device_put(
        (stitches, opt_state, params_a, params_b), rep)
    return dispatch.settle(block(stitches, opt_state, params_a, params_b, xs, labels))

  def init(stitches):
    return jax.jit(optimizer.init, out_shardings=rep)(stitches)

  train_block.jitted = block
  return init, train_block
