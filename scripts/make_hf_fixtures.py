"""Builds the tiny Hugging Face checkpoints in tests/fixtures/hf/ and checks lossland's export.

Each fixture is a random-weight model built from a config (nothing is
downloaded), saved with `save_pretrained` (safetensors), with the float32
logits of transformers on fixed tokens in `reference.npz` (`tokens` [2, 20]
int32, `logits` [2, 20, vocab] float32; fixtures written since `greedy` was
added, i.e. all but the first five, also have `greedy` [2, 12] int32, the
tokens transformers picks greedily, one step at a time on its KV cache,
after the first 6 tokens). Weights are redrawn at unit scale
(norm gains 1 + 0.2 N(0, 1), i.e. weights 0.2 N(0, 1) for Gemma's (1 + weight)
norms, biases 0.2 N(0, 1), matrices N(0, 1/min(shape)), each expert's matrix
of a stacked 3D parameter alike)
so that logits are O(1) and every tensor, norm gains and biases included,
changes them.

  llama3_gqa   Llama-3 style: 4 query / 2 key-value heads, rope_theta 5e5 with
               llama3 rope scaling (original context 64, so the rescaled and
               interpolated bands both occur at head_dim 16), untied head,
               float32, saved as 3 shards with model.safetensors.index.json,
               tokenizer files.
  llama_tied   Llama-2 style: multi-head, rope_theta 1e4, tied head, bfloat16.
  qwen2        q/k/v biases, 2 key-value heads, untied, float16.
  olmo2        QK-norm, post-norm branches, 2 key-value heads, float32.
  gpt2         LayerNorm, learned positions, fused c_attn, gelu_new, tied,
               float32, tokenizer files.
  gemma3       Gemma 3 text model: 3 query / 1 key-value heads of head_dim 24
               (query width 72 != d_model 48), query_pre_attn_scalar 20, layers
               sliding (window 5) / full / sliding, linear rope scaling (factor 4,
               base 1e5) on the full layer and base 1000 on the sliding ones,
               final logit soft-cap 5, tied head, bfloat16.
  qwen3        per-head QK-norm, 6 query / 2 key-value heads of head_dim 12,
               untied, float32.
  mistral      sliding window 7 on every layer, 4 query / 1 key-value heads of
               head_dim 20, untied, bfloat16.
  olmo3        OLMo-2 layout, layers sliding (window 5) / full, linear rope
               scaling (factor 2, base 5e5) on the full layer and base 1e4 on
               the sliding one, 2 key-value heads, float32.
  gemma2       the default alternating sliding (window 6) / full layers,
               attention soft-cap 3 and final soft-cap 4, query_pre_attn_scalar
               24, 4 query / 2 key-value heads, untied head, bfloat16.
  phi3         fused qkv_proj (4 query / 2 key-value heads: widths 64, 32, 32)
               and gate_up_proj, partial rotary 0.5, sliding window 8, untied,
               float32.
  gpt_neox     Pythia style: parallel residual, rotary on 4 of 16 channels
               (rotary_pct 0.25), fused per-head query_key_value, LayerNorm with
               bias, gelu, untied embed_out, float16.
  qwen3_moe    Qwen3-MoE: 6 experts of width 24, top-2 routing with
               norm_topk_prob, 5 query / 1 key-value heads of head_dim 12
               (query width 60 != d_model 48), per-head QK-norm, untied,
               float32 (transformers writes the experts one tensor each).

The tokenizer is a byte-level BPE with 320 tokens (256 bytes, one special
token, 63 merges) trained on a few sentences with the `tokenizers` library.

After writing the fixtures the script checks the other direction: lossland
loads each fixture, exports it to a temporary folder, and transformers loads
that folder and must reproduce the reference logits; a lossland
`TransformerLM` exported as a Llama folder must give transformers the logits
lossland computes. These checks need lossland's jax/flax next to torch, so
they live here and not in the test suite.

Environment (a venv of its own; torch and transformers are not lossland
dependencies). Versions used to write the committed fixtures:

  python3 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors==0.8.0 \
      tokenizers==0.23.3 numpy==2.4.6 jax==0.10.2 jaxlib==0.10.2 flax==0.12.8

Run from the repository root:

  /tmp/hfvenv/bin/python scripts/make_hf_fixtures.py            # write all fixtures, then check
  /tmp/hfvenv/bin/python scripts/make_hf_fixtures.py gemma3 qwen3   # only these
  /tmp/hfvenv/bin/python scripts/make_hf_fixtures.py --check [NAME ...]  # only the export check

Each fixture's random seed is its position in `specs()`, so writing one
fixture reproduces it without touching the others.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures' / 'hf'
VOCAB = 320
TOKENS_SHAPE = (2, 20)
PREFIX, GREEDY = 6, 12  # greedy decoding reference: 12 tokens after the first 6
SENTENCES = [
    'The quick brown fox jumps over the lazy dog.',
    'A loss landscape is the graph of the loss as a function of the weights.',
    'Curvature of the loss tells which directions the model is sensitive to.',
    'Low rank and sparse weights train large language models with less memory.',
    'Stitching layers compare the representations of two different networks.',
    'the the the and and of of to to in in is is it it that that',
] * 4


def make_tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=['<|endoftext|>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(SENTENCES, trainer)
  if tok.get_vocab_size() != VOCAB:
    raise RuntimeError(f'tokenizer has {tok.get_vocab_size()} tokens, expected {VOCAB}')
  return tok


def specs():
  from transformers import (Gemma2Config, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig,
                            MistralConfig, Olmo2Config, Olmo3Config, Phi3Config, Qwen2Config,
                            Qwen3Config, Qwen3MoeConfig)
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128)
  llama3_rope = {'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0,
                 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                 'original_max_position_embeddings': 64}  # < max_position_embeddings
  return [
      ('llama3_gqa', LlamaConfig(**common, num_key_value_heads=2, rope_parameters=llama3_rope,
                                 tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
       'float32', '150KB', True),
      ('llama_tied', LlamaConfig(**common, num_key_value_heads=4, tie_word_embeddings=True,
                                 bos_token_id=0, eos_token_id=0),
       'bfloat16', None, False),
      ('qwen2', Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False,
                            rope_parameters={'rope_type': 'default', 'rope_theta': 1000000.0}),
       'float16', None, False),
      ('olmo2', Olmo2Config(**common, num_key_value_heads=2, tie_word_embeddings=False,
                            pad_token_id=0, eos_token_id=0),
       'float32', None, False),
      ('gpt2', GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                          n_positions=64, bos_token_id=0, eos_token_id=0),
       'float32', None, True),
      ('gemma3', Gemma3TextConfig(
          vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
          num_attention_heads=3, num_key_value_heads=1, head_dim=24, query_pre_attn_scalar=20,
          sliding_window=5, layer_types=['sliding_attention', 'full_attention',
                                         'sliding_attention'],
          rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 4.0,
                                              'rope_theta': 100000.0},
                           'sliding_attention': {'rope_type': 'default', 'rope_theta': 1000.0}},
          final_logit_softcapping=5.0, tie_word_embeddings=True, max_position_embeddings=128,
          pad_token_id=0, bos_token_id=0, eos_token_id=0),
       'bfloat16', None, False),
      ('qwen3', Qwen3Config(**{**common, 'num_attention_heads': 6}, num_key_value_heads=2,
                            head_dim=12, tie_word_embeddings=False,
                            rope_parameters={'rope_type': 'default', 'rope_theta': 1000000.0}),
       'float32', None, False),
      ('mistral', MistralConfig(**common, num_key_value_heads=1, head_dim=20, sliding_window=7,
                                tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
       'bfloat16', None, False),
      ('olmo3', Olmo3Config(
          **common, num_key_value_heads=2, sliding_window=5, tie_word_embeddings=False,
          layer_types=['sliding_attention', 'full_attention'],
          rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 2.0,
                                              'rope_theta': 500000.0},
                           'sliding_attention': {'rope_type': 'default', 'rope_theta': 10000.0}},
          pad_token_id=0, eos_token_id=0),
       'float32', None, False),
      ('gemma2', Gemma2Config(
          **{**common, 'num_hidden_layers': 3}, num_key_value_heads=2, head_dim=16,
          query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=3.0,
          final_logit_softcapping=4.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=0,
          eos_token_id=0),
       'bfloat16', None, False),
      ('phi3', Phi3Config(**common, num_key_value_heads=2, sliding_window=8,
                          rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0,
                                           'partial_rotary_factor': 0.5},
                          tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                          pad_token_id=0),
       'float32', None, False),
      ('gpt_neox', GPTNeoXConfig(
          vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
          num_attention_heads=4, max_position_embeddings=128, use_parallel_residual=True,
          rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0,
                           'partial_rotary_factor': 0.25},
          hidden_act='gelu', tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
       'float16', None, False),
      ('qwen3_moe', Qwen3MoeConfig(
          vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
          num_attention_heads=5, num_key_value_heads=1, head_dim=12, num_experts=6,
          num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
          max_position_embeddings=128, tie_word_embeddings=False,
          rope_parameters={'rope_type': 'default', 'rope_theta': 1000000.0}),
       'float32', None, False),
  ]


def randomize(model, torch):
  """Unit-scale random weights (module docstring), drawn in parameter order."""
  # Gemma's norms multiply by 1 + weight: their weight is drawn around 0 for gains around 1.
  offset = {f'{module}.weight' for module, m in model.named_modules()
            if type(m).__name__.startswith('Gemma') and type(m).__name__.endswith('RMSNorm')}
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and name.endswith('weight'):  # norm gains
        p.copy_((0 if name in offset else 1) + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / min(p.shape[-2:]) ** 0.5)  # per matrix of 3D experts


def selected(names):
  """(seed, spec) of the fixtures `names` (all when empty); the seed is the position in specs()."""
  all_specs = list(enumerate(specs()))
  known = [spec[0] for _, spec in all_specs]
  unknown = sorted(set(names) - set(known))
  if unknown:
    raise SystemExit(f'unknown fixture(s) {unknown}; the fixtures are {known}')
  return [(seed, spec) for seed, spec in all_specs if not names or spec[0] in names]


def greedy(model, tokens, torch):
  """transformers' greedy continuation of tokens[:, :PREFIX] by GREEDY tokens, one forward per
  token on the model's own KV cache (a `DynamicCache` with sliding-window layers where the config
  has them). A loop rather than `generate`, which stops at the config's eos token."""
  token = torch.from_numpy(tokens[:, :PREFIX]).long()
  cache, out = None, []
  with torch.no_grad():
    for _ in range(GREEDY):
      step = model(token, cache=cache, use_cache=True)
      cache = step.cache
      token = step.logits[:, -1].argmax(-1)[:, None]
      out.append(token)
  return torch.cat(out, 1).numpy().astype(np.int32)


