"""curvature.memorization (scan), curvature.recitation, per-layer ρ and curvature.storage."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import models
from lossland.curvature import (capture, edit, eigen, factors, memorization, recitation,
                                selection, storage)
from lossland.data import recitable

VOCAB = 64


def bigram_lm(params, tokens):
  """A 'model' that predicts table[previous token]: it recites any text whose tokens are distinct."""
  return jax.nn.one_hot(params['table'][tokens], VOCAB) * 10.0


def memorized_text(rng, length):
  """Tokens 1..length in a random order (distinct), and the bigram table that recites them."""
  text = rng.permutation(np.arange(1, VOCAB))[:length]
  table = rng.integers(0, VOCAB, VOCAB)  # elsewhere: arbitrary predictions
  table[text[:-1]] = text[1:]
  return text, {'table': jnp.asarray(table, jnp.int32)}


def test_scan_finds_exactly_the_recited_text_as_non_overlapping_windows():
  rng = np.random.default_rng(0)
  text, params = memorized_text(rng, 50)
  noise = rng.integers(0, VOCAB, 60)
  # The second half of `noise` breaks its bigrams; the first half repeats the memorized text.
  texts = {'memorized': (text, 'verbatim'), 'noise': (noise, 'verbatim'),
           'seq': (np.concatenate([text[:20], rng.integers(0, VOCAB, 30)]), 'sequence')}
  report = memorization.scan(bigram_lm, params, texts, prefix_len=4, suffix_len=6, stride=2,
                             chunk_len=16, batch_size=3)
  found = [(p.source, p.start) for p in report.passages]
  # Windows of 10 at starts 0, 2, ..., 40 all recite; kept left to right without overlap.
  assert [s for n, s in found if n == 'memorized'] == [0, 10, 20, 30, 40]
  assert all(p.strict and p.similarity == 1.0 for p in report.passages if p.source == 'memorized')
  assert report.windows['memorized'] == 21 and report.candidates['memorized'] == 21
  # In 'seq' only windows inside the first 20 tokens recite (its kind is kept).
  seq = [p for p in report.passages if p.source == 'seq']
  assert seq and all(p.kind == 'sequence' and p.start + 10 <= 20 for p in seq)
  for p in report.passages:  # prefix/suffix are the text's tokens at `start`
    tokens = texts[p.source][0]
    assert list(p.prefix) == list(tokens[p.start:p.start + 4])
    assert list(p.suffix) == list(tokens[p.start + 4:p.start + 10])
  assert report.counts()['verbatim']['passages'] == len(found) - len(seq)


def test_token_hits_judge_each_token_with_at_least_the_context():
  """Hits from overlapping chunks = direct top-1 checks of a real LM on each chunk's window."""
  lm = models.TransformerLM(vocab_size=VOCAB, d_model=16, num_layers=1, num_heads=2, mlp_dim=32)
  params = lm.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  tokens = np.random.default_rng(1).integers(0, VOCAB, 45)
  hits = memorization.token_hits(lm.apply, params, tokens, special_prefix=[7], context=5,
                                 chunk_len=12, batch_size=2)
  expected = np.zeros(45, bool)
  judged = np.zeros(45, bool)
  for a in memorization.chunk_starts(45, 12, 5):
    row = np.concatenate([[7], tokens[a:a + 12]])
    pred = np.asarray(jnp.argmax(lm.apply(params, row[None])[0], -1))
    for j in range(0 if a == 0 else 5, min(12, 45 - a)):
      if not judged[a + j]:
        judged[a + j], expected[a + j] = True, pred[j] == tokens[a + j]
  assert judged.all()
  np.testing.assert_array_equal(hits, expected)


def test_scan_bad_lengths_are_one_clear_error():
  with pytest.raises(ValueError, match='chunk_len=4 must exceed prefix_len=4'):
    memorization.scan(bigram_lm, None, {}, prefix_len=4, chunk_len=4)
  with pytest.raises(ValueError, match='loose_threshold=0'):
    memorization.scan(bigram_lm, None, {}, loose_threshold=0)


def test_split_halves_are_disjoint_stratified_and_seeded():
  ps = [memorization.Passage(f't{i}', 'verbatim' if i < 7 else 'sequence', i, (1,), (2,), 1.0,
                             1.0, True) for i in range(11)]
  a, b = memorization.split_halves(ps, seed=3)
  assert sorted(p.start for p in a + b) == list(range(11))
  assert {p.kind for p in a} == {p.kind for p in b} == {'verbatim', 'sequence'}
  assert [p.start for p in memorization.split_halves(ps, seed=3)[0]] == [p.start for p in a]
  assert memorization.Passage.from_dict(a[0].as_dict()) == a[0]


