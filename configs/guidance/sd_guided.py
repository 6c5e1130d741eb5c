"""Attention guidance on a local Stable Diffusion folder: every arm on the same seeds.

    python -m launch.analyze --config=configs/guidance/sd_guided.py \
        --config.model.path=/ckpts/stable-diffusion-v1-5 --workdir=/tmp/sd_guided

Arms (`lossland.guidance.sd`, each with its paper's settings): baseline (CFG
7.5), Attend-and-Excite (with its refinement), A-STAR and Divide & Bind, 50
steps of the folder's scheduler, 16x16 maps. Prompts come from `prompts_file`
('prompt | word, word' lines; default: A&E-style prompts in
configs/guidance/sd_prompts.txt), each sampled with `num_seeds` seeds shared by
all arms. Writes results.json (per arm: final guidance loss, sampling seconds,
guided/unguided time), images.npz (uint8 images and concept maps per arm), and
sd_grid.png. Nothing is downloaded: `model.path` is a diffusers folder on disk.

`:runlocal`: 2 prompts x 2 seeds, 4 steps, on `model.path` (the tests give a
tiny random folder; default tests/fixtures/sd/tiny_sd1).
"""
import ml_collections


def get_config(arg=None):
  if arg not in (None, 'runlocal'):
    raise ValueError(f'unknown config arg {arg!r}; use runlocal or nothing')
  local = arg == 'runlocal'
  c = ml_collections.ConfigDict()
  c.experiment = 'guidance_sd'
  c.model = ml_collections.ConfigDict(dict(path='tests/fixtures/sd/tiny_sd1' if local else '',
                                           dtype='float32'))
  c.prompts_file = '' if local else 'configs/guidance/sd_prompts.txt'
  # Used when prompts_file is empty: the same 'prompt | word, word' lines.
  c.prompts = ('a cat and a dog | cat, dog', 'a red ball on a blue bench | ball, bench')
  c.arms = ('baseline', 'attend_excite', 'astar', 'divide_bind')
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.sampling = ml_collections.ConfigDict(dict(
      num_seeds=2 if local else 4, first_seed=0, num_steps=4 if local else 50, cfg_scale=7.5,
      repeats=1, multi_token='error'))
  return c
