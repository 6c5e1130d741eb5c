"""Small local Hugging Face folders made from nothing: a byte tokenizer and random LMs.

For tests, notebooks and `runlocal` configs, which may not download anything:

- `byte_tokenizer()`: a `tokenizers.Tokenizer` whose ids are the UTF-8 bytes
  of the text (GPT-2's byte-level pre-tokenizer and a BPE without merges, so
  id = byte value, the ids of `lossland.data.Vocab()`). Saved as
  tokenizer.json it makes any 256-token lossland LM a complete folder.
- `make_random_checkpoint(path, config)`: a `CausalLM` with random weights
  written by `lossland.interop.hf.save` with the byte tokenizer
  (transformers-loadable).

Host functions (they write files).
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from lossland.interop import hf
from lossland.models.hf_lm import CausalLM, CausalLMConfig

BYTE_VOCAB_SIZE = 256


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map of the 256 byte values to printable characters."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def byte_tokenizer() -> tokenizers.Tokenizer:
  """Tokenizer with id = UTF-8 byte value (256 ids, no special tokens)."""
  vocab = {char: byte for byte, char in bytes_to_unicode().items()}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  return tok


def tiny_config(**overrides) -> CausalLMConfig:
  """A 2-block Llama-shaped config over the 256 byte ids (GQA, untied head)."""
  base = dict(vocab_size=BYTE_VOCAB_SIZE, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=8, mlp_dim=64, tie_embeddings=False)
  base.update(overrides)
  return CausalLMConfig(**base)


def make_random_checkpoint(path, config: CausalLMConfig | None = None, *, seed: int = 0,
                           overwrite: bool = False) -> pathlib.Path:
  """Writes a random-weight `CausalLM(config)` (default `tiny_config()`) with the byte tokenizer."""
  config = tiny_config() if config is None else config
  if config.vocab_size < BYTE_VOCAB_SIZE:
    raise ValueError(f'vocab_size={config.vocab_size} is below the {BYTE_VOCAB_SIZE} ids of the '
                     'byte tokenizer')
  params = jax.jit(CausalLM(config).init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
  folder = hf.save(path, params, config, overwrite=overwrite)
  byte_tokenizer().save(str(folder / hf.TOKENIZER_FILE))
  return folder
