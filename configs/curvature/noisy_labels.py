"""Removing memorized noisy labels by curvature-mass editing (Merullo et al. 2025, sec. 4.3).

An MLP on the embedded `sklearn_digits` (1,437 train / 360 test 8x8 digits)
with 15% of training labels flipped to a wrong class is trained until it
fits the flipped labels; K-FAC factors (true Fisher) come from the clean
(unflipped) training images. The last two layers (`dense_1`, `head`) are
edited; ρ is chosen on half of the flipped points (set A) from `rhos` and the
other half (set B) is reported (the layer choice is discussed in
docs/results/curvature.md, with run times and results).

    python -m launch.analyze --config=configs/curvature/noisy_labels.py --workdir=/tmp/noisy

`:runlocal` trains 60 steps (the numbers are then meaningless).
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = 'curvature_noisy_labels'
  c.seed = 0
  c.progress = True
  c.data = ml_collections.ConfigDict(dict(source='sklearn_digits', data_dir='', flip_fraction=0.15))
  c.model = ml_collections.ConfigDict(dict(name='mlp', features=(512, 512), dtype='float32'))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=64, num_steps=3000, learning_rate=1e-3, final_lr=1e-5, warmup_steps=100,
      b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=1.0, steps_per_block=100))
  c.checkpoint_every = 1000
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.curvature = ml_collections.ConfigDict(dict(
      fisher_type='true', layers='dense_1|head', factor_samples=8, max_clean_drop=0.05,
      rhos=(0.99, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9, 0.85, 0.8, 0.75), ekfac=True))
  if arg == 'runlocal':
    c.model.features = (32, 32)
    c.train.update(dict(num_steps=60, steps_per_block=20, warmup_steps=5))
    c.checkpoint_every = 20
    c.curvature.update(dict(factor_samples=1, rhos=(0.95, 0.75)))
    c.progress = False
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use runlocal or nothing')
  return c
