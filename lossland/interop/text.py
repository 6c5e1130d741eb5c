"""Text files and (prefix, suffix) pairs as token ids of a checkpoint's tokenizer.

Used by the curvature edit of pretrained models (`configs/curvature/hf_edit.py`):
K-FAC factors and held-out perplexity come from a plain text file, recitation
from JSONL (prefix, suffix) pairs (`lossland.data.read_recitation_pairs`).
The text is encoded whole and without special tokens, so the ids are one
stream from which `lossland.data.lm_batch` draws windows; each prefix is
encoded with the tokenizer's special tokens (e.g. a BOS, as in generation),
each suffix without them. Host functions.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tokenizers


PYTHON_DOCS = 'python-docs'


def python_docs() -> str:
  """The Python reference manual's topic texts, shipped with every Python (`pydoc_data.topics`).

  About 0.75 MB of English technical prose found on any machine with Python:
  clean text for K-FAC factors and held-out perplexity without a download.
  """
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  return '\n\n'.join(topics.topics[k] for k in sorted(topics.topics))


def read_text(path: str) -> str:
  """The UTF-8 text of `path` (line endings kept as they are), or `python_docs()` for 'python-docs'."""
  if path == PYTHON_DOCS:
    return python_docs()
  if not os.path.isfile(path):
    raise FileNotFoundError(f'text file {path!r} does not exist; pass a UTF-8 text file '
                            '(--config.data.path=FILE)')
  with open(path, encoding='utf-8', newline='') as f:
    text = f.read()
  if not text:
    raise ValueError(f'text file {path!r} is empty')
  return text


def encode_text(text: str, tokenizer: tokenizers.Tokenizer) -> np.ndarray:
  """[num_tokens] int32 ids of `text`, without special tokens."""
  return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)


def split_tokens(tokens: np.ndarray, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(first 1 - fraction, last fraction) of a token stream."""
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(f'heldout_fraction={heldout_fraction} must be in (0, 1)')
  cut = int(round(len(tokens) * (1.0 - heldout_fraction)))
  return tokens[:cut], tokens[cut:]


def encode_pairs(pairs: Sequence[tuple[str, str]], tokenizer: tokenizers.Tokenizer
                 ) -> list[tuple[list[int], list[int]]]:
  """Token (prefix, suffix) pairs: prefixes with special tokens, suffixes without."""
  out = []
  for i, (prefix, suffix) in enumerate(pairs):
    p = tokenizer.encode(prefix, add_special_tokens=True).ids
    s = tokenizer.encode(suffix, add_special_tokens=False).ids
    if not p or not s:
      raise ValueError(f'pair {i} ({prefix[:30]!r}, {suffix[:30]!r}) has an empty prefix or '
                       'suffix after tokenization')
    out.append((list(p), list(s)))
  return out
