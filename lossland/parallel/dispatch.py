"""Dispatching collective-bearing computations from host loops without deadlocking XLA:CPU.

On CPU, a program that spans several devices (fake devices from
`--xla_force_host_platform_device_count`, as in the tests and on laptops) runs
one participant per device on a shared host thread pool, and its collectives
(an all-reduce over a data-sharded batch, a `psum` in `shard_map`, a reduction
in a `while_loop` condition) wait in a rendezvous until every participant has
arrived. JAX dispatches asynchronously, so a loop that calls a jitted function
once per batch without looking at the result puts tens of such executions in
flight; participants of different executions then occupy the pool's threads
and wait for peers queued behind them, and after 40 s XLA aborts the process with
`rendezvous.cc: Termination timeout for all reduce ... exceeded`. On a 2-core
machine with 8 fake devices, 40 back-to-back calls of a jitted sum over a
data-sharded batch hung where 30 finished, and chained accumulations (each
call taking the previous sums) hang the same way. Raising the rendezvous
timeout only delays the abort.

The remedy used by every loop in lossland: pass the result of each
collective-bearing call through `settle` (or build the step with `settled`).
On CPU with more than one device it waits until the result is computed, so at
most one such execution is in flight; anywhere else it returns at once and adds
no host synchronization, so GPU and TPU keep dispatching ahead.

Why waiting per call rather than fusing the batches into one jitted scan:
waiting works for every loop shape, including a ragged last batch, host
iterators that produce batches lazily (no stacked copy of all batches in
memory), Python control flow between calls (bisection on an edit strength,
greedy decoding) and different functions interleaved in one loop. On CPU the
"device" is the host's own cores, so dispatching ahead buys little: the wait
costs the host-side work of the next call (Python dispatch, placing its
batch). Where the batches are uniform and known in advance, a scan is the
better program anyway (`train.fit` and the TLM trainer run blocks of steps as
one `lax.scan`); the two compose, since a scan is one execution and `settle`
waits for it. The global switch
`jax_cpu_enable_async_dispatch=False` would also avoid the hazard, but it
changes the behaviour of the user's code outside lossland as well.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import jax

T = TypeVar('T')


def _waits(devices) -> bool:
  """True for a placement on more than one CPU device (one platform per placement)."""
  return len(devices) > 1 and next(iter(devices)).platform == 'cpu'


def _spans_cpu_devices(leaf: Any) -> bool:
  if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
    return False
  return _waits(leaf.sharding.device_set)


def needs_settling(tree: Any) -> bool:
  """Whether some array in `tree` lives on more than one CPU device.

  Such an array is the output of a multi-device CPU execution, the kind whose
  collectives can deadlock when several are in flight. False for host values,
  tracers, single-device arrays and arrays on GPU or TPU.
  """
  return any(_spans_cpu_devices(leaf) for leaf in jax.tree.leaves(tree))


def settle(tree: T) -> T:
  """Returns `tree`; on a multi-device CPU placement, first waits until it is computed.

  Call it on the result of every jitted call that a host loop repeats, e.g.
  `sums = settle(accumulate(sums, params, batch, rng))`. Not for use inside jit
  (tracers pass through unchanged); on GPU and TPU it never blocks.
  """
  if needs_settling(tree):
    jax.block_until_ready(tree)
  return tree


def settled(fn: Callable[..., T]) -> Callable[..., T]:
  """`fn` whose every result goes through `settle`: a step function safe to call in a loop.

  The wrapper is a plain Python function: call `fn` itself for `.lower`,
  `.trace` or `.eval_shape`.
  """

  @functools.wraps(fn)
  def call(*args, **kwargs):
    return settle(fn(*args, **kwargs))

  return call
