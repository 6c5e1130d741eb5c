"""Procedurally rendered coloured shapes with captions, and a deterministic detector.

The task behind `lossland.guidance` (A-STAR, Agarwal et al. ICCV 2023;
Attend-and-Excite, Chefer et al. 2023): 32x32 RGB images of one or two
non-overlapping shapes (circle, square, triangle) in one of five palette
colours on black, captioned "a red circle" or "a red circle and a blue
square". Two-object scenes are a minority (`TWO_OBJECT_FRACTION`) and the
colour-shape pairs in `HELD_OUT_PAIRS` never appear in two-object scenes, so a
small text-to-image model trained on it neglects concepts in two-object
prompts, which is the failure mode the attention losses target.

* `sample_scene(rng)`, `render(objects)`: the generator (numpy, exact,
  unantialiased pixels in palette colours).
* `detect(image)`: palette segmentation -> connected components -> shape by
  the fill ratio of the bounding box. Exact on ground-truth renders (tested)
  and tolerant to the noise of generated samples.
* `ShapesBuilder`: the TFDS builder (`shapes32`, no download, no TensorFlow);
  `render_dataset(n, seed)` gives the same kind of arrays without TFDS.
* `tokenize(caption)`: the word-level caption tokenizer with start (`<s>`)
  and end (`</s>`) tokens, padded to `MAX_TOKENS`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
COLORS: dict[str, tuple[int, int, int]] = {
    'red': (230, 30, 30), 'green': (30, 200, 40), 'blue': (40, 80, 240),
    'yellow': (240, 230, 30), 'purple': (190, 50, 230)}
COLOR_NAMES = tuple(COLORS)
SHAPES = ('circle', 'square', 'triangle')
BACKGROUND = (0, 0, 0)
TWO_OBJECT_FRACTION = 0.3
HALF_SIZES = (5, 6, 7)  # half the bounding-box side, so boxes are 11, 13 or 15 px
# One held-out pair per colour; each shape is held out with at least one colour.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ('red', 'circle'), ('green', 'square'), ('blue', 'triangle'), ('yellow', 'circle'),
    ('purple', 'square'))

PAD, START, END = '<pad>', '<s>', '</s>'
VOCAB: tuple[str, ...] = (PAD, START, END, 'a', 'and') + COLOR_NAMES + SHAPES
MAX_TOKENS = 10  # <s> a red circle and a blue square </s> <pad>

Object = tuple[str, str]  # (colour, shape)


def caption(objects: Sequence[Object]) -> str:
  """'a red circle' or 'a red circle and a blue square'."""
  return ' and '.join(f'a {c} {s}' for c, s in objects)


def parse_caption(text: str) -> list[Object]:
  """Inverse of `caption`; raises ValueError naming the unknown word."""
  objects = []
  for part in text.strip().split(' and '):
    words = part.split()
    if len(words) != 3 or words[0] != 'a' or words[1] not in COLORS or words[2] not in SHAPES:
      raise ValueError(f'cannot parse {part!r} in caption {text!r}; expected "a <colour> <shape>" '
                       f'with colours {COLOR_NAMES} and shapes {SHAPES}, joined by " and "')
    objects.append((words[1], words[2]))
  return objects


def tokenize(text: str, max_tokens: int = MAX_TOKENS) -> np.ndarray:
  """Word ids `[<s>, words..., </s>, <pad>...]` of length `max_tokens` (int32).

  The empty string gives the null caption `<s> </s>` used for classifier-free
  guidance.
  """
  words = text.split()
  unknown = [w for w in words if w not in VOCAB]
  if unknown:
    raise ValueError(f'words {unknown} are not in the caption vocabulary {VOCAB[3:]}')
  ids = [VOCAB.index(START)] + [VOCAB.index(w) for w in words] + [VOCAB.index(END)]
  if len(ids) > max_tokens:
    raise ValueError(f'caption {text!r} needs {len(ids)} tokens, more than max_tokens={max_tokens}')
  return np.array(ids + [VOCAB.index(PAD)] * (max_tokens - len(ids)), np.int32)


def _shape_mask(shape: str, cy: int, cx: int, r: int, size: int = IMAGE_SIZE) -> np.ndarray:
  y, x = np.mgrid[:size, :size]
  dy, dx = y - cy, x - cx
  if shape == 'circle':
    return dy * dy + dx * dx <= (r + 0.5) ** 2
  if shape == 'square':
    return (np.abs(dy) <= r) & (np.abs(dx) <= r)
  if shape == 'triangle':  # apex up; row k (0 at the apex) has half-width floor(k / 2)
    k = dy + r
    return (k >= 0) & (k <= 2 * r) & (np.abs(dx) <= k // 2)
  raise ValueError(f'unknown shape {shape!r}; available: {SHAPES}')


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[Object, ...]
  boxes: tuple[tuple[int, int, int], ...]  # (cy, cx, r) per object


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
  """uint8 image [size, size, 3]: palette-coloured shapes on black."""
  image = np.zeros((size, size, 3), np.uint8)
  image[:] = BACKGROUND
  for (colour, shape), (cy, cx, r) in zip(scene.objects, scene.boxes):
    image[_shape_mask(shape, cy, cx, r, size)] = COLORS[colour]
  return image


def _place(rng: np.random.Generator, count: int, size: int) -> tuple[tuple[int, int, int], ...]:
  """Bounding boxes inside the image, separated by at least a 2-pixel gap."""
  while True:
    boxes = []
    for _ in range(count):
      r = int(rng.choice(HALF_SIZES))
      boxes.append((int(rng.integers(r + 1, size - r - 1)), int(rng.integers(r + 1, size - r - 1)),
                    r))
    if count == 1:
      return tuple(boxes)
    (y0, x0, r0), (y1, x1, r1) = boxes
    if abs(y0 - y1) > r0 + r1 + 2 or abs(x0 - x1) > r0 + r1 + 2:
      return tuple(boxes)


def sample_objects(rng: np.random.Generator, two: bool) -> tuple[Object, ...]:
  """One random pair, or two with distinct colours and neither in `HELD_OUT_PAIRS`."""
  if not two:
    return ((COLOR_NAMES[rng.integers(5)], SHAPES[rng.integers(3)]),)
  while True:
    c0, c1 = rng.choice(len(COLOR_NAMES), 2, replace=False)
    objects = ((COLOR_NAMES[c0], SHAPES[rng.integers(3)]),
               (COLOR_NAMES[c1], SHAPES[rng.integers(3)]))
    if not any(o in HELD_OUT_PAIRS for o in objects):
      return objects


def sample_scene(rng: np.random.Generator, *, two_object_fraction: float = TWO_OBJECT_FRACTION,
                 size: int = IMAGE_SIZE) -> Scene:
  objects = sample_objects(rng, bool(rng.random() < two_object_fraction))
  return Scene(objects, _place(rng, len(objects), size))


def render_dataset(n: int, seed: int, *, two_object_fraction: float = TWO_OBJECT_FRACTION
                   ) -> dict[str, np.ndarray]:
  """`n` scenes without TFDS: {'image' uint8 [n,32,32,3], 'tokens' int32 [n, MAX_TOKENS],
  'objects' int32 [n, 2, 2] (colour id, shape id; -1 pads single objects)}."""
  rng = np.random.default_rng(seed)
  images, tokens, objects = [], [], []
  for _ in range(n):
    scene = sample_scene(rng, two_object_fraction=two_object_fraction)
    images.append(render(scene))
    tokens.append(tokenize(caption(scene.objects)))
    objects.append(encode_objects(scene.objects))
  return {'image': np.stack(images), 'tokens': np.stack(tokens), 'objects': np.stack(objects)}


def encode_objects(objects: Sequence[Object]) -> np.ndarray:
  out = -np.ones((2, 2), np.int32)
  for i, (c, s) in enumerate(objects):
    out[i] = (COLOR_NAMES.index(c), SHAPES.index(s))
  return out


# ---------------------------------------------------------------- detector

@dataclasses.dataclass(frozen=True)
class Detection:
  colour: str
  shape: str
  area: int
  fill: float  # area / bounding-box area
  box: tuple[int, int, int, int]  # y0, x0, y1, x1 (inclusive)


def classify_fill(fill: float) -> str:
  """Shape from the fill ratio of the bounding box: square ~1, circle ~0.8, triangle ~0.5."""
  if fill >= 0.9:
    return 'square'
  if fill >= 0.64:
    return 'circle'
  return 'triangle'


def segment(image: np.ndarray, *, max_distance: float = 110.0) -> np.ndarray:
  """Palette index per pixel: -1 background, else index into `COLOR_NAMES`.

  A pixel takes its nearest palette colour (background included) if that is
  within `max_distance` (RGB units of 0..255); otherwise it is background.
  `image` is uint8 [H, W, 3] or float in [0, 1].
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.clip(np.asarray(image, np.float32), 0, 1) * 255.0
  palette = np.array([BACKGROUND] + [COLORS[c] for c in COLOR_NAMES], np.float32)  # [6, 3]
  dist = np.linalg.norm(image[..., None, :].astype(np.float32) - palette, axis=-1)  # [H, W, 6]
  nearest = dist.argmin(-1)
  nearest = np.where(dist.min(-1) <= max_distance, nearest, 0)
  return nearest - 1


