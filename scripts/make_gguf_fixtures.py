"""Builds the tiny GGUF files in tests/fixtures/gguf/ and their transformers references.

Each fixture is a random-weight model written with `gguf.GGUFWriter` the way
llama.cpp's convert_hf_to_gguf.py writes a converted checkpoint (nothing is
downloaded): llama-architecture query/key rows permuted for llama.cpp's
interleaved rotary (`LlamaModel.permute`), one-dimensional tensors (norm gains,
biases) in F32, matrices in a mix of llama.cpp's storage types. Next to each
`NAME.gguf` is `NAME.npz` with what transformers makes of the file:

  tokens   [2, 12] int32 fixed token ids
  logits   [2, 12, vocab] float32 logits of
           `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)`
  texts    the strings below; ids / ids_offsets: `AutoTokenizer(...)(text).input_ids`
           of each, concatenated (offsets [len(texts) + 1]); decoded: their
           `decode(ids, skip_special_tokens=True)`

Weights are drawn at unit scale (norm gains 1 + 0.2 N(0, 1), biases 0.2 N(0, 1),
matrices N(0, 1/min(shape))) so logits are O(1) and every tensor changes them.

  llama_gqa    llama, 3 blocks, d_model 64, 8 query / 2 key-value heads of
               head_dim 20 (query width 160 != d_model, written as
               attention.key_length and rope.dimension_count), mlp 256, untied
               head, rope_theta 5e5, gpt2-style byte-level BPE (320 tokens,
               add_bos_token). Types: token_embd F16, output Q8_0; attn_q
               Q4_0 / Q8_0 / Q5_1, attn_k Q8_0 / Q4_1 / Q5_0, attn_v F16 / BF16 /
               Q4_0, attn_output F32 / F16 / BF16,
               ffn_gate Q4_1 / Q5_0 / Q8_0, ffn_up Q5_1 / Q4_0 / Q4_1, ffn_down
               Q4_K / Q5_K / Q6_K.
  qwen2_tied   qwen2, 2 blocks, d_model 64, 4 / 2 heads, mlp 96, q/k/v biases,
               tied head (no output.weight), byte-level BPE with the qwen2
               pre-tokenizer split and two control tokens (322 tokens). Types:
               token_embd Q8_0, attention Q8_0 / BF16, MLP Q4_0 / F16.
  llama_spm    llama, 1 block, d_model 64, 4 / 4 heads, mlp 128, tied head,
               a SentencePiece-style vocabulary (tokenizer.ggml.model "llama":
               <unk>, <s>, </s>, 256 <0xXX> byte tokens, scored pieces, one
               user-defined token, no merges). Types: F32, F16, Q8_0, Q4_1.

  gemma3_swa   gemma3 (written as convert_hf_to_gguf.py `Gemma3Model` writes a Gemma 3
               text model: norm gains stored as 1 + w, no q/k permutation, no
               vocab_size key), 6 blocks, d_model 32, 2 query / 1 key-value heads
               of head_dim 256 (query width 512; 256 = transformers' default
               query_pre_attn_scalar, which its GGUF loader always uses, and
               llama.cpp's key_length scaling), mlp 64, sliding window 4 on 5 of
               the 6 blocks (llama.cpp's and transformers' default pattern 6; no
               pattern key), global rope base 1e6, local 1e4 (the defaults, no
               key), tied head, a Gemma-style SentencePiece vocabulary
               (tokenizer.ggml.model "llama": <pad> <eos> <bos> <unk> <mask>,
               turn markers, user-defined whitespace tokens stored with real
               spaces, byte tokens, pieces whose scores do not follow their
               order). Types: token_embd Q8_0, attention Q8_0 / Q4_0 / Q5_0 / F16,
               attn_output Q4_K / Q6_K (256-wide rows), MLP Q8_0 / Q4_1 / F16.

gguf 0.19's `gguf.quants.quantize` writes F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and
Q8_0 but raises NotImplementedError for the K-quants (Q2_K ... Q6_K), so the
K-quant tensors are written as raw blocks (ggml-common.h's `block_q4_K` etc.):
random codes and sub-block scales, with the fp16 super-block scales set so the
weights have the scale above. They dequantize like any llama.cpp file.

After writing, the script checks the way back: lossland loads each file,
`hf.save` exports it, and transformers loads that folder and must reproduce the
reference logits and tokenization. That needs lossland's jax/flax next to
torch, so it lives here and not in the test suite.

Environment (a venv of its own; torch and transformers are not lossland
dependencies). Versions used to write the committed fixtures:

  python3 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers==5.24.0 gguf==0.19.0 accelerate==1.16.0 \
      safetensors==0.8.0 tokenizers==0.23.3 numpy==2.4.6 jax==0.10.2 jaxlib==0.10.2 flax==0.12.8

Run from the repository root (HF_HUB_OFFLINE=1 is set by the script: nothing is fetched):

  /tmp/hfvenv/bin/python scripts/make_gguf_fixtures.py            # write fixtures, then check
  /tmp/hfvenv/bin/python scripts/make_gguf_fixtures.py gemma3_swa # only this one
  /tmp/hfvenv/bin/python scripts/make_gguf_fixtures.py --check [NAME ...]  # only the export check

Each fixture's random seed is its position in `specs()`, so writing one
fixture reproduces it without touching the others.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures' / 'gguf'
TOKENS_SHAPE = (2, 12)
SENTENCES = [
    'The quick brown fox jumps over the lazy dog.',
    'A loss landscape is the graph of the loss as a function of the weights.',
    'Curvature of the loss tells which directions the model is sensitive to.',
    'Low rank and sparse weights train large language models with less memory.',
    'Stitching layers compare the representations of two different networks.',
    'the the the and and of of to to in in is is it it that that',
] * 4
TEXTS = [
    'The quick brown fox jumps over the lazy dog.',
    ' leading space, then  two   spaces and a tab\tend',
    'Numbers 12345 and 3.14159; unicode: café, naïve, 東京, emoji 🙂!',
    "line one\nline two\n\n  indented, don't stop",
    '<|endoftext|>special<|im_start|>user\nHi<|im_end|> <sep> <s> </s> <unk>',
    '',
]


# --- tokenizers ---------------------------------------------------------------------------------


def byte_level_bpe(vocab_size: int = 320):
  """(tokens, merges) of a byte-level BPE trained on SENTENCES, '<|endoftext|>' at id 0."""
  import json

  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(SENTENCES, trainer)
  model = json.loads(tok.to_str())['model']
  tokens = sorted(model['vocab'], key=model['vocab'].get)
  merges = [' '.join(m) if isinstance(m, list) else m for m in model['merges']]
  assert len(tokens) == vocab_size, len(tokens)
  return tokens, merges


def sentencepiece_vocab(num_pieces: int = 96):
  """(tokens, scores, token_types) laid out as llama.cpp writes a SentencePiece BPE vocabulary."""
  import json

  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  trainer = trainers.BpeTrainer(vocab_size=num_pieces, show_progress=False)
  tok.train_from_iterator(SENTENCES, trainer)
  vocab = json.loads(tok.to_str())['model']['vocab']
  pieces = sorted(vocab, key=vocab.get)
  tokens = ['<unk>', '<s>', '</s>'] + [f'<0x{b:02X}>' for b in range(256)] + pieces + ['<sep>']
  # SentencePiece scores: pieces learned earlier score higher; specials and bytes score 0.
  scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
  types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]  # UNKNOWN, CONTROL, BYTE, NORMAL, USER
  return tokens, scores, types


# --- weights ------------------------------------------------------------------------------------


def unit(rng, *shape):
  return (rng.standard_normal(shape) / min(shape) ** 0.5).astype(np.float32)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`: half-split rotary rows -> interleaved."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


# Bytes of one 256-value super-block and the byte offsets of its fp16 scale fields
# (ggml-common.h: block_q4_K {d, dmin, scales[12], qs[128]}, block_q5_K {d, dmin, scales[12],
# qh[32], qs[128]}, block_q6_K {ql[128], qh[64], scales[16] int8, d}).
K_BLOCKS = {'Q4_K': (144, {0: 1.0, 2: 7.5}), 'Q5_K': (176, {0: 1.0, 2: 15.5}),
            'Q6_K': (210, {208: 1.0})}


def k_quant_blocks(rng, rows: int, cols: int, qtype: str) -> np.ndarray:
  """Random codes for `rows` x `cols` weights in `qtype`, scaled to about N(0, 1/min(shape)).

  Q4_K/Q5_K decode to d * sc * q - dmin * m with 6-bit sc, m and 4/5-bit q, so
  dmin = d * E[q] centres them; Q6_K decodes to d * sc * (q - 32), int8 sc.
  The super-block scale d is set from the measured spread of the codes.
  """
  import gguf
  qt = gguf.GGMLQuantizationType[qtype]
  size, fields = K_BLOCKS[qtype]
  blocks = rng.integers(0, 256, (rows * cols // 256, size), dtype=np.uint8)
  for offset, ratio in fields.items():
    blocks[:, offset:offset + 2] = np.full((len(blocks), 1), ratio, np.float16).view(np.uint8)
  raw = blocks.reshape(rows, -1)
  spread = float(gguf.quants.dequantize(raw, qt).std())
  d = 1.0 / (spread * min(rows, cols) ** 0.5)
  for offset, ratio in fields.items():
    blocks[:, offset:offset + 2] = np.full((len(blocks), 1), ratio * d, np.float16).view(np.uint8)
  return blocks.reshape(rows, -1)


def add(writer, rng, name: str, value: np.ndarray | None, qtype: str, shape=None):
  """Writes `value` ([out, in], or 1-D) in `qtype`; K-quants get random blocks of `shape`."""
  import gguf
  qt = gguf.GGMLQuantizationType[qtype]
  if qtype in K_BLOCKS:
    writer.add_tensor(name, k_quant_blocks(rng, *shape, qtype), raw_dtype=qt)
  elif qtype in ('F32', 'F16'):
    writer.add_tensor(name, value.astype(np.float32 if qtype == 'F32' else np.float16))
  else:
    writer.add_tensor(name, gguf.quants.quantize(value, qt), raw_dtype=qt)


def gemma_vocab(num_pieces: int = 96, seed: int = 0):
  """(tokens, scores, token_types) laid out as convert_hf_to_gguf.py writes Gemma's vocabulary."""
  import json

  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme='never')
  trainer = trainers.BpeTrainer(vocab_size=num_pieces, show_progress=False)
  tok.train_from_iterator(SENTENCES, trainer)
  vocab = json.loads(tok.to_str())['model']['vocab']
  pieces = sorted(vocab, key=vocab.get)
  head = ['<pad>', '<eos>', '<bos>', '<unk>', '<mask>', '[multimodal]', '<start_of_turn>',
          '<end_of_turn>', '\n', '\n\n', '\t', '  ', '   ', '    ']
  head_types = [3, 3, 3, 3, 3, 4, 3, 3, 4, 4, 4, 4, 4, 4]
  tokens = head + [f'<0x{b:02X}>' for b in range(256)] + pieces
  types = head_types + [6] * 256 + [1] * len(pieces)
  # Gemma's scores do not follow its merge order (transformers ranks merges by position).
  scores = [-1000.0] * len(head) + [0.0] * 256 + list(
      np.random.default_rng(seed).uniform(-50, 0, len(pieces)))
  return tokens, scores, types


