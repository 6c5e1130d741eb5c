"""Output files and folders written whole: a killed run leaves the old outputs or the new ones.

A launcher killed (SIGKILL, out of memory, preemption) while it writes its
outputs must not leave a mix, such as an edited model's new weights beside an
empty `config.json` and a `results.json` that describes another run. Each
output is written under a temporary name beside its place and moved into it
only once complete:

    with atomic.staged(os.path.join(workdir, 'edited')) as tmp:
      hf.save(tmp, params, config)           # writes WORKDIR/.<pid>.partial.edited

Inside a `Publication` (`launch.analyze` opens one around each experiment) the
staged outputs are moved into place together with `results.json`, after the
run returns: first every staged output and the results are complete under
their temporary names, then a journal (`.<pid>.journal.json`) that lists the
moves is written (atomically), then the moves are made (`edited` goes to
`.<pid>.old.edited`, the new folder takes its name, the old one is deleted),
and last the journal is removed. `recover` (called when a Publication opens,
and by `staged` outside one) finishes an interrupted publication that has a
journal, and otherwise discards a dead run's partial outputs and puts back an
old output whose replacement never arrived. So after a kill at any point and
the next run's recovery the folder holds either all the old outputs or all the
new ones; between the kill and that recovery a single output may sit under its
`.old` name.

Names keep their extension (`.<pid>.partial.spectra.png`), so writers that pick
a format from it (matplotlib, numpy) write the same bytes. A writer that raises
leaves nothing behind and the old output in place. Durability against power
loss (fsync of the data) is not attempted: the kernel keeps what a killed
process wrote.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Any, Iterator

from lossland.train import checkpoint

RESULTS = 'results.json'
_TEMP = re.compile(r'^\.(\d+)\.(partial|old)\.(.+)$')
_JOURNAL = re.compile(r'^\.(\d+)\.journal\.json(\.tmp)?$')

_active: Publication | None = None  # the publication staged outputs join, if any
_in_flight: set[str] = set()  # this process's staged paths not yet moved into place


def _temp_path(path: str, kind: str) -> str:
  folder, name = os.path.split(os.path.abspath(path))
  return os.path.join(folder, f'.{os.getpid()}.{kind}.{name}')


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


def _alive(pid: int) -> bool:
  """Whether `pid` runs; this process counts as dead (its leftovers are a killed run's that had
  the same pid, since it publishes its own before returning)."""
  return pid != os.getpid() and checkpoint.process_alive(pid)


def _move_into_place(new: str, target: str, old: str) -> None:
  """Moves `new` to `target`, the previous `target` via `old`; safe to repeat after a kill."""
  if os.path.lexists(new):
    if os.path.lexists(target):
      _remove(old)  # a stale leftover of an earlier attempt under this name
      os.rename(target, old)
    os.rename(new, target)
  _remove(old)


def _journal_path(folder: str, pid: int) -> str:
  return os.path.join(folder, f'.{pid}.journal.json')


def _roll_forward(folder: str, moves: list, journal: str) -> None:
  for new, target in moves:
    match = _TEMP.match(new)
    old = f'.{match.group(1)}.old.{target}' if match else f'.old.{target}'
    _move_into_place(os.path.join(folder, new), os.path.join(folder, target),
                     os.path.join(folder, old))
  os.remove(journal)


def recover(folder: str) -> None:
  """Finishes or undoes the output writes of a run that was killed in `folder`.

  With a journal, the interrupted publication is completed (every listed output
  moves into place). Without one, partial outputs of processes that no longer
  run are deleted, and an old output whose replacement never arrived goes back
  to its name. Partial outputs of a live process (another run) are left alone.
  """
  if not os.path.isdir(folder):
    return
  for name in sorted(os.listdir(folder)):
    match = _JOURNAL.match(name)
    if not match or _alive(int(match.group(1))):
      continue
    path = os.path.join(folder, name)
    if match.group(2):  # killed while writing the journal: nothing moved yet
      os.remove(path)
      continue
    with open(path) as f:
      moves = json.load(f)['moves']  # written whole (a rename), so it parses
    _roll_forward(folder, moves, path)
  for name in os.listdir(folder):
    match = _TEMP.match(name)
    if not match or _alive(int(match.group(1))) or os.path.join(folder, name) in _in_flight:
      continue
    target = os.path.join(folder, match.group(3))
    if match.group(2) == 'old' and not os.path.lexists(target):
      os.rename(os.path.join(folder, name), target)
    else:
      _remove(os.path.join(folder, name))


def _publish(folder: str, moves: list[tuple[str, str]], committed=lambda: None) -> None:
  """Moves each (temporary, final) name pair of `folder` into place, through a journal.

  Once the journal exists the moves belong to it (`committed` is called then): an
  error or a kill from there on is finished by `recover`, never undone.
  """
  if not moves:
    committed()
    return
  journal = _journal_path(folder, os.getpid())
  with open(journal + '.tmp', 'w') as f:
    json.dump({'moves': moves}, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(journal + '.tmp', journal)
  committed()
  _roll_forward(folder, moves, journal)


@contextlib.contextmanager
def staged(path: str) -> Iterator[str]:
  """Yields a temporary sibling of `path` to write into; `path` is then replaced by it whole.

  The writer creates the yielded path (a file or a folder). Outside a
  `Publication` it replaces `path` when the block ends; inside one, when the
  publication publishes (together with the other outputs and results.json).
  When the block raises, the temporary output is deleted and `path` is kept.
  A block that writes nothing leaves `path` as it was.
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  publication = _active if _active is not None and _active.folder == folder else None
  if publication is None:
    recover(folder)
  tmp = _temp_path(path, 'partial')
  _remove(tmp)
  _in_flight.add(tmp)
  try:
    yield tmp
  except BaseException:
    _in_flight.discard(tmp)
    _remove(tmp)
    raise
  if not os.path.lexists(tmp):
    _in_flight.discard(tmp)
    return
  move = (os.path.basename(tmp), os.path.basename(path))
  if publication is not None:
    publication.moves = [m for m in publication.moves if m[1] != move[1]] + [move]
  else:
    _in_flight.discard(tmp)
    _publish(folder, [move])


