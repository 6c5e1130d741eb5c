"""Full-batch linear-CKA matrix benchmark (12 x 12 layers, n = 10,000, width 512).

    OPENBLAS_NUM_THREADS=2 python -m launch.bench --config=configs/stitching/bench_cka_full.py

Prints one JSON line: lossland's `cka_matrix`, NumPy's pair-by-pair formula
and the bare XLA cross products, alternated over `repeats` rounds (min and
median of each), lossland / bare (target <= 1.5), NumPy / lossland (target
>= 2) and the largest value difference. Several minutes on 2 CPU cores
(NumPy dominates). `:runlocal` is tiny.
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.bench = 'stitching_cka_full'
  c.mesh = ml_collections.ConfigDict(dict(data=1, model=1))
  c.bench_args = ml_collections.ConfigDict(dict(n=10000, width=512, layers=12, repeats=3))
  if arg == 'runlocal':
    c.bench_args.update(dict(n=256, width=16, layers=3, repeats=2))
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use runlocal or nothing')
  return c