def detect(image: np.ndarray, *, min_area: int = 20, max_distance: float = 110.0
           ) -> list[Detection]:
  """Objects in one image: palette segmentation, 4-connected components, fill-ratio shape.

  Components smaller than `min_area` pixels (noise, stray edges) are dropped.
  Deterministic and exact on `render` output (see tests).
  """
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  labels = segment(image, max_distance=max_distance)
  found = []
  for ci, colour in enumerate(COLOR_NAMES):
    components, count = ndimage.label(labels == ci)
    if not count:
      continue
    for k, sl in enumerate(ndimage.find_objects(components), start=1):
      area = int((components[sl] == k).sum())
      if area < min_area:
        continue
      h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
      fill = area / float(h * w)
      found.append(Detection(colour, classify_fill(fill), area, fill,
                             (sl[0].start, sl[1].start, sl[0].stop - 1, sl[1].stop - 1)))
  return found


# ---------------------------------------------------------------- TFDS builder

class ShapesBuilder(tfds.core.GeneratorBasedBuilder):
  """`shapes32`: captioned renders of one or two coloured shapes (see module docstring).

  train: 30,000 scenes (seed 0); test: 2,000 scenes (seed 1). Two-object
  scenes are 30% and never contain a pair from `HELD_OUT_PAIRS`.
  """

  name = 'shapes32'
  VERSION = tfds.core.Version('1.0.0')
  SPLIT_SIZES = {'train': (30_000, 0), 'test': (2_000, 1)}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='32x32 renders of one or two coloured shapes with captions (lossland).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            'caption': tfds.features.Text(),
            'objects': tfds.features.Tensor(shape=(2, 2), dtype=np.int32)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(n, seed)
            for name, (n, seed) in self.SPLIT_SIZES.items()}

  def _generate_examples(self, n: int, seed: int):
    import PIL.Image  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(seed)
    for i in range(n):
      scene = sample_scene(rng)
      yield i, {'image': PIL.Image.fromarray(render(scene)), 'caption': caption(scene.objects),
                'objects': encode_objects(scene.objects)}
