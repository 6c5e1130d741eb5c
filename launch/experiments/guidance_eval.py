"""Concept-neglect evaluation of attention guidance on `shapes32`.

See configs/guidance/shapes_eval.py for the protocol.

Arms: `baseline` (DDIM + CFG), `attend_excite`, `astar`, and the control
`astar_non_concept` (A-STAR on the prompt's two article tokens "a" instead of
its nouns). Every arm sees the same initial noise for each (prompt, seed).
"""
from __future__ import annotations

import itertools
import json
import os
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from launch import common
from launch import config_cli
from launch.experiments import guidance_train
from lossland import guidance, parallel
from lossland.data import shapes
from lossland.guidance import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUNE_SEED_OFFSET = 1_000_000
START, END = shapes.VOCAB.index(shapes.START), shapes.VOCAB.index(shapes.END)


def two_object_prompts(num: int, seed: int, held_out: bool = True
                       ) -> list[tuple[shapes.Object, shapes.Object]]:
  """Colour- and shape-distinct pairs; with `held_out`, those with >= 1 pair held out of
  two-object training scenes, else those with none (combinations seen in training)."""
  pairs = [(c, s) for c in shapes.COLOR_NAMES for s in shapes.SHAPES]
  combos = [(a, b) for a, b in itertools.combinations(pairs, 2)
            if a[0] != b[0] and a[1] != b[1]
            and (a in shapes.HELD_OUT_PAIRS or b in shapes.HELD_OUT_PAIRS) == held_out]
  order = np.random.default_rng(seed).permutation(len(combos))
  return [combos[i] for i in order[:num]]


def get_model(config, workdir: str):
  """(model, params, train_results): workdir's checkpoint, else model_dir's, else train."""
  if guidance_train.has_trained(workdir):
    return (*guidance_train.load_trained(workdir), {'source': workdir})
  model_dir = config.model_dir and os.path.join(REPO, config.model_dir)
  if model_dir and guidance_train.has_trained(model_dir):
    return (*guidance_train.load_trained(model_dir), {'source': config.model_dir})
  spec = os.path.join(REPO, config.train_config) + (f':{config.train_arg}' if config.train_arg
                                                     else '')
  train_results = guidance_train.run(config_cli.load_config_file(spec), workdir)
  return (*guidance_train.load_trained(workdir), dict(train_results, source='trained'))


def _prompt_id(prompt) -> int:
  return zlib.crc32(shapes.caption(prompt).encode()) % (2 ** 31)


@jax.jit
def _noise(seeds: jax.Array, prompt_ids: jax.Array) -> jax.Array:
  """z_T [n, 32, 32, 3] of each (seed, prompt): identical in every arm."""
  return jax.vmap(lambda s, p: jax.random.normal(
      jax.random.fold_in(jax.random.key(s), p), (32, 32, 3)))(seeds, prompt_ids)


