"""Canary sequences for memorization experiments (Merullo et al. 2025, sec. 4.1).

Random canaries (a `prefix_len`-token prefix and a `suffix_len`-token suffix
of random lowercase letters, as byte ids) are mixed into a byte-level text
corpus. A training row is either a random text window or a canary followed by
a text window; canary occurrences are drawn without replacement from a
shuffled list holding each canary `repeats` times, so every canary is seen
exactly `repeats` times in `num_steps = num_canaries * repeats / canary_rows`
steps. `batch_fn(step)` depends only on the step (the trainer's resumable
position). The canaries split into set A (choose the edit) and set B (report).

`flip_labels` makes the memorization set of sec. 4.3: a fraction of training
labels moved to a wrong class. `read_recitation_pairs` reads user-supplied (prefix, suffix) text pairs from a
JSONL file, the form in which recitation sets of pretrained models come.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from lossland.data.images import epoch_indices
from lossland.data.text import lm_batch

ALPHABET = np.frombuffer(b'abcdefghijklmnopqrstuvwxyz', np.uint8).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Canaries:
  """Canary token rows and their split into a selection and an evaluation set."""
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
  """`num` random lowercase-letter canaries, split in half into set A and set B."""
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
    text = lm_batch(corpus_tokens, step, batch_size=batch_size, seq_len=seq_len, seed=seed,
                    process_index=0, process_count=1)
    rows = np.concatenate([text['inputs'], text['targets'][:, -1:]], axis=1)  # [B, seq+1]
    if canary_rows:
      occ = epoch_indices(step, batch_size=canary_rows, num_examples=num_occurrences,
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


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """(noisy labels, sorted flipped indices): `fraction` of labels moved to a random wrong class."""
  if not 0.0 <= fraction <= 1.0 or num_classes < 2:
    raise ValueError(f'flip fraction {fraction} must be in [0, 1] and num_classes={num_classes} '
                     'at least 2')
  rng = np.random.default_rng([seed, 11])
  flipped = np.sort(rng.choice(len(labels), int(round(fraction * len(labels))), replace=False))
  noisy = labels.copy()
  noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, len(flipped))) % num_classes
  return noisy, flipped


def read_recitation_pairs(path: str) -> list[tuple[str, str]]:
  """(prefix, suffix) strings from a JSONL file of {"prefix": ..., "suffix": ...} objects.

  Blank lines are skipped. Raises FileNotFoundError for a missing file and a
  ValueError naming the line for a line that is not such an object, or when
  the file holds no pair.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'recitation file {path!r} does not exist; give a JSONL file with '
                            'one {"prefix": ..., "suffix": ...} object per line')
  pairs = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        item = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{number} is not valid JSON ({e.msg})') from None
      if (not isinstance(item, dict) or not isinstance(item.get('prefix'), str)
          or not isinstance(item.get('suffix'), str) or not item['suffix']):
        raise ValueError(f'{path}:{number} must be an object with string "prefix" and a '
                         f'non-empty string "suffix"; got {line.strip()[:80]!r}')
      pairs.append((item['prefix'], item['suffix']))
  if not pairs:
    raise ValueError(f'recitation file {path!r} holds no (prefix, suffix) pair')
  return pairs


def write_recitation_pairs(path: str, pairs) -> None:
  """Writes (prefix, suffix) string pairs as the JSONL that `flip_labels` makes the memorization set of sec. 4.3: a fraction of training
labels moved to a wrong class. `read_recitation_pairs` reads."""
  with open(path, 'w', encoding='utf-8') as f:
    for prefix, suffix in pairs:
      f.write(json.dumps({'prefix': prefix, 'suffix': suffix}) + '\n')
