"""The default job: a byte-level LM on lossland's embedded English corpus.

The corpus is CPython's documentation topics (`pydoc_data`), built into a TFDS
dataset on first use with no download:

    python -m launch.train --config=configs/lm/pydoc_byte.py --workdir=/tmp/lm

4 layers, d_model 128, context 128, batch 16, 500 steps (about 2 passes over
the 422 KB training split); measured loss and time: README, "The main job".
`:full` trains 1500 steps (three times as long); `:runlocal` trains
40 steps in seconds. `model.matmul_dtype='auto'` uses bfloat16 matrix products
only where the hardware has bfloat16 dot units (`lossland.models.precision`).
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.task = 'lm'
  c.seed = 0
  c.progress = True
  c.data = ml_collections.ConfigDict(dict(source='pydoc_text', path='', vocab='byte', data_dir=''))
  c.model = ml_collections.ConfigDict(dict(
      name='transformer_lm', d_model=128, num_layers=4, num_heads=4, mlp_dim=344,
      tie_embeddings=True, dtype='float32', matmul_dtype='auto'))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=16, seq_len=128, num_steps=500, learning_rate=1e-3, final_lr=1e-4,
      warmup_steps=50, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0, steps_per_block=50))
  c.eval = ml_collections.ConfigDict(dict(every=100, num_batches=20, batch_size=16))
  c.checkpoint = ml_collections.ConfigDict(dict(every=250, keep=2))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.param_rules = ()
  if arg == 'full':
    c.train.num_steps, c.train.warmup_steps = 1500, 100
    c.eval.every, c.checkpoint.every = 250, 500
  elif arg == 'runlocal':
    c.train.num_steps, c.train.warmup_steps, c.train.steps_per_block = 40, 5, 10
    c.train.seq_len = 64
    c.eval.every, c.eval.num_batches, c.checkpoint.every = 20, 2, 20
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use full, runlocal or nothing')
  return c