class Runner:
  """Samples (prompt, seed) lists in fixed-size chunks with one compiled sampler per arm."""

  def __init__(self, model, params, config, mesh):
    s = config.sampling
    self.model, self.params, self.mesh = model, params, mesh
    self.batch = s.batch_size
    self.num_steps = s.num_steps
    self.schedule = guidance.linear_schedule(s.num_timesteps)
    self.null = jnp.asarray(shapes.tokenize(''))
    self.samplers: dict = {}
    self.resolution = config.eval.map_resolution

  def sampler(self, g: guidance.Guidance | None):
    if g not in self.samplers:
      self.samplers[g] = guidance.make_sampler(self.model.apply, self.schedule,
                                               num_steps=self.num_steps, guidance=g)
    return self.samplers[g]

  def run(self, prompts, seeds, concept_words, *, guide: guidance.Guidance | None, cfg: float,
          scale: float, keep_maps: bool = False):
    """uint8 images [n,32,32,3] (and maps) for parallel lists of prompts / seeds / concepts."""
    sample = self.sampler(guide)
    steps = guidance.step_size_schedule(scale, self.num_steps)
    images, maps = [], []
    n = len(prompts)
    for lo in range(0, n, self.batch):
      idx = np.arange(lo, lo + self.batch) % n  # pad the last chunk with repeats
      tokens = np.stack([shapes.tokenize(shapes.caption(prompts[i])) for i in idx])
      tmask = guidance.text_mask(tokens, start_id=START, end_id=END)
      cidx = guidance.concept_indices(tokens, [concept_words[i] for i in idx], shapes.VOCAB)
      noise = _noise(np.asarray([seeds[i] for i in idx], np.int32),
                     np.asarray([_prompt_id(prompts[i]) for i in idx], np.int32))
      batch = parallel.shard_batch({'noise': np.asarray(noise), 'tokens': tokens,
                                    'tmask': tmask, 'cidx': cidx}, self.mesh)
      out, aux = parallel.settle(sample(self.params, batch['noise'], batch['tokens'], self.null,
                                        batch['tmask'], batch['cidx'], jnp.float32(cfg), steps))
      take = min(self.batch, n - lo)
      images.append(guidance.to_uint8(out)[:take])
      if keep_maps and aux:
        maps.append(np.asarray(aux['maps'])[:take])
    images = np.concatenate(images)
    return (images, np.concatenate(maps)) if keep_maps else images

  def time_ratio(self, guide: guidance.Guidance, cfg: float, scale: float, repeats: int) -> dict:
    """Median wall time of guided vs unguided sampling of one batch (compile excluded)."""
    prompts = [('red', 'circle'), ('blue', 'square')]
    tokens = np.stack([shapes.tokenize(shapes.caption(prompts))] * self.batch)
    tmask = guidance.text_mask(tokens, start_id=START, end_id=END)
    cidx = guidance.concept_indices(tokens, [['circle', 'square']] * self.batch, shapes.VOCAB)
    noise = np.asarray(jax.random.normal(jax.random.key(0), (self.batch, 32, 32, 3)))
    batch = parallel.shard_batch({'noise': noise, 'tokens': tokens, 'tmask': tmask,
                                  'cidx': cidx}, self.mesh)
    steps = guidance.step_size_schedule(scale, self.num_steps)
    times = {}
    for name, g in (('unguided', None), ('guided', guide)):
      fn = self.sampler(g)
      run = lambda: jax.block_until_ready(fn(self.params, batch['noise'], batch['tokens'],
                                             self.null, batch['tmask'], batch['cidx'],
                                             jnp.float32(cfg), steps))
      run()
      ts = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t0)
      times[name] = float(np.median(ts))
    return {'unguided_seconds': times['unguided'], 'guided_seconds': times['guided'],
            'ratio': times['guided'] / times['unguided']}


def make_guidance(arm, resolution: int) -> guidance.Guidance:
  return guidance.Guidance(
      loss=arm.loss, num_guided_steps=arm.num_guided_steps, resolution=resolution,
      smooth_sigma=arm.smooth_sigma or None, threshold=arm.threshold,
      refine_steps=tuple(arm.refine_steps), refine_targets=tuple(arm.refine_targets),
      max_refine_iters=arm.max_refine_iters)


def _grid(prompts, seeds):
  pairs = [(p, s) for p in prompts for s in seeds]
  return [p for p, _ in pairs], [s for _, s in pairs]


def save_figure(path, baseline, guided, maps, prompts, seeds_per_prompt):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = len(prompts)
  cols = seeds_per_prompt
  fig, axes = plt.subplots(rows * 2, cols * 3 // 1, figsize=(1.3 * cols * 3, 1.4 * rows * 2),
                           squeeze=False)
  for r, prompt in enumerate(prompts):
    for s in range(cols):
      i = r * cols + s
      for k, (img, label) in enumerate(((baseline[i], 'baseline'), (guided[i], 'A-STAR'))):
        ax = axes[2 * r + k, 3 * s]
        ax.imshow(img)
        ax.set_title(label if s == 0 else '', fontsize=6)
      for m in range(2):
        for k in range(2):
          ax = axes[2 * r + k, 3 * s + 1 + m]
          if k == 1:
            ax.imshow(maps[i, ..., m], cmap='viridis')
            ax.set_title(prompt[m][1], fontsize=6)
    axes[2 * r, 0].set_ylabel(shapes.caption(prompt), fontsize=5)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


