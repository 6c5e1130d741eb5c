"""Folders written whole: an error or a kill midway leaves the old folder (or none), never a mix.

`written_whole(folder, keep)` yields an empty temporary folder to write into,
a sibling of `folder` named `.{name}.saving-{pid}-*` (with the mode a new
folder gets, or that of the folder it replaces). When the block raises, the
sibling is deleted and `folder` is left as it was. When it completes, the
entries of the old `folder` that the block did not write and `keep(name)`
accepts are hard-linked (or copied) into the new one, so files a writer leaves
alone stay; then `folder` is renamed away, the new folder renamed into its
place, and the old one deleted.

A kill before the renames leaves `folder` intact and a partial sibling, which
the next `written_whole` in the same parent folder deletes (when its process is
dead); a kill between the two renames (microseconds) leaves the complete old
folder as `.{name}.saving-{pid}-*.old`, which the next one renames back first.

A folder that cannot be renamed (a mount point, or a parent the process may
not write to, as with a volume mounted into a container) is staged inside
itself instead (`{folder}/.saving-{pid}-*`): an error while writing still
leaves it as it was, but the final step moves file by file (each
`os.replace` atomic, the whole not), deleting the replaced weights first.

    with written_whole(pathlib.Path('/ckpts/edited'), keep=lambda name: True) as tmp:
      write_everything(tmp)
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import tempfile
from typing import Callable, Iterator

_TAG = 'saving-'
# mkdtemp's names: prefix + 8 characters of [a-z0-9_].
_SIBLING = re.compile(r'^\.(?P<name>.+)\.saving-(?P<pid>\d+)-[a-z0-9_]{8}(?P<old>\.old)?$')
_INSIDE = re.compile(r'^\.saving-(?P<pid>\d+)-[a-z0-9_]{8}$')


def _alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _dead(name: str, pattern: re.Pattern) -> re.Match | None:
  """The match of `name` when it is a leftover of a process that no longer runs."""
  match = pattern.match(name)
  return match if match and not _alive(int(match.group('pid'))) else None


def recover(folder: pathlib.Path) -> None:
  """Cleans up after killed writes beside `folder` and inside it (see the module docstring).

  Every leftover in `folder`'s parent is handled, whatever folder it was for,
  so a killed write to a name never used again (a launcher's temporary
  output) is deleted by the next write beside it.
  """
  parent = folder.parent
  if parent.is_dir():
    leftovers = [(e, m) for e in parent.iterdir() if (m := _dead(e.name, _SIBLING))]
    for entry, match in sorted(leftovers, key=lambda em: not em[1].group('old')):
      target = parent / match.group('name')
      if match.group('old') and not os.path.lexists(target):
        os.rename(entry, target)  # the swap was killed halfway: the old folder is whole
      else:
        shutil.rmtree(entry, ignore_errors=True)
  if folder.is_dir():
    for entry in folder.iterdir():
      if _dead(entry.name, _INSIDE):
        shutil.rmtree(entry, ignore_errors=True)


def _link_or_copy(src: pathlib.Path, dst: pathlib.Path) -> None:
  if src.is_dir() and not src.is_symlink():
    shutil.copytree(src, dst, symlinks=True)
    return
  try:
    os.link(src, dst, follow_symlinks=False)  # nothing writes to either name after this
  except OSError:
    shutil.copy2(src, dst, follow_symlinks=False)


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  else:
    path.unlink()


def _in_place(folder: pathlib.Path) -> bool:
  """Whether `folder` exists and cannot be swapped by renames (see the module docstring)."""
  return folder.is_dir() and (os.path.ismount(folder) or
                              not os.access(folder.parent, os.W_OK | os.X_OK))


@contextlib.contextmanager
def written_whole(folder: pathlib.Path,
                  keep: Callable[[str], bool] = lambda name: True) -> Iterator[pathlib.Path]:
  """Yields an empty temporary folder whose contents replace `folder` when the block ends.

  Args:
    folder: the target; its parents are created.
    keep: whether an entry of the old folder that the block did not write
      stays (e.g. False for weights the new ones replace).
  """
  folder = pathlib.Path(folder)
  folder.parent.mkdir(parents=True, exist_ok=True)
  recover(folder)
  in_place = _in_place(folder)
  umask = os.umask(0)
  os.umask(umask)
  mode = os.stat(folder).st_mode & 0o7777 if folder.is_dir() else 0o777 & ~umask
  if in_place:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{_TAG}{os.getpid()}-', dir=folder))
  else:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{folder.name}.{_TAG}{os.getpid()}-',
                                        dir=folder.parent))
  try:
    os.chmod(tmp, mode)
    yield tmp
    if in_place:
      written = {entry.name for entry in tmp.iterdir()}
      for entry in sorted(folder.iterdir(), key=lambda e: not e.name.endswith('.json')):
        if entry != tmp and entry.name not in written and not keep(entry.name):
          _remove(entry)
      for entry in sorted(tmp.iterdir()):
        os.replace(entry, folder / entry.name)
      tmp.rmdir()
    elif folder.is_dir():
      for entry in sorted(folder.iterdir()):
        if keep(entry.name) and not os.path.lexists(tmp / entry.name):
          _link_or_copy(entry, tmp / entry.name)
      old = tmp.with_name(tmp.name + '.old')
      os.rename(folder, old)
      os.rename(tmp, folder)
      shutil.rmtree(old)
    else:
      os.rename(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
