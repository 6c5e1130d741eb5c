"""The concept-neglect evaluation on `shapes32`: prompts, paired seeds, arms, tuning, scoring.

The protocol of `configs/guidance/shapes_eval.py` (in the manner of
big_vision's evaluators: an object that owns the compiled samplers and the
batching, functions for each phase):

* test prompts are colour- and shape-distinct two-object pairs containing at
  least one colour-shape pair held out of two-object training scenes
  (`two_object_prompts`); single-object prompts are all 15 pairs;
* every arm sees the same initial noise for each (prompt, seed)
  (`seed_noise`), so arms are compared on paired samples (McNemar's test,
  `evaluate.mcnemar`);
* the CFG weight is chosen by the baseline's own two-object success on tuning
  seeds disjoint from the test seeds (`TUNE_SEED_OFFSET` on), then each guided
  arm's step-size scale by its two-object success (`tune`).
"""
from __future__ import annotations

import dataclasses
import itertools
import time
import zlib
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from lossland import parallel
from lossland.data import shapes
from lossland.guidance import attention as attention_lib
from lossland.guidance import diffusion
from lossland.guidance import evaluate
from lossland.guidance import sampler as sampler_lib
from lossland.guidance import tokens as tokens_lib

TUNE_SEED_OFFSET = 1_000_000
START, END = shapes.VOCAB.index(shapes.START), shapes.VOCAB.index(shapes.END)
SINGLE_PROMPTS = [((c, s),) for c in shapes.COLOR_NAMES for s in shapes.SHAPES]

Prompt = Sequence[tuple[str, str]]  # ((colour, shape), ...)


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


def prompt_id(prompt: Prompt) -> int:
  """A stable id of a prompt's caption (CRC32), folded into its seeds' noise."""
  return zlib.crc32(shapes.caption(prompt).encode()) % (2 ** 31)


@jax.jit
def seed_noise(seeds: jax.Array, prompt_ids: jax.Array) -> jax.Array:
  """z_T [n, 32, 32, 3] of each (seed, prompt): identical in every arm."""
  return jax.vmap(lambda s, p: jax.random.normal(
      jax.random.fold_in(jax.random.key(s), p), (32, 32, 3)))(seeds, prompt_ids)


def grid(prompts: Sequence[Prompt], seeds: Sequence[int]) -> tuple[list, list]:
  """Every (prompt, seed) pair, prompt-major: parallel lists of prompts and seeds."""
  pairs = [(p, s) for p in prompts for s in seeds]
  return [p for p, _ in pairs], [s for _, s in pairs]


def nouns(prompt: Prompt) -> list[str]:
  """The concept words of a prompt: its shape nouns."""
  return [s for _, s in prompt]


def articles(prompt: Prompt) -> list[str]:
  """The control concepts: the article 'a' once per object."""
  return ['a'] * len(prompt)


def make_guidance(arm: Mapping[str, Any], resolution: int) -> sampler_lib.Guidance:
  """The `Guidance` of one arm of the config (`configs/guidance/shapes_eval.py:arms`)."""
  return sampler_lib.Guidance(
      loss=arm['loss'], num_guided_steps=arm['num_guided_steps'], resolution=resolution,
      smooth_sigma=arm['smooth_sigma'] or None, threshold=arm['threshold'],
      refine_steps=tuple(arm['refine_steps']), refine_targets=tuple(arm['refine_targets']),
      max_refine_iters=arm['max_refine_iters'])


class Generated(NamedTuple):
  """uint8 images [n, 32, 32, 3] and, when asked for, the concept maps [n, res, res, M]."""
  images: np.ndarray
  maps: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class Timing:
  """Median wall time of one batch, guided and unguided (compilation excluded)."""
  unguided_seconds: float
  guided_seconds: float

  @property
  def ratio(self) -> float:
    return self.guided_seconds / self.unguided_seconds

  def as_dict(self) -> dict[str, float]:
    return {'unguided_seconds': self.unguided_seconds, 'guided_seconds': self.guided_seconds,
            'ratio': self.ratio}