SINGLE_PROMPTS = [((c, s),) for c in shapes.COLOR_NAMES for s in shapes.SHAPES]


def single_object_success_tune(runner, cfg: float, num_seeds: int) -> float:
  """The baseline's single-object success on all 15 single-object prompts x tuning seeds."""
  ps, ss = _grid(SINGLE_PROMPTS, list(range(TUNE_SEED_OFFSET, TUNE_SEED_OFFSET + num_seeds)))
  images = runner.run(ps, ss, [[s for _, s in p] for p in ps], guide=None, cfg=cfg, scale=0.0)
  return float(evaluate.score(images, ps)['success'].mean())


def run(config, workdir: str) -> dict:
  start = time.perf_counter()
  model, params, train_info = get_model(config, workdir)
  mesh = common.build_mesh(config.mesh, config.sampling.batch_size)
  runner = Runner(model, params, config, mesh)
  e = config.eval
  test_prompts = two_object_prompts(e.num_prompts, config.seed)
  tune_prompts = two_object_prompts(e.tune_prompts, config.seed)
  nouns = lambda prompt: [s for _, s in prompt]
  articles = lambda prompt: ['a', 'a']

  def score_two(prompts, seeds, guide, cfg, scale, concepts=nouns):
    ps, ss = _grid(prompts, seeds)
    images = runner.run(ps, ss, [concepts(p) for p in ps], guide=guide, cfg=cfg, scale=scale)
    return evaluate.score(images, ps)

  # 1. Tune on seeds disjoint from the test seeds.
  tune_seeds = list(range(TUNE_SEED_OFFSET, TUNE_SEED_OFFSET + e.tune_seeds))
  tuning: dict = {'cfg': {}, 'scale': {}}
  screen_only = e.get('screen_only', False)
  for cfg in (config.sampling.cfg_grid if len(config.sampling.cfg_grid) > 1 or screen_only
              else ()):
    tuning['cfg'][str(cfg)] = float(score_two(tune_prompts, tune_seeds, None, cfg, 0.0)['success']
                                    .mean())
  cfg = float(max(config.sampling.cfg_grid, key=lambda c: tuning['cfg'].get(str(c), 0.0)))
  if tuning['cfg']:
    seen_prompts = two_object_prompts(e.tune_prompts, config.seed, held_out=False)
    tuning['baseline_seen_combinations'] = float(
        score_two(seen_prompts, tune_seeds, None, cfg, 0.0)['success'].mean())
  tuning['baseline_single_object_success'] = single_object_success_tune(
      runner, cfg, min(e.tune_seeds, 20))
  if screen_only:  # model screening: tuning seeds only, no guided arm, no test seed
    return {'tuning': tuning, 'cfg_scale': cfg, 'model_source': train_info.get('source'),
            'wall_seconds': time.perf_counter() - start}
  guides, scales = {}, {}
  for name, arm in config.arms.items():
    guides[name] = make_guidance(arm, e.map_resolution)
    tuning['scale'][name] = {}
    for scale in (arm.scales if len(arm.scales) > 1 else ()):
      tuning['scale'][name][str(scale)] = float(
          score_two(tune_prompts, tune_seeds, guides[name], cfg, scale)['success'].mean())
    scales[name] = float(max(arm.scales, key=lambda s: tuning['scale'][name].get(str(s), 0.0)))

  # 2. Test: paired seeds across arms.
  seeds = list(range(e.num_seeds))
  arms = {'baseline': (None, 0.0, nouns)}
  arms.update({name: (guides[name], scales[name], nouns) for name in guides})
  if 'astar' in guides:
    arms['astar_non_concept'] = (guides['astar'], scales['astar'], articles)
  two = {}
  for name, (g, sc, concepts) in arms.items():
    two[name] = score_two(test_prompts, seeds, g, cfg, sc, concepts)
    # Kept if the run is cut short: the test numbers so far.
    with open(os.path.join(workdir, 'partial_results.json'), 'w') as f:
      json.dump({'tuning': tuning, 'cfg_scale': cfg, 'step_size_scale': scales,
                 'samples_per_arm': len(seeds) * len(test_prompts),
                 'two_object_success': {k: float(v['success'].mean()) for k, v in two.items()},
                 'success': {k: v['success'].astype(int).tolist() for k, v in two.items()}}, f)
  single = {}
  for name, (g, sc, _) in arms.items():
    if name == 'astar_non_concept':
      continue
    ps, ss = _grid(SINGLE_PROMPTS, list(range(e.single_seeds)))
    images = runner.run(ps, ss, [nouns(p) for p in ps], guide=g, cfg=cfg, scale=sc)
    single[name] = evaluate.score(images, ps)

  results: dict = {
      'two_object_success': {k: float(v['success'].mean()) for k, v in two.items()},
      'per_object_presence': {k: float(v['presence'].mean()) for k, v in two.items()},
      'binding_accuracy': {k: float(np.nanmean(v['binding'])) if np.isfinite(v['binding']).any()
                           else float('nan') for k, v in two.items()},
      'single_object_success': {k: float(v['success'].mean()) for k, v in single.items()},
      'two_object_success_per_prompt': {
          name: {shapes.caption(p): float(v['success'][i * len(seeds):(i + 1) * len(seeds)].mean())
                 for i, p in enumerate(test_prompts)} for name, v in two.items()},
      'tuning': tuning, 'cfg_scale': cfg, 'step_size_scale': scales,
      'seeds_per_prompt': len(seeds), 'num_two_object_prompts': len(test_prompts),
      'samples_per_arm': len(seeds) * len(test_prompts), 'num_ddim_steps': runner.num_steps,
      'model_source': train_info.get('source'),
  }
  if train_info.get('source') == 'trained':
    results['train'] = {k: v for k, v in train_info.items() if k != 'source'}
  for name in arms:
    if name == 'baseline':
      continue
    test = evaluate.mcnemar(two[name]['success'], two['baseline']['success'])
    results[f'mcnemar_p_{name}_vs_baseline'] = test['p']
    results[f'mcnemar_{name}_vs_baseline'] = test
  if 'astar' in two and 'attend_excite' in two:
    results['mcnemar_p_astar_vs_attend_excite'] = evaluate.mcnemar(
        two['astar']['success'], two['attend_excite']['success'])['p']
  # Does the premise of attention guidance hold: do the concept maps mark the objects?
  results['attention_localization'] = guidance.map_localization(
      model.apply, params, runner.schedule,
      shapes.render_dataset(e.localization_scenes, seed=config.seed, two_object_fraction=1.0),
      timesteps=(900, 700, 500, 300), resolution=e.map_resolution, seed=config.seed)
  if 'astar' in guides:
    timing = runner.time_ratio(guides['astar'], cfg, scales['astar'], e.timing_repeats)
    results['guided_over_unguided_time'] = timing['ratio']
    results['timing'] = timing

  # 3. Figure: baseline vs A-STAR on the same seeds, with A-STAR's concept maps.
  if 'astar' in guides and e.figure_prompts:
    fig_prompts = test_prompts[:e.figure_prompts]
    ps, ss = _grid(fig_prompts, list(range(e.figure_seeds)))
    base = runner.run(ps, ss, [nouns(p) for p in ps], guide=None, cfg=cfg, scale=0.0)
    guided, maps = runner.run(ps, ss, [nouns(p) for p in ps], guide=guides['astar'], cfg=cfg,
                              scale=scales['astar'], keep_maps=True)
    save_figure(os.path.join(workdir, 'guidance_grid.png'), base, guided, maps, fig_prompts,
                e.figure_seeds)
  results['wall_seconds'] = time.perf_counter() - start
  return results
