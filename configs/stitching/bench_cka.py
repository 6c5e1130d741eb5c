"""Minibatch linear-CKA matrix benchmark (12 x 12 layers, n = 10,000, width 512).

    python -m launch.bench --config=configs/stitching/bench_cka.py

Prints one JSON line with lossland's time, the NumPy pair-by-pair time
(timed on a few pairs, scaled to all 144), their ratio and the max value
difference. Expect ~1-3 minutes on 2 CPU cores. `:runlocal` is tiny.
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.bench = 'stitching_cka'
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.bench_args = ml_collections.ConfigDict(dict(
      n=10000, width=512, layers=12, batch_size=1000, repeats=2, numpy_pairs=6))
  if arg == 'runlocal':
    c.bench_args.update(dict(n=512, width=32, layers=3, batch_size=128, repeats=1,
                             numpy_pairs=2))
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use runlocal or nothing')
  return c
