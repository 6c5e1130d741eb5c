"""Data: embedded TFDS builders, text files, catalog datasets (mocked), deterministic batches."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from lossland import data
from lossland.data import builders


def test_embedded_text_corpus_is_real_english(data_dir):
  corpus = data.load_tfds_text('pydoc_text', data_dir=data_dir)
  assert corpus.vocab.size == 256
  assert len(corpus.train) > 300_000
  ratio = len(corpus.validation) / (len(corpus.train) + len(corpus.validation))
  assert 0.05 < ratio < 0.15
  text = corpus.vocab.decode(corpus.train[:5000])
  assert ' the ' in text


def test_stdlib_corpus_is_large_and_splits_by_file(data_dir):
  files = builders.stdlib_source_files()
  assert 'os.py' in files and 'json/decoder.py' in files
  assert not any(f.startswith(('test/', 'idlelib/', 'encodings/')) for f in files)
  train = data.data_source('python_stdlib', 'train', data_dir=data_dir)
  validation = data.data_source('python_stdlib', 'validation', data_dir=data_dir)
  train_paths = {train[i]['path'] for i in range(len(train))}
  val_paths = {validation[i]['path'] for i in range(len(validation))}
  assert not train_paths & val_paths and len(val_paths) > 20
  assert len(train_paths) + len(val_paths) > 0.95 * len(files)  # empty files are dropped
  corpus = data.load_tfds_text('python_stdlib', data_dir=data_dir)
  assert len(corpus.train) > 5_000_000 and len(corpus.validation) > 100_000


def test_embedded_digits(data_dir):
  ds = data.load_image_dataset('sklearn_digits', data_dir=data_dir)
  assert ds.train_images.shape[1:] == (8, 8, 1)
  assert len(ds.train_labels) + len(ds.test_labels) == 1797
  assert ds.num_classes == 10 and ds.train_images.max() == 1.0


def test_text_file_split_and_char_vocab(tmp_path):
  path = tmp_path / 't.txt'
  path.write_text('abcdefghij' * 10, encoding='utf-8')
  corpus = data.load_text_file(str(path))
  assert len(corpus.train) == 90 and len(corpus.validation) == 10
  assert corpus.vocab.size == 10
  assert corpus.vocab.decode(corpus.train[:10]) == 'abcdefghij'


def test_missing_file_and_unknown_dataset_are_clear(tmp_path):
  with pytest.raises(ValueError, match='data.path'):
    data.load_text_file(str(tmp_path / 'missing.txt'))
  with pytest.raises(ValueError, match='unknown dataset'):
    data.data_source('no_such_dataset_xyz', 'train', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='not prepared'):
    data.data_source('mnist', 'train', data_dir=str(tmp_path))


def test_catalog_text_and_images_with_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=4):
    corpus = data.load_tfds_text('tiny_shakespeare', vocab='char', data_dir=str(tmp_path))
    assert len(corpus.train) > 0 and corpus.vocab.size < 256
    images = data.load_image_dataset('mnist', data_dir=str(tmp_path))
    assert images.train_images.shape == (4, 28, 28, 1)


def test_lm_batch_is_deterministic_and_split_across_processes():
  tokens = np.arange(1000, dtype=np.int32)
  a = data.lm_batch(tokens, 7, batch_size=8, seq_len=16, seed=3)
  b = data.lm_batch(tokens, 7, batch_size=8, seq_len=16, seed=3)
  np.testing.assert_array_equal(a['inputs'], b['inputs'])
  np.testing.assert_array_equal(a['targets'], a['inputs'] + 1)
  parts = [data.lm_batch(tokens, 7, batch_size=8, seq_len=16, seed=3, process_index=i,
                         process_count=4)['inputs'] for i in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), a['inputs'])
  c = data.lm_batch(tokens, 8, batch_size=8, seq_len=16, seed=3)
  assert not np.array_equal(a['inputs'], c['inputs'])


def test_lm_batch_rejects_a_corpus_shorter_than_one_window():
  with pytest.raises(ValueError, match=r'has 16 tokens, fewer than the seq_len \+ 1 = 17'):
    data.lm_batch(np.arange(16), 0, batch_size=2, seq_len=16, seed=0)


def test_lm_batch_accepts_a_stream_of_exactly_one_window():
  tokens = np.arange(17, dtype=np.int32)  # seq_len + 1: one window, start 0
  batch = data.lm_batch(tokens, 3, batch_size=2, seq_len=16, seed=0)
  np.testing.assert_array_equal(batch['inputs'], np.tile(tokens[:-1], (2, 1)))
  np.testing.assert_array_equal(batch['targets'], np.tile(tokens[1:], (2, 1)))


def test_lm_batch_keeps_the_recorded_start_offsets():
  # Longer streams draw starts exactly as before the boundary fix, so recorded runs reproduce.
  tokens = np.arange(1000, dtype=np.int32)
  starts = np.random.default_rng([3, 7]).integers(0, 1000 - 16 - 1, size=8)
  batch = data.lm_batch(tokens, 7, batch_size=8, seq_len=16, seed=3)
  np.testing.assert_array_equal(batch['inputs'][:, 0], starts)


def test_text_file_that_is_not_utf8_names_the_file_and_offset(tmp_path):
  path = tmp_path / 'latin1.txt'
  path.write_bytes('caf\u00e9 au lait'.encode('latin-1'))  # 0xe9 at byte 3
  with pytest.raises(ValueError, match=r"latin1.txt' is not UTF-8: byte 3 \(0xe9\)"):
    data.load_text_file(str(path))


def test_directory_as_text_file_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r'is a directory; set --config.data.path'):
    data.load_text_file(str(tmp_path))


def test_text_file_reads_windows_newlines_as_text_mode_did(tmp_path):
  path = tmp_path / 'crlf.txt'
  path.write_bytes(b'ab\r\ncd\rd' * 10)
  corpus = data.load_text_file(str(path))
  assert corpus.vocab.chars == '\nabcd'


def test_lm_batch_rejects_an_empty_batch():
  with pytest.raises(ValueError, match='batch_size=0 must be at least 1'):
    data.lm_batch(np.arange(100), 0, batch_size=0, seq_len=16, seed=0)


def test_epoch_indices_visit_every_example_once_per_epoch():
  n, batch = 10, 4
  seen = np.concatenate([data.epoch_indices(s, batch_size=batch, num_examples=n, seed=1)
                         for s in range(5)])  # 20 slots = 2 epochs
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
  parts = [data.epoch_indices(3, batch_size=batch, num_examples=n, seed=1, process_index=i,
                              process_count=2) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(parts), seen[12:16])
  with pytest.raises(ValueError, match='fewer than one batch'):
    data.epoch_indices(0, batch_size=16, num_examples=n, seed=1)
