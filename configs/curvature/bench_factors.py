"""Benchmark: K-FAC factor accumulation for all MLP layers vs a plain forward+backward.

    python -m launch.bench --config=configs/curvature/bench_factors.py

Prints one JSON line with `factor_step_ms`, `fwd_bwd_ms` and their `ratio`
(target <= 1.5), measured in one process on the same batch, plus the factor
memory Σ(d_in² + d_out²)·4 bytes. `:runlocal` uses a tiny model.
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.bench = 'curvature_factors'
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      name='transformer_lm', d_model=128, num_layers=4, num_heads=4, mlp_dim=344,
      tie_embeddings=True, dtype='float32', vocab_size=256))
  c.batch_size = 16
  c.seq_len = 128
  c.pattern = r'block_\d+/mlp/(gate|up|down)'
  c.fisher_type = 'true'
  c.repeats = 10
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  if arg == 'runlocal':
    c.model.update(dict(d_model=32, num_layers=2, num_heads=2, mlp_dim=64))
    c.batch_size, c.seq_len, c.repeats = 8, 32, 3
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use runlocal or nothing')
  return c
