"""Builds the tiny Stable Diffusion folders in tests/fixtures/sd/ and their torch reference outputs.

Each folder has the diffusers layout (`model_index.json`, `unet/`, `text_encoder/`,
`vae/`, `tokenizer/`, `scheduler/`) with random weights built from configs
(nothing is downloaded), written by `save_pretrained` as safetensors:

  tiny_sd1   SD 1.x style: conv `proj_in`/`proj_out`, `attention_head_dim` an int
             (which SD 1.x configs use as the number of heads), quick_gelu CLIP,
             pad token <|endoftext|>, PNDM scheduler (skip_prk_steps), float32.
  tiny_sd2   SD 2.x style: linear `proj_in`/`proj_out`, per-block head dims,
             upcast attention, gelu CLIP, pad token "!", DDIM scheduler with
             v-prediction, weights stored in float16.

Both have a latent of 4 x 32 x 32 with cross-attention at 32, 16 and 8 (mid),
so Attend-and-Excite's 16 x 16 maps exist (one down and two up cross-attention
layers), and a VAE with one downsampling (64 x 64 images). Weights are redrawn
so that every tensor changes the outputs (norm gains 1 + 0.2 N(0, 1), biases
0.1 N(0, 1), other tensors N(0, 1/fan_in)); the zero-initialized output convs of
diffusers would otherwise hide most of the network.

The tokenizer is a CLIP BPE over 256 byte symbols, their end-of-word forms, the
merges of a small word list (`WORDS`; "elephant" is left as two tokens, "ele"
and "phant</w>", for the multi-token concept case) and the two specials.

`reference.npz` in each folder holds float32 outputs of diffusers/transformers on
fixed inputs, in torch layout (NCHW; lossland's models are NHWC):

  unet_x [2,4,32,32], unet_t [2] int64, unet_context [2,77,D], unet_eps [2,4,32,32]
  unet_probs16 [L,2,256,77]: the head-averaged cross-attention probabilities of
      the L cross-attention layers with 16 x 16 queries, in call order
      (`unet_probs16_names` [L]: their diffusers module names)
  tok_prompts [n] str, tok_ids [n,77] int64: CLIPTokenizer ids, padded to 77
  text_ids [n,77] int64, text_hidden [n,77,D]: CLIPTextModel last_hidden_state
  vae_z [1,4,32,32], vae_decoded [1,3,64,64]: AutoencoderKL.decode(z) (no scaling)
  vae_x [1,3,64,64], vae_mean, vae_logvar [1,4,32,32]: encode(x).latent_dist

Environment (its own venv; torch, transformers and diffusers are not lossland
dependencies). Versions used to write the committed fixtures:

  python3 -m venv /tmp/sdvenv
  /tmp/sdvenv/bin/pip install torch==2.13.0 transformers==5.24.0 diffusers==0.42.1 \
      safetensors==0.8.0 tokenizers==0.23.3 numpy==2.4.6

Run from the repository root:  /tmp/sdvenv/bin/python scripts/make_sd_fixtures.py
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent / 'tests' / 'fixtures' / 'sd'
WORDS = ('a', 'photo', 'of', 'cat', 'dog', 'and', 'red', 'blue', 'green', 'ball', 'bench',
         'bird', 'with', 'on', 'the', 'car', 'frog', 'tiger', 'turtle', 'bowl', 'apple',
         'yellow', 'horse', 'bear', 'in', 'field', ',', '.')
PARTIAL = {'elephant': ('ele', 'phant')}  # multi-token words: the pieces that become tokens
PROMPTS = ('a cat and a dog', 'a red ball on a blue bench', 'A photo of a Tiger, with a bowl.',
           'an elephant and a horse', '')
D_TEXT = 32


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
  bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('\xa1'), ord('\xac') + 1))
        + list(range(ord('\xae'), ord('\xff') + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _bpe(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
  """Byte-pair encoding of one word: merge the lowest-ranked adjacent pair until none applies."""
  ranks = {m: i for i, m in enumerate(merges)}
  while len(symbols) > 1:
    pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
    rank, i = min(pairs)
    if rank == len(ranks):
      break
    symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
  return symbols


def _add_merges(piece: str, end: bool, merges: list[tuple[str, str]]) -> None:
  """Appends merges until `piece` (with '</w>' on its last symbol when `end`) is one token."""
  symbols = [bytes_to_unicode()[b] for b in piece.encode()]
  if end:
    symbols[-1] += '</w>'
  while len(symbols := _bpe(symbols, merges)) > 1:
    merges.append((symbols[0], symbols[1]))


def write_tokenizer(folder: pathlib.Path, pad_token: str) -> CLIPTokenizer:
  byte_symbols = list(bytes_to_unicode().values())
  vocab = byte_symbols + [s + '</w>' for s in byte_symbols]
  merges = []
  pieces = [(w, True) for w in WORDS]
  for parts in PARTIAL.values():
    pieces += [(p, i == len(parts) - 1) for i, p in enumerate(parts)]
  for piece, end in pieces:
    _add_merges(piece, end, merges)
  vocab += [a + b for a, b in merges if a + b not in vocab]
  vocab += ['<|startoftext|>', '<|endoftext|>']
  folder.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    vocab_file, merges_file = os.path.join(tmp, 'vocab.json'), os.path.join(tmp, 'merges.txt')
    with open(vocab_file, 'w') as f:
      json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(merges_file, 'w') as f:
      f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
    tok = CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(str(folder))
    # The files of a real SD folder: vocab.json and merges.txt, not transformers' tokenizer.json.
    (folder / 'tokenizer.json').unlink()
    shutil.copy(vocab_file, folder)
    shutil.copy(merges_file, folder)
  tok = CLIPTokenizer.from_pretrained(str(folder))
  for w in WORDS:
    ids = tok(w, add_special_tokens=False)['input_ids']
    assert len(ids) == 1, (w, ids)
  for w, parts in PARTIAL.items():
    assert len(tok(w, add_special_tokens=False)['input_ids']) == len(parts), w
  return tok


def redraw_(module: torch.nn.Module, gen: torch.Generator) -> None:
  """Unit-scale random weights in every tensor (see the module docstring)."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith('bias'):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      elif p.ndim == 1:  # norm gains
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else p.shape[0]
        if 'embedding' in name:
          fan_in = 1
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))


