"""Finding the passages a language model recites: a memorized set built from text a user has.

Merullo et al. (2025), sec. 4.1 edit away recitation of a *memorized set*:
(prefix, suffix) pairs the model completes verbatim by greedy decoding. For a
pretrained model nobody knows that set in advance; Pythia's memorization
evaluations (Biderman et al. 2023, sec. 3) find it by scanning training text
with k = 32-token prefixes and 32-token continuations. `scan` does the same on
any texts, in two stages so a corpus of tens of thousands of tokens scans in
minutes on a CPU:

1. **Screening (teacher forced).** Each text's tokens are cut into chunks of
   `chunk_len` that overlap by `prefix_len`, each behind the tokenizer's
   special prefix (e.g. BOS), and one forward pass per chunk gives, for every
   token, whether it is the model's top-1 prediction given the true text
   before it (at least `prefix_len` tokens of it; more inside a chunk). A
   window starting at token s (prefix tokens[s:s+P], suffix
   tokens[s+P:s+P+L], s on a grid of `stride`) is a candidate when the
   fraction of its suffix tokens predicted so is at least `screen_threshold`.
   A strictly recited suffix is predicted at every position given exactly its
   prefix, so with `screen_threshold` <= 1 it is a candidate unless the longer
   context of the chunk changes a prediction; the screen trades that rare miss
   for one forward pass per token instead of one greedy decode per window.
2. **Confirmation (greedy).** Each candidate's prefix alone (after the
   special prefix) is greedily decoded for L tokens (`metrics.greedy_decode`,
   a KV cache for `CausalLM`), and scored as `curvature.metrics` defines it:
   strict = exact suffix, loose = 1 - Levenshtein/L >= `loose_threshold`.

Confirmed windows are kept without overlap (left to right within each text),
so every passage is distinct text; each carries its text's kind ('verbatim'
text a model can only reproduce by storing it, or a rule-following
'sequence'; `lossland.data.recitable`). `split_halves` divides a set into the
selection half and the reporting half of sec. 4.1, stratified by kind.

Host functions; the forward pass and the decoding are jitted once per shape.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lossland import parallel
from lossland.curvature import metrics


@dataclasses.dataclass(frozen=True)
class Passage:
  """One confirmed window: where it is, its tokens, and how the model recites it."""
  source: str  # the text's name
  kind: str  # 'verbatim' or 'sequence'
  start: int  # index of the prefix's first token in the text's token stream
  prefix: tuple[int, ...]  # the special prefix (e.g. BOS) + P text tokens, as decoding sees it
  suffix: tuple[int, ...]  # the L tokens that follow
  teacher_forced: float  # fraction of suffix tokens predicted top-1 in the screen
  similarity: float  # 1 - Levenshtein(greedy continuation, suffix) / L
  strict: bool  # greedy continuation == suffix

  def loose(self, threshold: float) -> bool:
    return self.similarity >= threshold

  def as_dict(self) -> dict:
    return dataclasses.asdict(self) | {'prefix': list(self.prefix), 'suffix': list(self.suffix)}

  @classmethod
  def from_dict(cls, d: Mapping) -> 'Passage':
    return cls(**(dict(d) | {'prefix': tuple(d['prefix']), 'suffix': tuple(d['suffix'])}))


@dataclasses.dataclass(frozen=True)
class ScanReport:
  """The passages found, and how many windows each stage saw, per text."""
  passages: tuple[Passage, ...]
  windows: dict[str, int]  # windows screened per text
  candidates: dict[str, int]  # windows that passed the screen per text
  loose_threshold: float

  def counts(self) -> dict[str, dict[str, int]]:
    """{kind: {'passages', 'strict', 'texts'}}: the memorized set's size by kind."""
    out = {}
    for p in self.passages:
      c = out.setdefault(p.kind, {'passages': 0, 'strict': 0, 'texts': set()})
      c['passages'] += 1
      c['strict'] += int(p.strict)
      c['texts'].add(p.source)
    return {k: {**v, 'texts': len(v['texts'])} for k, v in out.items()}


