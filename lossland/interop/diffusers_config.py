"""Checking a diffusers/transformers component config against what lossland's module supports.

Each loader (`diffusers_unet`, `diffusers_vae`, `diffusers_text`) states, per
config field that changes the architecture, the values its module implements;
`check_fields` raises one ValueError naming every field whose value is not
among them, so a user learns all of what is unsupported at once.
"""
from __future__ import annotations

from typing import Any, Mapping


def check_fields(config: Mapping[str, Any], supported: Mapping[str, Any], what: str) -> None:
  """Raises ValueError naming each field of `config` outside `supported`.

  `supported` maps a field to a tuple of accepted values (a missing field is
  taken as diffusers' default, which must be the tuple's first value) or to a
  predicate on the value.
  """
  bad = []
  for key, accepted in supported.items():
    if callable(accepted):
      if key in config and not accepted(config[key]):
        bad.append(f'{key}={config[key]!r}')
      continue
    value = config.get(key, accepted[0])
    if value not in accepted:
      bad.append(f'{key}={value!r} (supported: {list(accepted)})')
  if bad:
    raise ValueError(f'{what} config has fields lossland does not implement: {bad}')


def per_block(value: Any, blocks: int, key: str) -> tuple:
  """A config value given once or per block (diffusers allows both) as a tuple of `blocks`."""
  if isinstance(value, (list, tuple)):
    if len(value) != blocks:
      raise ValueError(f'{key} has {len(value)} entries for {blocks} blocks')
    return tuple(value)
  return (value,) * blocks

