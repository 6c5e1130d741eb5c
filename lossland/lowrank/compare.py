"""Pre-training comparison arms: LOST and its baselines at one parameter budget, trained alike.

An arm is a parameterization of every attention/MLP linear map (LOST, Li et al.
2025; SLTrain, Han et al. 2024; CoLA, Liu et al. 2024; plain low rank with SVD
or Xavier factors) or dense weights trained with GaLore (Zhao et al. 2024,
Alg. 1). Every arm gets the same optimizer recipe (AdamW, warmup then cosine
to a fraction of its peak rate) at its own best rate:

    spec = lowrank.arm_spec('lost', param_fraction=0.5)
    model = TransformerLM(..., dense=lowrank.dense_factory(spec.kind, **spec.kwargs))
    recipe = lowrank.OptimizerRecipe(num_steps=2000)
    run = lowrank.train_arm(spec, 3e-3, seed, model=model, params=params, loss_fn=loss_fn,
                            batch_fn=batch_fn, eval_set=val, recipe=recipe, mesh=mesh,
                            example_inputs=(tokens,))
    sweep = train.sweep_rates(lambda lr: lowrank.train_arm(spec, lr, 0, ...), rates, extend=2,
                              score=lambda r: r.val_loss)
    summary = lowrank.summarize_arm(sweep, [runs at sweep.best_rate for the other seeds])

`launch/experiments/lowrank_pretrain_compare.py` wires these to a config.
This module imports `lossland.train` (and so orbax), so `lossland.lowrank`
loads it only when one of its names is used.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from lossland import train as train_lib
from lossland.lowrank import factory, galore as galore_lib
from lossland.parallel import rules as rules_lib

# The keyword arguments of `arm_spec` (the layer settings a config holds).
ARM_SETTINGS = ('param_fraction', 'sparsity', 'gamma', 'density', 'sltrain_alpha')
ARMS = ('dense', 'lost', 'lost_silu', 'lost_gather', 'lowrank_svd', 'lowrank_xavier', 'cola',
        'sltrain', 'galore')


class Arm(NamedTuple):
  name: str
  kind: str  # the `dense_factory` kind
  kwargs: dict  # its layer fields
  galore: bool  # dense weights, trained with GaLore-Adam instead of AdamW


def arm_spec(name: str, *, param_fraction: float = 0.5, sparsity: float = 0.05,
             gamma: float = 0.5, density: float = 0.03, sltrain_alpha: float = 32.0) -> Arm:
  """The layer kind, layer fields and optimizer of arm `name` (one of `ARMS`).

  `param_fraction` is every factorized arm's budget (of each layer's dense
  parameters); `sparsity` and `gamma` are LOST's s and γ, `density` and
  `sltrain_alpha` SLTrain's δ and α. The low-rank and CoLA arms take the largest
  rank within the same budget.
  """
  f = param_fraction
  lost = dict(param_fraction=f, sparsity=sparsity, gamma=gamma)
  specs = {
      'dense': ('dense', {}, False),
      'lost': ('lost', lost, False),
      'lost_silu': ('lost', dict(lost, activation='silu'), False),
      'lost_gather': ('lost', dict(lost, impl='gather'), False),  # same maths, other kernel
      'lowrank_svd': ('lowrank', dict(param_fraction=f, factor_init='svd'), False),
      'lowrank_xavier': ('lowrank', dict(param_fraction=f, factor_init='xavier'), False),
      'cola': ('cola', dict(param_fraction=f), False),
      'sltrain': ('sltrain', dict(param_fraction=f, density=density, alpha=sltrain_alpha), False),
      'galore': ('dense', {}, True),
  }
  if name not in specs:
    raise ValueError(f'unknown arm {name!r} (config key lowrank.arms); available: {list(ARMS)}')
  return Arm(name, *specs[name])


def galore_mask(params) -> Any:
  """True for the 2-D kernels of attention and MLP layers (GaLore projects those), else False."""
  def leaf(path, x):
    name = rules_lib.path_name(path)
    return x.ndim == 2 and ('/attn/' in name or '/mlp/' in name)
  return jax.tree_util.tree_map_with_path(leaf, params)


@dataclasses.dataclass(frozen=True)
class OptimizerRecipe:
  """AdamW (or GaLore-Adam for a GaLore arm), linear warmup, cosine to `final_lr_ratio` x peak."""
  num_steps: int
  warmup_fraction: float = 0.1
  final_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.0
  grad_clip: float | None = 1.0
  galore_rank: int = 64
  galore_gap: int = 200  # steps between GaLore's projector updates (T in Alg. 1)
  galore_scale: float = 0.25  # GaLore's α

  @property
  def warmup_steps(self) -> int:
    return max(1, int(self.warmup_fraction * self.num_steps))

  def optimizer(self, arm: Arm, lr: float) -> optax.GradientTransformation:
    schedule = train_lib.warmup_cosine(lr, self.warmup_steps, self.num_steps,
                                       lr * self.final_lr_ratio)
    if arm.galore:
      return galore_lib.galore_adamw(schedule, rank=self.galore_rank,
                                     update_proj_gap=self.galore_gap, scale=self.galore_scale,
                                     b1=self.b1, b2=self.b2, weight_decay=self.weight_decay,
                                     grad_clip=self.grad_clip, mask=galore_mask)
    return train_lib.adamw(learning_rate=schedule, b1=self.b1, b2=self.b2,
                           weight_decay=self.weight_decay, grad_clip=self.grad_clip)


@dataclasses.dataclass(frozen=True)
class ArmRun:
  """One trained (arm, rate, seed): the final validation loss and what training it cost."""
  arm: str
  lr: float
  seed: int
  val_loss: float  # inf when the run diverged
  step_ms: float  # steady-state milliseconds per optimizer step (nan if diverged)
  train_state_bytes: int  # params + optimizer state (0 if diverged)
  linear_params: int  # parameters of the factorized linear maps
  wall_seconds: float

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ArmRun:
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def train_arm(arm: Arm, lr: float, seed: int, *, model, params, loss_fn: Callable,
              batch_fn: Callable[[int], Any], eval_set: Mapping[str, Any],
              recipe: OptimizerRecipe, mesh: Mesh, example_inputs: Sequence[Any],
              workdir: str | None = None, steps_per_block: int = 1, show_progress: bool = False,
              log: Callable[[str], None] | None = None) -> ArmRun:
  """Trains `model` (built with `arm`'s dense factory) at peak rate `lr`; a diverged run scores inf.

  Args:
    arm: from `arm_spec`; `model` must use its `dense_factory(arm.kind, **arm.kwargs)`.
    lr: peak learning rate.
    seed: data seed (`data_seed`); the step rng is `key(seed + 1)`.
    model, params: the model and its initial params (or a function returning them).
    loss_fn, batch_fn: as for `train.fit`.
    eval_set: the validation stack [num_batches, batch, ...], scored once at the end.
    recipe: the optimizer recipe shared by every arm.
    mesh: device mesh with a `data` axis.
    example_inputs: inputs for `linear_layers(model, *example_inputs)` (the census of
      factorized layers whose parameters `linear_params` counts).
    workdir, steps_per_block, show_progress: passed to `train.fit`.
    log: called with a line when the run diverges.
  """
  paths = [layer.path for layer in factory.linear_layers(model, *example_inputs)]
  params = params() if callable(params) else params
  start = time.perf_counter()
  try:
    result = train_lib.fit(
        params=params, loss_fn=loss_fn, optimizer=recipe.optimizer(arm, lr), batch_fn=batch_fn,
        num_steps=recipe.num_steps, mesh=mesh, rng=jax.random.key(seed + 1), data_seed=seed,
        eval_sets={'val': eval_set}, eval_every=recipe.num_steps, workdir=workdir,
        steps_per_block=steps_per_block, show_progress=show_progress)
    val_loss = result.evals[-1]['val_loss']
    step_ms = (1e3 * result.steady_seconds / result.steady_steps if result.steady_steps
               else math.nan)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((result.state.params,
                                                         result.state.opt_state)))
  except FloatingPointError as e:  # a diverged rate loses the sweep, it does not stop it
    if log:
      log(f'{arm.name} lr={lr:g} seed={seed} diverged: {e}')
    val_loss, step_ms, state_bytes = math.inf, math.nan, 0
  return ArmRun(arm=arm.name, lr=lr, seed=seed, val_loss=float(val_loss), step_ms=float(step_ms),
                train_state_bytes=int(state_bytes),
                linear_params=factory.linear_param_count(params, paths),
                wall_seconds=time.perf_counter() - start)


def cached_arm_run(run_dir: str, train: Callable[[], ArmRun] | None) -> ArmRun | None:
  """The run stored in `run_dir/result.json`; else `train()`, stored there (None: train nothing)."""
  path = os.path.join(run_dir, 'result.json')
  if os.path.exists(path):
    with open(path) as f:
      return ArmRun.from_dict(json.load(f))
  if train is None:
    return None
  run = train()
  os.makedirs(run_dir, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(run.to_dict(), f)
  return run


@dataclasses.dataclass(frozen=True)
class ArmSummary:
  """An arm at its best rate: the loss over seeds, its size and cost, relative to dense."""
  seeds: int
  val_loss_mean: float
  val_loss_std: float  # sample std over seeds (ddof 1); 0 for one seed
  best_lr: float
  linear_params: int
  step_ms: float  # median over the seeds' runs
  train_state_bytes: int
  sweep_val_loss: dict  # '<rate>' -> the seed-0 validation loss of the sweep
  param_fraction: float | None = None  # set by `relative_to`
  step_ratio: float | None = None
  state_bytes_ratio: float | None = None

  def to_dict(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def summarize_arm(sweep: train_lib.RateSweep, rest: Sequence[ArmRun]) -> ArmSummary:
  """The sweep's best run plus the other seeds' runs at its rate."""
  best = sweep.best
  if best is None:
    raise ValueError('the sweep has no finished run to summarize')
  losses = np.array([best.val_loss] + [r.val_loss for r in rest])
  return ArmSummary(
      seeds=len(losses), val_loss_mean=float(losses.mean()),
      val_loss_std=float(losses.std(ddof=1)) if len(losses) > 1 else 0.0, best_lr=best.lr,
      linear_params=best.linear_params,
      step_ms=float(np.nanmedian([best.step_ms] + [r.step_ms for r in rest])),
      train_state_bytes=best.train_state_bytes,
      sweep_val_loss={f'{r.lr:g}': r.val_loss for r in sweep.runs})


def relative_to(summaries: Mapping[str, ArmSummary],
                reference: str = 'dense') -> dict[str, ArmSummary]:
  """Each summary with its parameters, step time and state bytes as ratios to `reference`'s."""
  if reference not in summaries:
    raise ValueError(f'no {reference!r} arm to compare with; have {sorted(summaries)}')
  ref = summaries[reference]
  return {name: dataclasses.replace(
      s, param_fraction=s.linear_params / ref.linear_params, step_ratio=s.step_ms / ref.step_ms,
      state_bytes_ratio=s.train_state_bytes / ref.train_state_bytes)
      for name, s in summaries.items()}
