"""Paired-seed runs of the guidance arms on Stable Diffusion: prompts file in, images, maps, times out.

A prompts file has one prompt per line with its concept words after a `|`:

    a cat and a dog | cat, dog
    a bear and a turtle | bear, turtle

(blank lines and lines starting with `#` are skipped). Every arm samples every
prompt with the same seeds, so arm k's image (prompt p, seed s) starts from the
same z_T as the baseline's: the comparison of Chefer et al. 2023, fig. 5, and
Agarwal et al. 2023, fig. 6. `compare_arms` runs each arm's batch in one
compiled scan and times it after compiling (median of `repeats`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from lossland.guidance import schedulers as schedulers_lib
from lossland.guidance import sd as sd_lib


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """One prompt and the words to guide in it."""
  prompt: str
  concepts: tuple[str, ...]


def parse_prompts(lines: Sequence[str], source: str = 'prompts') -> list[PromptSpec]:
  """`PromptSpec`s of 'prompt | word, word' lines (module docstring); one error per bad line."""
  specs, bad = [], []
  for n, line in enumerate(lines, 1):
    line = line.strip()
    if not line or line.startswith('#'):
      continue
    prompt, sep, words = line.partition('|')
    concepts = tuple(w.strip() for w in words.split(',') if w.strip())
    if not sep or not prompt.strip() or not concepts:
      bad.append(f'line {n}: {line!r}')
      continue
    specs.append(PromptSpec(prompt.strip(), concepts))
  if bad:
    raise ValueError(f'{source}: each line must be "prompt | word, word" (the concept words to '
                     f'guide after a |); these are not: {bad}')
  if not specs:
    raise ValueError(f'{source} has no prompts')
  return specs


def read_prompts(path: str) -> list[PromptSpec]:
  """`parse_prompts` of a file."""
  with open(path) as f:
    return parse_prompts(f.read().splitlines(), path)


@dataclasses.dataclass
class ArmRun:
  """One arm over the paired batch: samples and the median sampling time (compile excluded)."""
  samples: sd_lib.SDSamples
  seconds: float
  compile_seconds: float


def paired_batch(specs: Sequence[PromptSpec], seeds: Sequence[int]
                 ) -> tuple[list[str], list[list[str]], list[int]]:
  """(prompts, concepts, seeds) of every prompt x seed, prompt-major."""
  rows = [(s, seed) for s in specs for seed in seeds]
  return ([s.prompt for s, _ in rows], [list(s.concepts) for s, _ in rows],
          [int(seed) for _, seed in rows])


def compare_arms(sd: sd_lib.StableDiffusion, specs: Sequence[PromptSpec], seeds: Sequence[int],
                 arms: Sequence[str] = sd_lib.ARMS, *, num_steps: int = 50,
                 cfg_scale: float = 7.5, mesh: Mesh | None = None, repeats: int = 1,
                 multi_token: str = 'error',
                 scheduler: schedulers_lib.Scheduler | None = None) -> dict[str, ArmRun]:
  """Every arm on every (prompt, seed), decoded; arms share z_T. Concept errors come first.

  Arms sample with the folder's scheduler (`num_steps` steps), or with `scheduler`.
  """
  prompts, concepts, seed_list = paired_batch(specs, seeds)
  counts = {len(c) for c in concepts}
  if len(counts) != 1:
    raise ValueError(f'every prompt needs the same number of concept words to share one batch, '
                     f'got {sorted(counts)}; split the prompts file by count')
  sd_lib.concept_positions(sd.tokenizer, prompts, concepts, multi_token=multi_token)
  runs = {}
  for arm in arms:
    sampler = sd_lib.make_sd_sampler(sd, arm, num_steps=num_steps, mesh=mesh,
                                     scheduler=scheduler)
    kwargs = dict(seeds=seed_list, cfg_scale=cfg_scale, multi_token=multi_token)
    if arm != 'baseline':
      kwargs['concepts'] = concepts
    t0 = time.perf_counter()
    samples = sampler(prompts, decode=True, **kwargs)
    jax.block_until_ready(samples.images)
    compile_seconds = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(sampler(prompts, decode=False, **kwargs).latents)
      times.append(time.perf_counter() - t0)
    runs[arm] = ArmRun(samples, float(np.median(times)), compile_seconds)
  return runs


def to_uint8(images) -> np.ndarray:
  """[b, H, W, 3] images in about [-1, 1] as uint8 (diffusers' postprocessing)."""
  return np.asarray(np.clip((np.asarray(images, np.float32) + 1) * 127.5 + 0.5, 0, 255),
                    np.uint8)


def save_grid(path: str, runs: dict[str, ArmRun], specs: Sequence[PromptSpec],
              seeds: Sequence[int]) -> None:
  """PNG: a row per arm, a column per (prompt, seed); under each guided arm, its concept maps."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  prompts, concepts, seed_list = paired_batch(specs, seeds)
  rows = []
  for arm, run in runs.items():
    rows.append((arm, to_uint8(run.samples.images), None))
    if run.samples.maps is not None:
      for m in range(run.samples.maps.shape[-1]):
        rows.append((f'{arm} maps', np.asarray(run.samples.maps)[..., m], m))
  cols = len(prompts)
  fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.7 * len(rows)), squeeze=False)
  for r, (label, images, m) in enumerate(rows):
    for i in range(cols):
      ax = axes[r, i]
      ax.imshow(images[i], cmap=None if m is None else 'viridis')
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(f'{prompts[i]}\nseed {seed_list[i]}', fontsize=5)
      if m is not None:
        ax.set_xlabel(concepts[i][m], fontsize=5)
    axes[r, 0].set_ylabel(label, fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