def specs():
  return [
      dict(name='llama_gqa', arch='llama', vocab=320, d=64, layers=3, heads=8, kv=2, head_dim=20,
           mlp=256, tied=False, theta=500000.0, eps=1e-5, ctx=256, tokenizer='bpe', pre='default',
           add_bos=True, embd='F16', output='Q8_0',
           blocks=[dict(attn_q='Q4_0', attn_k='Q8_0', attn_v='F16', attn_output='F32',
                        ffn_gate='Q4_1', ffn_up='Q5_1', ffn_down='Q4_K'),
                   dict(attn_q='Q8_0', attn_k='Q4_1', attn_v='BF16', attn_output='F16',
                        ffn_gate='Q5_0', ffn_up='Q4_0', ffn_down='Q5_K'),
                   dict(attn_q='Q5_1', attn_k='Q5_0', attn_v='Q4_0', attn_output='BF16',
                        ffn_gate='Q8_0', ffn_up='Q4_1', ffn_down='Q6_K')]),
      dict(name='qwen2_tied', arch='qwen2', vocab=322, d=64, layers=2, heads=4, kv=2, head_dim=16,
           mlp=96, tied=True, theta=1000000.0, eps=1e-6, ctx=512, tokenizer='bpe', pre='qwen2',
           add_bos=False, embd='Q8_0', output=None,
           blocks=[dict(attn_q='Q8_0', attn_k='BF16', attn_v='Q8_0', attn_output='BF16',
                        ffn_gate='Q4_0', ffn_up='F16', ffn_down='Q4_0')] * 2),
      dict(name='llama_spm', arch='llama', vocab=None, d=64, layers=1, heads=4, kv=4, head_dim=16,
           mlp=128, tied=True, theta=10000.0, eps=1e-6, ctx=128, tokenizer='spm', pre=None,
           add_bos=None, embd='F16', output=None,
           blocks=[dict(attn_q='Q8_0', attn_k='Q4_1', attn_v='F32', attn_output='Q8_0',
                        ffn_gate='Q4_1', ffn_up='F16', ffn_down='Q8_0')]),
      dict(name='gemma3_swa', arch='gemma3', vocab=None, d=32, layers=6, heads=2, kv=1,
           head_dim=256, mlp=64, tied=True, theta=1000000.0, eps=1e-6, ctx=128, window=4,
           tokenizer='gemma', pre='default', add_bos=True, embd='Q8_0', output=None,
           blocks=[dict(attn_q=q, attn_k=k, attn_v=v, attn_output=o, ffn_gate=g, ffn_up=u,
                        ffn_down=dn)
                   for q, k, v, o, g, u, dn in [
                       ('Q8_0', 'Q4_0', 'Q5_0', 'Q4_K', 'Q8_0', 'Q4_1', 'F16'),
                       ('Q4_0', 'Q8_0', 'F16', 'Q6_K', 'Q4_1', 'F16', 'Q8_0'),
                       ('Q5_0', 'F16', 'Q8_0', 'Q4_K', 'F16', 'Q8_0', 'Q4_1'),
                       ('F16', 'Q5_0', 'Q4_0', 'Q6_K', 'Q8_0', 'Q4_1', 'F16'),
                       ('Q8_0', 'Q8_0', 'Q8_0', 'Q4_K', 'Q4_1', 'F16', 'Q8_0'),
                       ('Q4_0', 'Q4_0', 'F16', 'Q6_K', 'F16', 'Q8_0', 'Q4_1')]]),
  ]


