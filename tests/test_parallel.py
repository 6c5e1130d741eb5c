"""Meshes, batch placement and regex parameter shardings on 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lossland import parallel


def test_make_mesh_infers_one_axis():
  mesh = parallel.make_mesh({'data': -1, 'model': 2}, jax.devices())
  assert dict(mesh.shape) == {'data': 4, 'model': 2}
  with pytest.raises(ValueError, match='at most one'):
    parallel.make_mesh({'data': -1, 'model': -1}, jax.devices())
  with pytest.raises(ValueError, match='do not fit'):
    parallel.make_mesh({'data': 3, 'model': -1}, jax.devices())
  with pytest.raises(ValueError, match='use 4 devices but 8'):
    parallel.make_mesh({'data': 2, 'model': 2}, jax.devices())


def test_shard_batch_places_rows_on_data_axis():
  mesh = parallel.make_mesh({'data': 4, 'model': 2}, jax.devices())
  batch = {'x': np.arange(8 * 3).reshape(8, 3)}
  sharded = parallel.shard_batch(batch, mesh)['x']
  assert sharded.sharding.spec == P('data', None)
  assert {s.data.shape for s in sharded.addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(sharded), batch['x'])
  block = parallel.shard_batch({'x': np.zeros((5, 8, 3))}, mesh, leading_axes=1)['x']
  assert block.sharding.spec == P(None, 'data', None)


def test_shard_batch_rejects_indivisible_batch():
  mesh = parallel.make_mesh({'data': 8, 'model': 1}, jax.devices())
  with pytest.raises(ValueError, match='not divisible by the data axis'):
    parallel.shard_batch({'x': np.zeros((12, 2))}, mesh)


def test_param_shardings_follow_regex_rules():
  mesh = parallel.make_mesh({'data': 4, 'model': 2}, jax.devices())
  params = {'block_0': {'mlp': {'up': {'kernel': jnp.zeros((4, 6))},
                                'down': {'kernel': jnp.zeros((6, 4))}},
                        'norm': {'scale': jnp.zeros((4,))}}}
  rules = [('.*/up/kernel', P(None, 'model')), ('.*/down/kernel', P('model', None))]
  shardings = parallel.param_shardings(params, mesh, rules)
  placed = jax.device_put(params, shardings)
  assert placed['block_0']['mlp']['up']['kernel'].sharding.spec == P(None, 'model')
  assert placed['block_0']['mlp']['down']['kernel'].sharding.spec == P('model', None)
  assert placed['block_0']['norm']['scale'].sharding.spec == P()
  with pytest.raises(ValueError, match='not divisible by mesh axis'):
    parallel.param_shardings({'w': {'kernel': jnp.zeros((3, 3))}}, mesh,
                             [('w/kernel', P('model', None))])


@pytest.mark.parametrize('rules,needle', [
    ([('.*/up/kernel', P(None, 'modle'))], r"names mesh axis 'modle'; the mesh has axes "
                                           r"\('data', 'model'\)"),
    ([('*/up/kernel', P(None, 'model'))], "pattern '\\*/up/kernel' is not a valid regex"),
    ([('.*/up/kernel',)], 'is not a \\(regex, PartitionSpec\\) pair'),
])
def test_param_shardings_reject_malformed_rules(rules, needle):
  mesh = parallel.make_mesh({'data': 4, 'model': 2}, jax.devices())
  with pytest.raises(ValueError, match=needle):
    parallel.param_shardings({'up': {'kernel': jnp.zeros((4, 6))}}, mesh, rules)


def test_param_shardings_accept_a_spec_over_two_axes():
  mesh = parallel.make_mesh({'data': 4, 'model': 2}, jax.devices())
  shardings = parallel.param_shardings({'w': jnp.zeros((8, 3))}, mesh,
                                       [('w', P(('data', 'model'), None))])
  assert shardings['w'].spec == P(('data', 'model'), None)
  with pytest.raises(ValueError, match=r"dimension 4 is not divisible by mesh axis \('data', "):
    parallel.param_shardings({'w': jnp.zeros((4, 3))}, mesh, [('w', P(('data', 'model'), None))])


def test_put_replicated_places_keys_and_arrays_on_every_device():
  mesh = parallel.make_mesh({'data': 4, 'model': 2}, jax.devices())
  tree = parallel.put_replicated({'key': jax.random.key(3), 'x': jnp.arange(3.0),
                                  'h': np.ones(2)}, mesh)
  for leaf in jax.tree.leaves(tree):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
  assert jax.random.key_impl(tree['key']) == jax.random.key_impl(jax.random.key(3))
  np.testing.assert_array_equal(jax.random.key_data(tree['key']),
                                jax.random.key_data(jax.random.key(3)))


def test_local_process_env_sets_the_coordinator_and_one_device_count():
  env = parallel.distributed.local_process_env(
      1, 2, 4321, 4, base={'XLA_FLAGS': '--xla_force_host_platform_device_count=8 --xla_foo'})
  assert env['XLA_FLAGS'] == '--xla_foo --xla_force_host_platform_device_count=4'
  assert (env['JAX_COORDINATOR_ADDRESS'], env['JAX_NUM_PROCESSES'], env['JAX_PROCESS_ID'],
          env['JAX_PLATFORMS']) == ('127.0.0.1:4321', '2', '1', 'cpu')
  with pytest.raises(ValueError, match='must be at least 1'):
    parallel.run_local_processes(['true'], num_processes=0, devices_per_process=1)


def test_initialize_multihost_rejects_a_non_integer_process_id(monkeypatch):
  monkeypatch.setenv('JAX_PROCESS_ID', 'zero')
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='zero' must be an integer"):
    parallel.initialize_multihost()