class Runner:
  """Samples (prompt, seed) lists in fixed-size chunks with one compiled sampler per arm.

  Args:
    apply_fn: the denoiser, `(params, x, t, tokens, **apply_kwargs) -> ε`.
    params: its variables.
    schedule: the diffusion schedule; num_steps: DDIM steps.
    batch_size: samples per compiled call (the last chunk is padded with repeats).
    mesh: batches are sharded over its `data` axis; None uses all local devices.
    attention, apply_kwargs: as in `sampler.make_sampler`.
  """

  def __init__(self, apply_fn: Callable, params, *, schedule: diffusion.Schedule,
               num_steps: int, batch_size: int, mesh: Mesh | None = None,
               attention: attention_lib.AttentionSource = attention_lib.AttentionSource(),
               apply_kwargs: Mapping[str, Any] | None = None):
    self.apply_fn, self.params = apply_fn, params
    self.schedule, self.num_steps, self.batch = schedule, num_steps, batch_size
    self.mesh = parallel.data_mesh(mesh)
    self.attention, self.apply_kwargs = attention, dict(apply_kwargs or {})
    self.null = np.asarray(shapes.tokenize(''))
    self.samplers: dict = {}

  def sampler(self, guide: sampler_lib.Guidance | None) -> sampler_lib.Sampler:
    if guide not in self.samplers:
      self.samplers[guide] = sampler_lib.make_sampler(
          self.apply_fn, self.schedule, num_steps=self.num_steps, null_tokens=self.null,
          guidance=guide, attention=self.attention, apply_kwargs=self.apply_kwargs,
          mesh=self.mesh, vocab=shapes.VOCAB)
    return self.samplers[guide]

  def batch_of(self, prompts: Sequence[Prompt], seeds: Sequence[int],
               concepts: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """The sampler batch (host arrays) of parallel lists of prompts, seeds and concept words."""
    tokens = np.stack([shapes.tokenize(shapes.caption(p)) for p in prompts])
    noise = seed_noise(np.asarray(seeds, np.int32),
                       np.asarray([prompt_id(p) for p in prompts], np.int32))
    return {'noise': np.asarray(noise), 'tokens': tokens,
            'text_mask': tokens_lib.text_mask(tokens, start_id=START, end_id=END),
            'token_indices': tokens_lib.concept_indices(tokens, concepts, shapes.VOCAB)}

  def run(self, prompts: Sequence[Prompt], seeds: Sequence[int],
          concepts: Sequence[Sequence[str]], *, guide: sampler_lib.Guidance | None, cfg: float,
          scale: float, keep_maps: bool = False) -> Generated:
    """Images (and maps) for parallel lists of prompts / seeds / concept words."""
    sample = self.sampler(guide)
    steps = sampler_lib.step_size_schedule(scale, self.num_steps)
    images, maps = [], []
    n = len(prompts)
    for lo in range(0, n, self.batch):
      idx = np.arange(lo, lo + self.batch) % n  # pad the last chunk with repeats
      batch = self.batch_of([prompts[i] for i in idx], [seeds[i] for i in idx],
                            [concepts[i] for i in idx])
      out = sample(self.params, batch, cfg_scale=cfg, step_sizes=steps)
      take = min(self.batch, n - lo)
      images.append(sampler_lib.to_uint8(out.images)[:take])
      if keep_maps and out.maps is not None:
        maps.append(np.asarray(out.maps)[:take])
    return Generated(np.concatenate(images), np.concatenate(maps) if maps else None)

  def score(self, prompts: Sequence[Prompt], seeds: Sequence[int], *,
            guide: sampler_lib.Guidance | None, cfg: float, scale: float,
            concepts: Callable[[Prompt], list[str]] = nouns) -> dict[str, np.ndarray]:
    """`evaluate.score` of every (prompt, seed) of the grid, prompt-major."""
    ps, ss = grid(prompts, seeds)
    images = self.run(ps, ss, [concepts(p) for p in ps], guide=guide, cfg=cfg,
                      scale=scale).images
    return evaluate.score(images, ps)

  def time_ratio(self, guide: sampler_lib.Guidance, cfg: float, scale: float,
                 repeats: int) -> Timing:
    """Median wall time of guided vs unguided sampling of one batch (compile excluded)."""
    prompts = [('red', 'circle'), ('blue', 'square')]
    tokens = np.stack([shapes.tokenize(shapes.caption(prompts))] * self.batch)
    batch = {'noise': np.asarray(jax.random.normal(jax.random.key(0), (self.batch, 32, 32, 3))),
             'tokens': tokens,
             'text_mask': tokens_lib.text_mask(tokens, start_id=START, end_id=END),
             'token_indices': tokens_lib.concept_indices(
                 tokens, [['circle', 'square']] * self.batch, shapes.VOCAB)}
    steps = sampler_lib.step_size_schedule(scale, self.num_steps)
    times = {}
    for name, g in (('unguided', None), ('guided', guide)):
      fn = self.sampler(g)
      run = lambda: jax.block_until_ready(fn(self.params, batch, cfg_scale=cfg,
                                             step_sizes=steps))
      run()
      ts = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t0)
      times[name] = float(np.median(ts))
    return Timing(times['unguided'], times['guided'])


@dataclasses.dataclass(frozen=True)
class Tuning:
  """What the tuning seeds chose, and the success rates behind each choice."""
  cfg: float
  scales: dict[str, float]  # arm -> chosen step-size scale
  record: dict  # JSON: 'cfg', 'scale', 'baseline_seen_combinations', ...