def write_fixtures(names=()):
  import torch
  import transformers
  from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

  tokenizer = PreTrainedTokenizerFast(tokenizer_object=make_tokenizer(),
                                      eos_token='<|endoftext|>', bos_token='<|endoftext|>')
  for seed, (name, config, dtype, shard, with_tokenizer) in selected(names):
    out = FIXTURES / name
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation='eager').eval()
    randomize(model, torch)
    model.to(getattr(torch, dtype))
    kwargs = {'max_shard_size': shard} if shard else {}
    model.save_pretrained(out, **kwargs)
    if with_tokenizer:
      tokenizer.save_pretrained(out)
    # Reference logits in float32 from the folder as saved (a fresh float32 model, so buffers
    # such as the rotary frequencies are not rounded to the storage dtype).
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                    attn_implementation='eager').eval()
    tokens = np.random.RandomState(seed).randint(0, VOCAB, TOKENS_SHAPE).astype(np.int32)
    with torch.no_grad():
      logits = reloaded(torch.from_numpy(tokens).long()).logits.numpy().astype(np.float32)
    np.savez(out / 'reference.npz', tokens=tokens, logits=logits,
             greedy=greedy(reloaded, tokens, torch))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f'{name}: {dtype}, {len(list(out.glob("*.safetensors")))} safetensors file(s), '
          f'{size / 1024:.0f} KiB, |logits| max {np.abs(logits).max():.2f}')
  print(f'transformers {transformers.__version__}, torch {torch.__version__}')


