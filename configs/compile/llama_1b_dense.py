"""Dense pre-training of a 1B LLaMA-shaped model (the LOST paper's largest) at sequence 256.

    python -m launch.compile --config=configs/compile/llama_1b_dense.py --topology=v5e:16x16

LLaMA-1B as in GaLore/LOST: d_model 2048, 24 layers, 32 heads, SwiGLU 5461,
vocabulary 32000 (T5 tokenizer), batch 512 x 256 tokens, AdamW. float32
params and moments, bfloat16 matrix products. 5461 has no factor a TPU mesh
axis could use, so no tensor parallelism: FSDP of every large param over all
256 chips (`parallel.fsdp_rules`), the batch over the same axis.
"""
from configs.compile import _base


def get_config(arg=None):
  c = _base.lm_config(d_model=2048, num_layers=24, num_heads=32, mlp_dim=5461, vocab_size=32000,
                      batch_size=512, seq_len=256, programs='train', fsdp=True)
  if arg:
    raise ValueError(f'unknown config arg {arg!r}')
  return c
