"""Digit pairs: two 8x8 digits side by side ([8, 16, 1] images), label (d1 + d2) mod 10.

A procedural task built from the embedded `sklearn_digits` dataset, hard
enough that stitching accuracy separates layers (on single digits nearly every
stitch scores alike; docs/results/stitching.md). Train pairs use only training digits and test
pairs only test digits; pairs are drawn with a fixed seed.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DigitPairs:
  train_images: np.ndarray  # [n_train, 8, 16, 1] float32 in [0, 1]
  train_labels: np.ndarray  # [n_train] int32, (d1 + d2) mod 10
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int = 10


def make_pairs(images: np.ndarray, labels: np.ndarray, count: int, seed: int
               ) -> tuple[np.ndarray, np.ndarray]:
  """`count` random pairs (i, j) of `images` [n, 8, 8, 1] -> ([count, 8, 16, 1], [count])."""
  rng = np.random.default_rng(seed)
  i = rng.integers(0, len(images), count)
  j = rng.integers(0, len(images), count)
  x = np.concatenate([images[i], images[j]], axis=2).astype(np.float32)
  y = ((labels[i] + labels[j]) % 10).astype(np.int32)
  return x, y


def load_digit_pairs(num_train: int = 20000, num_test: int = 4000, *, seed: int = 0,
                     data_dir: str | None = None) -> DigitPairs:
  """Builds the pairs dataset from `load_image_dataset('sklearn_digits')`."""
  if num_train <= 0 or num_test <= 0:
    raise ValueError(f'num_train={num_train} and num_test={num_test} must be positive')
  from lossland.data import load_image_dataset  # pylint: disable=g-import-not-at-top
  # (imported here: `import lossland.stitching` does not pull in tensorflow_datasets)
  digits = load_image_dataset('sklearn_digits', data_dir=data_dir)
  train_x, train_y = make_pairs(digits.train_images, digits.train_labels, num_train, seed)
  test_x, test_y = make_pairs(digits.test_images, digits.test_labels, num_test, seed + 1)
  return DigitPairs(train_x, train_y, test_x, test_y)