class RecordingProcessor(AttnProcessor):
  """diffusers' AttnProcessor that keeps the head-averaged cross-attention probabilities."""

  def __init__(self, name: str, store: list):
    super().__init__()
    self.name, self.store = name, store

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
               temb=None, *args, **kwargs):
    if encoder_hidden_states is not None:
      query = attn.head_to_batch_dim(attn.to_q(hidden_states))
      key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
      probs = attn.get_attention_scores(query, key, None)  # [b*heads, q, k]
      b = hidden_states.shape[0]
      self.store.append((self.name, probs.reshape(b, attn.heads, *probs.shape[1:]).mean(1)))
    return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def unet_config(sd2: bool) -> dict:
  cfg = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
             block_out_channels=(16, 32, 32), norm_num_groups=8,
             down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
             up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
             cross_attention_dim=D_TEXT)
  if sd2:
    cfg.update(attention_head_dim=(4, 8, 8), use_linear_projection=True, upcast_attention=True)
  else:
    cfg.update(attention_head_dim=2)
  return cfg


def build(name: str, sd2: bool, seed: int) -> None:
  folder = ROOT / name
  shutil.rmtree(folder, ignore_errors=True)
  gen = torch.Generator().manual_seed(seed)
  torch.manual_seed(seed)
  tok = write_tokenizer(folder / 'tokenizer', pad_token='!' if sd2 else '<|endoftext|>')

  unet = UNet2DConditionModel(**unet_config(sd2))
  text = CLIPTextModel(CLIPTextConfig(
      vocab_size=len(tok), hidden_size=D_TEXT, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=77, projection_dim=D_TEXT,
      hidden_act='gelu' if sd2 else 'quick_gelu', bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
  vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                      down_block_types=('DownEncoderBlock2D',) * 2,
                      up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(16, 32),
                      layers_per_block=1, norm_num_groups=8, sample_size=64)
  for m in (unet, text, vae):
    redraw_(m, gen)
    m.eval()
  if sd2:
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type='v_prediction')
  else:
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
  dtype = torch.float16 if sd2 else torch.float32
  for sub, m in (('unet', unet), ('text_encoder', text), ('vae', vae)):
    m.to(dtype).save_pretrained(str(folder / sub), safe_serialization=True)
    m.float()  # the references use the stored (possibly float16-rounded) weights in float32
  scheduler.save_pretrained(str(folder / 'scheduler'))
  with open(folder / 'model_index.json', 'w') as f:
    json.dump({'_class_name': 'StableDiffusionPipeline', '_diffusers_version': '0.42.1',
               'scheduler': ['diffusers', type(scheduler).__name__],
               'text_encoder': ['transformers', 'CLIPTextModel'],
               'tokenizer': ['transformers', 'CLIPTokenizer'],
               'unet': ['diffusers', 'UNet2DConditionModel'],
               'vae': ['diffusers', 'AutoencoderKL'],
               'safety_checker': [None, None], 'feature_extractor': [None, None],
               'requires_safety_checker': False}, f, indent=2)

  ref = {}
  ref['tok_prompts'] = np.array(PROMPTS)
  ref['tok_ids'] = np.array(tok(list(PROMPTS), padding='max_length', max_length=77)['input_ids'])
  with torch.no_grad():
    ids = torch.tensor(ref['tok_ids'])
    ref['text_ids'] = ref['tok_ids']
    ref['text_hidden'] = text(ids).last_hidden_state.numpy()

    store: list = []
    unet.set_attn_processor({k: RecordingProcessor(k, store) for k in unet.attn_processors})
    x = torch.randn((2, 4, 32, 32), generator=gen)
    t = torch.tensor([981, 1])
    context = text(ids[:2]).last_hidden_state
    ref.update(unet_x=x.numpy(), unet_t=t.numpy(), unet_context=context.numpy(),
               unet_eps=unet(x, t, encoder_hidden_states=context).sample.numpy())
    at16 = [(n, p) for n, p in store if p.shape[1] == 256]
    ref['unet_probs16'] = np.stack([p.numpy() for _, p in at16])
    ref['unet_probs16_names'] = np.array([n for n, _ in at16])

    z = torch.randn((1, 4, 32, 32), generator=gen)
    ref.update(vae_z=z.numpy(), vae_decoded=vae.decode(z).sample.numpy())
    image = torch.rand((1, 3, 64, 64), generator=gen) * 2 - 1
    dist = vae.encode(image).latent_dist
    ref.update(vae_x=image.numpy(), vae_mean=dist.mean.numpy(), vae_logvar=dist.logvar.numpy())
  np.savez_compressed(folder / 'reference.npz', **ref)
  size = sum(p.stat().st_size for p in folder.rglob('*') if p.is_file())
  print(f'{folder}: {size / 1e6:.2f} MB; 16x16 cross-attention layers: {list(ref["unet_probs16_names"])}')


if __name__ == '__main__':
  build('tiny_sd1', sd2=False, seed=0)
  build('tiny_sd2', sd2=True, seed=1)
