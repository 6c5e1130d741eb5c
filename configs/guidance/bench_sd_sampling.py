"""Guided (A-STAR, its paper's schedule) over unguided Stable Diffusion sampling time.

    python -m launch.bench --config=configs/guidance/bench_sd_sampling.py
    python -m launch.bench --config=configs/guidance/bench_sd_sampling.py \
        --config.model.path=/path/to/stable-diffusion-v1-5 --config.sampling.batch_size=8

Default: the tiny random SD 1.x folder tests/fixtures/sd/tiny_sd1 (PLMS, 50
steps = 51 model calls, A-STAR in the first 25, CFG 7.5), batch 8 over all
local devices, median of 3 runs each after compiling (about a minute on 2 CPU
cores). `:runlocal`: batch 2, 10 steps, 1 repeat (seconds). Result: one JSON
line with `guided_over_unguided_time` (issue 16 target: at most 2.0).
"""
import ml_collections


def get_config(arg=None):
  if arg not in (None, 'runlocal'):
    raise ValueError(f'unknown config arg {arg!r}; use runlocal or nothing')
  local = arg == 'runlocal'
  c = ml_collections.ConfigDict()
  c.bench = 'sd_sampling'
  c.model = ml_collections.ConfigDict(dict(path='tests/fixtures/sd/tiny_sd1'))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.arm = 'astar'
  c.prompts = ('a cat and a dog', 'a red ball on a blue bench')
  c.concepts = (('cat', 'dog'), ('ball', 'bench'))
  c.sampling = ml_collections.ConfigDict(dict(
      batch_size=2 if local else 8, num_steps=10 if local else 50, cfg_scale=7.5,
      repeats=1 if local else 3))
  return c