def _check_lengths(prefix_len: int, suffix_len: int, stride: int, chunk_len: int) -> None:
  if min(prefix_len, suffix_len, stride) < 1:
    raise ValueError(f'prefix_len={prefix_len}, suffix_len={suffix_len} and stride={stride} '
                     'must all be at least 1')
  if chunk_len <= prefix_len:
    raise ValueError(f'chunk_len={chunk_len} must exceed prefix_len={prefix_len} (chunks '
                     'overlap by prefix_len)')


def chunk_starts(num_tokens: int, chunk_len: int, overlap: int) -> list[int]:
  """Starts of chunks of `chunk_len` overlapping by `overlap` that cover `num_tokens` tokens."""
  step = chunk_len - overlap
  starts = [0]
  while starts[-1] + chunk_len < num_tokens:
    starts.append(starts[-1] + step)
  return starts


@functools.partial(jax.jit, static_argnums=0)
def _top1(apply_fn: Callable, params, inputs: jax.Array) -> jax.Array:
  """[batch, T] argmax next-token ids (the logits never leave the device)."""
  return jnp.argmax(apply_fn(params, inputs), axis=-1).astype(jnp.int32)


def chunk_rows(tokens: np.ndarray, special_prefix: Sequence[int], chunk_len: int,
               context: int) -> tuple[np.ndarray, list[int]]:
  """([chunks, len(special_prefix) + chunk_len] rows (zero-padded), chunk starts) of one text."""
  lead = len(special_prefix)
  starts = chunk_starts(len(tokens), chunk_len, context)
  rows = np.zeros((len(starts), lead + chunk_len), np.int32)
  for r, a in enumerate(starts):
    piece = tokens[a:a + chunk_len]
    rows[r, :lead] = special_prefix
    rows[r, lead:lead + len(piece)] = piece
  return rows, starts


def top1_rows(apply_fn: Callable, params, rows: np.ndarray, *, batch_size: int,
              mesh=None) -> np.ndarray:
  """[rows, T] argmax next-token ids of equal-length rows, in batches of `batch_size`."""
  mesh = parallel.data_mesh(mesh)
  size = mesh.devices.size
  batch_size = -(-max(batch_size, 1) // size) * size
  pad = -len(rows) % batch_size
  rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), np.int32)])
  out = []
  for b in range(0, len(rows), batch_size):
    inputs = parallel.shard_batch(rows[b:b + batch_size], mesh)
    out.append(np.asarray(parallel.settle(_top1(apply_fn, params, inputs))))
  return np.concatenate(out)[:len(rows) - pad]


def hits_of_chunks(tokens: np.ndarray, starts: Sequence[int], predicted: np.ndarray, lead: int,
                   chunk_len: int, context: int) -> np.ndarray:
  """[len(tokens)] bool from the chunks' predictions (each token judged in its first chunk
  with at least `context` text tokens before it, or at the text's start)."""
  n = len(tokens)
  hits = np.zeros(n, bool)
  judged = np.zeros(n, bool)
  for r, a in enumerate(starts):
    # Position lead - 1 + j predicts text token a + j (j = 0 is predicted from the special prefix).
    first = 0 if a == 0 else context
    if a == 0 and lead == 0:
      first = 1  # nothing predicts the first token
    for j in range(first, min(chunk_len, n - a)):
      if not judged[a + j]:
        judged[a + j] = True
        hits[a + j] = predicted[r, lead - 1 + j] == tokens[a + j]
  return hits


