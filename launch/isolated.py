"""Run a function in a fresh (spawned) process, so that a compiler crash costs one call, not the run.

libtpu's compiler can die of a signal on some shapes (SD 1.5 with A-STAR at 6
seeds per v5e chip overflows a stack in its convolution emitter) or be killed
for host memory (TPU's QDWH eigh of a 4096² matrix on a 23 GB host); `launch.compile_sd`
and `launch.eigh_compile_cost` compile each case in its own child.
"""
from __future__ import annotations

import multiprocessing
import signal


def _child_main(conn, fn, args):
  try:
    conn.send(('ok', fn(*args)))
  except BaseException as e:  # pylint: disable=broad-except
    conn.send(('raised', f'{type(e).__name__}: {e}'))
  finally:
    conn.close()


def run_isolated(fn, *args):
  """`fn(*args)` in a spawned process: (its result or None when the process died, exit code).

  `fn` and `args` must pickle (a module-level function). An exception in `fn`
  is raised here as a RuntimeError with its message.
  """
  ctx = multiprocessing.get_context('spawn')
  receive, send = ctx.Pipe(duplex=False)
  child = ctx.Process(target=_child_main, args=(send, fn, args))
  child.start()
  send.close()
  try:
    status, value = receive.recv()
  except EOFError:  # the child died before sending
    status, value = 'died', None
  child.join()
  if status == 'raised':
    raise RuntimeError(f'compiling in a child process failed: {value}')
  return value, child.exitcode


def signal_name(exit_code: int | None) -> str:
  """'SIGKILL' for a child killed by SIGKILL (exit code -9), else 'no signal'."""
  if exit_code is not None and exit_code < 0:
    try:
      return signal.Signals(-exit_code).name
    except ValueError:
      pass
  return 'no signal'