class Publication:
  """The outputs of one run of a launcher in `folder`, moved into place together.

      with atomic.Publication(workdir) as outputs:   # recovers a killed run's outputs first
        results = experiment.run(config, workdir)     # its `staged` outputs wait
        outputs.publish(results)                      # all of them, then results.json

  Leaving the block without `publish` (an error) deletes the staged outputs and
  keeps the old ones. With `write=False` (the other processes of a multi-host job,
  whose workdir process 0 writes) `publish` writes nothing and staged outputs are
  deleted.
  """

  def __init__(self, folder: str, *, write: bool = True):
    self.folder = os.path.abspath(folder)
    self.write = write
    self.moves: list[tuple[str, str]] = []
    self.published = False

  def __enter__(self) -> Publication:
    global _active
    if _active is not None:
      raise RuntimeError(f'a Publication of {_active.folder} is already open in this process')
    os.makedirs(self.folder, exist_ok=True)
    if self.write:
      recover(self.folder)
    _active = self
    return self

  def publish(self, results: dict[str, Any] | None) -> None:
    """Moves every staged output into place, then writes `results` as results.json."""
    if not self.write:
      return
    moves = list(self.moves)
    if results is not None:
      tmp = _temp_path(os.path.join(self.folder, RESULTS), 'partial')
      try:
        with open(tmp, 'w') as f:
          json.dump(results, f, indent=2, sort_keys=True)
      except BaseException:
        _remove(tmp)
        raise
      moves.append((os.path.basename(tmp), RESULTS))

    def committed():
      for new, _ in self.moves:
        _in_flight.discard(os.path.join(self.folder, new))
      self.moves, self.published = [], True

    _publish(self.folder, moves, committed)

  def __exit__(self, *exc) -> None:
    global _active
    _active = None
    for new, _ in self.moves:  # staged but never published: the run failed
      _in_flight.discard(os.path.join(self.folder, new))
      _remove(os.path.join(self.folder, new))
    self.moves = []
