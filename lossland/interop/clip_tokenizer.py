"""CLIP's BPE tokenizer (Radford et al. 2021) from a Stable Diffusion `tokenizer/` folder.

The folder is what transformers' `CLIPTokenizer.save_pretrained` writes for
SD 1.x/2.x: `vocab.json`, `merges.txt` and `tokenizer_config.json` (no
`tokenizer.json`). `load_clip_tokenizer` builds the `tokenizers` pipeline that
transformers' `CLIPTokenizerFast` builds from those files
(`convert_slow_tokenizer.CLIPConverter`):

  normalizer     NFC, runs of whitespace -> one space, lowercase
  pre-tokenizer  CLIP's word regex (`'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|
                 [^\\s\\p{L}\\p{N}]+`; whitespace dropped), then ByteLevel without
                 a prefix space
  model          BPE over the byte symbols, '</w>' marking a word's last piece

`<|startoftext|>` and `<|endoftext|>` are special tokens, so a prompt that
spells them out gets their ids. `ClipTokenizer.encode` adds them around each
prompt and pads to 77 as SD pipelines do (`padding='max_length'`); a longer
prompt is an error rather than silently truncated. Host code.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

START, END = '<|startoftext|>', '<|endoftext|>'
_WORD = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# transformers' CLIPTokenizer defaults, used where the config does not name a token.
_DEFAULTS = {'bos_token': START, 'eos_token': END, 'pad_token': END, 'unk_token': END,
             'model_max_length': 77}


def _token(value: Any) -> Any:
  """A config token as a string (older configs store {'__type': 'AddedToken', 'content': ...})."""
  return value['content'] if isinstance(value, dict) else value


class ClipTokenizer:
  """CLIP ids of prompts, their token strings and the positions of words.

  Attributes:
    vocab: token string -> id.
    start_id, end_id, pad_id: ids of the start, end and padding tokens.
    max_length: encoded length (77), start and end tokens included.
    tokenizer: the underlying `tokenizers.Tokenizer` (no post-processor: its encodings
      lack the start and end tokens).
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, start: str, end: str, pad: str,
               max_length: int):
    self.tokenizer = tokenizer
    self.vocab = tokenizer.get_vocab(with_added_tokens=True)
    missing = [t for t in (start, end, pad) if t not in self.vocab]
    if missing:
      raise ValueError(f'the CLIP vocab has no token {missing} (start {start!r}, end {end!r}, '
                       f'pad {pad!r})')
    self.start_id, self.end_id, self.pad_id = (self.vocab[t] for t in (start, end, pad))
    self.max_length = max_length
    self._start, self._end = start, end

  def _encoding(self, prompt: str) -> tokenizers.Encoding:
    enc = self.tokenizer.encode(prompt, add_special_tokens=False)
    if len(enc.ids) > self.max_length - 2:
      raise ValueError(f'prompt {prompt!r} has {len(enc.ids)} tokens; CLIP takes at most '
                       f'{self.max_length - 2} (+ start and end tokens = {self.max_length}). '
                       'Shorten it (lossland does not truncate prompts)')
    return enc

  def encode(self, prompts: Sequence[str]) -> np.ndarray:
    """[n, max_length] int32: start id, the prompt's tokens, end id, then pad ids."""
    if isinstance(prompts, str):
      raise TypeError(f'encode takes a list of prompts, got the string {prompts!r}')
    out = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
    for i, prompt in enumerate(prompts):
      ids = [self.start_id] + self._encoding(prompt).ids + [self.end_id]
      out[i, :len(ids)] = ids
    return out

  def tokens(self, prompt: str) -> list[str]:
    """The token strings of `prompt`, start token at position 0, end token last, no padding."""
    return [self._start] + self._encoding(prompt).tokens + [self._end]

  def _words(self, text: str) -> list[str]:
    normalized = self.tokenizer.normalizer.normalize_str(text)
    return [w for w, _ in self.tokenizer.pre_tokenizer.pre_tokenize_str(normalized)]

  def word_positions(self, prompt: str, word: str) -> list[tuple[int, ...]]:
    """For each occurrence of `word` in `prompt`, the positions of its tokens (start token = 0).

    `word` matches whole pre-tokenized words, after CLIP's normalization (so
    case does not matter and 'cat' is not found in 'catalog'); a `word` that
    pre-tokenizes into several pieces ('ice cream', 'tiger,') matches them in
    a row. No occurrence gives [].
    """
    target = self._words(word)
    if not target:
      raise ValueError(f'word {word!r} has no tokens')
    enc = self._encoding(prompt)
    groups: dict[int, list[int]] = {}  # pre-tokenized word -> its token positions
    for position, w in enumerate(enc.word_ids, start=1):
      groups.setdefault(w, []).append(position)
    pieces = list(groups.values())
    words = [''.join(enc.tokens[p - 1] for p in ps).removesuffix('</w>') for ps in pieces]
    out = []
    for i in range(len(words) - len(target) + 1):
      if words[i:i + len(target)] == target:
        out.append(tuple(p for w in range(i, i + len(target)) for p in pieces[w]))
    return out

  def __repr__(self) -> str:
    return (f'ClipTokenizer(vocab={len(self.vocab)}, max_length={self.max_length}, '
            f'start_id={self.start_id}, end_id={self.end_id}, pad_id={self.pad_id})')


def _read_json(path: str) -> dict[str, Any]:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _merges(path: str) -> list[tuple[str, str]]:
  with open(path, encoding='utf-8') as f:
    lines = f.read().split('\n')
  if lines and lines[0].startswith('#version'):
    lines = lines[1:]
  out = []
  for n, line in enumerate(lines):
    if not line.strip():
      continue
    pair = line.split()
    if len(pair) != 2:
      raise ValueError(f'{path} line {n + 2}: a merge is two symbols, got {line!r}')
    out.append((pair[0], pair[1]))
  return out


def load_clip_tokenizer(folder: str | os.PathLike) -> ClipTokenizer:
  """The CLIP tokenizer of `folder` (vocab.json, merges.txt, optional tokenizer_config.json)."""
  folder = os.fspath(folder)
  files = {f: os.path.join(folder, f) for f in ('vocab.json', 'merges.txt')}
  missing = [f for f, p in files.items() if not os.path.isfile(p)]
  if missing:
    have = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    raise FileNotFoundError(f'the CLIP tokenizer folder {folder!r} lacks {missing} (it has '
                            f'{have}); it needs vocab.json and merges.txt')
  config = dict(_DEFAULTS)
  for name in ('special_tokens_map.json', 'tokenizer_config.json'):  # the latter wins
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      config.update({k: v for k, v in _read_json(path).items() if v is not None})
  start, end, pad, unk = (str(_token(config[k])) for k in
                          ('bos_token', 'eos_token', 'pad_token', 'unk_token'))
  max_length = int(config['model_max_length'])
  if not 2 < max_length <= 10_000:  # transformers writes a huge sentinel when it is unset
    max_length = _DEFAULTS['model_max_length']

  vocab = _read_json(files['vocab.json'])
  tok = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=_merges(files['merges.txt']), dropout=None,
      continuing_subword_prefix='', end_of_word_suffix='</w>', fuse_unk=False, unk_token=unk))
  tok.normalizer = normalizers.Sequence([
      normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r'\s+'), ' '),
      normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_WORD), behavior='removed', invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in dict.fromkeys((start, end, unk))])
  return ClipTokenizer(tok, start=start, end=end, pad=pad, max_length=max_length)
