"""train.fit_classifier and train.accuracy: the hand-wired recipe's numbers, learning, errors."""
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from lossland import data, models, parallel, train

RNG = np.random.default_rng(0)
X = RNG.normal(size=(60, 6)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int32) + (X[:, 1] > 0)  # 3 classes, learnable
MLP = models.MLP(features=(16,), num_classes=3)
PARAMS = MLP.init(jax.random.key(0), X[:1])


def test_fit_classifier_equals_the_hand_wired_fit_and_learns():
  optimizer = train.adamw(learning_rate=3e-2)
  mesh = parallel.make_mesh({'data': 4}, jax.devices()[:4])
  result = train.fit_classifier(MLP, PARAMS, X, Y, batch_size=12, num_steps=40, optimizer=optimizer,
                                rng=jax.random.key(1), data_seed=3, mesh=mesh, steps_per_block=10)

  def batch_fn(step):  # the recipe launch/tasks.py and the experiments wrote by hand
    idx = data.epoch_indices(step, batch_size=12, num_examples=60, seed=3)
    return {'inputs': X[idx], 'labels': Y[idx]}
  by_hand = train.fit(params=PARAMS, loss_fn=train.classification_loss(MLP.apply),
                      optimizer=optimizer, batch_fn=batch_fn, num_steps=40, mesh=mesh,
                      rng=jax.random.key(1), data_seed=3, steps_per_block=10, show_progress=False)
  np.testing.assert_array_equal(result.train_losses, by_hand.train_losses)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.params),
               jax.device_get(by_hand.state.params))
  before = train.accuracy(MLP, PARAMS, {'inputs': X, 'labels': Y})
  after = train.accuracy(MLP, result.params, {'inputs': X, 'labels': Y})
  assert after > max(before, 0.8), (before, after)


def test_default_mesh_takes_the_devices_that_divide_the_batch():
  result = train.fit_classifier(MLP.apply, PARAMS, X, Y, batch_size=6, num_steps=2,
                                optimizer=train.adamw(learning_rate=1e-2),
                                rng=jax.random.key(1), data_seed=0)
  assert len(result.params['params']['dense_0']['kernel'].sharding.device_set) == 6
  assert train.classifier.data_mesh(16).devices.size == 8


def test_accuracy_counts_examples_over_batches_and_passes_apply_kwargs():
  class Dropout(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      return nn.Dropout(0.5, deterministic=not train)(nn.Dense(3)(x))

  model = Dropout()
  params = model.init(jax.random.key(0), X[:1], train=False)
  predicted = np.asarray(model.apply(params, X, train=False)).argmax(-1)
  batches = [{'inputs': X[:50], 'labels': Y[:50]}, {'inputs': X[50:], 'labels': Y[50:]}]
  got = train.accuracy(model, params, batches, apply_kwargs={'train': False})
  assert got == np.mean(predicted == Y)  # per example, not the mean of the two batch means
  assert got != np.mean([np.mean(predicted[:50] == Y[:50]), np.mean(predicted[50:] == Y[50:])])
  with pytest.raises(ValueError, match="'inputs' and 'labels'"):
    train.accuracy(model, params, [X], apply_kwargs={'train': False})
  with pytest.raises(TypeError, match='apply_fn'):
    train.accuracy(3, params, batches)



def test_eval_stack_keeps_whole_batches_in_order_and_rejects_bad_sizes():
  stack = train.eval_stack(X, Y, batch_size=25)
  assert stack['inputs'].shape == (2, 25, 6)
  np.testing.assert_array_equal(stack['labels'].reshape(-1), Y[:50])
  with pytest.raises(ValueError, match='eval batch size 61 exceeds the 60 examples'):
    train.eval_stack(X, Y, batch_size=61)
  with pytest.raises(ValueError, match='one label per example'):
    train.shuffled_batches(X, Y[:5], batch_size=4, data_seed=0)


def test_an_unknown_task_is_a_value_error_naming_the_key():
  from launch import tasks
  config = ml_collections.ConfigDict({'task': 'regress'})
  with pytest.raises(ValueError, match=r"unknown task 'regress' \(config key task\)"):
    tasks.build_task(config)
