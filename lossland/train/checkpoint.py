"""Orbax checkpoints of the train state plus the data iterator's position, and the workdir lock.

Each checkpoint is written to a temporary directory and renamed into place
when complete, so an interrupted save never replaces the previous good one;
restoring ignores unfinished directories. Restores go straight into the target
shardings (abstract arrays carrying a `.sharding`), so a checkpoint written on
one mesh restores on another.

Every checkpoint also stores a checksum of each array of the state (params and
optimizer state) in its `integrity/` item. `restore` checks, in order, that the
checkpoint's files are all there (`integrity/` included: a checkpoint whose
checksums are gone cannot be verified, so it counts as corrupt), that its
arrays have the shapes and dtypes of the target state (an error naming the
mismatched arrays otherwise: another model wrote it), that orbax can read it
and that the checksums match. `restore_latest` moves a checkpoint that fails
any check but the shape check aside into `WORKDIR/corrupt_checkpoints/` with
one warning and falls back to the next newest.

Saves are asynchronous: `save` returns once it has dispatched a private copy
of the state; a worker thread hands that copy to orbax, which writes it while
training goes on. The next `save`, `latest_step`, `restore`, `wait` and
`close` wait for it first. The caller may donate the saved state right away.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import gc
import json
import os
import shutil
import socket
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

try:
  import fcntl
except ImportError:  # Windows: locks fall back to the pid check
  fcntl = None

_CHECKSUM_VERSION = 'murmur3-sum-v1'
_ITEMS = ('state', 'data', 'integrity')


class CorruptCheckpointError(Exception):
  """A checkpoint that is incomplete, unreadable or whose bytes changed on disk."""


class IncompatibleCheckpointError(ValueError):
  """A readable checkpoint whose arrays do not match the target state (another model)."""


class WorkdirInUseError(ValueError):
  """Another live process holds the workdir's lock."""


