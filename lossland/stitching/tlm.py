"""Task loss matching (TLM): train stitching layers on the task loss, both halves frozen.

Balogh & Jelasity (AAAI 2025), Sec. 3.1: T is trained by cross-entropy of the
stitched network B_{>j}(T(A_{<=i}(x))) with A and B frozen; the paper uses
Adam (lr 1e-3, weight decay 1e-5), batch 256, and initializes T randomly,
with the DM (pseudo-inverse) solution, or with the identity.

`TaskLossMatching` trains many stitches at once: the loss is the sum of every
stitch's own cross-entropy, the stitches share no parameters, and Adam(W) is
coordinate-wise, so each stitch follows exactly the trajectory it would alone
(no global-norm clipping, which would couple them). One jitted block of steps
(`lax.scan`) runs per host call; frozen params are arguments, not constants.
On multi-device CPU each call waits for its block (`parallel.settle`), so a
host loop over blocks never has two blocks' all-reduces in flight.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from lossland.parallel import dispatch
from lossland.parallel import mesh as mesh_lib
from lossland.stitching import matching
from lossland.stitching import splice as capture_lib
from lossland.stitching.pairs import Pair, as_pairs
from lossland.stitching.pairwise import _kwargs, check_batch, layer_shapes
from lossland.stitching.splice import Model


def tlm_optimizer(learning_rate: float = 1e-3, weight_decay: float = 1e-5
                  ) -> optax.GradientTransformation:
  """The paper's optimizer: AdamW(lr 1e-3, weight decay 1e-5), no clipping."""
  return optax.adamw(learning_rate, weight_decay=weight_decay)


def stitch_dims(model_a: Model, params_a, model_b: Model, params_b, x: jax.Array,
                pairs: Sequence[Pair], *, apply_kwargs: Mapping[str, Any] | None = None,
                apply_kwargs_b: Mapping[str, Any] | None = None) -> dict[Pair, tuple[int, int]]:
  """{Pair: (d_in, d_out)}: the feature sizes (last axes) each stitch maps between."""
  pairs = as_pairs(pairs)
  kwargs_a, kwargs_b = _kwargs(apply_kwargs, apply_kwargs_b)
  shapes_a = layer_shapes(model_a, params_a, x, sorted({p.source for p in pairs}),
                          apply_kwargs=kwargs_a)
  shapes_b = layer_shapes(model_b, params_b, x, sorted({p.target for p in pairs}),
                          apply_kwargs=kwargs_b)
  return {p: (shapes_a[p.source][-1], shapes_b[p.target][-1]) for p in pairs}


def init_stitches(rng: jax.Array | None, dims: Mapping[Pair, tuple[int, int]], *,
                  kind: str = 'random') -> dict[Pair, dict]:
  """{Pair: stitch} for every pair of `dims`: the i-th pair (in `dims` order) gets fold_in(rng, i).

  kind: 'random' (LeCun normal, zero bias) or 'identity' (rng unused); for the
  DM init, pass `DMStatistics.solve_all()` to TLM directly.
  """
  if kind == 'random' and rng is None:
    raise ValueError("kind='random' needs an rng key")
  return {Pair(*p): matching.init_stitch(None if rng is None else jax.random.fold_in(rng, i),
                                         d_in, d_out, kind)
          for i, (p, (d_in, d_out)) in enumerate(dims.items())}


def stitched_losses(model_a: Model, params_a, model_b: Model, params_b,
                    stitches: Mapping[Pair, dict], pairs: Sequence[Pair], x: jax.Array,
                    labels: jax.Array, *, apply_kwargs: Mapping[str, Any] | None = None,
                    apply_kwargs_b: Mapping[str, Any] | None = None) -> dict[Pair, jax.Array]:
  """{Pair: mean cross-entropy of that stitched network}. Jit-safe; A's pass is shared."""
  kwargs_a, kwargs_b = _kwargs(apply_kwargs, apply_kwargs_b)
  params_a = jax.lax.stop_gradient(params_a)
  params_b = jax.lax.stop_gradient(params_b)
  _, acts_a = capture_lib.capture(model_a, params_a, x, sorted({p.source for p in pairs}),
                                  apply_kwargs=kwargs_a)
  out = {}
  for pair in pairs:
    logits = capture_lib.replace_layer(
        model_b, params_b, x, pair.target,
        lambda target, pair=pair: matching.apply_stitch(stitches[pair], acts_a[pair.source],
                                                        target),
        apply_kwargs=kwargs_b)
    out[pair] = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return out


class TLMBlock(NamedTuple):
  """What one `TaskLossMatching.train_block` call returns; losses {Pair: [steps]} (device)."""
  stitches: dict
  opt_state: Any
  losses: dict


class TLMResult(NamedTuple):
  """What `TaskLossMatching.fit` returns: the trained stitches and every step's loss (host)."""
  stitches: dict  # {Pair: {'w', 'b'}}
  opt_state: Any
  losses: dict  # {Pair: np.ndarray [num_steps]}


