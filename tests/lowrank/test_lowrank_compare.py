"""lowrank.compare: arm specs, the shared optimizer recipe, GaLore's mask, runs, summaries."""
import json
import math

import jax
import numpy as np
import pytest

from lossland import lowrank, models, parallel, train


def test_arm_specs_share_the_budget_and_unknown_arms_name_the_choices():
  lost = lowrank.arm_spec('lost', param_fraction=0.4, sparsity=0.1, gamma=0.7)
  assert (lost.kind, lost.kwargs, lost.galore) == (
      'lost', {'param_fraction': 0.4, 'sparsity': 0.1, 'gamma': 0.7}, False)
  assert lowrank.arm_spec('lost_silu').kwargs['activation'] == 'silu'
  assert lowrank.arm_spec('lowrank_svd', param_fraction=0.4).kwargs == {
      'param_fraction': 0.4, 'factor_init': 'svd'}
  assert lowrank.arm_spec('sltrain', density=0.1, sltrain_alpha=8.0).kwargs == {
      'param_fraction': 0.5, 'density': 0.1, 'alpha': 8.0}
  assert lowrank.arm_spec('galore') == lowrank.Arm('galore', 'dense', {}, True)
  assert {lowrank.arm_spec(a).name for a in lowrank.ARMS} == set(lowrank.ARMS)
  with pytest.raises(ValueError, match=r"unknown arm 'lots' \(config key lowrank.arms\)"):
    lowrank.arm_spec('lots')


def test_recipe_is_adamw_with_warmup_cosine_and_galore_projects_attention_and_mlp_kernels():
  recipe = lowrank.OptimizerRecipe(num_steps=20, warmup_fraction=0.1, final_lr_ratio=0.1,
                                   weight_decay=0.1, galore_rank=2, galore_gap=5)
  assert recipe.warmup_steps == 2
  assert lowrank.OptimizerRecipe(num_steps=5).warmup_steps == 1  # never 0
  shapes = {'embed': {'embedding': (16, 8)}, 'final_norm': {'scale': (8,)},
            'block_0': {'attn': {'query': {'kernel': (8, 8)}},
                        'mlp': {'up': {'kernel': (8, 16), 'bias': (16,)}}}}
  params = {'params': jax.tree.map(lambda s: np.ones(s, np.float32), shapes,
                                   is_leaf=lambda s: isinstance(s, tuple))}
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
  by_hand = train.adamw(learning_rate=train.warmup_cosine(1e-2, 2, 20, 1e-3), b2=0.95,
                        weight_decay=0.1)
  ours = recipe.optimizer(lowrank.arm_spec('dense'), 1e-2)

  @jax.jit
  def three_updates(state_a, state_b):
    for _ in range(3):
      (ua, state_a), (ub, state_b) = ours.update(grads, state_a, params), by_hand.update(
          grads, state_b, params)
    return ua, ub
  jax.tree.map(np.testing.assert_array_equal, *three_updates(ours.init(params),
                                                             by_hand.init(params)))
  mask = lowrank.galore_mask(params)
  flat = {parallel.path_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat['params/block_0/mlp/up/kernel'] and flat['params/block_0/attn/query/kernel']
  assert not flat['params/embed/embedding']
  assert not any(flat[k] for k in flat if not k.endswith('kernel'))
  # The GaLore arm keeps rank-2 moments for exactly the masked kernels (min side > rank).
  galore = recipe.optimizer(lowrank.arm_spec('galore'), 1e-2)
  state = jax.eval_shape(galore.init, params)
  galore_state = next(s for s in state if isinstance(s, lowrank.galore.GaLoreState))
  moments = {parallel.path_name(p): m.shape
             for p, m in jax.tree_util.tree_flatten_with_path(galore_state.mu)[0]}
  assert moments['params/block_0/mlp/up/kernel'] == (2, 16)  # [8, 16]: its 8 rows projected
  assert moments['params/embed/embedding'] == (16, 8)  # not projected


def test_a_diverged_arm_scores_inf_and_the_run_round_trips_through_its_cache(tmp_path):
  mlp = models.MLP(features=(8,), num_classes=3)
  x = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
  params = mlp.init(jax.random.key(0), x[:1])
  batch = {'inputs': x, 'labels': np.arange(8) % 3}
  poisoned = lambda step: dict(batch, inputs=x * np.nan)  # noqa: E731
  lines = []
  run = lowrank.train_arm(
      lowrank.arm_spec('dense'), 1e-2, 0, model=mlp, params=params,
      loss_fn=train.classification_loss(mlp.apply), batch_fn=poisoned,
      eval_set={k: v[None] for k, v in batch.items()}, recipe=lowrank.OptimizerRecipe(num_steps=4),
      mesh=parallel.make_mesh({'data': 1}, jax.devices()[:1]), example_inputs=(x[:1],),
      steps_per_block=2, log=lines.append)
  assert run.val_loss == math.inf and run.train_state_bytes == 0 and math.isnan(run.step_ms)
  assert run.linear_params == 5 * 8 + 8 + 8 * 3 + 3  # both Dense layers, with biases
  assert 'dense lr=0.01 seed=0 diverged' in lines[0]
  run_dir = str(tmp_path / 'run')
  assert lowrank.cached_arm_run(run_dir, None) is None
  assert lowrank.cached_arm_run(run_dir, lambda: run) == run
  cached = lowrank.cached_arm_run(run_dir, None)  # from result.json, nothing trained
  assert json.dumps(cached.to_dict()) == json.dumps(run.to_dict())  # (nan != nan as a field)


def _run(arm, lr, seed, loss, ms=2.0):
  return lowrank.ArmRun(arm, lr, seed, loss, ms, 1000, 100, 1.0)


def test_summary_takes_the_best_rate_and_ratios_are_to_dense():
  sweep = train.sweep_rates(lambda lr: _run('lost', lr, 0, {1e-3: 3.0, 3e-3: 2.0, 1e-2: 2.5}[lr]),
                            [1e-3, 3e-3, 1e-2], score=lambda r: r.val_loss)
  summary = lowrank.summarize_arm(sweep, [_run('lost', 3e-3, 1, 2.2, ms=4.0),
                                          _run('lost', 3e-3, 2, 2.4, ms=np.nan)])
  assert summary.best_lr == 3e-3 and summary.seeds == 3
  assert summary.val_loss_mean == pytest.approx(2.2)
  assert summary.val_loss_std == pytest.approx(0.2)  # ddof 1 of (2.0, 2.2, 2.4)
  assert summary.step_ms == 3.0  # median ignoring the diverged run's nan
  assert summary.sweep_val_loss == {'0.001': 3.0, '0.003': 2.0, '0.01': 2.5}
  assert 'param_fraction' not in summary.to_dict()
  dense = lowrank.ArmSummary(1, 1.9, 0.0, 1e-3, 200, 1.5, 4000, {})
  both = lowrank.relative_to({'dense': dense, 'lost': summary})
  assert both['lost'].param_fraction == 0.5 and both['lost'].step_ratio == 2.0
  assert both['lost'].state_bytes_ratio == 0.25 and both['dense'].param_fraction == 1.0
  with pytest.raises(ValueError, match="no 'dense' arm"):
    lowrank.relative_to({'lost': summary})

