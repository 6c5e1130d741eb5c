"""`parallel.settle`: one collective-bearing execution in flight at a time on multi-device CPU.

Without it, 40 back-to-back calls of a jitted sum over a batch sharded on the 8
fake devices hang in an XLA:CPU rendezvous and the process is aborted after
40 s, so the stress tests here fail by crashing rather than by an assertion.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lossland import parallel
from lossland.parallel import dispatch

NUM_CALLS = 100  # well past the ~30-40 in-flight executions at which XLA:CPU deadlocks


@pytest.fixture(scope='module')
def mesh():
  return parallel.make_mesh({'data': 8}, jax.devices())


def _slow_sum(x):
  """A reduction over the sharded batch (one all-reduce) that takes long enough to observe."""
  return jax.lax.fori_loop(0, 100, lambda i, acc: jnp.tanh(acc @ acc.T @ acc), x).sum()


def test_settle_waits_for_multi_device_cpu_results(mesh):
  x = parallel.shard_batch(np.full((256, 256), 0.01, np.float32), mesh)
  fn = jax.jit(_slow_sum)
  fn(x).block_until_ready()  # compile
  assert parallel.needs_settling(fn(x))
  out = parallel.settle(fn(x))
  assert out.is_ready()
  settled = parallel.settled(fn)
  assert settled(x).is_ready()
  assert settled.__name__ == fn.__name__


def test_host_values_single_devices_and_tracers_pass_through():
  single = jnp.ones(3)
  assert not parallel.needs_settling({'a': np.ones(2), 'b': 1.0, 'c': single, 'd': None})
  assert parallel.settle(single) is single
  tree = {'x': np.zeros(2), 'y': (1, 'text')}
  assert parallel.settle(tree) is tree

  @jax.jit
  def inside(x):  # under a trace the values are tracers: nothing to wait for
    return parallel.settle(x * 2)

  np.testing.assert_array_equal(inside(jnp.arange(3.0)), [0.0, 2.0, 4.0])


def test_only_multi_device_cpu_placements_wait():
  devices = lambda platform, n: [types.SimpleNamespace(platform=platform) for _ in range(n)]
  assert dispatch._waits(devices('cpu', 2))
  assert dispatch._waits(devices('cpu', 8))
  assert not dispatch._waits(devices('cpu', 1))
  assert not dispatch._waits(devices('gpu', 8))
  assert not dispatch._waits(devices('tpu', 4))


def test_many_reductions_in_a_row_finish(mesh):
  """100 independent calls, each with an all-reduce over the data axis."""
  fn = parallel.settled(jax.jit(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)))
  w = jax.device_put(jnp.eye(64), parallel.replicated(mesh))
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(64, 64)).astype(np.float32) for _ in range(NUM_CALLS)]
  sharded = [parallel.shard_batch(x, mesh) for x in xs]  # placed first: calls go back to back
  outs = [fn(w, x) for x in sharded]
  expected = sum(float(np.sum(np.tanh(x.astype(np.float64)) ** 2)) for x in xs)
  np.testing.assert_allclose(float(sum(jax.device_get(outs))), expected, rtol=1e-4)


def test_many_chained_accumulations_finish(mesh):
  """100 calls that each take the previous sums (donated), as the factor accumulators do."""
  rep = parallel.replicated(mesh)
  fn = jax.jit(lambda s, x: s + x.T @ x, donate_argnums=0, out_shardings=rep)
  s = jax.device_put(jnp.zeros((16, 16)), rep)
  x = parallel.shard_batch(np.ones((64, 16), np.float32), mesh)
  for _ in range(NUM_CALLS):
    s = parallel.settle(fn(s, x))
  assert s.sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(s), np.full((16, 16), 64.0 * NUM_CALLS))


def test_shard_map_psum_in_a_loop_finishes(mesh):
  """The `shard_map` + `psum` pattern of the streamed similarity indices."""
  update = jax.jit(jax.shard_map(lambda h, x: h + jax.lax.psum(jnp.sum(x), parallel.DATA_AXIS),
                                 mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS)),
                                 out_specs=P()))
  h = jax.device_put(jnp.zeros(()), NamedSharding(mesh, P()))
  x = parallel.shard_batch(np.ones((16,), np.float32), mesh)
  for _ in range(NUM_CALLS):
    h = parallel.settle(update(h, x))
  assert float(h) == 16.0 * NUM_CALLS
