"""Command-line parsing shared by the launchers.

`--config=configs/topic/exp.py[:arg]` loads `get_config(arg)`; every
`--config.a.b=value` overrides an existing key (parsed as the key's current
type); an unknown key stops with a message that names it and lists the keys
that do exist. The config is locked afterwards, so a typo in code fails too.
"""
from __future__ import annotations

import argparse
import contextlib
import ast
import importlib.util
import os
from typing import Sequence

import ml_collections


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  path, _, arg = spec.partition(':')
  if not os.path.exists(path):
    raise SystemExit(f'config file {path!r} does not exist')
  module_spec = importlib.util.spec_from_file_location('lossland_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise SystemExit(f'config file {path!r} has no get_config(arg=None)')
  return module.get_config(arg or None)


def _parse_value(text: str, current):
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
      raise SystemExit(f'unknown config key {dotted!r}: {where} has no {part!r}. '
                       f'Available keys: {available}')
    if i < len(parts) - 1:
      node = node[part]
  try:
    value = _parse_value(text, node[parts[-1]])
  except ValueError as e:
    raise SystemExit(f'bad value for --config.{dotted}: {e}') from e
  with node.ignore_type():
    node[parts[-1]] = value


def parse(argv: Sequence[str], description: str) -> tuple[argparse.Namespace,
                                                           ml_collections.ConfigDict]:
  """Returns (args with .config/.workdir/.multihost, the overridden locked config)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--config', required=True, help='configs/<topic>/<exp>.py[:arg]')
  parser.add_argument('--workdir', default=None, help='where results, metrics and checkpoints go')
  parser.add_argument('--multihost', action='store_true',
                      help='call jax.distributed.initialize() first (TPU pods, SLURM, ...)')
  args, rest = parser.parse_known_args(argv)
  config = load_config_file(args.config)
  for item in rest:
    if not item.startswith('--config.') or '=' not in item:
      raise SystemExit(f'unrecognized argument {item!r}; overrides look like --config.key=value')
    key, _, value = item[len('--config.'):].partition('=')
    apply_override(config, key, value)
  config.lock()
  return args, config


@contextlib.contextmanager
def user_errors():
  """Turns a bad-input error (ValueError, FloatingPointError, FileNotFoundError) into one
  clear line on stderr and exit status 1. Set LOSSLAND_TRACEBACK=1 to see the traceback."""
  try:
    yield
  except (ValueError, FloatingPointError, FileNotFoundError) as e:
    if os.environ.get('LOSSLAND_TRACEBACK'):
      raise
    raise SystemExit(f'error: {e}') from e
