"""Concept neglect on `shapes32`: baseline vs Attend-and-Excite vs A-STAR, paired seeds.

    python -m launch.analyze --config=configs/guidance/shapes_eval.py --workdir=DIR

The model comes from DIR if it holds `params.msgpack` + `model.json`, else from
`model_dir` (the committed checkpoint `lossland/guidance/assets/shapes_unet_3k`,
a model that neglects concepts; `lossland/guidance/assets/shapes_unet` is the
20k-step one that composes well), else it is trained into DIR with
`configs/guidance/shapes_train.py:3k` (set `--config.model_dir=` to force training).

Protocol (`lossland.guidance.runner`): two-object test prompts are
`num_prompts` colour-distinct, shape-distinct pairs that contain at least one
colour-shape pair held out of two-object training scenes. On separate tuning
seeds, the CFG weight is chosen by the baseline's own two-object success, then
each guided arm's step-size scale by its two-object success. On the test seeds
(`num_seeds` per prompt, the same initial noise in every arm) every arm is
scored with the deterministic detector; McNemar's exact test compares arms.
Single-object prompts (all 15 pairs) are scored the same way. Also reported:
`attention_localization`, how well each object's colour and noun token maps
correlate with its mask on noised ground-truth scenes (the premise of attention
guidance).

Variants: the default is the 500-seed protocol (a GPU job); `:screen` scores
only the baseline on tuning seeds (to choose among trained models); `:cpu` is
the size 2 CPU cores allow (20 paired samples per arm, fixed CFG and step
size); `:runlocal` trains a tiny model (or uses DIR's) and runs every arm on
2 prompts x 4 seeds with 4 DDIM steps. Measured costs and results:
`docs/results/guidance.md`.
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = 'guidance_eval'
  c.seed = 0
  c.model_dir = 'lossland/guidance/assets/shapes_unet_3k'
  c.train_config = 'configs/guidance/shapes_train.py'
  c.train_arg = '3k'
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.sampling = ml_collections.ConfigDict(dict(
      num_steps=25, num_timesteps=1000, batch_size=400, cfg_grid=(3.0, 5.0, 7.5)))
  c.eval = ml_collections.ConfigDict(dict(
      num_prompts=10, num_seeds=500, single_seeds=100, tune_seeds=40, tune_prompts=10,
      map_resolution=16, figure_prompts=4, figure_seeds=6, timing_repeats=3, screen_only=False,
      localization_scenes=64))
  # Per arm: loss, guided steps K, step-size scales tried on the tuning seeds, refinement.
  c.arms = ml_collections.ConfigDict(dict(
      attend_excite=ml_collections.ConfigDict(dict(
          loss='attend_excite', num_guided_steps=12, scales=(1.0, 4.0, 16.0, 64.0),
          refine_steps=(0, 5, 10), refine_targets=(0.95, 0.5, 0.2), max_refine_iters=5,
          smooth_sigma=0.5, threshold='otsu')),
      astar=ml_collections.ConfigDict(dict(
          loss='astar', num_guided_steps=12, scales=(1.0, 4.0, 16.0, 64.0), refine_steps=(),
          refine_targets=(), max_refine_iters=0, smooth_sigma=0.5, threshold='otsu')),
  ))
  if arg == 'cpu':
    # 10 prompts x 2 seeds per arm (not 500), K = 5 of 20 steps, no tuning (single-value grids).
    c.sampling.update(num_steps=20, batch_size=20, cfg_grid=(3.0,))
    c.eval.update(num_prompts=10, num_seeds=2, single_seeds=1, tune_seeds=2, tune_prompts=10,
                  figure_prompts=1, figure_seeds=4, timing_repeats=1)
    for arm in ('attend_excite', 'astar'):
      c.arms[arm].update(num_guided_steps=5, scales=(1.0,))
    c.arms.attend_excite.update(refine_steps=(0, 4), refine_targets=(0.95, 0.5),
                                max_refine_iters=3)
  elif arg == 'screen':
    # Model screening (tuning seeds only): the baseline's two-object success per CFG weight
    # and its single-object success; no guided arm runs and no test seed is sampled.
    c.eval.update(screen_only=True, figure_prompts=0)
    c.arms = ml_collections.ConfigDict()
  elif arg == 'runlocal':
    c.model_dir = ''
    c.train_arg = 'runlocal'
    c.sampling.update(num_steps=4, batch_size=8, cfg_grid=(3.0,))
    c.eval.update(num_prompts=2, num_seeds=4, single_seeds=2, tune_seeds=2, tune_prompts=2,
                  figure_prompts=2, figure_seeds=2, timing_repeats=1, localization_scenes=8)
    for arm in ('attend_excite', 'astar'):
      c.arms[arm].update(num_guided_steps=2, scales=(10.0,))
    c.arms.attend_excite.update(refine_steps=(0,), refine_targets=(0.5,), max_refine_iters=2)
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use cpu, screen, runlocal or nothing')
  return c
