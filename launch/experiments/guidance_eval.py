"""Concept-neglect evaluation of attention guidance on `shapes32` (protocol: the config's
docstring and `lossland.guidance.runner`). Arms: `baseline` (DDIM + CFG), `attend_excite`,
`astar`, and the control `astar_non_concept` (A-STAR on the article tokens).
Writes results.json (by launch.analyze), partial_results.json and guidance_grid.png."""
from __future__ import annotations

import json
import os
import time

import jax

from launch import common, config_cli
from launch.experiments import guidance_train
from lossland import guidance
from lossland.data import shapes
from lossland.guidance import checkpoints, runner as R

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def get_model(config, workdir: str):
  """(model, params, info): workdir's checkpoint, else model_dir's, else trained into workdir."""
  model_dir = config.model_dir and os.path.join(REPO, config.model_dir)
  for folder, source in ((workdir, workdir), (model_dir, config.model_dir)):
    if folder and checkpoints.has_trained(folder):
      return (*checkpoints.load_trained(folder), {'source': source})
  spec = os.path.join(REPO, config.train_config)
  spec += f':{config.train_arg}' if config.train_arg else ''
  info = guidance_train.run(config_cli.load_config_file(spec), workdir)
  return (*checkpoints.load_trained(workdir), dict(info, source='trained'))


def run(config, workdir: str) -> dict:
  start, e, s = time.perf_counter(), config.eval, config.sampling
  model, params, info = get_model(config, workdir)
  runner = R.Runner(model.apply, params, schedule=guidance.linear_schedule(s.num_timesteps),
                    num_steps=s.num_steps, batch_size=s.batch_size,
                    mesh=common.build_mesh(config.mesh, s.batch_size))
  guides = {name: R.make_guidance(arm, e.map_resolution) for name, arm in config.arms.items()}
  tuning = R.tune(runner, guides, {n: a.scales for n, a in config.arms.items()},
                  cfg_grid=s.cfg_grid, num_prompts=e.tune_prompts, num_seeds=e.tune_seeds,
                  seed=config.seed, screen_only=e.get('screen_only', False))
  base = {'tuning': tuning.record, 'cfg_scale': tuning.cfg, 'model_source': info.get('source')}
  if e.get('screen_only', False):  # model screening: tuning seeds only
    return dict(base, wall_seconds=time.perf_counter() - start)
  prompts, seeds = R.two_object_prompts(e.num_prompts, config.seed), list(range(e.num_seeds))
  arms, two, single = R.paired_arms(guides, tuning.scales), {}, {}
  for name, (g, scale, concepts) in arms.items():
    two[name] = runner.score(prompts, seeds, guide=g, cfg=tuning.cfg, scale=scale,
                             concepts=concepts)
    with open(os.path.join(workdir, 'partial_results.json'), 'w') as f:  # kept if cut short
      json.dump(dict(base, step_size_scale=tuning.scales, samples_per_arm=len(seeds) * len(prompts),
                     two_object_success={k: float(v['success'].mean()) for k, v in two.items()},
                     success={k: v['success'].astype(int).tolist() for k, v in two.items()}), f)
  for name, (g, scale, _) in arms.items():
    if name != 'astar_non_concept':
      single[name] = runner.score(R.SINGLE_PROMPTS, list(range(e.single_seeds)), guide=g,
                                  cfg=tuning.cfg, scale=scale)
  scores, tests = R.summarize(two, single, prompts, len(seeds))
  results = dict(scores, **base, step_size_scale=tuning.scales, seeds_per_prompt=len(seeds),
                 num_two_object_prompts=len(prompts), samples_per_arm=len(seeds) * len(prompts),
                 num_ddim_steps=s.num_steps, **tests)
  if info.get('source') == 'trained':
    results['train'] = {k: v for k, v in info.items() if k != 'source'}
  results['attention_localization'] = guidance.map_localization(
      model.apply, params, runner.schedule,
      shapes.render_dataset(e.localization_scenes, seed=config.seed, two_object_fraction=1.0),
      timesteps=(900, 700, 500, 300), resolution=e.map_resolution,
      rng=jax.random.key(config.seed), mesh=runner.mesh).as_dict()
  if 'astar' in guides:
    timing = runner.time_ratio(guides['astar'], tuning.cfg, tuning.scales['astar'],
                               e.timing_repeats)
    results.update(guided_over_unguided_time=timing.ratio, timing=timing.as_dict())
    if e.figure_prompts:  # baseline vs A-STAR on the same seeds, with A-STAR's concept maps
      ps, ss = R.grid(prompts[:e.figure_prompts], list(range(e.figure_seeds)))
      words = [R.nouns(p) for p in ps]
      plain = runner.run(ps, ss, words, guide=None, cfg=tuning.cfg, scale=0.0).images
      guided = runner.run(ps, ss, words, guide=guides['astar'], cfg=tuning.cfg,
                          scale=tuning.scales['astar'], keep_maps=True)
      R.save_figure(os.path.join(workdir, 'guidance_grid.png'), plain, guided.images,
                    guided.maps, prompts[:e.figure_prompts], e.figure_seeds)
  results['wall_seconds'] = time.perf_counter() - start
  return results