def check_export(names=()):
  """lossland import -> export -> transformers import reproduces the reference logits."""
  import torch
  from transformers import AutoModelForCausalLM
  sys.path.insert(0, str(REPO))
  import jax
  import jax.numpy as jnp
  from lossland import models
  from lossland.interop import hf

  def hf_logits(folder, tokens):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation='eager').eval()
    with torch.no_grad():
      return model(torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()

  for _, (name, *_, with_tokenizer) in selected(names):
    ref = np.load(FIXTURES / name / 'reference.npz')
    ckpt = hf.load(FIXTURES / name)
    # With the imported config.json as base, and with a config lossland writes from scratch
    # (the rope_theta/rope_scaling spelling of transformers < 5).
    for base in (ckpt.hf_config, None):
      with tempfile.TemporaryDirectory() as tmp:
        hf.save(tmp, ckpt.params, ckpt.config, base_config=base,
                tokenizer_from=FIXTURES / name if with_tokenizer else None)
        got = hf_logits(tmp, ref['tokens'])
      diff = float(np.abs(got - ref['logits']).max())
      print(f'export {name} ({"imported" if base else "fresh"} config): transformers logits vs '
            f'reference, max abs diff {diff:.2e}')
      assert diff < 1e-5 * (1 + np.abs(ref['logits']).max()), name

  lm = models.TransformerLM(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, mlp_dim=48)
  tokens = np.random.RandomState(0).randint(0, VOCAB, TOKENS_SHAPE).astype(np.int32)
  params = lm.init(jax.random.key(0), jnp.asarray(tokens))
  params = jax.tree.map(lambda p: p * 20.0 if p.ndim == 2 else p, params)  # O(1) logits
  want = np.asarray(lm.apply(params, jnp.asarray(tokens)))
  with tempfile.TemporaryDirectory() as tmp:
    hf.save(tmp, params, models.config_from_transformer_lm(lm))
    got = hf_logits(tmp, tokens)
  diff = float(np.abs(got - want).max())
  print(f'export TransformerLM as llama: transformers vs lossland logits, max abs diff {diff:.2e}'
        f' (|logits| max {np.abs(want).max():.2f})')
  assert diff < 1e-5 * (1 + np.abs(want).max())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('names', nargs='*', help='fixtures to write and check (default: all)')
  parser.add_argument('--check', action='store_true', help='only run the export check')
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if not args.check:
    write_fixtures(args.names)
  check_export(args.names)


if __name__ == '__main__':
  main()