def _mix(h: jax.Array) -> jax.Array:
  """The murmur3 finalizer: a bijection of uint32 that spreads every input bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def leaf_checksum(x: jax.Array) -> jax.Array:
  """Two uint32 sums of mixed (bits, flat index) pairs of `x`; jit-safe.

  Each element's term is a bijection of its bits, so changing any single
  element always changes both sums; the wrapping integer sum is exact and
  order-free, so the result does not depend on how `x` is sharded.
  """
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize >= 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types gain a trailing axis of 2
  else:
    narrow = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
  index = jnp.zeros(bits.shape, jnp.uint32)
  for axis, size in enumerate(bits.shape):
    index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
  first = _mix(bits ^ _mix(index + jnp.uint32(0x9E3779B9)))
  second = _mix(bits + _mix(index ^ jnp.uint32(0x7F4A7C15)) * jnp.uint32(0x27D4EB2F))
  return jnp.stack([jnp.sum(first, dtype=jnp.uint32), jnp.sum(second, dtype=jnp.uint32)])


def _flat(tree) -> dict[str, Any]:
  return {'/'.join(map(str, k)): v for k, v in ocp.tree.to_flat_dict(tree).items()}


def _first_line(error: BaseException, limit: int = 300) -> str:
  text = str(error).split('See full TensorStore details')[0].strip().splitlines()
  text = text[0] if text else ''
  return f'{type(error).__name__}: {text[:limit]}'


def _drop_abandoned_read_reports(previous_hook):
  """An unraisable hook that drops what orbax's abandoned reads of a broken checkpoint report.

  When one read fails, orbax closes its event loop while the other reads are in
  flight; their completions later raise 'Event loop is closed' (or leave failed
  coroutines behind), each printed as a traceback through `sys.unraisablehook`,
  possibly long after the restore returned. Everything else goes to
  `previous_hook`.
  """
  def hook(unraisable):
    code = getattr(unraisable.object, 'cr_code', None)
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == 'Event loop is closed') or (
            code is not None and 'orbax' in code.co_filename):
      return
    previous_hook(unraisable)
  hook.drops_abandoned_reads = True
  return hook


@contextlib.contextmanager
def _quiet_failed_reads():
  """Runs a read of a possibly broken checkpoint without tracebacks from its abandoned reads."""
  try:
    yield
  except Exception:
    if not getattr(sys.unraisablehook, 'drops_abandoned_reads', False):
      sys.unraisablehook = _drop_abandoned_read_reports(sys.unraisablehook)
    raise
  finally:
    gc.collect()


_CHECKSUM_FNS: dict[Any, Any] = {}  # mesh -> jitted per-leaf checksums, replicated on it


class Checkpointer:
  """Saves every `every` steps into `WORKDIR/checkpoints`, keeping the latest `keep`."""

  def __init__(self, workdir: str, *, every: int, keep: int = 2):
    if every <= 0:
      raise ValueError(f'checkpoint every={every} must be a positive number of steps')
    if keep <= 0:
      raise ValueError(f'keep_checkpoints={keep} must be at least 1 (config key checkpoint.keep): '
                       'with none kept, nothing could be resumed')
    self.every = every
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    handlers = {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
                'integrity': ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._saver = concurrent.futures.ThreadPoolExecutor(1)
    self._pending: concurrent.futures.Future | None = None
    self._copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))

  @staticmethod
  def _checksums(state) -> dict[str, list[int]]:
    """Per-array checksums of `state`, computed on its devices (blocks until done)."""
    sharding = jax.tree.leaves(state)[0].sharding
    mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
    if mesh not in _CHECKSUM_FNS:
      out = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
      _CHECKSUM_FNS[mesh] = jax.jit(lambda tree: jax.tree.map(leaf_checksum, tree),
                                    out_shardings=out)
    sums = jax.device_get(_CHECKSUM_FNS[mesh](state))
    return {path: [int(v) for v in np.asarray(s)] for path, s in _flat(sums).items()}

  def latest_step(self) -> int | None:
    self.wait()
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    self.wait()
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_position: dict[str, Any]) -> None:
    """Starts writing `state` (copied first: the caller may donate it) and returns."""
    self.wait()
    state = self._copy(state)
    # Blocking here keeps one collective-bearing program in flight at a time (XLA:CPU
    # collectives can deadlock otherwise); the state is ready, so it costs one pass over it.
    integrity = {'version': _CHECKSUM_VERSION, 'checksums': self._checksums(state)}
    self._pending = self._saver.submit(
        self.manager.save, step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position),
            integrity=ocp.args.JsonSave(integrity)),
        force=True)

  def wait(self) -> None:
    """Blocks until the last `save` is on disk; re-raises its error, if any."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      pending.result()
    self.manager.wait_until_finished()

  def _check_files(self, step: int) -> None:
    """Raises CorruptCheckpointError for missing pieces, the checksums (`integrity/`) included.

    Every checkpoint this class writes has checksums; one without them cannot be
    told from one whose bytes changed, so restoring it "unverified" could start
    training from garbage (a NaN loss many steps later, blamed on the optimizer).
    """
    path = os.path.join(self.directory, str(step))
    for required in ('_CHECKPOINT_METADATA', 'state/_METADATA', 'data'):
      if not os.path.exists(os.path.join(path, required)):
        raise CorruptCheckpointError(f'{required} is missing')
    if not os.path.exists(os.path.join(path, 'integrity')):
      raise CorruptCheckpointError('integrity/ (the checksums of its arrays) is missing, so its '
                                   'bytes cannot be verified')

  def _check_compatible(self, step: int, abstract_state: Any) -> None:
    message = None
    try:
      with _quiet_failed_reads():
        stored = _flat(self.manager.item_metadata(step)['state'].tree)
    except Exception as e:  # noqa: BLE001 - any failure to read the metadata means corruption
      message = f'its metadata cannot be read ({_first_line(e)})'
    if message:
      raise CorruptCheckpointError(message)
    wanted = _flat(abstract_state)
    problems = [f'{p}: missing from the checkpoint' for p in wanted if p not in stored]
    problems += [f'{p}: in the checkpoint but not in this model' for p in stored
                 if p not in wanted]
    for p in wanted.keys() & stored.keys():
      a, b = stored[p], wanted[p]
      if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
        problems.append(f'{p}: checkpoint {tuple(a.shape)} {np.dtype(a.dtype)} vs this run '
                        f'{tuple(b.shape)} {np.dtype(b.dtype)}')
    if problems:
      problems.sort(key=lambda p: (not p.startswith('params'), p))
      shown = '; '.join(problems[:6]) + (f'; and {len(problems) - 6} more'
                                         if len(problems) > 6 else '')
      raise IncompatibleCheckpointError(
          f'the checkpoint at step {step} in {self.workdir} was written by a different model or '
          f'optimizer: {shown}. Use a fresh workdir, or the model config that wrote it.')

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint `step` into `abstract_state` and verifies its checksums.

    Args:
      step: the checkpoint's step.
      abstract_state: the target pytree; every leaf has `.shape`, `.dtype` and a
        `.sharding` (e.g. `jax.eval_shape` output with shardings attached), which
        the restored arrays get.

    Returns:
      (state, data position dict).

    Raises:
      IncompatibleCheckpointError: the checkpoint's arrays differ in shape or dtype.
      CorruptCheckpointError: missing files (the checksums included), unreadable data or a
        checksum mismatch.
    """
    self.wait()
    missing = [jax.tree_util.keystr(p) for p, x in
               jax.tree_util.tree_flatten_with_path(abstract_state)[0]
               if getattr(x, 'sharding', None) is None]
    if missing:
      raise ValueError(f'abstract_state has no sharding for {missing[:3]}; attach the target '
                       'shardings (jax.ShapeDtypeStruct(..., sharding=...))')
    self._check_files(step)
    self._check_compatible(step, abstract_state)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
    items = dict(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
                 integrity=ocp.args.JsonRestore())
    message = None
    try:
      with _quiet_failed_reads():
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types here
      message = f'it cannot be read ({_first_line(e)})'
    if message:
      raise CorruptCheckpointError(message)
    try:
      stored = dict(restored.integrity).get('checksums')
    except (TypeError, ValueError):  # not a JSON object
      stored = None
    if not isinstance(stored, dict):
      raise CorruptCheckpointError('integrity/ holds no checksums, so its bytes cannot be verified')
    actual = self._checksums(restored.state)
    bad = sorted((p for p in actual if stored.get(p) != actual[p]),
                 key=lambda p: (not p.startswith('params'), p))
    if bad:
      raise CorruptCheckpointError(
          f'the checksums of {len(bad)} arrays do not match what was saved ({", ".join(bad[:3])}'
          f'{", ..." if len(bad) > 3 else ""}): its bytes changed on disk')
    return restored.state, dict(restored.data)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest checkpoint that passes every check, or returns None if none does.

    A checkpoint that is incomplete, unreadable or fails its checksums is moved
    into `WORKDIR/corrupt_checkpoints/` (kept for inspection, out of orbax's way)
    with one warning naming its step; the next newest is tried. A checkpoint from
    a different model raises `IncompatibleCheckpointError` instead.
    """
    for step in reversed(self.all_steps()):
      try:
        state, position = self.restore(step, abstract_state)
      except CorruptCheckpointError as e:
        moved = self._move_aside(step)
        older = [s for s in self.all_steps() if s < step]
        fallback = (f'falling back to checkpoint {older[-1]}' if older
                    else 'no older checkpoint: training starts from step 0')
        warnings.warn(f'checkpoint {step} in {self.directory} is unusable: {e}; moved it to '
                      f'{moved}, {fallback}', stacklevel=2)
        continue
      return step, state, position
    return None

  def _move_aside(self, step: int) -> str:
    target_dir = os.path.join(self.workdir, 'corrupt_checkpoints')
    target = os.path.join(target_dir, str(step))
    if jax.process_index() == 0:
      os.makedirs(target_dir, exist_ok=True)
      suffix = 1
      while os.path.exists(target):
        target, suffix = os.path.join(target_dir, f'{step}.{suffix}'), suffix + 1
      shutil.move(os.path.join(self.directory, str(step)), target)
    self.manager.reload()
    return target

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._saver.shutdown(wait=True)
      self.manager.close()


