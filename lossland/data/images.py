"""In-memory image classification datasets and deterministic epoch batches."""
from __future__ import annotations

import dataclasses

import numpy as np

from lossland.data import shapes, sources


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  train_images: np.ndarray  # [n, H, W, C] float32 in [0, 1]
  train_labels: np.ndarray  # [n] int32
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int


def _read(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  source = sources.data_source(name, split, data_dir=data_dir)
  examples = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(e['image']) for e in examples]).astype(np.float32) / 255.0
  labels = np.array([int(e['label']) for e in examples], np.int32)
  return images, labels


def load_image_dataset(name: str = 'sklearn_digits', *, data_dir: str | None = None,
                       test_split: str = 'test') -> ImageDataset:
  """Loads `sklearn_digits` (embedded) or a catalog dataset (`mnist`, `cifar10`)."""
  train_x, train_y = _read(name, 'train', data_dir)
  test_x, test_y = _read(name, test_split, data_dir)
  return ImageDataset(train_x, train_y, test_x, test_y,
                      int(max(train_y.max(), test_y.max())) + 1)


def epoch_indices(step: int, *, batch_size: int, num_examples: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Example indices of this process's rows of global batch `step`.

  Global example slot `step * batch_size + r` falls in epoch `slot // n`, whose
  order is a permutation seeded by `(seed, epoch)`: every example is seen once
  per epoch, and the position is just the step number.
  """
  if num_examples < batch_size:
    raise ValueError(f'the dataset has {num_examples} examples, fewer than one batch of '
                     f'{batch_size}; lower batch_size')
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} is not divisible by {process_count} processes')
  local = batch_size // process_count
  slots = step * batch_size + process_index * local + np.arange(local)
  epochs, offsets = np.divmod(slots, num_examples)
  out = np.empty(local, np.int64)
  for epoch in np.unique(epochs):
    order = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
    out[epochs == epoch] = order[offsets[epochs == epoch]]
  return out


def load_shapes(split: str = 'train', *, data_dir: str | None = None) -> dict[str, np.ndarray]:
  """Reads a `shapes32` split (built on first use) into the arrays of `render_dataset`."""
  source = sources.data_source('shapes32', split, data_dir=data_dir)
  examples = [source[i] for i in range(len(source))]
  captions = [e['caption'].decode() if isinstance(e['caption'], bytes) else str(e['caption'])
              for e in examples]
  return {'image': np.stack([np.asarray(e['image']) for e in examples]).astype(np.uint8),
          'tokens': np.stack([shapes.tokenize(c) for c in captions]),
          'objects': np.stack([np.asarray(e['objects'], np.int32) for e in examples])}
