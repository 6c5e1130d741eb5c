"""Random-access data sources: embedded builders (prepared on first use) and
TFDS catalog datasets (which the user prepares). No TensorFlow involved."""
from __future__ import annotations

import os
from typing import Any

import tensorflow_datasets as tfds

from lossland.data import builders


def default_data_dir() -> str:
  """`$LOSSLAND_DATA_DIR`, else TFDS's own default (`~/tensorflow_datasets`)."""
  return os.environ.get('LOSSLAND_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def data_source(name: str, split: str, *, data_dir: str | None = None) -> Any:
  """Returns a random-access source (`len`, `__getitem__`) of one split.

  Embedded datasets (`pydoc_text`, `sklearn_digits`, and any builder a module
  registers in `builders.EMBEDDED`) are generated locally the first time.
  Catalog datasets (`tiny_shakespeare`, `mnist`, `cifar10`, `c4`, ...) must
  already be prepared in `data_dir` in array_record format.
  """
  data_dir = data_dir or default_data_dir()
  if name in builders.EMBEDDED:
    builder = builders.EMBEDDED[name](data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared():
      tfds.disable_progress_bar()
      builder.download_and_prepare()
    sources = builder.as_data_source()
    if split not in sources:
      raise ValueError(f'dataset {name!r} has no split {split!r}; available: {sorted(sources)}')
    return sources[split]
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f'unknown dataset {name!r}. Embedded datasets: {sorted(builders.EMBEDDED)}; '
        'otherwise give a TFDS catalog name (e.g. tiny_shakespeare, mnist, cifar10, c4).') from e
  except (AssertionError, FileNotFoundError, NotImplementedError) as e:
    raise ValueError(
        f'dataset {name!r} split {split!r} is not prepared in {data_dir}. Prepare it on a machine '
        f'with internet access (e.g. `tfds build {name} --file_format=array_record '
        f'--data_dir={data_dir}`) or set --config.data.data_dir to where it lives.') from e