def tune(runner: Runner, guides: Mapping[str, sampler_lib.Guidance],
         scale_grids: Mapping[str, Sequence[float]], *, cfg_grid: Sequence[float],
         num_prompts: int, num_seeds: int, seed: int, screen_only: bool = False) -> Tuning:
  """Chooses the CFG weight (baseline success) then each arm's scale, on tuning seeds only.

  A grid of one value is taken without sampling (unless `screen_only`, which
  scores the baseline at every CFG weight and runs no guided arm).
  """
  prompts = two_object_prompts(num_prompts, seed)
  seeds = list(range(TUNE_SEED_OFFSET, TUNE_SEED_OFFSET + num_seeds))
  success = lambda guide, cfg, scale: float(runner.score(
      prompts, seeds, guide=guide, cfg=cfg, scale=scale)['success'].mean())
  record: dict = {'cfg': {}, 'scale': {}}
  for cfg in (cfg_grid if len(cfg_grid) > 1 or screen_only else ()):
    record['cfg'][str(cfg)] = success(None, cfg, 0.0)
  cfg = float(max(cfg_grid, key=lambda c: record['cfg'].get(str(c), 0.0)))
  if record['cfg']:
    seen = two_object_prompts(num_prompts, seed, held_out=False)
    record['baseline_seen_combinations'] = float(
        runner.score(seen, seeds, guide=None, cfg=cfg, scale=0.0)['success'].mean())
  single_seeds = seeds[:min(num_seeds, 20)]
  record['baseline_single_object_success'] = float(runner.score(
      SINGLE_PROMPTS, single_seeds, guide=None, cfg=cfg, scale=0.0)['success'].mean())
  scales = {}
  for name, guide in ({} if screen_only else guides).items():
    grid_ = scale_grids[name]
    record['scale'][name] = {}
    for scale in (grid_ if len(grid_) > 1 else ()):
      record['scale'][name][str(scale)] = success(guide, cfg, scale)
    scales[name] = float(max(grid_, key=lambda s: record['scale'][name].get(str(s), 0.0)))
  return Tuning(cfg, scales, record)


def paired_arms(guides: Mapping[str, sampler_lib.Guidance], scales: Mapping[str, float]
              ) -> dict[str, tuple[sampler_lib.Guidance | None, float, Callable]]:
  """The test arms: name -> (guidance, scale, concepts); the baseline first, and the
  control `astar_non_concept` (A-STAR on the article tokens) when A-STAR is an arm."""
  arms = {'baseline': (None, 0.0, nouns)}
  arms.update({name: (guides[name], scales[name], nouns) for name in guides})
  if 'astar' in guides:
    arms['astar_non_concept'] = (guides['astar'], scales['astar'], articles)
  return arms


def summarize(two: Mapping[str, dict], single: Mapping[str, dict],
              prompts: Sequence[Prompt], seeds_per_prompt: int) -> tuple[dict, dict]:
  """(success, presence and binding per arm and per-prompt success; McNemar tests), JSON."""
  out: dict = {
      'two_object_success': {k: float(v['success'].mean()) for k, v in two.items()},
      'per_object_presence': {k: float(v['presence'].mean()) for k, v in two.items()},
      'binding_accuracy': {k: float(np.nanmean(v['binding'])) if np.isfinite(v['binding']).any()
                           else float('nan') for k, v in two.items()},
      'single_object_success': {k: float(v['success'].mean()) for k, v in single.items()},
      'two_object_success_per_prompt': {
          name: {shapes.caption(p): float(
              v['success'][i * seeds_per_prompt:(i + 1) * seeds_per_prompt].mean())
                 for i, p in enumerate(prompts)} for name, v in two.items()},
  }
  tests: dict = {}
  for name in two:
    if name != 'baseline':
      test = evaluate.mcnemar(two[name]['success'], two['baseline']['success'])
      tests[f'mcnemar_p_{name}_vs_baseline'] = test['p']
      tests[f'mcnemar_{name}_vs_baseline'] = test
  if 'astar' in two and 'attend_excite' in two:
    tests['mcnemar_p_astar_vs_attend_excite'] = evaluate.mcnemar(
        two['astar']['success'], two['attend_excite']['success'])['p']
  return out, tests


def save_figure(path: str, baseline: np.ndarray, guided: np.ndarray, maps: np.ndarray,
                prompts: Sequence[Prompt], seeds_per_prompt: int) -> None:
  """PNG grid: per prompt and seed, the baseline and A-STAR images and A-STAR's concept maps."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows, cols = len(prompts), seeds_per_prompt
  fig, axes = plt.subplots(rows * 2, cols * 3, figsize=(1.3 * cols * 3, 1.4 * rows * 2),
                           squeeze=False)
  for r, prompt in enumerate(prompts):
    for s in range(cols):
      i = r * cols + s
      for k, (img, label) in enumerate(((baseline[i], 'baseline'), (guided[i], 'A-STAR'))):
        ax = axes[2 * r + k, 3 * s]
        ax.imshow(img)
        ax.set_title(label if s == 0 else '', fontsize=6)
      for m in range(2):
        ax = axes[2 * r + 1, 3 * s + 1 + m]
        ax.imshow(maps[i, ..., m], cmap='viridis')
        ax.set_title(prompt[m][1], fontsize=6)
    axes[2 * r, 0].set_ylabel(shapes.caption(prompt), fontsize=5)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