def token_hits(apply_fn: Callable, params, tokens: np.ndarray, *, special_prefix: Sequence[int],
               context: int, chunk_len: int, batch_size: int, mesh=None) -> np.ndarray:
  """[len(tokens)] bool: token i is the model's top-1 prediction given the text before it.

  Chunks of `chunk_len` tokens overlap by `context`; a token is judged in the
  first chunk where at least `context` text tokens precede it (or where it
  is, at the text's start). Every chunk is preceded by `special_prefix`.
  """
  tokens = np.asarray(tokens, np.int32)
  rows, starts = chunk_rows(tokens, special_prefix, chunk_len, context)
  predicted = top1_rows(apply_fn, params, rows, batch_size=batch_size, mesh=mesh)
  return hits_of_chunks(tokens, starts, predicted, len(special_prefix), chunk_len, context)


def screen_windows(hits: np.ndarray, prefix_len: int, suffix_len: int, stride: int,
                   threshold: float) -> tuple[list[tuple[int, float]], int]:
  """([(start, teacher-forced suffix accuracy)] of windows at or above `threshold`, windows seen)."""
  n = len(hits)
  width = prefix_len + suffix_len
  starts = range(0, n - width + 1, stride)
  cumulative = np.concatenate([[0], np.cumsum(hits)])
  out = []
  for s in starts:
    acc = (cumulative[s + width] - cumulative[s + prefix_len]) / suffix_len
    if acc >= threshold:
      out.append((s, float(acc)))
  return out, len(starts)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode(apply_fn: Callable, params, prefixes: jax.Array, num_tokens: int) -> jax.Array:
  return metrics.greedy_decode(apply_fn, params, prefixes, num_tokens)


def greedy_continuations(apply_fn: Callable, params, prefixes: np.ndarray, num_tokens: int, *,
                         batch_size: int) -> np.ndarray:
  """[n, num_tokens] greedy continuations of equal-length prefixes [n, P], in fixed-size batches."""
  prefixes = np.asarray(prefixes, np.int32)
  n = len(prefixes)
  if n == 0:
    return np.zeros((0, num_tokens), np.int32)
  size = min(batch_size, n)
  padded = np.concatenate([prefixes, np.repeat(prefixes[:1], -n % size, axis=0)])
  out = [np.asarray(_decode(apply_fn, params, padded[b:b + size], num_tokens))
         for b in range(0, len(padded), size)]
  return np.concatenate(out)[:n]


def non_overlapping(starts: Sequence[int], width: int) -> list[int]:
  """Indices of `starts` (ascending) kept left to right so that kept windows do not overlap."""
  kept, end = [], -1
  for i, s in enumerate(starts):
    if s >= end:
      kept.append(i)
      end = s + width
  return kept