class TaskLossMatching:
  """Trains the stitches of `pairs` (A's source layer -> B's target layer) on the task loss.

  Args:
    model_a, model_b: modules or apply_fns; `apply_kwargs` (and `apply_kwargs_b`
      for B when it differs) are passed to them.
    pairs: the stitches to train, jointly and independently.
    optimizer: default `tlm_optimizer()`, the paper's AdamW.
    mesh: batches are sharded on its `data` axis; None: all local devices.

  Batches are dicts {'inputs', 'labels'} (integer class labels, the
  cross-entropy's targets). `fit` is the loop; `init` and `train_block` are its
  parts, for a loop of your own. The block is jitted once per shape (`self.block`).
  """

  def __init__(self, model_a: Model, model_b: Model, pairs: Sequence[Pair],
               optimizer: optax.GradientTransformation | None = None, *,
               mesh: Mesh | None = None, apply_kwargs: Mapping[str, Any] | None = None,
               apply_kwargs_b: Mapping[str, Any] | None = None):
    self.pairs = as_pairs(pairs)
    self.optimizer = tlm_optimizer() if optimizer is None else optimizer
    self.mesh = mesh_lib.data_mesh(mesh)
    kwargs_a, kwargs_b = _kwargs(apply_kwargs, apply_kwargs_b)
    pairs, optimizer = self.pairs, self.optimizer

    def total(stitches, params_a, params_b, x, labels):
      losses = stitched_losses(model_a, params_a, model_b, params_b, stitches, pairs, x, labels,
                               apply_kwargs=kwargs_a, apply_kwargs_b=kwargs_b)
      return sum(losses.values()), losses

    def one_step(carry, batch, params_a, params_b):
      stitches, opt_state = carry
      x, labels = batch
      (_, losses), grads = jax.value_and_grad(total, has_aux=True)(
          stitches, params_a, params_b, x, labels)
      updates, opt_state = optimizer.update(grads, opt_state, stitches)
      return (optax.apply_updates(stitches, updates), opt_state), losses

    rep = mesh_lib.replicated(self.mesh)

    @functools.partial(jax.jit, out_shardings=(rep, rep, rep))
    def block(stitches, opt_state, params_a, params_b, xs, labels):
      (stitches, opt_state), losses = jax.lax.scan(
          lambda c, b: one_step(c, b, params_a, params_b), (stitches, opt_state), (xs, labels))
      return stitches, opt_state, losses

    self.block = block
    self._init = jax.jit(optimizer.init, out_shardings=rep)

  def _stitches(self, stitches: Mapping) -> dict[Pair, dict]:
    stitches = {Pair(*k): v for k, v in stitches.items()}
    if set(stitches) != set(self.pairs):
      raise KeyError(f'the stitches are for {sorted(str(p) for p in stitches)} but this trainer '
                     f'trains {sorted(str(p) for p in self.pairs)}')
    return stitches

  def init(self, stitches: Mapping[Pair, dict]):
    """The optimizer state of `stitches` (replicated)."""
    return self._init(self._stitches(stitches))

  def train_block(self, stitches: Mapping[Pair, dict], opt_state, params_a, params_b,
                  batches: Mapping[str, np.ndarray]) -> TLMBlock:
    """len(batches['inputs']) steps in one jitted scan; batches: {'inputs': [steps, batch, ...],
    'labels': [steps, batch]} host arrays (sharded on `data` here)."""
    check_batch(batches, ('inputs', 'labels'))
    xs, labels = mesh_lib.shard_batch((batches['inputs'], batches['labels']), self.mesh,
                                      leading_axes=1)
    rep = mesh_lib.replicated(self.mesh)
    stitches, opt_state, params_a, params_b = jax.device_put(
        (self._stitches(stitches), opt_state, params_a, params_b), rep)
    return TLMBlock(*dispatch.settle(self.block(stitches, opt_state, params_a, params_b, xs,
                                                labels)))

  def fit(self, stitches: Mapping[Pair, dict], params_a, params_b,
          batch_fn: Callable[[int], Mapping[str, np.ndarray]], *, num_steps: int,
          steps_per_block: int = 100) -> TLMResult:
    """`num_steps` steps from `stitches`; step s trains on `batch_fn(s)` ({'inputs', 'labels'}).

    Steps run in jitted blocks of `steps_per_block` (the last may be shorter,
    one more trace). Deterministic given `batch_fn`.
    """
    if num_steps < 1 or steps_per_block < 1:
      raise ValueError(f'num_steps={num_steps} and steps_per_block={steps_per_block} must be '
                       'positive')
    stitches = self._stitches(stitches)
    opt_state = self.init(stitches)
    losses = []
    for start in range(0, num_steps, steps_per_block):
      steps = [batch_fn(s) for s in range(start, min(start + steps_per_block, num_steps))]
      for b in steps:
        check_batch(b, ('inputs', 'labels'))
      stacked = {k: np.stack([np.asarray(b[k]) for b in steps]) for k in ('inputs', 'labels')}
      stitches, opt_state, block_losses = self.train_block(stitches, opt_state, params_a,
                                                           params_b, stacked)
      losses.append(jax.device_get(block_losses))
    return TLMResult(stitches, opt_state,
                     {p: np.concatenate([np.asarray(l[p]) for l in losses]) for p in self.pairs})
