"""Stitching A->B and A->A on digit pairs: DM vs TLM, CKA/PWCCA/Procrustes, OOD scores.

    python -m launch.analyze --config=configs/stitching/digit_pairs.py --workdir=/tmp/stitch

Per seed: two residual MLPs (6 hidden blocks x + relu(dense(x)) of width 256,
the first without a shortcut; the 6 block outputs are the stitched layers)
trained from different inits on pairs of 8x8 digits side by side, label
(d1 + d2) mod 10; then every layer pair A->B and A->A is stitched by direct
matching (one pass of streamed normal equations) and by task loss matching
(random and DM init, the 36 stitches of each matrix trained jointly) with the
paper's schedule: Adam lr 1e-3, batch 256, 2,400 steps (~30 epochs). 3 seeds;
about half an hour on 2 CPU cores.

Variants: `:plain`, a plain MLP (128-128-96-96-64-64, no shortcuts) with the
same schedule; `:cpu`, that plain MLP with TLM batch 64 x 1,500 steps (~5
epochs); `:runlocal`, 1 seed of a width-64 residual MLP with tiny training (a
minute or two on CPU, mostly compilation). Results, with the commands that
produced them: docs/results/stitching.md.
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = 'stitching_digit_pairs'
  c.seeds = (0, 1, 2)
  c.data = ml_collections.ConfigDict(dict(num_train=20000, num_test=4000, data_dir=''))
  # residual: hidden layers x + relu(dense(x)) where the width is unchanged; the stitched
  # layers are then the residual stream after each block.
  c.model = ml_collections.ConfigDict(dict(features=(256,) * 6, residual=True))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=128, num_steps=3000, learning_rate=2e-3, final_lr=1e-5, warmup_steps=100,
      weight_decay=1e-4, steps_per_block=100))
  # DM: the paper fits on K = 100 images; here the whole training set streams through.
  c.dm = ml_collections.ConfigDict(dict(batch_size=2000, ridge=0.0))
  c.tlm = ml_collections.ConfigDict(dict(
      inits=('random', 'direct'), batch_size=256, num_steps=2400, learning_rate=1e-3,
      weight_decay=1e-5, steps_per_block=100))
  # train_examples: also score every stitch on this many training pairs (0 = skip), which
  # separates TLM's generalization gap from under-training.
  c.eval = ml_collections.ConfigDict(dict(batch_size=1000, train_examples=4000))
  c.similarity_examples = 2000  # test inputs used for CKA / PWCCA / Procrustes
  c.distant = 3  # |i - j| >= distant counts as a distant layer pair
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.figures = True
  if arg in ('plain', 'cpu'):
    c.model.features, c.model.residual = (128, 128, 96, 96, 64, 64), False
  if arg == 'cpu':
    c.tlm.batch_size, c.tlm.num_steps = 64, 1500
  elif arg == 'runlocal':
    c.seeds = (0,)
    c.model.features = (64,) * 6
    c.data.num_train, c.data.num_test = 4000, 1000
    c.train.num_steps, c.train.steps_per_block, c.train.warmup_steps = 300, 100, 20
    c.tlm.batch_size, c.tlm.num_steps, c.tlm.steps_per_block = 64, 100, 50
    c.dm.batch_size, c.eval.batch_size = 1000, 1000
    c.similarity_examples = 1000
  elif arg not in (None, '', 'plain'):
    raise ValueError(f'unknown config arg {arg!r}; use plain, cpu, runlocal or nothing')
  return c
