"""Character-level Shakespeare: the reference small-LM configuration.

4 layers, 4 heads, d_model 128, context 64, batch 12, 2000 steps, AdamW lr 1e-3
(100 warmup steps, cosine to 1e-4), beta2 0.99, weight decay 0.1, clip 1.0,
evaluation every 250 steps on 20 batches. `model.matmul_dtype='auto'` gives the
matrix products bfloat16 operands with float32 accumulation where the hardware
has bfloat16 dot units (GPU, TPU, a CPU with AVX512-BF16/AMX or Arm BF16) and
plain float32 elsewhere (`lossland.models.preferred_matmul_dtype`); params,
norms, softmax and the loss stay float32 either way. `float32` or `bfloat16`
force one.
The text file is given by path:

    python -m launch.train --config=configs/lm/shakespeare_char.py \
        --config.data.path=../shared/data/tinyshakespeare.txt --workdir=/tmp/shakespeare

Measured loss and time against the PyTorch baseline: README, "Platform", and
`docs/results/platform_perf.md`.
`:runlocal` trains 40 steps in seconds.
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.task = 'lm'
  c.seed = 0
  c.progress = True
  c.data = ml_collections.ConfigDict(dict(source='file', path='', vocab='char', data_dir=''))
  c.model = ml_collections.ConfigDict(dict(
      name='transformer_lm', d_model=128, num_layers=4, num_heads=4, mlp_dim=344,
      tie_embeddings=True, dtype='float32', matmul_dtype='auto'))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=12, seq_len=64, num_steps=2000, learning_rate=1e-3, final_lr=1e-4,
      warmup_steps=100, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0, steps_per_block=50))
  c.eval = ml_collections.ConfigDict(dict(every=250, num_batches=20, batch_size=12))
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=2))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.param_rules = ()
  if arg == 'runlocal':
    c.train.num_steps, c.train.warmup_steps, c.train.steps_per_block = 40, 5, 10
    c.eval.every, c.eval.num_batches, c.checkpoint.every = 20, 2, 20
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use runlocal or nothing')
  return c
