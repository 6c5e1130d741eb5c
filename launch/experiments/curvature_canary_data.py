"""Canary data for the memorization experiment of Merullo et al. (2025), sec. 4.

256 random canary sequences (a 16-token prefix and a 16-token suffix of random
lowercase letters) are mixed into the embedded `pydoc_text` byte corpus. A
training row is either a random text window or a canary followed by a text
window; canary occurrences are drawn without replacement from a shuffled list
holding each canary `repeats` times, so every canary is seen exactly
`repeats` times in `num_steps = num_canaries * repeats / canary_rows` steps.
`batch_fn(step)` depends only on the step (the trainer's resumable position).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from lossland import data as data_lib

ALPHABET = np.frombuffer(b'abcdefghijklmnopqrstuvwxyz', np.uint8).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Canaries:
  tokens: np.ndarray  # [num_canaries, prefix_len + suffix_len] int32 byte ids
  prefix_len: int
  set_a: np.ndarray  # indices of the sweep set (choose rho and layers)
  set_b: np.ndarray  # indices of the held-out evaluation set

  @property
  def prefixes(self) -> np.ndarray:
    return self.tokens[:, :self.prefix_len]

  @property
  def suffixes(self) -> np.ndarray:
    return self.tokens[:, self.prefix_len:]


def make_canaries(num: int, prefix_len: int, suffix_len: int, seed: int) -> Canaries:
  rng = np.random.default_rng([seed, 7])
  tokens = ALPHABET[rng.integers(0, len(ALPHABET), size=(num, prefix_len + suffix_len))]
  order = rng.permutation(num)
  return Canaries(tokens.astype(np.int32), prefix_len, np.sort(order[:num // 2]),
                  np.sort(order[num // 2:]))


def make_batch_fn(corpus_tokens: np.ndarray, canaries: Canaries, *, batch_size: int,
                  seq_len: int, canary_rows: int, repeats: int, seed: int,
                  process_index: int = 0, process_count: int = 1):
  """Returns `batch_fn(step) -> {'inputs', 'targets'}` of [batch_size // process_count, seq_len].

  The first `canary_rows` rows of each global batch start with a canary.
  """
  canary_len = canaries.tokens.shape[1]
  if canary_rows > batch_size or canary_len >= seq_len:
    raise ValueError(f'canary_rows={canary_rows} must be <= batch_size={batch_size} and the '
                     f'canary length {canary_len} below seq_len={seq_len}')
  num_occurrences = len(canaries.tokens) * repeats
  local = batch_size // process_count

  def batch_fn(step: int) -> dict:
    text = data_lib.lm_batch(corpus_tokens, step, batch_size=batch_size, seq_len=seq_len,
                             seed=seed, process_index=0, process_count=1)
    rows = np.concatenate([text['inputs'], text['targets'][:, -1:]], axis=1)  # [B, seq+1]
    if canary_rows:
      occ = data_lib.epoch_indices(step, batch_size=canary_rows, num_examples=num_occurrences,
                                   seed=seed + 1)
      ids = occ % len(canaries.tokens)
      rows[:canary_rows] = np.concatenate(
          [canaries.tokens[ids], rows[:canary_rows, :seq_len + 1 - canary_len]], axis=1)
    rows = rows[process_index * local:(process_index + 1) * local]
    return {'inputs': rows[:, :-1], 'targets': rows[:, 1:]}

  return batch_fn


def steps_for_repeats(num_canaries: int, repeats: int, canary_rows: int) -> int:
  """Steps after which every canary has been seen exactly `repeats` times."""
  total = num_canaries * repeats
  if total % canary_rows:
    raise ValueError(f'{num_canaries} canaries x {repeats} repeats is not divisible by '
                     f'canary_rows={canary_rows}')
  return total // canary_rows
