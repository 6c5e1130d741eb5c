"""Token streams for language modelling and deterministic LM batches.

A corpus is split into a train and a validation token stream. Batches are
random windows whose start offsets are a pure function of (seed, step), as in
the character-level baselines lossland compares against: the iterator position
is just the step number, which the trainer saves with each checkpoint.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from lossland.data import sources


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Byte-level (`chars is None`, 256 ids) or character-level vocabulary."""
  chars: str | None = None

  @property
  def size(self) -> int:
    return 256 if self.chars is None else len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    if self.chars is None:
      return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)
    index = {c: i for i, c in enumerate(self.chars)}
    unknown = sorted(set(text) - set(index))
    if unknown:
      raise ValueError(f'characters {unknown[:10]} are not in the vocabulary')
    return np.array([index[c] for c in text], np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    if self.chars is None:
      return bytes(ids.astype(np.uint8).tolist()).decode('utf-8', errors='replace')
    return ''.join(self.chars[i] for i in ids)

  @classmethod
  def from_text(cls, text: str) -> 'Vocab':
    return cls(''.join(sorted(set(text))))


@dataclasses.dataclass(frozen=True)
class TextCorpus:
  train: np.ndarray  # [num_train_tokens] int32
  validation: np.ndarray  # [num_val_tokens] int32
  vocab: Vocab


def corpus_from_text(train_text: str, validation_text: str, vocab: str = 'char') -> TextCorpus:
  """Tokenizes two texts with a `char` vocabulary built from both, or `byte`s."""
  if vocab not in ('char', 'byte'):
    raise ValueError(f"vocab must be 'char' or 'byte', got {vocab!r}")
  v = Vocab.from_text(train_text + validation_text) if vocab == 'char' else Vocab()
  return TextCorpus(v.encode(train_text), v.encode(validation_text), v)


def load_text_file(path: str, vocab: str = 'char') -> TextCorpus:
  """A UTF-8 file: first 90% of characters train, last 10% validation.

  Raises:
    ValueError: naming the path when it does not exist or is a directory, and
      the byte offset of the first invalid byte when it is not UTF-8.
  """
  if os.path.isdir(path):
    raise ValueError(f'data.path {path!r} is a directory; set --config.data.path to a UTF-8 '
                     'text file inside it')
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except FileNotFoundError as e:
    raise ValueError(f'text file {path!r} does not exist; set --config.data.path to a UTF-8 '
                     'text file') from e
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'text file {path!r} is not UTF-8: byte {e.start} (0x{raw[e.start]:02x}) '
                     f'{e.reason}; convert it (e.g. `iconv -f latin1 -t utf-8`) or point '
                     '--config.data.path at a UTF-8 file') from e
  text = text.replace('\r\n', '\n').replace('\r', '\n')  # as text-mode open() reads it
  cut = int(len(text) * 0.9)
  return corpus_from_text(text[:cut], text[cut:], vocab)


def _as_str(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def load_tfds_text(name: str, *, vocab: str = 'byte', text_key: str = 'text',
                   validation_split: str = 'validation', data_dir: str | None = None,
                   max_chars: int = 100_000_000) -> TextCorpus:
  """Concatenates the documents of a TFDS text dataset (embedded or catalog).

  Documents are joined with a blank line; at most `max_chars` characters per
  split are read, so that very large corpora (c4) load a prefix.
  """
  def read(split: str) -> str:
    source = sources.data_source(name, split, data_dir=data_dir)
    docs, total = [], 0
    for i in range(len(source)):
      doc = _as_str(source[i][text_key])
      docs.append(doc)
      total += len(doc) + 2
      if total >= max_chars:
        break
    return '\n\n'.join(docs)
  return corpus_from_text(read('train'), read(validation_split), vocab)


def lm_batch(tokens: np.ndarray, step: int, *, batch_size: int, seq_len: int, seed: int,
             process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's rows of the global batch for `step`: random windows.

  Returns `inputs` and `targets` ([batch_size // process_count, seq_len] int32),
  where targets are inputs shifted by one token.
  """
  if len(tokens) < seq_len + 1:
    raise ValueError(f'the token stream has {len(tokens)} tokens, fewer than the seq_len + 1 = '
                     f'{seq_len + 1} of one window (inputs and their next-token targets); use a '
                     'larger corpus or a smaller seq_len')
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size} must be at least 1')
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} is not divisible by {process_count} processes')
  rng = np.random.default_rng([seed, step])
  # Starts are drawn from [0, len - seq_len - 1), as every recorded run drew them (the last
  # window start is left out); a stream of exactly one window has the one start 0.
  starts = rng.integers(0, max(len(tokens) - seq_len - 1, 1), size=batch_size)
  local = batch_size // process_count
  starts = starts[process_index * local:(process_index + 1) * local]
  windows = tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]]
  return {'inputs': windows[:, :-1], 'targets': windows[:, 1:]}
