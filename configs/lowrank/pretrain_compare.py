"""LOST vs dense vs low-rank (SVD / Xavier init) vs SLTrain pre-training, fairly tuned.

    python -m launch.analyze --config=configs/lowrank/pretrain_compare.py --workdir=/tmp/lowrank

A LLaMA-style byte LM (4 layers, d_model 256, SwiGLU 688, context 128) on the
embedded `python_stdlib` corpus (9.6 MB of training bytes, so 2000 steps of
32 x 128 tokens stay under one epoch). Attention and MLP linear maps are
replaced per arm at `lowrank.param_fraction` (50%) of the dense linear
parameters; embeddings, norms and head stay dense. Each arm's peak learning rate is chosen from
`learning_rates` on seed 0 (final validation loss), then `seeds` are run at
that rate. AdamW β = (0.9, 0.95), warmup then cosine to 10% of the peak.
results.json: per arm `val_loss_mean`, `val_loss_std`, `best_lr`,
`linear_params`, `param_fraction`, `step_ms`, `train_state_bytes`, plus every
run under `runs` and the acceptance gaps. Finished runs are kept in
WORKDIR/runs/*/result.json, so rerunning the command resumes.

Cost: 6 arms x (3 rates + 2 seeds) = 30 runs of `train.num_steps`; the full
size is a GPU job. Smaller variants: `:cpu_stdlib` (d_model 128, 4 layers,
1000 steps of 16 x 128 tokens, 0.2 epoch), `:cpu` (d_model 64, 2 layers, 300
steps on `pydoc_text`), `:runlocal` (2 arms, 1 rate, 2 seeds, 12 steps).
Measured times and results: docs/results/lowrank.md.
One arm per process: `--config.lowrank.arms=lost`, same workdir, then a last
call with every arm and `--config.lowrank.summarize_only=true` writes the table.
"""
import ml_collections

ARMS = 'dense,lost,lost_silu,lowrank_svd,lowrank_xavier,sltrain'


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = 'lowrank_pretrain_compare'
  c.task = 'lm'
  c.seed = 0
  c.progress = False
  c.data = ml_collections.ConfigDict(dict(source='python_stdlib', path='', vocab='byte', data_dir=''))
  c.model = ml_collections.ConfigDict(dict(
      name='transformer_lm', d_model=256, num_layers=4, num_heads=4, mlp_dim=688,
      tie_embeddings=True, dtype='float32'))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=32, seq_len=128, num_steps=2000, learning_rate=1e-3, final_lr=1e-4,
      warmup_steps=200, b1=0.9, b2=0.95, weight_decay=0.0, grad_clip=1.0, steps_per_block=50))
  c.eval = ml_collections.ConfigDict(dict(every=0, num_batches=32, batch_size=32,
                                          train_too=False))
  c.checkpoint = ml_collections.ConfigDict(dict(every=0, keep=1))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.param_rules = ()
  c.lowrank = ml_collections.ConfigDict(dict(
      arms=ARMS,  # comma-separated; also available: cola, galore
      learning_rates=(1e-3, 3e-3, 1e-2),
      extend_grid=2,  # rates added past the grid's end while an arm's best rate sits on it
      seeds=(0, 1, 2),
      final_lr_ratio=0.1,  # cosine decays to this fraction of each run's peak rate
      warmup_fraction=0.1,
      param_fraction=0.5,
      sparsity=0.05,  # LOST's s
      gamma=0.5,  # LOST's γ
      density=0.03,  # SLTrain's δ
      sltrain_alpha=32.0,
      galore_rank=64, galore_gap=200, galore_scale=0.25,
      summarize_only=False))  # True: only read finished runs of WORKDIR/runs, train nothing
  if arg == 'runlocal':
    c.model.update(dict(d_model=32, num_layers=1, num_heads=2, mlp_dim=88))
    c.train.update(dict(batch_size=8, seq_len=32, num_steps=12, steps_per_block=6))
    c.eval.update(dict(num_batches=2, batch_size=8))
    c.lowrank.update(dict(arms='dense,lost', learning_rates=(3e-3,), seeds=(0, 1), galore_rank=8,
                          galore_gap=5))
  elif arg == 'cpu':
    c.data.source = 'pydoc_text'
    c.model.update(dict(d_model=64, num_layers=2, num_heads=2, mlp_dim=172))
    c.train.update(dict(batch_size=16, seq_len=64, num_steps=300, steps_per_block=50))
    c.eval.update(dict(num_batches=16, batch_size=16))
    c.lowrank.update(dict(galore_rank=16, galore_gap=100))
  elif arg == 'cpu_stdlib':
    c.model.update(dict(d_model=128, num_layers=4, num_heads=4, mlp_dim=344))
    c.train.update(dict(batch_size=16, seq_len=128, num_steps=1000, steps_per_block=50))
    c.eval.update(dict(num_batches=32, batch_size=16))
    c.lowrank.update(dict(galore_rank=32, galore_gap=200))
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use runlocal, cpu, cpu_stdlib or nothing')
  return c
