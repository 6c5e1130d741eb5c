"""configs/curvature/hf_edit.py:runlocal on a tiny local checkpoint, and its bad-input errors."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch import analyze
from lossland import data, models, parallel
from lossland.curvature import edit, eigen, evaluate, factors
from lossland.interop import hf, tiny

WORDS = ('the', 'model', 'curvature', 'of', 'a', 'layer', 'is', 'low', 'where', 'memorized',
         'examples', 'live', 'and', 'high', 'for', 'shared', 'structure', 'in', 'text')
LAYERS = [f'block_{i}/mlp/{p}' for i in (0, 1) for p in ('gate', 'up')]


def write_inputs(folder: pathlib.Path):
  rng = np.random.default_rng(0)
  text = ' '.join(rng.choice(WORDS, size=3000)) + '\n'
  (folder / 'text.txt').write_text(text, encoding='utf-8')
  letters = lambda n: ''.join(rng.choice(list('abcdefghij'), n))  # one length: one decode shape
  pairs = [(letters(8), letters(4)) for _ in range(6)]
  data.write_recitation_pairs(str(folder / 'pairs.jsonl'), pairs)
  return folder / 'text.txt', folder / 'pairs.jsonl', pairs


def run_edit(tmp_path, model_dir, text, *extra):
  workdir = tmp_path / 'work'
  analyze.main(['--config=configs/curvature/hf_edit.py:runlocal', f'--config.model.path={model_dir}',
                f'--config.data.path={text}', f'--workdir={workdir}', *extra])
  return workdir, json.loads((workdir / 'results.json').read_text())


@pytest.fixture(scope='module')
def exported_lm(tmp_path_factory):
  """A random TransformerLM exported as a Llama folder with the byte tokenizer."""
  lm = models.TransformerLM(vocab_size=256, d_model=32, num_layers=2, num_heads=2, mlp_dim=48,
                            tie_embeddings=True)
  params = jax.jit(lm.init)(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))
  folder = hf.save(tmp_path_factory.mktemp('lm'), params, models.config_from_transformer_lm(lm))
  tiny.byte_tokenizer().save(str(folder / hf.TOKENIZER_FILE))
  return lm, params, folder


def test_byte_tokenizer_ids_are_the_utf8_bytes():
  tok, text = tiny.byte_tokenizer(), 'Grüße,\r\n\ttabs  and € 😀'
  ids = tok.encode(text, add_special_tokens=False).ids
  assert ids == list(text.encode('utf-8')) and tok.decode(ids) == text


def test_hf_edit_runlocal_equals_the_direct_edit_and_writes_it(exported_lm, tmp_path):
  """hf_edit on the exported folder (a CausalLM) = the library on the TransformerLM's params."""
  lm, params, folder = exported_lm
  text, pairs_file, _ = write_inputs(tmp_path)
  workdir, r = run_edit(tmp_path, folder, text, f'--config.data.recitation_path={pairs_file}',
                        '--config.curvature.rho=0.6')
  assert r['layers'] == LAYERS and r['recitation_pairs'] == 6
  for key in ('strict', 'loose', 'levenshtein'):
    assert 0 <= r[f'recitation_{key}_before'] <= 1 and 0 <= r[f'recitation_{key}_after'] <= 1
  assert all(0 < f < 1 for f in r['kept_fraction'].values())
  # The same windows (seeds), factors, edit and evaluator on the original model.
  tokens = np.frombuffer(text.read_bytes(), np.uint8).astype(np.int32)
  train, heldout = np.split(tokens, [int(round(len(tokens) * 0.9))])
  mesh = parallel.make_mesh({'data': 1}, jax.devices()[:1])  # one device compiles faster
  f = factors.estimate_factors(lm.apply, params, evaluate.factor_batches(train, 2, 8, 32, 0),
                               select=r'block_\d+/mlp/(gate|up)', rng=jax.random.key(77),
                               mesh=mesh)
  edited = edit.curvature_edit(params, eigen.eigenbasis(f), 0.6)
  ev = evaluate.LMEvaluator(lm.apply, evaluate.heldout_batches(heldout, 2, 8, 32, 0), mesh=mesh)
  # Two implementations of the same maths (TransformerLM vs CausalLM): float32 rounding.
  np.testing.assert_allclose(r['perplexity_before'], ev.perplexity(params), rtol=1e-5)
  np.testing.assert_allclose(r['perplexity_after'], ev.perplexity(edited), rtol=1e-5)
  # WORKDIR/edited holds the edit: only the selected kernels changed, the reported perplexity.
  back = hf.load(workdir / 'edited')
  assert back.config == hf.load(folder).config and back.tokenizer is not None
  flat = lambda tree: {jax.tree_util.keystr(k): v
                       for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  old, new = flat(params), flat(back.params)
  assert {k for k in old if not np.array_equal(old[k], new[k])} == {
      f"['params']['{n.split('/')[0]}']['mlp']['{n.split('/')[2]}']['kernel']" for n in LAYERS}
  np.testing.assert_allclose(ev.perplexity(back.params), r['perplexity_after'], rtol=1e-5)


@pytest.mark.parametrize('case, message', [
    ('missing_text', 'text file .* does not exist'),
    ('bad_jsonl', r'pairs.jsonl:2 must be an object with string "prefix"'),
    ('no_layer', "selection 'block_9/mlp/gate' matches none of the model's"),
    ('bad_eigh', "eigh method 'lapack' is not one of"),
])
def test_hf_edit_bad_input_is_one_clear_error(case, message, exported_lm, tmp_path):
  text, pairs, _ = write_inputs(tmp_path)
  extra = []
  if case == 'missing_text':
    text = tmp_path / 'nope.txt'
  elif case == 'bad_jsonl':
    pairs.write_text('{"prefix": "a", "suffix": "b"}\n{"prefix": "only a prefix"}\n')
    extra = [f'--config.data.recitation_path={pairs}']
  elif case == 'bad_eigh':
    extra = ['--config.curvature.eigh=lapack']
  else:
    extra = ['--config.curvature.layers=block_9/mlp/gate']
  with pytest.raises(SystemExit, match=message):
    run_edit(tmp_path, exported_lm[2], text, *extra)


def test_hf_edit_full_protocol_reports_half_b_and_reuses_its_cache(exported_lm, tmp_path, capsys):
  """Selection on half A, report on half B, controls, ρ sweep, held-out texts, cache, template."""
  _, _, folder = exported_lm
  model = tmp_path / 'model'
  model.mkdir()
  for f in folder.iterdir():
    (model / f.name).write_bytes(f.read_bytes())
  (model / 'chat_template.jinja').write_text('{{ messages }}')
  text, pairs, _ = write_inputs(tmp_path)
  other = tmp_path / 'other.txt'
  other.write_text(' '.join(WORDS[::-1] * 60))
  args = ['--config.selection.enabled=True', '--config.selection.candidate_blocks=(0, 1)',
          '--config.selection.max_blocks=1', '--config.selection.rhos=(0.5, 0.8)',
          "--config.report.controls=('random', 'svd')", '--config.report.rhos=(0.6, 0.9)',
          f'--config.data.recitation_path={pairs}', f'--config.data.heldout_paths={other}',
          "--config.curvature.rho_overrides=(('up', 0.95),)"]
  workdir, r = run_edit(tmp_path, model, text, *args)
  assert r['selection']['half_a'] == 3 and r['reported_passages'] == 3
  assert len(r['selection']['sweep']) == 4  # 2 single-block runs x 2 rhos
  assert set(r['perplexity']) == {'before', 'edit', 'random', 'svd'}
  assert set(r['perplexity']['edit']) == {'main', 'other'}
  assert all(v == 0.95 for n, v in r['rho_by_layer'].items() if n.endswith('up'))
  assert set(r['recitation']) == {'before', 'edit', 'random', 'svd'}
  rates = r['recitation']['edit']['all']
  assert rates['n'] == 3 and rates['strict_ci'][0] <= rates['strict'] <= rates['strict_ci'][1]
  assert len(r['rho_sweep']['strict']) == 2
  rows = [json.loads(line) for line in (workdir / 'passages.jsonl').read_text().splitlines()]
  assert len(rows) == 3 and set(rows[0]) >= {'prefix_text', 'suffix_text', 'before', 'edit'}
  assert (workdir / 'edited' / 'chat_template.jinja').read_text() == '{{ messages }}'
  cached = sorted(p.name for p in (workdir / 'cache').iterdir())
  assert [c.split('-')[0] for c in cached] == ['bases', 'factors']
  assert 'estimating K-FAC factors' in capsys.readouterr().out
  # A re-run with another ρ reuses the factors and eigenbases.
  analyze.main(['--config=configs/curvature/hf_edit.py:runlocal', f'--config.model.path={model}',
                f'--config.data.path={text}', f'--workdir={workdir}', *args,
                '--config.selection.rhos=(0.7,)', '--allow_config_change'])
  out = capsys.readouterr().out
  assert 'factors and eigenbases of 4 layers from' in out and 'estimating' not in out
  assert sorted(p.name for p in (workdir / 'cache').iterdir()) == cached


def test_hf_edit_scan_of_texts_the_model_does_not_recite(exported_lm, tmp_path):
  """A scan that finds nothing reports an empty memorized set and still edits."""
  text, _, _ = write_inputs(tmp_path)
  texts = tmp_path / 'texts'
  texts.mkdir()
  (texts / 'a.txt').write_text('abcdefghij' * 6)
  (texts / 'sequence-b.txt').write_text('0123456789' * 6)
  _, r = run_edit(tmp_path, exported_lm[2], text, '--config.memorized.scan=True',
                  f'--config.memorized.texts_dir={texts}')
  assert r['memorized']['passages'] == 0 and r['memorized']['by_text'] == {}
  assert 'recitation' not in r
  assert r['perplexity_after'] > 0


def test_hf_edit_seq_len_past_learned_positions_names_the_key(tmp_path):
  text, _, _ = write_inputs(tmp_path)
  gpt2 = pathlib.Path(__file__).parents[1] / 'fixtures' / 'hf' / 'gpt2'
  limit = hf.load(gpt2).config.max_positions
  with pytest.raises(SystemExit, match=rf'data.seq_len={limit + 1} is longer than the {limit} '
                     r'learned positions.*--config.data.seq_len'):
    run_edit(tmp_path, gpt2, text, f'--config.data.seq_len={limit + 1}')


def test_leading_special_tokens_are_the_bos_not_the_eos():
  import tokenizers  # pylint: disable=import-outside-toplevel
  from launch.experiments import curvature_hf_edit  # pylint: disable=import-outside-toplevel
  tok = tiny.byte_tokenizer()
  assert curvature_hf_edit.leading_special_tokens(tok) == []
  vocab = {'<s>': 0, '</s>': 1, 'a': 2}
  bpe = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='a'))
  bpe.post_processor = tokenizers.processors.TemplateProcessing(
      single='<s> $A </s>', special_tokens=[('<s>', 0), ('</s>', 1)])
  assert curvature_hf_edit.leading_special_tokens(bpe) == [0]


