"""lossland: studying and shaping loss landscapes and representations in JAX.

Subpackages: `models`, `data`, `parallel`, `train` (shared machinery), `interop`
(Hugging Face folders in and out), `taps` (the way into any linen model) and the
method modules `curvature`, `stitching`, `guidance`, `lowrank`.

Everything here is imported lazily (PEP 562): `import lossland.curvature`
loads curvature and what it needs, not every subpackage's dependencies
(tensorflow_datasets, orbax, PIL); `lossland.fit` imports `lossland.train` on
first use. `lossland.UserError` (`lossland.errors`) is the `ValueError` raised
for input a user can fix; the launchers print it as one line.
"""
import importlib

__version__ = '0.1.0'

SUBPACKAGES = ('curvature', 'data', 'guidance', 'interop', 'lowrank', 'models', 'parallel',
               'stitching', 'taps', 'train')
# Top-level shortcuts: name -> the subpackage (or module) that defines it.
SHORTCUTS = {
    'lm_batch': 'data', 'load_image_dataset': 'data', 'load_text_file': 'data',
    'load_tfds_text': 'data',
    'CNN': 'models', 'MLP': 'models', 'TransformerLM': 'models', 'ViT': 'models',
    'make_mesh': 'parallel', 'param_shardings': 'parallel', 'shard_batch': 'parallel',
    'adamw': 'train', 'fit': 'train', 'next_token_loss': 'train', 'warmup_cosine': 'train',
    'UserError': 'errors',
}

__all__ = sorted(SUBPACKAGES + tuple(SHORTCUTS))


def __getattr__(name: str):
  if name in SUBPACKAGES:
    return importlib.import_module(f'lossland.{name}')
  if name in SHORTCUTS:
    return getattr(importlib.import_module(f'lossland.{SHORTCUTS[name]}'), name)
  raise AttributeError(f'module lossland has no attribute {name!r}')


def __dir__():
  return __all__
