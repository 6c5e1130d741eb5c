"""The tokenizer of a GGUF file, rebuilt from its metadata as a `tokenizers.Tokenizer`.

A GGUF file has no tokenizer.json: llama.cpp keeps the vocabulary as metadata
(ggml docs/gguf.md, "Tokenizer"): `tokenizer.ggml.model` (the algorithm),
`.tokens` (the vocabulary, id order), `.token_type` (llama_token_type: 1
normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), `.merges`
(BPE merges, "left right"), `.scores` (SentencePiece piece scores),
`.pre` (the pre-tokenizer's name), `.bos_token_id` / `.eos_token_id` /
`.unknown_token_id` / `.padding_token_id`, `.add_bos_token` /
`.add_eos_token`.

`from_metadata` builds the tokenizer transformers builds for the same file
(transformers 5.24, integrations/gguf/gguf_tokenizer_mapping.py, loaded with
`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), so both give the same ids:

- 'gpt2' (byte-level BPE: GPT-2, Llama 3, Qwen2, SmolLM): the vocabulary (a
  token not spelled in GPT-2's byte alphabet is respelled byte by byte), the
  file's merges, ByteLevel pre-tokenizer and decoder; for the `.pre` names of
  `SPLITS` the text is first split with that family's regex, as llama.cpp does.
- 'llama' (SentencePiece BPE: Llama 1-2, Mistral, TinyLlama): BPE with byte
  fallback over the vocabulary, merges recovered from the scores (the file has
  none), Metaspace pre-tokenizer ('▁' for spaces, one prepended to the text).
- 'llama' in a Gemma file (`general.architecture` in `GEMMA_ARCHITECTURES`):
  transformers' `gemma_tokenizer`: tokens made only of whitespace with a
  space in them are respelled with '▁' for each character (the file stores
  Gemma's '▁▁' tokens as real spaces), merges are recovered ranking pieces by
  their position in the vocabulary (Gemma's scores do not follow its merge
  order), and the text is normalized by replacing spaces with '▁' without a
  prepended one (`GemmaTokenizer`).

Control tokens (and the bos/eos/unknown/padding tokens) are special tokens,
user-defined ones added tokens, so each is matched whole. A BOS (EOS) token is
prepended (appended) when `.add_bos_token` (`.add_eos_token`) says so; a
'llama' file without the key gets one, as llama.cpp gives it.

Where transformers and llama.cpp differ this follows transformers: a `.pre`
name outside `SPLITS` falls back to GPT-2's own regex, and a 'llama' file's
`tokenizer.ggml.add_space_prefix=False` is not honoured.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import tokenizers
from tokenizers import (AddedToken, Regex, decoders, models, normalizers, pre_tokenizers,
                        processors)

MODELS = ('gpt2', 'llama')
# general.architecture values whose 'llama' vocabulary is Gemma's (transformers' gemma_tokenizer).
GEMMA_ARCHITECTURES = ('gemma', 'gemma2', 'gemma3')
CONTROL, USER_DEFINED = 3, 4
SPECIAL_IDS = ('bos_token_id', 'eos_token_id', 'unknown_token_id', 'padding_token_id')

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regex that splits text before byte-level BPE (llama.cpp llama-vocab.cpp
# and the models' tokenizer.json files; the names transformers 5.24 maps for these families).
SPLITS = {
    **{name: _LLAMA3 for name in ('llama3', 'llama-v3', 'llama-bpe', 'falcon3', 'falcon-h1',
                                  'pixtral', 'midm-2.0', 'lfm2', 'jina-v5-nano', 'dbrx',
                                  'smaug-bpe')},
    **{name: _QWEN2 for name in ('qwen2', 'deepseek-r1-qwen', 'kormo', 'f2llmv2', 'megrez')},
}


@functools.cache
def byte_alphabet() -> dict[int, str]:
  """GPT-2's map of each byte to a printable character (openai/gpt-2 encoder.py `bytes_to_unicode`).

  Printable Latin-1 bytes stand for themselves; the other 68 are shifted to
  U+0100 onwards in byte order, so a space is 'Ġ' and a newline 'Ċ'.
  """
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
          *range(ord('®'), ord('ÿ') + 1)]
  chars = {b: chr(b) for b in keep}
  for i, b in enumerate(b for b in range(256) if b not in chars):
    chars[b] = chr(256 + i)
  return dict(sorted(chars.items()))


def merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
  """BPE merges implied by a SentencePiece vocabulary (transformers' `generate_merges`).

  Every split of a piece into two vocabulary pieces is a merge; merges are
  ranked by the merged piece's score, highest first, then by the lengths of
  the two halves (longer first), ties keeping vocabulary order.
  """
  vocab = {token: i for i, token in enumerate(tokens)}
  merges = []
  for piece, score in dict(zip(tokens, scores)).items():
    local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
             if piece[:k] in vocab and piece[k:] in vocab]
    merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  return [(left, right) for left, right, _ in merges]


def _byte_level(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
  spelling = byte_alphabet()
  alphabet = set(spelling.values())
  vocab = {token if set(token) <= alphabet else ''.join(spelling[b] for b in token.encode()): i
           for i, token in enumerate(metadata['tokenizer.ggml.tokens'])}
  merges = [tuple(m.split(' ')) for m in metadata.get('tokenizer.ggml.merges', ())]
  tok = tokenizers.Tokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix='',
                                        end_of_word_suffix='', fuse_unk=False))
  split = SPLITS.get(metadata.get('tokenizer.ggml.pre'))
  if split is None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  return tok


def _sentencepiece(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
  tokens = list(metadata['tokenizer.ggml.tokens'])
  if 'tokenizer.ggml.merges' in metadata:
    merges = [tuple(m.split(' ')) for m in metadata['tokenizer.ggml.merges']]
  elif 'tokenizer.ggml.scores' in metadata:
    merges = merges_from_scores(tokens, metadata['tokenizer.ggml.scores'])
  else:
    raise ValueError("GGUF metadata has neither 'tokenizer.ggml.merges' nor "
                     "'tokenizer.ggml.scores'; a 'llama' (SentencePiece) vocabulary needs one")
  vocab = {token: i for i, token in enumerate(tokens)}
  tok = tokenizers.Tokenizer(models.BPE(vocab, merges, dropout=None, fuse_unk=True,
                                        byte_fallback=True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='first',
                                               split=False)
  tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(' ', 1, 0)])
  return tok


def _gemma(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
  tokens = ['▁' * len(t) if ' ' in t and not t.strip() else t
            for t in metadata['tokenizer.ggml.tokens']]
  merges = merges_from_scores(tokens, [-float(i) for i in range(len(tokens))])
  vocab = {token: i for i, token in enumerate(tokens)}
  tok = tokenizers.Tokenizer(models.BPE(vocab, merges, dropout=None, fuse_unk=True,
                                        unk_token='<unk>', byte_fallback=True))
  tok.normalizer = normalizers.Replace(' ', '▁')
  tok.pre_tokenizer = pre_tokenizers.Split(' ', behavior='merged_with_previous', invert=False)
  tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                   decoders.Fuse()])
  return tok


def special_tokens(metadata: Mapping[str, Any]) -> dict[str, str]:
  """{'bos_token': '<s>', ...} for the ids the file names (bos, eos, unk, pad)."""
  tokens = metadata['tokenizer.ggml.tokens']
  out = {}
  for name, key in zip(('bos_token', 'eos_token', 'unk_token', 'pad_token'), SPECIAL_IDS):
    token_id = metadata.get(f'tokenizer.ggml.{key}')
    if token_id is not None and 0 <= int(token_id) < len(tokens):
      out[name] = tokens[int(token_id)]
  return out


def add_special(metadata: Mapping[str, Any]) -> tuple[bool, bool]:
  """(add_bos_token, add_eos_token) as the file states them ('llama' defaults to a BOS)."""
  default_bos = metadata.get('tokenizer.ggml.model') == 'llama'
  return (bool(metadata.get('tokenizer.ggml.add_bos_token', default_bos)),
          bool(metadata.get('tokenizer.ggml.add_eos_token', False)))


def from_metadata(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
  """The `tokenizers.Tokenizer` a GGUF file's tokenizer.ggml.* metadata describes.

  Raises:
    ValueError: for a tokenizer.ggml.model other than `MODELS`, or a file
      without a vocabulary.
  """
  kind = metadata.get('tokenizer.ggml.model')
  if kind not in MODELS:
    raise ValueError(f'GGUF tokenizer.ggml.model={kind!r} is not supported by lossland; it builds '
                     f'{MODELS} tokenizers (pass tokenizer=False to load the model without one)')
  if 'tokenizer.ggml.tokens' not in metadata:
    raise ValueError("GGUF metadata has no 'tokenizer.ggml.tokens' (the vocabulary)")
  if kind == 'gpt2':
    tok = _byte_level(metadata)
  elif metadata.get('general.architecture') in GEMMA_ARCHITECTURES:
    tok = _gemma(metadata)
  else:
    tok = _sentencepiece(metadata)
  tokens = metadata['tokenizer.ggml.tokens']
  types = list(metadata.get('tokenizer.ggml.token_type', ())) or [1] * len(tokens)
  named = special_tokens(metadata)
  alphabet = set(byte_alphabet().values()) if kind == 'gpt2' else None
  # transformers skips control tokens a byte-level vocabulary cannot spell (llama.cpp mislabels).
  special = [t for t, kind_id in zip(tokens, types) if kind_id == CONTROL and
             (alphabet is None or set(t) <= alphabet)]
  special += [t for t in named.values() if t not in special]
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
  vocab = tok.get_vocab()
  tok.add_tokens([AddedToken(t, normalized=False, special=False)
                  for t, kind_id in zip(tokens, types) if kind_id == USER_DEFINED and t in vocab])
  add_bos, add_eos = add_special(metadata)
  bos = named.get('bos_token') if add_bos else None
  eos = named.get('eos_token') if add_eos else None
  single = ' '.join([f'{bos}:0'] * bool(bos) + ['$A:0'] + [f'{eos}:0'] * bool(eos))
  pair = ' '.join([single] + [f'{bos}:1'] * bool(bos) + ['$B:1'] + [f'{eos}:1'] * bool(eos))
  tok.post_processor = processors.TemplateProcessing(
      single=single, pair=pair,
      special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if t])
  return tok


def tokenizer_config(metadata: Mapping[str, Any]) -> dict[str, Any]:
  """A tokenizer_config.json for the exported folder: special tokens, BOS/EOS use, chat template."""
  add_bos, add_eos = add_special(metadata)
  config: dict[str, Any] = {'tokenizer_class': 'PreTrainedTokenizerFast',
                            **special_tokens(metadata), 'add_bos_token': add_bos,
                            'add_eos_token': add_eos, 'clean_up_tokenization_spaces': False}
  if 'tokenizer.chat_template' in metadata:
    config['chat_template'] = metadata['tokenizer.chat_template']
  return config
