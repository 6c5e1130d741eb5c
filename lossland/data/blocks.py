"""Stacking per-step batches into the blocks that compiled train/eval loops scan over."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np


def stack_batches(batches: Sequence[Any]) -> Any:
  """Stacks batch pytrees of host arrays into one pytree of [len(batches), ...] arrays.

  The result is what `lossland.train.fit` takes as an eval set and what its
  train blocks scan over.
  """
  if not batches:
    raise ValueError('stack_batches needs at least one batch')
  return jax.tree.map(lambda *xs: np.stack(xs), *batches)
