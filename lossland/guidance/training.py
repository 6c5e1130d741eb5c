"""Training data of the shapes32 `TextUNet` (DDPM ε-prediction, Ho et al. 2020).

`shapes_train_data` gives the training scenes of `launch/experiments/guidance_train.py`
(which trains with `lossland.train.fit`, its EMA and time budget).
"""
from __future__ import annotations

from lossland import data as data_lib
from lossland.data import shapes

SOURCES = ('shapes32', 'generate')


def shapes_train_data(source: str = 'shapes32', *, num_examples: int = 0, seed: int = 0,
                      two_object_fraction: float = shapes.TWO_OBJECT_FRACTION,
                      data_dir: str | None = None) -> dict:
  """The training scenes: the `shapes32` builder's train split, or freshly rendered ones.

  Args:
    source: 'shapes32' (the TFDS builder, built on first use; its two-object
      fraction is fixed at `shapes.TWO_OBJECT_FRACTION`) or 'generate' (the
      same renderer without TFDS: `num_examples` scenes, `two_object_fraction`
      of them two-object, rendered with `seed`).
  Returns:
    {'image': uint8 [n, 32, 32, 3], 'tokens': int [n, T], 'objects': ...}.
  """
  if source == 'generate':
    if not num_examples:
      raise ValueError("data.source='generate' renders train.num_examples scenes; set "
                       '--config.train.num_examples (e.g. 30000)')
    return shapes.render_dataset(num_examples, seed=seed, two_object_fraction=two_object_fraction)
  if source != 'shapes32':
    raise ValueError(f'unknown data.source {source!r}; use one of {SOURCES}')
  if two_object_fraction != shapes.TWO_OBJECT_FRACTION:
    raise ValueError(f'the shapes32 builder has two_object_fraction '
                     f'{shapes.TWO_OBJECT_FRACTION}; for {two_object_fraction} use '
                     "--config.data.source=generate --config.train.num_examples=30000")
  return data_lib.load_shapes('train', data_dir=data_dir)
