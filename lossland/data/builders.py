"""TFDS builders for lossland's embedded datasets: nothing is downloaded.

* `pydoc_text`: real English text that ships with every CPython install: the
  documentation topics in `pydoc_data.topics` (79 topics, ~465k characters).
  One example per topic in each split: the first 90% of each topic's
  characters (cut at a line break) are train, the rest validation.
* `python_stdlib`: a corpus large enough for pre-training comparisons that
  must stay under one epoch: the `.py` files of the running CPython's
  standard library (test suites, `idlelib`, the codec tables in `encodings`
  and `site-packages` left out; 9.9 MB on CPython 3.11). One example per
  file; every 20th file in sorted path order is validation, so validation
  files are never seen in training. The content depends on the CPython that
  builds it (its version is in the dataset description).
* `sklearn_digits`: the 1,797 8x8 handwritten digits bundled with
  scikit-learn (Alpaydin & Kaynak 1998), pixel values 0..16 rescaled to
  0..255; every fifth image is test.

`shapes32` (procedural coloured shapes with captions, for `lossland.guidance`)
lives in `shapes.py`. All write array_record files and are read with `as_data_source()`, so
TensorFlow is never needed. Images are given to TFDS as PIL images, which it
encodes with pillow when TensorFlow is absent.
"""
from __future__ import annotations

import pathlib
import platform
import sysconfig

import numpy as np
import tensorflow_datasets as tfds

from lossland.data.shapes import ShapesBuilder


class PydocText(tfds.core.GeneratorBasedBuilder):
  """Python's bundled documentation topics as plain text documents."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='CPython documentation topics (pydoc_data.topics).',
        features=tfds.features.FeaturesDict({'topic': tfds.features.Text(),
                                             'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(validation=False),
            'validation': self._generate_examples(validation=True)}

  def _generate_examples(self, validation: bool):
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top
    for name in sorted(topics.topics):
      text = topics.topics[name]
      cut = text.find('\n', int(len(text) * 0.9))
      cut = len(text) if cut < 0 else cut + 1
      part = text[cut:] if validation else text[:cut]
      if part:
        yield name, {'topic': name, 'text': part}


_STDLIB_SKIP = frozenset({'test', 'tests', 'idle_test', 'idlelib', 'site-packages', '__pycache__',
                           'encodings'})


def stdlib_source_files() -> list[str]:
  """Relative paths of the standard library's `.py` files that `python_stdlib` uses."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  paths = (p.relative_to(root) for p in root.rglob('*.py'))
  return sorted(str(p) for p in paths if not _STDLIB_SKIP.intersection(p.parts))


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
  """The running CPython's standard-library source files as plain text documents."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Standard-library sources of CPython {platform.python_version()}.',
        features=tfds.features.FeaturesDict({'path': tfds.features.Text(),
                                             'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(validation=False),
            'validation': self._generate_examples(validation=True)}

  def _generate_examples(self, validation: bool):
    root = pathlib.Path(sysconfig.get_paths()['stdlib'])
    for i, rel in enumerate(stdlib_source_files()):
      if (i % 20 == 19) != validation:
        continue
      text = (root / rel).read_text(encoding='utf-8', errors='replace')
      if text.strip():
        yield rel, {'path': rel, 'text': text}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's bundled 8x8 handwritten digits."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='8x8 handwritten digits bundled with scikit-learn.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(num_classes=10)}),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(test=False),
            'test': self._generate_examples(test=True)}

  def _generate_examples(self, test: bool):
    import PIL.Image  # pylint: disable=g-import-not-at-top
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for i, (image, label) in enumerate(zip(images, digits.target)):
      if (i % 5 == 4) == test:
        yield i, {'image': PIL.Image.fromarray(image, mode='L'), 'label': int(label)}


EMBEDDED = {'pydoc_text': PydocText, 'python_stdlib': PythonStdlib, 'sklearn_digits': SklearnDigits,
            'shapes32': ShapesBuilder}
