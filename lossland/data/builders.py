"""TFDS builders for lossland's embedded datasets: nothing is downloaded.

* `pydoc_text`: real English text that ships with every CPython install: the
  documentation topics in `pydoc_data.topics` (79 topics, ~465k characters).
  One example per topic in each split: the first 90% of each topic's
  characters (cut at a line break) are train, the rest validation.
* `sklearn_digits`: the 1,797 8x8 handwritten digits bundled with
  scikit-learn (Alpaydin & Kaynak 1998), pixel values 0..16 rescaled to
  0..255; every fifth image is test.

`shapes32` (procedural coloured shapes with captions, for `lossland.guidance`)
lives in `shapes.py`. All write array_record files and are read with `as_data_source()`, so
TensorFlow is never needed. Images are given to TFDS as PIL images, which it
encodes with pillow when TensorFlow is absent.
"""
from __future__ import annotations

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


EMBEDDED = {'pydoc_text': PydocText, 'sklearn_digits': SklearnDigits, 'shapes32': ShapesBuilder}
