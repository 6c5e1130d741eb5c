"""The shapes32 generator, caption tokenizer, TFDS builder and deterministic detector."""
import numpy as np
import pytest

from lossland.data import images, shapes


def _truth(objects_row):
  return sorted((shapes.COLOR_NAMES[c], shapes.SHAPES[s]) for c, s in objects_row if c >= 0)


def _found(image, **kw):
  return sorted((d.colour, d.shape) for d in shapes.detect(image, **kw))


def test_detector_is_exact_on_ground_truth_renders():
  data = shapes.render_dataset(600, seed=123)
  correct = [_found(img) == _truth(obj) for img, obj in zip(data['image'], data['objects'])]
  assert np.mean(correct) >= 0.99
  assert np.mean(correct) == 1.0  # exact in practice; the issue asks for >= 99%


def test_detector_tolerates_pixel_noise():
  data = shapes.render_dataset(200, seed=7)
  rng = np.random.default_rng(0)
  noisy = np.clip(data['image'] + rng.normal(0, 12, data['image'].shape), 0, 255).astype(np.uint8)
  correct = [_found(img) == _truth(obj) for img, obj in zip(noisy, data['objects'])]
  assert np.mean(correct) >= 0.99


def test_fill_ratios_separate_the_shapes():
  for r in shapes.HALF_SIZES:
    for shape in shapes.SHAPES:
      scene = shapes.Scene((('red', shape),), ((16, 16, r),))
      (det,) = shapes.detect(shapes.render(scene))
      assert det.shape == shape and det.colour == 'red'
      assert det.box == (16 - r, 16 - r, 16 + r, 16 + r)


def test_scene_statistics_and_held_out_pairs():
  rng = np.random.default_rng(0)
  scenes = [shapes.sample_scene(rng) for _ in range(2000)]
  two = [s for s in scenes if len(s.objects) == 2]
  assert 0.25 < len(two) / len(scenes) < 0.35
  assert not any(o in shapes.HELD_OUT_PAIRS for s in two for o in s.objects)
  singles = {s.objects[0] for s in scenes if len(s.objects) == 1}
  assert set(shapes.HELD_OUT_PAIRS) <= singles  # held out of pairs only, seen alone
  for s in two:  # no overlap: renders keep every pixel of both shapes
    image = shapes.render(s)
    assert _found(image) == sorted(s.objects)


def test_tokenize_and_parse_round_trip():
  text = 'a red circle and a blue square'
  ids = shapes.tokenize(text)
  assert ids.shape == (shapes.MAX_TOKENS,)
  words = [shapes.VOCAB[i] for i in ids]
  assert words == ['<s>', 'a', 'red', 'circle', 'and', 'a', 'blue', 'square', '</s>', '<pad>']
  assert shapes.parse_caption(text) == [('red', 'circle'), ('blue', 'square')]
  assert [shapes.VOCAB[i] for i in shapes.tokenize('')][:3] == ['<s>', '</s>', '<pad>']
  with pytest.raises(ValueError, match='not in the caption vocabulary'):
    shapes.tokenize('a pink circle')
  with pytest.raises(ValueError, match='cannot parse'):
    shapes.parse_caption('a red hexagon')


def test_tfds_builder_matches_the_generator(data_dir, monkeypatch):
  monkeypatch.setattr(shapes.ShapesBuilder, 'SPLIT_SIZES', {'train': (40, 0), 'test': (10, 1)})
  monkeypatch.setattr(shapes.ShapesBuilder, 'VERSION', shapes.tfds.core.Version('0.0.1'))
  loaded = images.load_shapes('test', data_dir=data_dir)
  direct = shapes.render_dataset(10, seed=1)
  # TFDS stores examples in a key-hash order: compare as multisets of examples.
  def rows(d):
    return sorted(d['image'][i].tobytes() + d['tokens'][i].tobytes() + d['objects'][i].tobytes()
                  for i in range(len(d['image'])))
  assert len(loaded['image']) == 10
  assert rows(loaded) == rows(direct)
