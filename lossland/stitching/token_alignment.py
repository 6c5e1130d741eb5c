"""Token positions of two models with different tokenizers that have read the same text.

Layer-by-layer similarity (CKA) compares row r of model A's features with row
r of model B's, so both rows must describe the same input. Two language models
with different tokenizers cut a text into different tokens; what they share
are character positions. An *aligned unit* is a character position e where
both tokenizations have a clean boundary: the tokens up to some token i cover
exactly text[:e] and every later token starts at or after e (a boundary both
tokenizers' end offsets agree on; `tokenizers` Encoding.offsets are character
spans). The unit's representation in each model is the hidden state at the
LAST token ending at e: for a causal LM that is the state that has read
exactly text[:e] (plus the model's own BOS), the same text in both models.
The alternative, the mean over the tokens of the unit's span (the tokens after
the previous unit's, up to the last one ending at e), mixes states that have
read different prefixes, each of which the other model never sees as a state;
it is available as `reduce='mean'` (`aligned_features`) for comparison.
Units are the common boundaries only, so a span that one tokenizer splits and
the other does not (`Ġworld` vs `▁wor` `ld`) is one unit, ending after `ld`.

Conventions the end-offsets-only rule absorbs:

* Whitespace: byte-level BPE ('Ġworld', GPT-2 / Llama 3 / SmolLM) and
  SentencePiece ('▁world', Llama 2 / Gemma) both put a word's leading space
  in the word's token, and some post-processors trim it from the offsets
  (`ByteLevel(trim_offsets=True)`, which also moves ends of whitespace-only
  tokens); only end offsets are compared, and the offsets are read from the
  tokenizer without its post-processor, so no trimming happens.
* Byte pieces: a character split over several byte tokens (byte-level BPE's
  pieces of 'é', SentencePiece's `<0xC3>` `<0xA9>` byte fallback, a prepended
  '▁' that shares the offsets of the first character) gives tokens with
  overlapping spans; no boundary is placed inside them, since a later token
  starts before the end.
* Special tokens: the BOS (or any prefix) the tokenizer's post-processor adds
  is not part of the text; each window is fed with it (`Tokenized.prefix`),
  and it is never a unit. EOS and other suffixes are dropped.

Related: model fusion across vocabularies aligns tokens approximately, by
edit distance (Wan et al., "Knowledge Fusion of Large Language Models", ICLR
2024); here only exact common boundaries count, so each unit is the same text
in both models. CKA itself: Kornblith et al. (ICML 2019).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lossland import taps
from lossland.parallel import mesh as mesh_lib
from lossland.stitching import splice as capture_lib
from lossland.stitching.similarity import select_layers
from lossland.stitching.splice import Model

if TYPE_CHECKING:
  import tokenizers

REDUCES = ('last', 'mean')


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """A text as one tokenizer reads it.

  Attributes:
    ids: [T] int32, the text's tokens (no special tokens added by the tokenizer).
    starts, ends: [T] int64 character offsets of each token in the text.
    prefix: int32 ids the tokenizer puts before a text (e.g. [BOS]); may be empty.
  """
  ids: np.ndarray
  starts: np.ndarray
  ends: np.ndarray
  prefix: np.ndarray


def _content_tokenizer(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """A copy without post-processor, truncation or padding: offsets as the model splits them."""
  import tokenizers  # pylint: disable=g-import-not-at-top (keeps the package import light)
  copy = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  copy.post_processor = None
  copy.no_truncation()
  copy.no_padding()
  return copy


def tokenize(tokenizer: tokenizers.Tokenizer, text: str) -> Tokenized:
  """The text's tokens with character offsets, and the prefix (BOS) the tokenizer adds."""
  content = _content_tokenizer(tokenizer)
  enc = content.encode(text, add_special_tokens=False)
  ids = np.asarray(enc.ids, np.int32)
  offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
  probe = 'The prefix.'  # what a plain encode puts before the content tokens of any text
  bare = content.encode(probe, add_special_tokens=False).ids
  full = tokenizer.encode(probe).ids
  k = next((k for k in range(min(8, len(full)) + 1) if full[k:k + len(bare)] == bare), 0)
  return Tokenized(ids, offsets[:, 0], offsets[:, 1], np.asarray(full[:k], np.int32))


