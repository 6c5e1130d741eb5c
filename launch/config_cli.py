"""Command-line parsing shared by the launchers.

`--config=configs/topic/exp.py[:arg]` loads `get_config(arg)`; every
`--config.a.b=value` overrides an existing key (parsed as the key's current
type; a tuple key takes `(0.9,)` or `0.9,0.95`); an unknown key stops with a
message that names it and lists the keys that do exist. `validate` then checks
the values every launcher relies on (sizes, dtype names, mesh, `param_rules`)
so bad input stops before any data is loaded, with one message naming the key.
The config is locked afterwards, so a typo in code fails too.

Every mistake found here is a `lossland.UserError` (a ValueError); a launcher's
`main` runs inside `user_errors`, which prints it as one line, `error: <message>`,
and exits with status 1.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import os
import re
import sys
from typing import Sequence

import ml_collections

from lossland.errors import UserError


CONFIG_FORM = '--config=configs/<topic>/<exp>.py[:arg]'


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of `path[:arg]`; a UserError naming the file when it cannot."""
  path, _, arg = spec.partition(':')
  if not os.path.exists(path):
    raise UserError(f'config file {path!r} does not exist')
  if os.path.isdir(path):
    raise UserError(f'config file {path!r} is a folder; give a Python file: {CONFIG_FORM}')
  if not path.endswith('.py'):
    raise UserError(f'config file {path!r} is not a Python file (.py) with get_config(arg=None); '
                    f'give one: {CONFIG_FORM}')
  module_spec = importlib.util.spec_from_file_location('lossland_config', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f'config file {path!r} is not valid Python: {e.msg} (line {e.lineno})') from e
  except (ImportError, UnicodeDecodeError) as e:
    raise UserError(f'config file {path!r} cannot be loaded: {type(e).__name__}: {e}') from e
  if not callable(getattr(module, 'get_config', None)):
    raise UserError(f'config file {path!r} has no get_config(arg=None)')
  try:
    return module.get_config(arg or None)
  except ValueError as e:  # e.g. an unknown :arg
    raise UserError(f'config file {path!r} (get_config({arg or None!r})): {e}') from e


def check_workdir(workdir: str | None) -> None:
  """A UserError naming `--workdir` when it cannot be a folder (a file, a dangling symlink)."""
  if not workdir:
    return
  if os.path.islink(workdir) and not os.path.exists(workdir):
    raise UserError(f'--workdir={workdir} is a symlink to {os.readlink(workdir)!r}, which does '
                    'not exist; create that folder, or give another --workdir')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is a file, not a folder; give a folder (it is '
                    'created when missing)')


def _parse_sequence(text: str, current: tuple | list) -> tuple | list:
  """A tuple or list value: `(0.9,)`, `0.9,0.95` or `[64, 64]`; a bare scalar is an error."""
  example = ', '.join(repr(v) for v in current[:2]) if current else '0.9'
  forms = f"'({example},)' or '{example.replace(' ', '')},'" if len(current) < 2 else \
      f"'({example})' or '{example.replace(' ', '')}'"
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f'expected a {type(current).__name__} such as {forms}, got {text!r}') from e
  if not isinstance(value, (tuple, list)):
    raise ValueError(f'expected a {type(current).__name__} such as {forms}, got the scalar '
                     f'{text!r}; for one element write ({text},) or {text},')
  kinds = {type(v) for v in current} - {type(None)}
  if float in kinds:
    kinds.add(int)  # 1 is a fine float
  for v in value:
    if kinds and type(v) not in kinds:
      raise ValueError(f'element {v!r} of {text!r} is a {type(v).__name__}; the default '
                       f'{tuple(current)!r} holds {sorted(k.__name__ for k in kinds)}')
  return type(current)(value)


def _parse_value(text: str, current):
  if isinstance(current, (tuple, list)):
    return _parse_sequence(text, current)
  if isinstance(current, bool):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'expected true or false, got {text!r}')
    return text.lower() in ('true', '1')
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  node, parts = config, dotted.split('.')
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = '.'.join(parts[:i]) or 'the config'
      available = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise UserError(f'unknown config key {dotted!r}: {where} has no {part!r}. '
                      f'Available keys: {available}')
    if i < len(parts) - 1:
      node = node[part]
  try:
    value = _parse_value(text, node[parts[-1]])
  except ValueError as e:
    raise UserError(f'bad value for --config.{dotted}: {e}') from e
  with node.ignore_type():
    node[parts[-1]] = value


