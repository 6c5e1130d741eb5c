"""CLIP's BPE tokenizer (Radford et al. 2021) from a Stable Diffusion `tokenizer/` folder.

A folder holds the BPE as `vocab.json` + `merges.txt` (what transformers 4.x's
`CLIPTokenizer.save_pretrained` writes, as in every SD 1.x/2.x release) or as
`tokenizer.json` (transformers 5's `save_pretrained` writes only
`tokenizer.json` and `tokenizer_config.json`; 4.x's CLIPTokenizerFast writes
it next to the other files), with `tokenizer_config.json` and optionally
`special_tokens_map.json`. Like transformers 5's `CLIPTokenizer`, which
rebuilds its pipeline from the vocab and merges whichever files they come
from, `load_clip_tokenizer` builds this `tokenizers` pipeline:

  normalizer     NFC, runs of whitespace -> one space, lowercase
  pre-tokenizer  CLIP's word regex (`<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|
                 'm|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`; whitespace
                 dropped), then ByteLevel without a prefix space
  model          BPE over the byte symbols, '</w>' marking a word's last piece

Added tokens are split out of the text before all of that, as transformers'
tokenizers do (`_added_tokens`): the special tokens (`bos_token`, `eos_token`,
`unk_token`, `pad_token`, ...; SD 2.x pads with "!", so every "!" of a prompt
is that token, not "!</w>") and any added token (`added_tokens_decoder` in
tokenizer_config.json, `added_tokens` in tokenizer.json, e.g. a textual-inversion
"<cat-toy>"), each matched on the raw text or, when its `normalized` flag says
so, on the lowercased text. `ClipTokenizer.encode` adds the start and end
tokens around each prompt and pads to 77 as SD pipelines do
(`padding='max_length'`); a longer prompt is an error rather than silently
truncated. Host code.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

START, END = '<|startoftext|>', '<|endoftext|>'
_WORD = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
         r"""[^\s\p{L}\p{N}]+""")  # transformers 5's CLIPTokenizer (its slow 4.x one's too)
# transformers' CLIPTokenizer defaults, used where the config does not name a token.
_DEFAULTS = {'bos_token': START, 'eos_token': END, 'pad_token': END, 'unk_token': END,
             'model_max_length': 77}
# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order (a later token of the same text wins).
_NAMED = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token',
          'mask_token')
_EXTRA = ('additional_special_tokens', 'extra_special_tokens')
_BPE_FILES = ('vocab.json', 'merges.txt')
_FILES_HINT = ('a CLIP tokenizer folder has vocab.json + merges.txt (transformers 4.x '
               "CLIPTokenizer.save_pretrained, every SD release) or tokenizer.json (transformers "
               "5's save_pretrained writes tokenizer.json + tokenizer_config.json; 4.x's "
               'CLIPTokenizerFast writes it next to vocab.json and merges.txt)')


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


def _bpe_files(folder: str) -> tuple[dict[str, int], list[tuple[str, str]], list[dict]]:
  """(vocab, merges, tokenizer.json's added_tokens) from tokenizer.json, else vocab.json +
  merges.txt (transformers 5 reads tokenizer.json first when a folder has both)."""
  path = os.path.join(folder, 'tokenizer.json')
  if os.path.isfile(path):
    data = _read_json(path)
    model = data.get('model') or {}
    if model.get('type', 'BPE') != 'BPE' or not isinstance(model.get('vocab'), dict):
      raise ValueError(f'{path} holds a {model.get("type")!r} model; a CLIP tokenizer is BPE '
                       '(model.type "BPE" with a vocab dict and merges)')
    merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m)
              for m in model.get('merges', [])]
    return model['vocab'], merges, list(data.get('added_tokens') or [])
  files = {f: os.path.join(folder, f) for f in _BPE_FILES}
  missing = [f for f, p in files.items() if not os.path.isfile(p)]
  if missing:
    have = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    raise FileNotFoundError(f'the CLIP tokenizer folder {folder!r} has no tokenizer.json and lacks '
                            f'{missing} (it has {have}); {_FILES_HINT}')
  return _read_json(files['vocab.json']), _merges(files['merges.txt']), []


def _added(value: Any, *, special: bool | None = None) -> Any:
  """A config token: a string stays one; an AddedToken dict ({'__type': 'AddedToken', 'content':
  ..., 'normalized': ...} or without '__type') becomes a `tokenizers.AddedToken` with its flags."""
  if not isinstance(value, dict):
    return value
  fields = {k: value[k] for k in ('single_word', 'lstrip', 'rstrip', 'normalized', 'special')
            if k in value}
  if special is not None:
    fields['special'] = special
  return tokenizers.AddedToken(str(value['content']), **fields)


def _added_tokens(folder: str, config: dict[str, Any], json_added: list[dict]):
  """(the added tokens by id, the special tokens in transformers' order) of a tokenizer folder.

  As transformers 5's `from_pretrained`: tokenizer_config.json's
  `added_tokens_decoder` when it has one; otherwise special_tokens_map.json's
  entries override the config's, and tokenizer.json's `added_tokens` are the
  added tokens. A named special token spelled like an added token is that
  AddedToken (its `normalized` flag included).
  """
  decoder = {}
  if 'added_tokens_decoder' in config:
    decoder = {int(i): _added(t) for i, t in config['added_tokens_decoder'].items()}
  else:
    path = os.path.join(folder, 'special_tokens_map.json')
    if os.path.isfile(path):
      for key, value in _read_json(path).items():
        if key in _EXTRA and isinstance(value, list):
          config[key] = [_added(t, special=True) for t in value]
        else:
          config[key] = _added(value, special=True)
    decoder = {int(t['id']): _added(t) for t in json_added}
  by_text = {str(t.content): t for t in decoder.values()}
  named = [k for k in _NAMED if config.get(k) is not None]
  named += [k for k in config if k.endswith('_token') and k not in _NAMED
            and isinstance(config[k], (str, dict))]  # transformers 5: model-specific specials
  specials = [by_text.get(str(_text(_added(config[k]))), _added(config[k])) for k in named]
  for key in _EXTRA:
    specials += [_added(t) for t in config.get(key) or [] if isinstance(t, (str, dict))]
  return decoder, specials


def _text(token: Any) -> str:
  return str(token.content) if isinstance(token, tokenizers.AddedToken) else str(token)


def _add_tokens(tok: tokenizers.Tokenizer, decoder: dict, specials: list) -> None:
  """Adds the tokens as `TokenizersBackend.__init__` and `_post_init` of transformers 5 do: the
  added tokens by id, then the special tokens (strings: special, matched on the raw text);
  adding a text again replaces its flags."""
  first = [decoder[i] for i in sorted(decoder)]
  texts = {_text(t) for t in first}
  for t in specials:
    if _text(t) not in texts:
      first.append(tokenizers.AddedToken(t, special=True) if isinstance(t, str) else t)
      texts.add(_text(t))
  tok.add_tokens(first)
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          if isinstance(t, str) else t for t in specials])
  wrong = [f'{t.content!r}: {tok.token_to_id(str(t.content))} (stored as {i})'
           for i, t in decoder.items() if tok.token_to_id(str(t.content)) != i]
  if wrong:
    raise ValueError(f'added tokens get other ids than the tokenizer folder stores: {wrong}; '
                     'their ids must follow the vocab in order')


def load_clip_tokenizer(folder: str | os.PathLike) -> ClipTokenizer:
  """The CLIP tokenizer of `folder` (module docstring: tokenizer.json or vocab.json + merges.txt,
  with tokenizer_config.json and special_tokens_map.json when present)."""
  folder = os.fspath(folder)
  vocab, merges, json_added = _bpe_files(folder)
  config = dict(_DEFAULTS)
  path = os.path.join(folder, 'tokenizer_config.json')
  if os.path.isfile(path):
    config.update({k: v for k, v in _read_json(path).items() if v is not None})
  decoder, specials = _added_tokens(folder, config, json_added)
  start, end, pad, unk = (_text(_added(config[k])) for k in
                          ('bos_token', 'eos_token', 'pad_token', 'unk_token'))
  max_length = int(config['model_max_length'])
  if not 2 < max_length <= 10_000:  # transformers writes a huge sentinel when it is unset
    max_length = _DEFAULTS['model_max_length']

  tok = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix='',
      end_of_word_suffix='</w>', fuse_unk=False, unk_token=unk))
  tok.normalizer = normalizers.Sequence([
      normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r'\s+'), ' '),
      normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_WORD), behavior='removed', invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  _add_tokens(tok, decoder, specials)
  return ClipTokenizer(tok, start=start, end=end, pad=pad, max_length=max_length)
