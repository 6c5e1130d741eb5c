"""fit's EMA of the params (against a hand-written loop), its resume, and the time budget."""
import jax
import numpy as np
import optax
import pytest

from lossland import models, parallel, train

MLP = models.MLP(features=(8,), num_classes=3)
X = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
Y = (np.arange(64) % 3).astype(np.int32)
PARAMS = MLP.init(jax.random.key(0), X[:1])
OPTIMIZER = train.adamw(learning_rate=train.warmup_constant(3e-2, 2), weight_decay=0.1)
LOSS = train.classification_loss(MLP.apply)
DECAY = 0.8


def batch_fn(step):
  rows = (np.arange(8) + 8 * step) % 64
  return {'inputs': X[rows], 'labels': Y[rows]}


def _fit(**kw):
  mesh = parallel.make_mesh({'data': 2, 'model': 1}, jax.devices()[:2])
  return train.fit(params=PARAMS, loss_fn=LOSS, optimizer=OPTIMIZER, batch_fn=batch_fn,
                   mesh=mesh, rng=jax.random.key(1), data_seed=0, show_progress=False, **kw)


def test_ema_equals_a_hand_computed_per_step_ema():
  result = _fit(num_steps=6, steps_per_block=3, ema_decay=DECAY)

  @jax.jit
  def step_fn(params, opt_state, batch):
    grads, _ = jax.grad(LOSS, has_aux=True)(params, batch, jax.random.key(1))
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state, ema = PARAMS, OPTIMIZER.init(PARAMS), PARAMS
  for step in range(6):
    params, opt_state = step_fn(params, opt_state, batch_fn(step))
    ema = jax.tree.map(lambda e, p: DECAY * e + (1 - DECAY) * p, ema, params)
  # Same float32 ops in another order (scan vs python loop, 2-device mean): a few ulps.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(result.state.params), jax.device_get(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(result.ema_params), jax.device_get(ema))
  # The EMA lags the params: it is not just a copy of them.
  kernel = lambda t: np.asarray(t['params']['dense_0']['kernel'])  # noqa: E731
  assert np.abs(kernel(result.ema_params) - kernel(result.state.params)).max() > 1e-3
  assert _fit(num_steps=2).ema_params is None


def test_resumed_ema_equals_the_uninterrupted_one(tmp_path):
  full = _fit(num_steps=8, steps_per_block=2, ema_decay=DECAY)
  workdir = str(tmp_path / 'run')
  _fit(num_steps=4, steps_per_block=2, ema_decay=DECAY, workdir=workdir, checkpoint_every=2)
  resumed = _fit(num_steps=8, steps_per_block=2, ema_decay=DECAY, workdir=workdir,
                 checkpoint_every=2)
  assert resumed.resumed_from == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.ema_params),
               jax.device_get(full.ema_params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
               jax.device_get(full.state.params))


def test_a_spent_time_budget_stops_after_the_first_block_with_a_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  eval_set = {k: v[None] for k, v in batch_fn(0).items()}
  stopped = _fit(num_steps=9, steps_per_block=3, ema_decay=DECAY, workdir=workdir,
                 time_budget_s=0.0, eval_sets={'val': eval_set})
  assert stopped.stopped_by_time_budget and stopped.step == 3
  assert len(stopped.train_losses) == 3
  assert [e['step'] for e in stopped.evals] == [3]
  assert train.Checkpointer(workdir, every=3).latest_step() == 3
  # The same call resumes from it with a fresh budget, here enough to finish.
  finished = _fit(num_steps=9, steps_per_block=3, ema_decay=DECAY, workdir=workdir,
                  time_budget_s=1e6)
  assert finished.resumed_from == 3 and finished.step == 9
  assert not finished.stopped_by_time_budget


@pytest.mark.parametrize('kw, match', [({'ema_decay': 1.0}, 'ema_decay'),
                                       ({'ema_decay': -0.1}, 'ema_decay'),
                                       ({'time_budget_s': -1.0}, 'time_budget_s')])
def test_bad_ema_decay_or_budget_is_a_clear_error(kw, match):
  with pytest.raises(ValueError, match=match):
    _fit(num_steps=2, **kw)


def test_warmup_constant_ramps_then_holds():
  schedule = train.warmup_constant(1.0, 4)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 2, 4, 100)], [0, 0.5, 1, 1])
  assert float(train.warmup_constant(2.0, 0)(7)) == 2.0