MESH_AXES = ('data', 'model')


def _walk(config: ml_collections.ConfigDict, prefix: str = ''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _walk(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', key, value


def _is_size_key(name: str) -> bool:
  return name in ('batch_size', 'num_batches', 'seq_len') or name.endswith('_batch_size')


def _check_param_rules(rules) -> None:
  form = ("--config.param_rules=\"(('.*/mlp/up/kernel', (None, 'model')),)\": "
          'a tuple of (regex, partition spec) pairs')
  if not isinstance(rules, (tuple, list)):
    raise UserError(f'param_rules must be {form}; got {rules!r}')
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
            and isinstance(rule[1], (tuple, list))):
      raise UserError(f'param_rules entry {rule!r} is not a (regex, spec) pair; param_rules '
                      f'must be {form}')
    pattern, spec = rule
    try:
      re.compile(pattern)
    except re.error as e:
      raise UserError(f'param_rules pattern {pattern!r} is not a valid regex: {e}') from e
    for axis in spec:
      names = axis if isinstance(axis, (tuple, list)) else (axis,)
      bad = [a for a in names if a is not None and a not in MESH_AXES]
      if bad:
        raise UserError(f'param_rules entry {tuple(rule)!r} names mesh axis {bad[0]!r}; the '
                        f'mesh axes are {MESH_AXES} (or None for a replicated dimension)')


def _check_mesh(mesh: ml_collections.ConfigDict, num_devices: int | None) -> None:
  for axis in mesh:
    if axis not in MESH_AXES:
      raise UserError(f'mesh.{axis} is not a mesh axis; the axes are {MESH_AXES}')
  for axis in MESH_AXES:
    size = mesh.get(axis, 1)
    if not isinstance(size, int) or isinstance(size, bool) or size == 0 or size < -1:
      raise UserError(f'mesh.{axis}={size!r} must be a positive number of devices or -1 '
                      '(infer from the device count)')
    if num_devices is not None and size > num_devices:
      raise UserError(f'mesh.{axis}={size} exceeds the {num_devices} devices of this job; set '
                      f'--config.mesh.{axis} to at most {num_devices} (or -1 to infer it)')
  sizes = [mesh.get(a, 1) for a in MESH_AXES]
  if num_devices is not None and -1 not in sizes and sizes[0] * sizes[1] > num_devices:
    raise UserError(f'mesh.data={sizes[0]} x mesh.model={sizes[1]} needs {sizes[0] * sizes[1]} '
                    f'devices but this job has {num_devices}; lower one of them or set it to -1')


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
  """Checks the values the launchers rely on; raises a UserError naming the key.

  Sizes (`*batch_size`, `num_batches`, `seq_len`) must be at least 1; `model.dtype`
  and `model.matmul_dtype` must name a dtype of `launch.common.DTYPES`; `mesh`
  must have only the `data`/`model` axes, each -1 or a positive size (at most
  `num_devices` when given); `param_rules` must be (regex, spec) pairs naming
  mesh axes.
  """
  from launch import common  # pylint: disable=g-import-not-at-top
  for dotted, name, value in _walk(config):
    if _is_size_key(name) and isinstance(value, int) and not isinstance(value, bool) \
        and value < 1:
      raise UserError(f'{dotted}={value} must be at least 1; set --config.{dotted} to a '
                      'positive size')
  model = config.get('model')
  if isinstance(model, ml_collections.ConfigDict):
    for key, extra in (('dtype', ()), ('matmul_dtype', ('auto',))):
      value = model.get(key)
      if value is not None and value not in common.DTYPES and value not in extra:
        raise UserError(f'model.{key}={value!r} is not a dtype lossland builds models in; '
                        f'allowed: {sorted(common.DTYPES) + list(extra)}')
  if isinstance(config.get('mesh'), ml_collections.ConfigDict):
    _check_mesh(config.mesh, num_devices)
  if 'param_rules' in config:
    _check_param_rules(config.param_rules)


def parse_resumable(argv: Sequence[str] | None, description: str
                    ) -> tuple[argparse.Namespace, ml_collections.ConfigDict, bool]:
  """`parse` plus `--allow_config_change`, for the launchers that store their workdir's config.

  `argv` None reads `sys.argv[1:]`. Returns (args, config, allow_config_change).
  """
  flags = argparse.ArgumentParser(add_help=False)
  flags.add_argument('--allow_config_change', action='store_true')
  known, rest = flags.parse_known_args(sys.argv[1:] if argv is None else argv)
  args, config = parse(rest, description)
  return args, config, known.allow_config_change


def parse(argv: Sequence[str], description: str) -> tuple[argparse.Namespace,
                                                           ml_collections.ConfigDict]:
  """Returns (args with .config/.workdir/.multihost, the overridden locked config).

  First of all it gives jax one CPU device per host core (`common.use_host_cores`)
  and, on a machine without accelerators, only its CPU backend
  (`common.quiet_platforms`), since the device-count checks below start jax's
  backend. A `--workdir` that cannot be a folder stops here.
  """
  from launch import common  # pylint: disable=g-import-not-at-top
  common.use_host_cores()
  common.quiet_platforms()
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--config', required=True, help='configs/<topic>/<exp>.py[:arg]')
  parser.add_argument('--workdir', default=None, help='where results, metrics and checkpoints go')
  parser.add_argument('--multihost', action='store_true',
                      help='call jax.distributed.initialize() first (TPU pods, SLURM, ...)')
  args, rest = parser.parse_known_args(argv)
  check_workdir(args.workdir)
  config = load_config_file(args.config)
  for item in rest:
    if not item.startswith('--config.') or '=' not in item:
      raise UserError(f'unrecognized argument {item!r}; overrides look like --config.key=value')
    key, _, value = item[len('--config.'):].partition('=')
    apply_override(config, key, value)
  # Before jax.distributed.initialize() the device count is not known (and asking would
  # start the backend too early), so multi-host jobs skip the device-count checks.
  num_devices = None
  if not args.multihost:
    import jax  # pylint: disable=g-import-not-at-top
    num_devices = jax.device_count()
  validate(config, num_devices=num_devices)
  config.lock()
  return args, config


# Errors that mean bad input (a config value, a file, a folder), not a bug: the launchers
# print them as one line. `lossland.UserError` is the type for mistakes a user can fix; the
# library also raises plain ValueError (and its subclasses: JSON and Unicode decode errors,
# CompileError, WorkdirInUseError, ...) and OSErrors for what the user can change.
USER_ERRORS = (UserError, ValueError, FloatingPointError, FileNotFoundError, FileExistsError,
               IsADirectoryError, NotADirectoryError, PermissionError)


def user_error_message(error: BaseException) -> str | None:
  """The one-line message of a user error, or None for an exception that is a bug.

  Every `UserError` and the other `USER_ERRORS` count (their lines joined into one); a
  KeyError counts when it carries a sentence (`KeyError('no layer ...; available: ...')`),
  not a bare key (`d['x']`, a bug).
  """
  if isinstance(error, KeyError):
    text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else ''
    if ' ' not in text.strip():
      return None
  elif isinstance(error, USER_ERRORS):
    text = str(error)
  else:
    return None
  text = ' '.join(line.strip() for line in text.splitlines() if line.strip())
  return text or type(error).__name__


@contextlib.contextmanager
def user_errors():
  """Turns a user error (a `UserError`, see `user_error_message`) into one line on stderr.

  The line is `error: <message>` and the exit status 1. Set LOSSLAND_TRACEBACK=1 to see the
  traceback instead. Every launcher's `main` runs inside it.
  """
  try:
    yield
  except Exception as e:  # noqa: BLE001 - sorted by user_error_message
    message = user_error_message(e)
    if message is None or os.environ.get('LOSSLAND_TRACEBACK'):
      raise
    raise SystemExit(f'error: {message}') from e