def boundaries(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(chars, last): the clean boundaries e > 0 of one tokenization and the last token ending there.

  Token i ends a clean prefix at e = ends[i] when no earlier token ends after e
  and no later token starts before e; of several such tokens with the same e
  (an empty-span token after the boundary), the last is taken.
  """
  starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
  if len(ends) == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  later_start = np.append(np.minimum.accumulate(starts[::-1])[::-1][1:], np.iinfo(np.int64).max)
  clean = (ends == np.maximum.accumulate(ends)) & (later_start >= ends) & (ends > 0)
  last = np.flatnonzero(clean)
  chars = ends[last]
  keep = np.append(chars[1:] != chars[:-1], True)  # the last token of each run of equal ends
  return chars[keep], last[keep]


@dataclasses.dataclass(frozen=True)
class Alignment:
  """Aligned units: character positions where both tokenizations have a clean boundary.

  Attributes:
    chars: [U] increasing character positions e (unit k has read text[:chars[k]]).
    last_a, last_b: [U] index of the last token of A (of B) ending at chars[k].
  Unit k spans tokens last[k-1]+1 .. last[k] of each model (from 0 for k = 0).
  """
  chars: np.ndarray
  last_a: np.ndarray
  last_b: np.ndarray

  def __len__(self) -> int:
    return len(self.chars)


def align(a: Tokenized, b: Tokenized) -> Alignment:
  """The units both tokenizations end a token at (their common clean boundaries)."""
  chars_a, last_a = boundaries(a.starts, a.ends)
  chars_b, last_b = boundaries(b.starts, b.ends)
  chars, ia, ib = np.intersect1d(chars_a, chars_b, assume_unique=True, return_indices=True)
  return Alignment(chars, last_a[ia], last_b[ib])


@dataclasses.dataclass(frozen=True)
class Windows:
  """The text cut into windows of whole units, as each model's padded token batch.

  Attributes:
    inputs_a, inputs_b: [W, L_a], [W, L_b] int32 tokens (prefix, the window's
      tokens, then `pad_id` up to the length; causal attention keeps the padding
      from reaching any real position).
    last_a, last_b: [W, U] position in the window of each unit's last token.
    first_a, first_b: [W, U] position of each unit's first token (for 'mean').
    chars: [W, 2] the character range [start, end) each window covers (all of
      its tokens are fed, also those of units left out by `drop_first_units`).
    tokens_a, tokens_b: [W] real tokens per window (prefix included).
  """
  inputs_a: np.ndarray
  inputs_b: np.ndarray
  last_a: np.ndarray
  last_b: np.ndarray
  first_a: np.ndarray
  first_b: np.ndarray
  chars: np.ndarray
  tokens_a: np.ndarray
  tokens_b: np.ndarray

  @property
  def units_per_window(self) -> int:
    return self.last_a.shape[1]

  @property
  def num_units(self) -> int:
    return self.last_a.size

  def drop_first_units(self, k: int) -> Windows:
    """The same windows (same tokens fed) with the first k units of each left out of the features.

    A causal LM's first position is an attention sink whose residual stream is
    orders of magnitude larger than the others' (Xiao et al., "Efficient
    Streaming Language Models with Attention Sinks", ICLR 2024; Sun et al.,
    "Massive Activations in Large Language Models", COLM 2024); in a model
    without BOS that is the first unit of every window, and one such row per
    window dominates linear CKA (SmolLM2-135M, block_15 vs block_22 on the
    launcher's default text: 0.999 with them, 0.54 without them and the one
    other massive row, see `massive_units`). A BOS is never a unit.
    """
    if not 0 <= k < self.units_per_window:
      raise ValueError(f'cannot drop {k} of the {self.units_per_window} units of each window; '
                       f'drop between 0 and {self.units_per_window - 1}')
    return dataclasses.replace(self, last_a=self.last_a[:, k:], last_b=self.last_b[:, k:],
                               first_a=self.first_a[:, k:], first_b=self.first_b[:, k:])


def _window_tokens(last: np.ndarray, units: int, count: int):
  """(first token, last token) of each of `count` windows of `units` consecutive units."""
  end = last[(np.arange(count) + 1) * units - 1]
  start = np.concatenate([[0], last[np.arange(1, count) * units - 1] + 1])
  return start, end


def _fits(alignment: Alignment, units: int, count: int, budget_a: int, budget_b: int) -> bool:
  for last, budget in ((alignment.last_a, budget_a), (alignment.last_b, budget_b)):
    start, end = _window_tokens(last, units, count)
    if np.max(end - start + 1) > budget:
      return False
  return True


def make_windows(a: Tokenized, b: Tokenized, alignment: Alignment, *, seq_len: int,
                 num_windows: int = 0, units_per_window: int = 0, pad_id: int = 0,
                 multiple: int = 8) -> Windows:
  """Consecutive windows of `units_per_window` units from the start of the text.

  Both models get the same characters per window (the tokens of each between
  two unit boundaries, after its own prefix), at most `seq_len` tokens each.
  Every window has the same number of units, so a permutation of windows is a
  permutation of blocks of rows (`cka_null`'s 'windows' null).

  Args:
    num_windows: at most this many windows (0: as many as the text holds).
    units_per_window: 0 picks the largest count whose windows all fit `seq_len`
      in both models.
    multiple: each model's window length is its longest window rounded up to a
      multiple of this (at most `seq_len`), so a finer tokenizer does not pad
      the other.

  Raises:
    ValueError: no units, or windows that cannot fit `seq_len`.
  """
  n = len(alignment)
  if n == 0:
    raise ValueError('the two tokenizations share no token boundary in the text; is the text '
                     'empty, or do both tokenizers read it (an unknown-token tokenizer may map '
                     'it to a single token)?')
  budget_a, budget_b = seq_len - len(a.prefix), seq_len - len(b.prefix)

  def count(units):
    return n // units if not num_windows else min(n // units, num_windows)

  if units_per_window:
    units = units_per_window
    if count(units) == 0:
      raise ValueError(f'the text has {n} aligned units, fewer than one window of '
                       f'units_per_window={units}; use a longer text or fewer units per window')
    if not _fits(alignment, units, count(units), budget_a, budget_b):
      raise ValueError(f'windows of {units} units need more than seq_len={seq_len} tokens in one '
                       'of the models; raise seq_len or lower units_per_window (0 chooses it)')
  else:
    units = next((u for u in range(min(budget_a, budget_b, n), 0, -1)
                  if _fits(alignment, u, count(u), budget_a, budget_b)), 0)
    if units == 0:
      raise ValueError(f'no window of whole aligned units fits seq_len={seq_len} tokens (a single '
                       'unit is longer); raise seq_len')
  w = count(units)
  out = {}
  for side, tok, last in (('a', a, alignment.last_a), ('b', b, alignment.last_b)):
    start, end = _window_tokens(last, units, w)
    p = len(tok.prefix)
    length = min(seq_len, -(-int(np.max(end - start + 1) + p) // multiple) * multiple)
    inputs = np.full((w, length), pad_id, np.int32)
    inputs[:, :p] = tok.prefix
    for i in range(w):
      inputs[i, p:p + end[i] - start[i] + 1] = tok.ids[start[i]:end[i] + 1]
    unit_last = last[:w * units].reshape(w, units)
    unit_first = np.concatenate([[-1], last[:w * units - 1]]).reshape(w, units) + 1
    out[side] = (inputs, unit_last - start[:, None] + p, unit_first - start[:, None] + p,
                 end - start + 1 + p)
  chars = alignment.chars[:w * units].reshape(w, units)
  char_range = np.stack([np.concatenate([[0], chars[:-1, -1]]), chars[:, -1]], axis=1)
  return Windows(out['a'][0], out['b'][0], out['a'][1], out['b'][1], out['a'][2], out['b'][2],
                 char_range, out['a'][3], out['b'][3])


def _reduce(act: jax.Array, last: jax.Array, first: jax.Array, reduce: str) -> jax.Array:
  """[b, t, d] activations -> [b, U, d] at each unit's last token, or their mean over the span."""
  act = act.astype(jnp.float32)
  if reduce == 'last':
    return jnp.take_along_axis(act, last[..., None], axis=1)
  sums = jnp.concatenate([jnp.zeros_like(act[:, :1]), jnp.cumsum(act, axis=1)], axis=1)
  span = jnp.take_along_axis(sums, last[..., None] + 1, 1) - jnp.take_along_axis(
      sums, first[..., None], 1)
  return span / (last - first + 1)[..., None].astype(jnp.float32)




def aligned_features(model: Model, params, inputs: np.ndarray, last: np.ndarray,
                     first: np.ndarray | None = None, *, layers: taps.Selector,
                     reduce: str = 'last', batch_size: int = 8, mesh: Mesh | None = None,
                     apply_kwargs: Mapping[str, Any] | None = None,
                     log: Callable[[str], None] | None = None
                     ) -> tuple[list[str], list[np.ndarray]]:
  """Each selected layer's features at the aligned units: ([layer paths], [[W·U, d] float32]).

  Args:
    model, params: a model (linen module, NNX module or apply_fn) and its params.
    inputs: [W, L] tokens (`Windows.inputs_a`); last, first: [W, U] positions.
    layers: module paths or a `taps` selector (e.g. r'block_\\d+', the residual
      stream after each block of a `CausalLM`), resolved on the first batch.
    reduce: 'last' (the state at the unit's last token; default, see the module
      docstring) or 'mean' (the mean over the unit's tokens).
    batch_size: windows per forward pass; the last batch is padded by repetition.
    mesh: batches are sharded on its `data` axis (None: all local devices), so
      batch_size must be a multiple of its size.
    log: called with a progress line after each batch.

  Rows are unit-major within windows (window 0's units, then window 1's, ...).
  """
  if reduce not in REDUCES:
    raise ValueError(f'unknown reduce {reduce!r}; use one of {REDUCES}')
  first = last if first is None else first
  mesh = mesh_lib.data_mesh(mesh)
  kwargs = dict(apply_kwargs or {})
  w = len(inputs)
  count = -(-w // batch_size)
  rows = np.concatenate([np.arange(w), np.full(count * batch_size - w, w - 1)])
  params = mesh_lib.put_replicated(params, mesh)
  names, out = None, []
  for i in range(count):
    pick = rows[i * batch_size:(i + 1) * batch_size]
    x, la, fi = (mesh_lib.shard_batch(np.asarray(v)[pick], mesh) for v in (inputs, last, first))
    if names is None:
      names = select_layers(model, params, x, layers, apply_kwargs=kwargs)

      @jax.jit  # one trace: every batch has the same shape
      def features(params, x, last, first):
        _, acts = capture_lib.capture(model, params, x, names, apply_kwargs=kwargs)
        return [_reduce(acts[k], last, first, reduce) for k in names]

    feats = features(params, x, la, fi)
    out.append([np.asarray(f) for f in jax.device_get(feats)])
    if log:
      log(f'batch {i + 1}/{count}')
  feats = [np.concatenate([b[k] for b in out])[:w] for k in range(len(names))]
  return list(names), [f.reshape(-1, f.shape[-1]) for f in feats]


def massive_units(feats, *, ratio: float = 20.0) -> np.ndarray:
  """[n] bool: units whose centered feature norm is above `ratio` x the median in any layer.

  Besides the first position (`Windows.drop_first_units`), a causal LM can put
  an attention sink's massive activations (Sun et al., COLM 2024) on a later
  delimiter token, e.g. a '\\n\\n' early in a window: SmolLM2-135M's block_15
  has one such row at 200x the median norm (the next largest: 1.8x), which
  alone lifts its CKA with block_22 from 0.54 to 0.98. Leave them out with
  `mask_units`. `feats`: [n, d] arrays (all layers of both models).
  """
  out = np.zeros(len(feats[0]), bool)
  for f in feats:
    f = np.asarray(f, np.float64)
    norms = np.linalg.norm(f - f.mean(axis=0), axis=1)
    out |= norms > ratio * np.median(norms)
  return out


def mask_units(feats, mask: np.ndarray) -> list[np.ndarray]:
  """Each [n, d] feature with the rows in `mask` set to the mean of the others.

  Centered, such a row is 0, so linear CKA is exactly that of the other rows
  (the column means are unchanged), while every row keeps its place (a
  'windows' permutation null still moves whole windows).
  """
  mask = np.asarray(mask, bool)
  if mask.all():
    raise ValueError('every unit is masked; raise the outlier ratio')
  out = []
  for f in feats:
    f = np.array(f, np.float32)
    f[mask] = f[~mask].mean(axis=0)
    out.append(f)
  return out