def process_alive(pid: int) -> bool:
  """Whether a process with this pid runs on this host (one we may not signal counts as running)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return True


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (Linux), which tells a live process from a reused pid."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


class WorkdirLock:
  """An exclusive lock on a workdir: `WORKDIR/lock`, holding the owner's pid and host.

  The holder keeps an `flock` on the file, which the OS drops when the process
  dies, so a crashed run never leaves the workdir locked: the next run takes
  the lock over. Where `flock` is unavailable (some network filesystems) a lock
  whose pid no longer runs on this host counts as stale. Re-entrant within a
  process; only process 0 of a multi-host job takes it.
  """

  _held: dict[str, list] = {}  # path -> [fd, depth] for the locks this process holds

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, 'lock')

  def __enter__(self) -> WorkdirLock:
    if jax.process_index() != 0:
      return self
    if self.path in self._held:
      self._held[self.path][1] += 1
      return self
    os.makedirs(self.workdir, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        locked = self._flock(fd)
        previous = self._read(fd)
        if locked is False or (locked is None and self._alive(previous)):
          raise WorkdirInUseError(self._busy_message(previous))
        if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
          break  # still the file at the path (its last owner did not just remove it)
      except BaseException:
        os.close(fd)
        raise
      os.close(fd)
    if previous:
      warnings.warn(f'took over {self.path}, left by {self._owner(previous)}, which is not '
                    'running any more', stacklevel=2)
    record = {'pid': os.getpid(), 'host': socket.gethostname(), 'start': _process_start(
        os.getpid()), 'since': time.strftime('%Y-%m-%d %H:%M:%S'), 'command': sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    self._held[self.path] = [fd, 1]
    return self

  def __exit__(self, *exc) -> None:
    if self.path not in self._held:
      return
    entry = self._held[self.path]
    entry[1] -= 1
    if entry[1] == 0:
      del self._held[self.path]
      with contextlib.suppress(OSError):
        os.remove(self.path)
      os.close(entry[0])  # closing drops the flock

  @staticmethod
  def _flock(fd: int) -> bool | None:
    """True if locked, False if another process holds it, None if flock is unsupported."""
    if fcntl is None:
      return None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        return False
      return None

  @staticmethod
  def _read(fd: int) -> dict:
    try:
      return json.loads(os.pread(fd, 65536, 0).decode() or '{}')
    except ValueError:
      return {}

  @staticmethod
  def _alive(record: dict) -> bool:
    if not record or record.get('host') != socket.gethostname():
      return bool(record)  # another host's process cannot be checked: assume it runs
    pid = int(record.get('pid', 0))
    if not process_alive(pid):
      return False
    return record.get('start') is None or record.get('start') == _process_start(pid)

  @staticmethod
  def _owner(record: dict) -> str:
    if not record:
      return 'another process'
    since = f' since {record["since"]}' if record.get('since') else ''
    return f'pid {record.get("pid")} on host {record.get("host")}{since}'

  def _busy_message(self, record: dict) -> str:
    owner = self._owner(record)
    return (f'the workdir {self.workdir} is in use by {owner}: two runs would overwrite each '
            f"other's checkpoints and metrics. Wait for that run to finish, stop it, or use "
            f'another workdir; if it is not running any more, delete {self.path}.')
