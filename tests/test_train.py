"""The training loop: 1 vs 8 devices, shardings, exact resume, NaN handling, one trace per shape."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lossland import data, models, parallel, train

VOCAB, SEQ, BATCH = 40, 16, 8
TOKENS = np.random.default_rng(0).integers(0, VOCAB, 5000).astype(np.int32)
MODEL = models.TransformerLM(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, mlp_dim=64)
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))
OPTIMIZER = train.adamw(learning_rate=train.warmup_cosine(3e-3, 2, 12, 3e-4), weight_decay=0.1)


def batch_fn(step):
  return data.lm_batch(TOKENS, step, batch_size=BATCH, seq_len=SEQ, seed=0)


def _fit(mesh, **kw):
  kw.setdefault('num_steps', 6)
  return train.fit(params=PARAMS, loss_fn=train.next_token_loss(MODEL.apply), optimizer=OPTIMIZER,
                   batch_fn=batch_fn, mesh=mesh, rng=jax.random.key(1), data_seed=0,
                   steps_per_block=kw.pop('steps_per_block', 3), show_progress=False, **kw)


def test_one_device_and_eight_devices_give_the_same_losses():
  one = _fit(parallel.make_mesh({'data': 1, 'model': 1}, jax.devices()[:1]))
  eight = _fit(parallel.make_mesh({'data': 8, 'model': 1}, jax.devices()))
  np.testing.assert_allclose(eight.train_losses, one.train_losses, rtol=1e-5)
  assert len(one.train_losses) == 6
  kernel = eight.state.params['params']['block_0']['mlp']['up']['kernel']
  assert kernel.sharding.spec == P() and len(kernel.sharding.device_set) == 8


def test_model_parallel_rules_shard_params_and_optimizer_state():
  mesh = parallel.make_mesh({'data': 4, 'model': 2}, jax.devices())
  rules = [('.*/mlp/(gate|up)/kernel', P(None, 'model')), ('.*/mlp/down/kernel', P('model', None))]
  sharded = _fit(mesh, param_rules=rules)
  reference = _fit(parallel.make_mesh({'data': 1, 'model': 1}, jax.devices()[:1]))
  np.testing.assert_allclose(sharded.train_losses, reference.train_losses, rtol=1e-5)
  mlp = sharded.state.params['params']['block_1']['mlp']
  assert mlp['up']['kernel'].sharding.spec == P(None, 'model')
  assert mlp['down']['kernel'].sharding.spec == P('model', None)
  adam = sharded.state.opt_state[1][0]
  assert adam.mu['params']['block_1']['mlp']['up']['kernel'].sharding.spec == P(None, 'model')


@pytest.mark.slow  # ~25 s; test_checkpoint_faults' SIGTERM resume checks the same equality
def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
  mesh = parallel.make_mesh({'data': 2, 'model': 1}, jax.devices()[:2])
  full = _fit(mesh, num_steps=8, steps_per_block=2)
  workdir = str(tmp_path / 'run')
  first = _fit(mesh, num_steps=4, steps_per_block=2, workdir=workdir, checkpoint_every=2)
  assert first.resumed_from is None
  resumed = _fit(mesh, num_steps=8, steps_per_block=2, workdir=workdir, checkpoint_every=2)
  assert resumed.resumed_from == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
               jax.device_get(full.state.params))
  np.testing.assert_array_equal(resumed.train_losses, full.train_losses[4:])
  checkpointer = train.Checkpointer(workdir, every=2)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          resumed.state)
  _, position = checkpointer.restore(8, abstract)
  assert position == {'step': 8, 'seed': 0}
  with pytest.raises(ValueError, match='data seed'):
    train.fit(params=PARAMS, loss_fn=train.next_token_loss(MODEL.apply), optimizer=OPTIMIZER,
              batch_fn=batch_fn, mesh=mesh, rng=jax.random.key(1), data_seed=5, num_steps=10,
              workdir=workdir, checkpoint_every=2, show_progress=False)


def test_nan_loss_stops_without_overwriting_the_last_good_checkpoint(tmp_path):
  mesh = parallel.make_mesh({'data': 2, 'model': 1}, jax.devices()[:2])
  mlp = models.MLP(features=(8,), num_classes=3)
  x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
  params = mlp.init(jax.random.key(0), x)

  def poisoned(step):
    return {'inputs': x * (np.nan if step >= 6 else 1.0), 'labels': np.arange(4) % 3}

  workdir = str(tmp_path / 'nan')
  with pytest.raises(FloatingPointError, match='at step 6.*last good checkpoint: 6'):
    train.fit(params=params, loss_fn=train.classification_loss(mlp.apply),
              optimizer=train.adamw(learning_rate=1e-2), batch_fn=poisoned, num_steps=10,
              mesh=mesh, rng=jax.random.key(0), data_seed=0, workdir=workdir,
              checkpoint_every=2, steps_per_block=2, show_progress=False)
  checkpointer = train.Checkpointer(workdir, every=2)
  assert checkpointer.latest_step() == 6
  state = jax.eval_shape(lambda: train.init_train_state(params, train.adamw(learning_rate=1e-2)))
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                      sharding=parallel.replicated(mesh)), state)
  restored, _ = checkpointer.restore(6, state)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(restored.params))


def test_each_compiled_function_traces_once_per_shape():
  traces = []
  base = train.next_token_loss(MODEL.apply)

  def counting_loss(params, batch, rng):
    traces.append(batch['inputs'].shape)
    return base(params, batch, rng)

  eval_set = data.stack_batches([batch_fn(100 + i) for i in range(2)])
  train.fit(params=PARAMS, loss_fn=counting_loss, optimizer=OPTIMIZER, batch_fn=batch_fn,
            mesh=parallel.make_mesh({'data': 2, 'model': 1}, jax.devices()[:2]),
            rng=jax.random.key(1), data_seed=0, num_steps=12, steps_per_block=2,
            eval_sets={'val': eval_set}, eval_every=2, show_progress=False)
  # One trace for the train block, at most two for evaluation (shape inference + scan body),
  # although 6 blocks and 6 evaluations ran.
  assert len(traces) <= 3, traces


def test_an_interrupted_save_leaves_the_previous_checkpoint_in_charge(tmp_path):
  mesh = parallel.make_mesh({'data': 2, 'model': 1}, jax.devices()[:2])
  workdir = str(tmp_path / 'run')
  _fit(mesh, num_steps=4, steps_per_block=2, workdir=workdir, checkpoint_every=2)
  # What a save killed mid-write leaves behind: orbax's temporary directory.
  partial = tmp_path / 'run' / 'checkpoints' / '6.orbax-checkpoint-tmp-1700000000'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'garbage').write_bytes(b'\x00' * 10)
  resumed = _fit(mesh, num_steps=6, steps_per_block=2, workdir=workdir, checkpoint_every=2)
  assert resumed.resumed_from == 4
  assert int(resumed.state.step) == 6