def write_gguf(spec: dict, seed: int, path: pathlib.Path) -> int:
  """Writes the fixture `spec`; returns its vocabulary size."""
  import gguf
  rng = np.random.default_rng(seed)
  w = gguf.GGUFWriter(str(path), spec['arch'])
  w.add_name(f'lossland-{spec["name"]}')
  if spec['tokenizer'] == 'bpe':
    tokens, merges = byte_level_bpe()
    types = [3] + [1] * (len(tokens) - 1)  # '<|endoftext|>' is CONTROL
    if spec['vocab'] > len(tokens):
      extra = ['<|im_start|>', '<|im_end|>'][:spec['vocab'] - len(tokens)]
      tokens, types = tokens + extra, types + [3] * len(extra)
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre(spec['pre'])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(len(tokens) - 1 if spec['vocab'] > 320 else 0)
    w.add_add_bos_token(spec['add_bos'])
  elif spec['tokenizer'] == 'gemma':
    tokens, scores, types = gemma_vocab(seed=seed)
    w.add_tokenizer_model('llama')
    w.add_tokenizer_pre(spec['pre'])
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(spec['add_bos'])
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
  else:
    tokens, scores, types = sentencepiece_vocab()
    w.add_tokenizer_model('llama')
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(True)
  vocab, d, heads, kv, hd = len(tokens), spec['d'], spec['heads'], spec['kv'], spec['head_dim']
  gemma = spec['arch'] == 'gemma3'
  if not gemma:  # convert_hf_to_gguf.py writes no vocab_size for Gemma 3
    w.add_vocab_size(vocab)
  w.add_block_count(spec['layers'])
  w.add_context_length(spec['ctx'])
  w.add_embedding_length(d)
  w.add_feed_forward_length(spec['mlp'])
  w.add_head_count(heads)
  w.add_head_count_kv(kv)
  w.add_rope_freq_base(spec['theta'])
  w.add_layer_norm_rms_eps(spec['eps'])
  if spec['arch'] == 'llama':
    w.add_rope_dimension_count(hd)
    if hd * heads != d:
      w.add_key_length(hd)
      w.add_value_length(hd)
  if gemma:
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_sliding_window(spec['window'])
  add(w, rng, 'token_embd.weight', unit(rng, vocab, d), spec['embd'])
  for i, types_i in enumerate(spec['blocks']):
    pre = f'blk.{i}'
    # Gains: 1 + 0.2 N(0, 1); for gemma3 that is the 1 + w convert_hf_to_gguf.py stores.
    add(w, rng, f'{pre}.attn_norm.weight', 1 + 0.2 * rng.standard_normal(d), 'F32')
    q, k = unit(rng, heads * hd, d), unit(rng, kv * hd, d)
    if spec['arch'] == 'llama':  # what convert_hf_to_gguf.py does to q_proj / k_proj
      q, k = permute(q, heads), permute(k, kv)
    add(w, rng, f'{pre}.attn_q.weight', q, types_i['attn_q'])
    add(w, rng, f'{pre}.attn_k.weight', k, types_i['attn_k'])
    add(w, rng, f'{pre}.attn_v.weight', unit(rng, kv * hd, d), types_i['attn_v'])
    if spec['arch'] == 'qwen2':
      for name, width in (('attn_q', heads * hd), ('attn_k', kv * hd), ('attn_v', kv * hd)):
        add(w, rng, f'{pre}.{name}.bias', 0.2 * rng.standard_normal(width), 'F32')
    if gemma:  # per-head QK-norm gains
      add(w, rng, f'{pre}.attn_q_norm.weight', 1 + 0.2 * rng.standard_normal(hd), 'F32')
      add(w, rng, f'{pre}.attn_k_norm.weight', 1 + 0.2 * rng.standard_normal(hd), 'F32')
    output = types_i['attn_output']
    add(w, rng, f'{pre}.attn_output.weight',
        None if output in K_BLOCKS else unit(rng, d, heads * hd), output, shape=(d, heads * hd))
    if gemma:
      add(w, rng, f'{pre}.post_attention_norm.weight', 1 + 0.2 * rng.standard_normal(d), 'F32')
    add(w, rng, f'{pre}.ffn_norm.weight', 1 + 0.2 * rng.standard_normal(d), 'F32')
    add(w, rng, f'{pre}.ffn_gate.weight', unit(rng, spec['mlp'], d), types_i['ffn_gate'])
    add(w, rng, f'{pre}.ffn_up.weight', unit(rng, spec['mlp'], d), types_i['ffn_up'])
    down = types_i['ffn_down']
    add(w, rng, f'{pre}.ffn_down.weight', None if down in K_BLOCKS else unit(rng, d, spec['mlp']),
        down, shape=(d, spec['mlp']))
    if gemma:
      add(w, rng, f'{pre}.post_ffw_norm.weight', 1 + 0.2 * rng.standard_normal(d), 'F32')
  add(w, rng, 'output_norm.weight', 1 + 0.2 * rng.standard_normal(d), 'F32')
  if not spec['tied']:
    add(w, rng, 'output.weight', unit(rng, vocab, d), spec['output'])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return vocab


