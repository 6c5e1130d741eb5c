"""LM train-step time and train-state bytes of LOST (and baselines) vs dense, in one process.

    python -m launch.bench --config=configs/lowrank/bench_step.py

LLaMA-style byte LM at d_model 512 (4 layers, SwiGLU 1376, context 128, batch
8). Each arm's compiled train block is timed `rounds` times, interleaved with
the others to share the machine's noise; the median of each arm's medians is
reported with `<arm>_step_ratio` and `<arm>_state_bytes_ratio` against dense.
Target: lost at 50% parameters ≤ 0.8x dense time and ≤ 0.6x dense bytes.
`:runlocal` is d_model 64. Measured times and ratios: docs/results/lowrank.md.
"""
import ml_collections

from configs.lowrank import pretrain_compare


def get_config(arg=None):
  c = pretrain_compare.get_config()
  c.bench = 'lowrank_step'
  del c.experiment
  c.model.update(dict(d_model=512, num_layers=4, num_heads=8, mlp_dim=1376))
  c.train.update(dict(batch_size=8, seq_len=128, num_steps=1000, steps_per_block=5))
  c.eval.update(dict(num_batches=1, batch_size=8))
  c.bench_arms = 'dense,lost,lowrank_svd,sltrain'
  c.rounds = 3
  c.repeats = 3
  if arg == 'runlocal':
    c.model.update(dict(d_model=64, num_layers=1, num_heads=2, mlp_dim=172))
    c.train.update(dict(batch_size=4, seq_len=32, steps_per_block=2))
    c.bench_arms, c.rounds, c.repeats = 'dense,lost', 1, 2
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use runlocal or nothing')
  return ml_collections.ConfigDict(c)