def test_hf_edit_ekfac_edits_with_the_corrected_masses(exported_lm, tmp_path):
  lm, params, folder = exported_lm
  text, _, _ = write_inputs(tmp_path)
  _, r = run_edit(tmp_path, folder, text, '--config.curvature.ekfac=True',
                  '--config.curvature.rho=0.6')
  tokens = np.frombuffer(text.read_bytes(), np.uint8).astype(np.int32)
  train, heldout = np.split(tokens, [int(round(len(tokens) * 0.9))])
  mesh = parallel.make_mesh({'data': 1}, jax.devices()[:1])
  batches = evaluate.factor_batches(train, 2, 8, 32, 0)
  bases = eigen.eigenbasis(factors.estimate_factors(
      lm.apply, params, batches, select=r'block_\d+/mlp/(gate|up)', rng=jax.random.key(77),
      mesh=mesh))
  masses = eigen.estimate_eigencorrection(lm.apply, params, bases, batches, mesh=mesh,
                                          rng=jax.random.key(78))
  ev = evaluate.LMEvaluator(lm.apply, evaluate.heldout_batches(heldout, 2, 8, 32, 0), mesh=mesh)
  assert r['method'] == 'ekfac'
  np.testing.assert_allclose(r['perplexity_after'],
                             ev.perplexity(edit.curvature_edit(params, bases, 0.6, masses)),
                             rtol=1e-5)


def test_windows_behind_a_bos_score_the_same_text_tokens():
  from launch.experiments import curvature_hf_edit  # pylint: disable=import-outside-toplevel
  batch = {'inputs': np.array([[5, 6, 7]]), 'targets': np.array([[6, 7, 8]])}
  out = curvature_hf_edit.with_special_prefix(batch, [1])
  np.testing.assert_array_equal(out['inputs'], [[1, 5, 6, 7]])
  np.testing.assert_array_equal(out['targets'], [[5, 6, 7, 8]])
  np.testing.assert_array_equal(out['mask'], [[0, 1, 1, 1]])
  two = curvature_hf_edit.with_special_prefix(batch, [1, 2])
  np.testing.assert_array_equal(two['inputs'], [[1, 2, 5, 6, 7]])
  np.testing.assert_array_equal(two['targets'], [[2, 5, 6, 7, 8]])
  np.testing.assert_array_equal(two['mask'], [[0, 0, 1, 1, 1]])
  assert curvature_hf_edit.with_special_prefix(batch, []) is batch