# --- references ---------------------------------------------------------------------------------


def transformers_reference(path: pathlib.Path, vocab: int, seed: int) -> dict:
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                               dtype=torch.float32,
                                               attn_implementation='eager').eval()
  tokens = np.random.RandomState(seed).randint(0, vocab, TOKENS_SHAPE).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long()).logits.numpy().astype(np.float32)
  tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  ids = [tok(text)['input_ids'] for text in TEXTS]
  decoded = [tok.decode(i, skip_special_tokens=True) for i in ids]
  return dict(tokens=tokens, logits=logits, texts=np.array(TEXTS),
              ids=np.array([t for i in ids for t in i], np.int32),
              ids_offsets=np.cumsum([0] + [len(i) for i in ids]).astype(np.int32),
              decoded=np.array(decoded))


def selected(names):
  """(seed, spec) of the fixtures `names` (all when empty); the seed is the position in specs()."""
  known = [spec['name'] for spec in specs()]
  unknown = sorted(set(names) - set(known))
  if unknown:
    raise SystemExit(f'unknown fixture(s) {unknown}; the fixtures are {known}')
  return [(seed, spec) for seed, spec in enumerate(specs()) if not names or spec['name'] in names]


def write_fixtures(names=()):
  import importlib.metadata

  import torch
  import transformers
  FIXTURES.mkdir(parents=True, exist_ok=True)
  for seed, spec in selected(names):
    path = FIXTURES / f'{spec["name"]}.gguf'
    vocab = write_gguf(spec, seed, path)
    ref = transformers_reference(path, vocab, seed)
    np.savez(FIXTURES / f'{spec["name"]}.npz', **ref)
    size = path.stat().st_size + (FIXTURES / f'{spec["name"]}.npz').stat().st_size
    print(f'{spec["name"]}: {size / 1024:.0f} KiB, vocab {vocab}, |logits| max '
          f'{np.abs(ref["logits"]).max():.2f}')
  print(f'transformers {transformers.__version__}, torch {torch.__version__}, '
        f'gguf {importlib.metadata.version("gguf")}')


