"""Finding a prompt's concept tokens and the text tokens its maps are normalized over.

Host-side helpers (numpy); their outputs are the `token_indices` and
`text_mask` arrays of `lossland.guidance.maps.token_maps`. Attend-and-Excite
(Chefer et al. 2023, sec. 3) and A-STAR (Agarwal et al. 2023, sec. 3) guide
the maps of the prompt's subject tokens (here the shape nouns); the start
token is excluded from the re-normalization because it is an attention sink.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def text_mask(tokens: np.ndarray, *, start_id: int, end_id: int) -> np.ndarray:
  """[b, T] bool: True strictly between the start token and the first end token."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f'tokens must be [batch, seq], got shape {tokens.shape}')
  pos = np.arange(tokens.shape[1])[None]
  is_end = tokens == end_id
  if not is_end.any(1).all():
    bad = int(np.argmin(is_end.any(1)))
    raise ValueError(f'prompt {bad} has no end token (id {end_id}): {tokens[bad].tolist()}; '
                     'tokenize prompts with start and end tokens')
  end = is_end.argmax(1)[:, None]
  return (pos > 0) & (pos < end) & (tokens[:, :1] == start_id)


def concept_indices(tokens: np.ndarray, concepts: Sequence[Sequence[str]],
                    vocab: Sequence[str]) -> np.ndarray:
  """Positions [b, M] of each prompt's concept words in its token sequence.

  Args:
    tokens: [b, T] token ids.
    concepts: per prompt, the M concept words to guide (e.g. its nouns); a
      repeated word takes its next occurrence.
    vocab: id -> word.
  Raises:
    ValueError naming the prompt, the missing concept and the prompt's words
    if a concept is not a token of its prompt, or if prompts have different
    numbers of concepts.
  """
  tokens = np.asarray(tokens)
  if len(concepts) != len(tokens):
    raise ValueError(f'{len(concepts)} concept lists for {len(tokens)} prompts')
  counts = {len(c) for c in concepts}
  if len(counts) != 1:
    raise ValueError(f'every prompt in a batch needs the same number of concepts, got {counts}; '
                     'batch one-object and two-object prompts separately')
  out = np.zeros((len(tokens), counts.pop()), np.int32)
  for b, (row, words) in enumerate(zip(tokens, concepts)):
    names = [vocab[i] for i in row]
    used: set[int] = set()
    for m, word in enumerate(words):
      hits = [p for p, w in enumerate(names) if w == word and p not in used]
      if not hits:
        raise ValueError(f'concept {word!r} is not a token of prompt {b} ({" ".join(names)!r}); '
                         f'its tokens are {names}')
      out[b, m] = hits[0]
      used.add(hits[0])
  return out


def check_token_indices(tokens, text_mask, token_indices,
                        vocab: Sequence[str] | None = None) -> None:
  """Raises ValueError unless every concept index points at a word of its prompt.

  Indices out of range give NaN losses inside a jitted sampler; indices at the
  start token, the end token or padding (outside `text_mask`), or a prompt with
  no words at all, would silently guide nothing. Host-side (numpy).

  Args:
    tokens: [b, T] token ids.
    text_mask: [b, T] bool (`text_mask`).
    token_indices: [b, M] positions (`concept_indices`), M ≥ 1.
    vocab: id -> word, to name the prompt's tokens in the error (else ids).
  """
  tokens, mask = np.asarray(tokens), np.asarray(text_mask, bool)
  idx = np.asarray(token_indices)
  if idx.ndim != 2 or tokens.ndim != 2 or mask.shape != tokens.shape or len(idx) != len(tokens):
    raise ValueError(f'token_indices {idx.shape} must be [batch, M] and text_mask {mask.shape} '
                     f'[batch, T] for tokens {tokens.shape}')
  if idx.shape[1] == 0:
    raise ValueError('token_indices has no concept tokens (M = 0): guidance would guide '
                     'nothing; give each prompt at least one concept (`concept_indices`)')

  def listing(b: int) -> str:
    words = [vocab[t] if vocab is not None and 0 <= t < len(vocab) else int(t)
             for t in tokens[b].tolist()]
    return ', '.join(f'{p}:{w}' for p, w in enumerate(words))

  for b in range(len(tokens)):
    if not mask[b].any():
      raise ValueError(f'prompt {b} has no words to guide (empty prompt); its tokens '
                       f'(position:token) are [{listing(b)}]')
    for m, p in enumerate(idx[b].tolist()):
      if not 0 <= p < tokens.shape[1]:
        raise ValueError(f'concept {m} of prompt {b} is at position {p}, outside the '
                         f'{tokens.shape[1]} token positions; its tokens (position:token) are '
                         f'[{listing(b)}]')
      if not mask[b, p]:
        raise ValueError(f'concept {m} of prompt {b} is at position {p}, the start token, end '
                         'token or padding, which would guide nothing; pick a word of the prompt '
                         f'(`concept_indices`). Its tokens (position:token) are [{listing(b)}]')
