"""Benchmark: K-FAC factor accumulation through linen, NNX and plain-function models.

    python -m launch.bench --config=configs/curvature/bench_any_model.py

One LM (4 blocks of attention + MLP, d_model 128, every Dense a layer: 25
layers) written three ways with the same weights; prints one JSON line with
each path's median accumulation time and `nnx_ratio`, `plain_ratio` against
linen (target <= 1.05), measured in one process, interleaved. `:runlocal`
uses a tiny model.
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.bench = 'curvature_any_model'
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(d_model=128, num_layers=4, num_heads=4,
                                           vocab_size=256))
  c.batch_size = 16
  c.seq_len = 128
  c.fisher_type = 'true'
  c.repeats = 15
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  if arg == 'runlocal':
    c.model.update(dict(d_model=32, num_layers=2, num_heads=2))
    c.batch_size, c.seq_len, c.repeats = 8, 16, 3
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use runlocal or nothing')
  return c