def check_export(names=()):
  """lossland GGUF import -> hf.save -> transformers import reproduces the references."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  sys.path.insert(0, str(REPO))
  from lossland.interop import gguf as lgguf
  from lossland.interop import hf

  for _, spec in selected(names):
    path = FIXTURES / f'{spec["name"]}.gguf'
    ref = np.load(FIXTURES / f'{spec["name"]}.npz')
    ckpt = lgguf.load(path)
    with tempfile.TemporaryDirectory() as tmp:
      hf.save(tmp, ckpt.params, ckpt.config, base_config=ckpt.hf_config)
      lgguf.save_tokenizer(tmp, path)
      model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
      with torch.no_grad():
        got = model(torch.from_numpy(ref['tokens']).long()).logits.numpy()
      tok = AutoTokenizer.from_pretrained(tmp)
      ids = [tok(text)['input_ids'] for text in ref['texts']]
    diff = float(np.abs(got - ref['logits']).max())
    want_ids = np.split(ref['ids'], ref['ids_offsets'][1:-1])
    same = all(list(a) == list(b) for a, b in zip(ids, want_ids))
    print(f'export {spec["name"]}: transformers logits of the exported folder vs reference, max '
          f'abs diff {diff:.2e}; tokenizer.json encodes like the GGUF tokenizer: {same}')
    assert diff < 1e-5 * (1 + np.abs(ref['logits']).max()), spec['name']
    assert same, spec['name']


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('names', nargs='*', help='fixtures to write and check (default: all)')
  parser.add_argument('--check', action='store_true', help='only run the export check')
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  if not args.check:
    write_fixtures(args.names)
  check_export(args.names)


if __name__ == '__main__':
  main()
