"""Selection of layers and ρ, matched-perplexity controls, the LM evaluator and canary data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import data, models
from lossland.curvature import controls, edit, eigen, evaluate, factors, metrics, selection


def test_block_runs_and_layer_grouping():
  assert selection.contiguous_block_runs((0, 1, 2, 3), 2) == [(0,), (1,), (2,), (3,), (0, 1),
                                                             (1, 2), (2, 3)]
  assert selection.contiguous_block_runs((0, 2, 3), 3) == [(0,), (2,), (3,), (2, 3)]
  assert selection.block_index('block_12/mlp/up') == 12
  assert selection.block_index('encoder/block_3/attn/query') == 3
  assert selection.block_index('head') is None and selection.block_index('xblock_1/a') is None


def test_bisect_knob_finds_the_matched_perplexity():
  # perplexity exp(2 - 2 * knob) falls with the knob; target e^1 sits at knob 0.5 exactly.
  result = controls.bisect_knob(lambda k: (float(np.exp(2 - 2 * k)), k), float(np.e), steps=6)
  assert result.knob == 0.5 and result.params == 0.5
  target = float(np.exp(2 - 2 * 0.3))
  result = controls.bisect_knob(lambda k: (float(np.exp(2 - 2 * k)), None), target, steps=10)
  assert abs(result.knob - 0.3) < 2 ** -9
  with pytest.raises(ValueError, match='at least one step'):
    controls.bisect_knob(lambda k: (1.0, None), 1.0, steps=0)


def test_choose_rho_prefers_the_objective_then_the_larger_rho():
  rows = [{'acc': 0.9, 'err': 0.5}, {'acc': 0.9, 'err': 0.2}, {'acc': 0.9, 'err': 0.2},
          {'acc': 0.5, 'err': 0.0}]
  rhos = (0.9, 0.8, 0.7, 0.6)
  pick = lambda rows: selection.choose_rho(rhos, rows, objective=lambda r: r['err'],
                                           feasible=lambda r: r['acc'] >= 0.8)
  assert pick(rows) == 1  # 0.6 is infeasible, 0.8 beats 0.7 on the tie
  assert pick([{'acc': 0.0, 'err': 1.0}] * 4) == 0  # nothing feasible: the first


@pytest.fixture(scope='module')
def tiny_lm():
  model = models.TransformerLM(vocab_size=16, d_model=16, num_layers=2, num_heads=2, mlp_dim=24)
  params = model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))
  tokens = np.random.default_rng(1).integers(0, 16, size=400).astype(np.int32)
  ev = evaluate.LMEvaluator(model.apply, evaluate.heldout_batches(tokens, 2, 8, 12, 0))
  f = factors.estimate_factors(model.apply, params, evaluate.factor_batches(tokens, 2, 8, 12, 0),
                               select=r'block_\d+/mlp/(gate|up)', rng=jax.random.key(2))
  return model, params, ev, eigen.eigenbasis(f)


def test_recitation_of_pairs_is_the_mean_over_pairs(tiny_lm):
  _, params, ev, _ = tiny_lm
  rng = np.random.default_rng(3)
  pairs = [(list(rng.integers(0, 16, p)), list(rng.integers(0, 16, 2))) for p in (3, 3, 4)]
  pairs[0] = (pairs[0][0], list(ev.generate(params, np.array([pairs[0][0]]), 2)[0]))  # recited
  got = ev.recitation_of_pairs(params, pairs)
  per_pair = [metrics.recitation_scores(ev.generate(params, np.array([p]), 2), np.array([s]))
              for p, s in pairs]
  assert got.count == 3 and got.strict >= 1 / 3
  for key in ('strict', 'loose', 'levenshtein'):
    assert getattr(got, key) == pytest.approx(np.mean([s[key] for s in per_pair]))
  with pytest.raises(ValueError, match='empty prefix or suffix'):
    ev.recitation_of_pairs(params, [([1], [])])


def test_selection_sweep_and_controls_on_a_tiny_lm(tiny_lm):
  model, params, ev, bases = tiny_lm
  can = data.make_canaries(4, 4, 3, seed=0)
  ppl = ev.perplexity(params)
  choice = selection.select_layers_and_rho(
      params, bases, ev, can.prefixes[can.set_a], can.suffixes[can.set_a], candidate_blocks=(0, 1),
      max_blocks=1, rhos=(1.0, 0.7), max_ppl_ratio=10.0, ppl_before=ppl)
  assert [s.blocks for s in choice.sweep] == [(0,), (1,)]
  assert all(s.rho == 0.7 for s in choice.sweep)
  best = min(choice.sweep, key=lambda s: (s.strict_a, s.ppl_ratio))
  assert (choice.blocks, choice.rho) == (best.blocks, best.rho)
  assert choice.layers == tuple(n for n in bases if selection.block_index(n) in best.blocks)
  for s in choice.sweep:  # each point is the edit it names
    sub = selection.layers_of_blocks(bases, s.blocks)
    assert s.ppl_ratio == ev.perplexity(edit.curvature_edit(params, sub, s.rho)) / ppl
  chosen = {n: bases[n] for n in choice.layers}
  kept = controls.kept_counts(chosen, 0.7)
  same = controls.same_count_controls(params, chosen, kept, rng=jax.random.key(0))
  assert set(same) == {'random', 'inverted'}
  target = ev.perplexity(edit.curvature_edit(params, chosen, 0.7))
  for kind in controls.KINDS:
    c = controls.matched_control(kind, params, chosen, ev, target, steps=2, rng=jax.random.key(0))
    assert c.knob in (0.5, 0.25, 0.75)
    assert c.perplexity == ev.perplexity(c.params)
  with pytest.raises(ValueError, match='control kind'):
    controls.control_edit('nope', params, chosen, 0.5, rng=jax.random.key(0))


def test_canary_data_and_recitation_files(tmp_path):
  can = data.make_canaries(6, 3, 2, seed=0)
  assert can.tokens.shape == (6, 5) and sorted(np.concatenate([can.set_a, can.set_b])) == list(
      range(6))
  assert ((can.tokens >= ord('a')) & (can.tokens <= ord('z'))).all()
  batch_fn = data.canaries.make_batch_fn(np.arange(100, dtype=np.int32) % 50, can, batch_size=4,
                                         seq_len=8, canary_rows=2, repeats=2, seed=0)
  steps = data.steps_for_repeats(6, 2, 2)
  seen = np.concatenate([batch_fn(s)['inputs'][:2, :5] for s in range(steps)])
  counts = {tuple(r): 0 for r in can.tokens}
  for row in seen:
    counts[tuple(row)] += 1
  assert set(counts.values()) == {2}  # every canary exactly `repeats` times
  path = tmp_path / 'pairs.jsonl'
  data.write_recitation_pairs(str(path), [('ab', 'c'), ('é x', 'yz')])
  assert data.read_recitation_pairs(str(path)) == [('ab', 'c'), ('é x', 'yz')]
  path.write_text('{"prefix": "a", "suffix": "b"}\n\nnot json\n')
  with pytest.raises(ValueError, match='pairs.jsonl:3 is not valid JSON'):
    data.read_recitation_pairs(str(path))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.read_recitation_pairs(str(tmp_path / 'missing.jsonl'))
  noisy, flipped = data.flip_labels(np.arange(20) % 4, 0.25, 4, seed=0)
  assert len(flipped) == 5 and (noisy[flipped] != (np.arange(20) % 4)[flipped]).all()