def scan(apply_fn: Callable, params, texts: Mapping[str, tuple[Sequence[int], str]], *,
         special_prefix: Sequence[int] = (), prefix_len: int = 32, suffix_len: int = 32,
         stride: int = 8, chunk_len: int = 256, screen_threshold: float = 0.75,
         loose_threshold: float = 0.75, batch_size: int = 8, mesh=None,
         log: Callable[[str], None] | None = None) -> ScanReport:
  """The passages of `texts` the model recites (module docstring).

  Args:
    apply_fn: `(params, tokens[b, T]) -> logits[b, T, vocab]` of a causal LM
      (`model.apply`; a `CausalLM`'s decodes with its KV cache).
    params: its variables.
    texts: {name: (token ids of the whole text without special tokens, kind)}.
    special_prefix: ids put before every chunk and prefix (the tokenizer's
      BOS, as generation would see it); () for none.
    prefix_len, suffix_len: P and L of every window (Pythia: 32 and 32; the
      paper's 7B study: 64 and 48).
    stride: distance between window starts screened.
    chunk_len: tokens per screening forward pass.
    screen_threshold: teacher-forced suffix accuracy a window needs to be decoded.
    loose_threshold: similarity (1 - Levenshtein/L) a passage needs to be kept.
    batch_size: rows per forward pass and per decoding batch.
    mesh: the screening batches are sharded on its `data` axis (None = all
      local devices).
    log: called with one progress line per text (e.g. `print`).
  """
  _check_lengths(prefix_len, suffix_len, stride, chunk_len)
  if not 0.0 < loose_threshold <= 1.0 or not 0.0 <= screen_threshold <= 1.0:
    raise ValueError(f'loose_threshold={loose_threshold} must be in (0, 1] and '
                     f'screen_threshold={screen_threshold} in [0, 1]')
  special_prefix = [int(t) for t in special_prefix]
  width, lead = prefix_len + suffix_len, len(special_prefix)
  tokens = {n: np.asarray(t, np.int32) for n, (t, _) in texts.items()}
  scanned = [n for n in texts if len(tokens[n]) >= width]
  # 1. One teacher-forced pass over every text's chunks, batched across texts.
  chunks = {n: chunk_rows(tokens[n], special_prefix, chunk_len, prefix_len) for n in scanned}
  all_rows = [rows for rows, _ in chunks.values()]
  predicted = top1_rows(apply_fn, params, np.concatenate(all_rows), batch_size=batch_size,
                        mesh=mesh) if all_rows else None
  windows = {n: 0 for n in texts}
  found, offset = [], 0
  for n in scanned:
    rows, starts = chunks[n]
    hits = hits_of_chunks(tokens[n], starts, predicted[offset:offset + len(rows)], lead,
                          chunk_len, prefix_len)
    offset += len(rows)
    passing, windows[n] = screen_windows(hits, prefix_len, suffix_len, stride, screen_threshold)
    found.extend((n, s, acc) for s, acc in passing)
  candidates = {n: sum(f[0] == n for f in found) for n in texts}
  if log is not None:
    log(f'scan: {sum(windows.values())} windows of {len(scanned)} texts screened, '
        f'{len(found)} pass; decoding them')
  # 2. Greedy confirmation of every candidate, batched across texts.
  prefixes = np.array([np.concatenate([special_prefix, tokens[n][s:s + prefix_len]])
                       for n, s, _ in found], np.int32).reshape(len(found), lead + prefix_len)
  suffixes = np.array([tokens[n][s + prefix_len:s + width] for n, s, _ in found],
                      np.int32).reshape(len(found), suffix_len)
  generated = greedy_continuations(apply_fn, params, prefixes, suffix_len, batch_size=batch_size)
  similarity = np.array([1.0 - metrics.levenshtein(g, t) / suffix_len
                         for g, t in zip(generated, suffixes)])
  passages = []
  for n in scanned:
    idx = np.array([i for i, f in enumerate(found) if f[0] == n and
                    similarity[i] >= loose_threshold], int)
    starts = np.array([found[i][1] for i in idx], int)
    kept = [Passage(n, texts[n][1], int(found[i][1]), tuple(int(t) for t in prefixes[i]),
                    tuple(int(t) for t in suffixes[i]), found[i][2], float(similarity[i]),
                    bool(np.all(generated[i] == suffixes[i])))
            for i in idx[non_overlapping(starts, width)]]
    passages.extend(kept)
    if log is not None:
      log(f'scan {n} ({texts[n][1]}): {len(tokens[n])} tokens, {windows[n]} windows, '
          f'{candidates[n]} pass the screen, {len(kept)} passages '
          f'({sum(p.strict for p in kept)} strict)')
  return ScanReport(tuple(passages), windows, candidates, loose_threshold)


def split_halves(passages: Sequence[Passage], seed: int) -> tuple[list[Passage], list[Passage]]:
  """(selection half A, reporting half B): a seeded shuffle within each kind, alternately dealt.

  Sec. 4.1 chooses the edit's layers and ρ on one set of memorized examples
  and reports another; dealing per kind keeps both kinds in both halves.
  """
  rng = np.random.default_rng(seed)
  a, b = [], []
  for kind in sorted({p.kind for p in passages}):
    group = [p for p in passages if p.kind == kind]
    order = rng.permutation(len(group))
    for j, i in enumerate(order):
      (a if j % 2 == 0 else b).append(group[i])
  return a, b