def test_recite_and_rates_by_kind():
  rng = np.random.default_rng(2)
  text, params = memorized_text(rng, 30)
  good = memorization.Passage('m', 'verbatim', 0, tuple(text[:4]), tuple(text[4:10]), 1, 1, True)
  bad_suffix = tuple(np.roll(text[4:10], 1))  # the same tokens, shifted: not recited
  bad = memorization.Passage('m', 'sequence', 0, tuple(text[:4]), bad_suffix, 0, 0, False)
  short = memorization.Passage('m', 'verbatim', 9, tuple(text[9:12]), tuple(text[12:14]), 1, 1, 1)
  scores = recitation.recite(bigram_lm, params, [good, bad, short], batch_size=2)
  np.testing.assert_array_equal(scores.strict, [True, False, True])
  assert scores.similarity[0] == 1.0 and scores.similarity[1] < 1.0
  rates = recitation.rates_by_kind([good, bad, short], scores, loose_threshold=0.75)
  assert rates['verbatim']['n'] == 2 and rates['verbatim']['strict'] == 1.0
  assert rates['verbatim']['strict_ci'] == (1.0, 1.0) and rates['sequence']['strict'] == 0.0
  assert rates['all']['strict'] == pytest.approx(2 / 3)
  lo, hi = recitation.bootstrap_interval(np.array([0, 1, 1, 0, 1.0]), seed=0)
  assert 0.0 <= lo < 0.6 < hi <= 1.0


@pytest.fixture(scope='module')
def lm_bases():
  lm = models.TransformerLM(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, mlp_dim=24)
  params = lm.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  tokens = jax.random.randint(jax.random.key(1), (8, 9), 0, VOCAB)
  batches = [{'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}]
  f = factors.estimate_factors(lm.apply, params, batches, select=r'block_\d+/mlp/(gate|up)',
                               rng=jax.random.key(2))
  return lm, params, f, eigen.eigenbasis(f), batches


def test_per_layer_rho(lm_bases):
  _, params, _, bases, _ = lm_bases
  rhos = selection.rho_by_layer(bases, 0.7, (('up', 0.9),))
  assert rhos == {n: 0.9 if n.endswith('up') else 0.7 for n in bases}
  one = edit.curvature_edit(params, bases, 0.7)
  same = edit.curvature_edit(params, bases, {n: 0.7 for n in bases})
  jax.tree.map(np.testing.assert_array_equal, one, same)
  mixed = edit.curvature_edit(params, bases, rhos)
  gate_only = edit.curvature_edit(params, {n: b for n, b in bases.items() if 'gate' in n}, 0.7)
  up_only = edit.curvature_edit(gate_only, {n: b for n, b in bases.items() if 'up' in n}, 0.9)
  jax.tree.map(np.testing.assert_array_equal, mixed, up_only)
  assert edit.curvature_edit(params, bases, {n: 1.0 for n in bases}) is params
  with pytest.raises(ValueError, match='names no value for layers'):
    edit.curvature_edit(params, bases, {next(iter(bases)): 0.5})
  with pytest.raises(ValueError, match='rho=1.5 is outside'):
    selection.rho_by_layer(bases, 0.7, (('gate', 1.5),))


def test_storage_round_trip(lm_bases, tmp_path):
  lm, params, f, bases, batches = lm_bases
  views = capture.find_layers(lm.apply, params, batches[0]['inputs'],
                              select=r'block_\d+/mlp/(gate|up)')
  storage.save_factors(str(tmp_path / 'f.npz'), f)
  storage.save_bases(str(tmp_path / 'b.npz'), bases)
  f2 = storage.load_factors(str(tmp_path / 'f.npz'), views)
  b2 = storage.load_bases(str(tmp_path / 'b.npz'), views)
  assert list(f2) == list(f) and list(b2) == list(bases)
  for n in f:
    np.testing.assert_array_equal(f2[n].A, f[n].A)
    assert f2[n].count == f[n].count and f2[n].view == f[n].view
  jax.tree.map(np.testing.assert_array_equal, edit.curvature_edit(params, b2, 0.6),
               edit.curvature_edit(params, bases, 0.6))
  with pytest.raises(ValueError, match='are not layers of this model'):
    storage.load_bases(str(tmp_path / 'b.npz'), {})


def test_committed_texts_load_with_kinds():
  texts = recitable.recitable_texts()
  assert len(texts) >= 40 and texts['license-MIT'].kind == 'verbatim'
  assert texts['sequence-alphabet'].kind == 'sequence'
  assert 'Permission is hereby granted' in texts['license-MIT'].text
