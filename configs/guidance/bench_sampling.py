"""Guided (A-STAR) over unguided sampling time, same batch and DDIM steps.

    python -m launch.bench --config=configs/guidance/bench_sampling.py

Default: the committed UNet, batch 32, 20 DDIM steps with CFG, A-STAR on the
first 5. `:runlocal`: a random tiny UNet, batch 4, 4 steps.
"""
import importlib.util
import os


def _eval_config(arg):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shapes_eval.py')
  spec = importlib.util.spec_from_file_location('shapes_eval_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  if arg not in (None, 'runlocal'):
    raise ValueError(f'unknown config arg {arg!r}; use runlocal or nothing')
  c = _eval_config('runlocal' if arg == 'runlocal' else 'cpu')
  c.bench = 'guidance_sampling'
  c.model_dir = '' if arg == 'runlocal' else 'lossland/guidance/assets/shapes_unet'
  c.sampling.batch_size = 4 if arg == 'runlocal' else 32
  c.eval.timing_repeats = 1 if arg == 'runlocal' else 3
  return c
