"""lossland.stitching.token_alignment on real tokenizers: byte-level BPE, SentencePiece, GGUF."""
import pathlib

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lossland.interop import gguf, gguf_tokenizer, hf
from lossland.stitching import alignment, splice
from lossland.stitching import token_alignment as ta

FIXTURES = pathlib.Path(__file__).parents[1] / 'fixtures'
# Runs of spaces, a tab, newlines, accents (precomposed and combining), CJK, an emoji, digits.
TEXT = ('  Hello  world,\tnaïve café 日本語 😀 e\u0301 ok\n\nnew  line 12345 x. '
        'The quick brown fox jumps over the lazy dog; 3.14159 is π.\n'
        'Two,\n\n  spaces;\n\n  then.\n')


def _gguf(name):
  return gguf_tokenizer.from_metadata(gguf.read_metadata(FIXTURES / 'gguf' / f'{name}.gguf'))


def _byte_bpe(trim_offsets):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([TEXT * 5], trainers.BpeTrainer(
      vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
  return tok


@pytest.fixture(scope='module')
def toks():
  """name -> (tokenizer, byte_level): decoding a byte-level prefix gives its text exactly."""
  return {'llama3_hf': (hf.load_tokenizer(FIXTURES / 'hf' / 'llama3_gqa'), True),
          'spm_gguf': (_gguf('llama_spm'), False),  # SentencePiece, byte fallback, BOS
          'qwen2_gguf': (_gguf('qwen2_tied'), True),
          'llama_gguf': (_gguf('llama_gqa'), True),  # byte-level with a BOS
          'trained_bpe': (_byte_bpe(False), True)}


def _decodes_to(tok, byte_level, ids, text):
  got = tok.decode([int(i) for i in ids], skip_special_tokens=True)
  # SentencePiece's decoder drops the space it prepends, and with it a leading one of the text.
  return got == text if byte_level else got.lstrip(' ') == text.lstrip(' ')


def _check_clean(tk, chars, last):
  for e, i in zip(chars, last):
    assert tk.ends[i] == e and tk.ends[:i + 1].max() == e
    assert i == len(tk.ids) - 1 or tk.starts[i + 1:].min() >= e
    assert i == len(tk.ids) - 1 or tk.ends[i + 1] > e  # the LAST token ending at e


PAIRS = [('llama3_hf', 'spm_gguf'), ('spm_gguf', 'qwen2_gguf'), ('trained_bpe', 'spm_gguf'),
         ('llama_gguf', 'trained_bpe')]


@pytest.mark.parametrize('name_a,name_b', PAIRS)
def test_aligned_units_cover_the_same_characters_in_both_models(toks, name_a, name_b):
  (tok_a, bl_a), (tok_b, bl_b) = toks[name_a], toks[name_b]
  a, b = ta.tokenize(tok_a, TEXT), ta.tokenize(tok_b, TEXT)
  al = ta.align(a, b)
  assert len(al) > 20 and np.all(np.diff(al.chars) > 0)
  assert np.all(np.diff(al.last_a) > 0) and np.all(np.diff(al.last_b) > 0)
  _check_clean(a, al.chars, al.last_a)
  _check_clean(b, al.chars, al.last_b)
  for e, i, j in zip(al.chars, al.last_a, al.last_b):  # the identical prefix, text[:e], read
    assert _decodes_to(tok_a, bl_a, a.ids[:i + 1], TEXT[:e])
    assert _decodes_to(tok_b, bl_b, b.ids[:j + 1], TEXT[:e])
  # Every common clean boundary is a unit: against characters, a tokenization keeps all of its own.
  chars = ta.Tokenized(np.zeros(0), np.arange(len(TEXT)), np.arange(len(TEXT)) + 1, np.zeros(0))
  own_a = ta.align(a, chars).chars
  np.testing.assert_array_equal(al.chars, np.intersect1d(own_a, ta.align(b, chars).chars))
  np.testing.assert_array_equal(ta.align(a, a).chars, own_a)


def test_no_unit_inside_a_character_split_into_byte_tokens(toks):
  a = ta.tokenize(toks['spm_gguf'][0], 'é😀x')  # '▁' and <0xC3> <0xA9> share (0, 1)
  assert a.prefix.tolist() == [1]
  assert [(int(s), int(e)) for s, e in zip(a.starts, a.ends)][:3] == [(0, 1)] * 3
  chars, last = ta.boundaries(a.starts, a.ends)
  assert chars.tolist() == [1, 2, 3] and last[0] == 2


def test_trimmed_offsets_align_as_untrimmed(toks):
  # ByteLevel(trim_offsets=True) cuts the trailing space off 'ĊĊĠ' (end 125 -> 124): read from
  # the post-processed encoding, that would be a unit at 124 where the token has read 125
  # characters. The offsets are read without the post-processor, so both give the same units.
  other = ta.tokenize(toks['spm_gguf'][0], TEXT)
  trimmed = _byte_bpe(True)
  untrimmed, got = (ta.align(ta.tokenize(t, TEXT), other) for t in (_byte_bpe(False), trimmed))
  np.testing.assert_array_equal(untrimmed.chars, got.chars)
  raw = ta.tokenize(trimmed, TEXT)
  offsets = np.asarray(trimmed.encode(TEXT).offsets)
  naive = ta.align(ta.Tokenized(raw.ids, offsets[:, 0], offsets[:, 1], raw.prefix), other)
  assert set(naive.chars) - set(got.chars)  # the failure this guards against


@pytest.fixture(scope='module')
def windows(toks):
  text = TEXT * 8
  a, b = ta.tokenize(toks['llama3_hf'][0], text), ta.tokenize(toks['spm_gguf'][0], text)
  al = ta.align(a, b)
  return text, a, b, al, ta.make_windows(a, b, al, seq_len=32, num_windows=6)


def test_windows_hold_the_same_characters_for_both_models(toks, windows):
  text, a, b, al, w = windows
  u = w.units_per_window
  assert w.inputs_a.shape[0] == 6 and w.num_units == 6 * u
  assert w.inputs_a.shape[1] % 8 == 0 and w.inputs_a.shape[1] <= 32 >= w.inputs_b.shape[1]
  assert np.all(w.inputs_b[:, 0] == 1) and np.all(w.first_b[:, 0] == 1)  # spm's BOS first
  assert np.all(w.first_a[:, 0] == 0)
  # Largest fitting window: one more unit per window would not fit 32 tokens.
  with pytest.raises(ValueError, match='need more than seq_len=32'):
    ta.make_windows(a, b, al, seq_len=32, num_windows=6, units_per_window=u + 1)
  np.testing.assert_array_equal(w.chars[1:, 0], w.chars[:-1, 1])
  for k in range(6):
    start = w.chars[k, 0]
    for side, (tok, bl) in (('a', toks['llama3_hf']), ('b', toks['spm_gguf'])):
      inputs, last, first = (getattr(w, f'{f}_{side}')[k] for f in ('inputs', 'last', 'first'))
      np.testing.assert_array_equal(first[1:], last[:-1] + 1)
      for j in range(u):  # what the model has read at each unit: the window's text up to it
        assert _decodes_to(tok, bl, inputs[:last[j] + 1], text[start:al.chars[k * u + j]])
      assert last[-1] + 1 == getattr(w, f'tokens_{side}')[k]


def test_dropping_the_first_units_keeps_the_windows(windows):
  *_, w = windows
  d = w.drop_first_units(2)
  assert d.units_per_window == w.units_per_window - 2
  assert d.num_units == 6 * d.units_per_window
  np.testing.assert_array_equal(d.inputs_a, w.inputs_a)
  np.testing.assert_array_equal(d.last_b, w.last_b[:, 2:])
  np.testing.assert_array_equal(d.first_a, w.first_a[:, 2:])
  with pytest.raises(ValueError, match=f'cannot drop {w.units_per_window} of the'):
    w.drop_first_units(w.units_per_window)


def test_windows_refuse_what_cannot_fit(windows):
  _, a, b, al, _ = windows
  with pytest.raises(ValueError, match='no window of whole aligned units fits seq_len=2'):
    ta.make_windows(a, b, al, seq_len=2)
  with pytest.raises(ValueError, match='fewer than one window of units_per_window=100000'):
    ta.make_windows(a, b, al, seq_len=32, units_per_window=100000)


def test_aligned_features_are_the_states_at_the_units(windows):
  _, _, _, _, w = windows
  ckpt = hf.load(FIXTURES / 'hf' / 'llama3_gqa', tokenizer=False)
  names, last = ta.aligned_features(ckpt.model, ckpt.params, w.inputs_a, w.last_a,
                                    layers=r'block_\d+', batch_size=8)
  _, mean = ta.aligned_features(ckpt.model, ckpt.params, w.inputs_a, w.last_a, w.first_a,
                                layers=names, reduce='mean', batch_size=8)
  assert names == ['block_0', 'block_1'] and last[0].shape == (w.num_units, 64)
  u = w.units_per_window
  for k in (0, 5):  # each window alone and unpadded: padding never reaches a real position
    x = w.inputs_a[k:k + 1, :w.tokens_a[k]]
    _, acts = splice.capture(ckpt.model, ckpt.params, x, names)
    for i, name in enumerate(names):
      act = np.asarray(acts[name][0])
      np.testing.assert_allclose(last[i][k * u:(k + 1) * u], act[w.last_a[k]], atol=2e-5)
      want = [act[f:l + 1].mean(0) for f, l in zip(w.first_a[k], w.last_a[k])]
      np.testing.assert_allclose(mean[i][k * u:(k + 1) * u], want, atol=2e-5)
  with pytest.raises(ValueError, match="unknown reduce 'max'"):
    ta.aligned_features(ckpt.model, ckpt.params, w.inputs_a, w.last_a, layers=names,
                        reduce='max')


def test_masking_massive_units_is_removing_them_from_cka():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(200, 4))
  xs = [base @ rng.normal(size=(4, 8)) + rng.normal(size=(200, 8)) + 5 for _ in range(2)]
  ys = [base @ rng.normal(size=(4, 6)) + rng.normal(size=(200, 6))]
  xs[1][17] += 400  # one massive row in one layer of A
  ys[0][3] += 300
  mask = ta.massive_units(xs + ys, ratio=20)
  assert np.flatnonzero(mask).tolist() == [3, 17]
  masked = ta.mask_units(xs + ys, mask)
  np.testing.assert_allclose(alignment.cka_matrix(masked[:2], masked[2:]),
                             alignment.cka_matrix([x[~mask] for x in xs], [ys[0][~mask]]),
                             atol=1e-6)
  assert float(alignment.linear_cka(xs[1], ys[0])) < 0.2 < float(
      alignment.linear_cka(masked[1], masked[2]))
  with pytest.raises(ValueError, match='every unit is masked'):
    ta.mask_units(xs, np.ones(200, bool))
