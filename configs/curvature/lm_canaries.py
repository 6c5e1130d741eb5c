"""Memorization removal by curvature-mass editing on a small LM with canaries.

Merullo et al. (2025), sec. 4, at toy scale: a 4-layer gated-MLP byte LM is
trained on the embedded `pydoc_text` corpus plus 256 random canaries (16-token
prefix, 16-token suffix of random letters) each seen `canary.repeats` times.
K-FAC factors of the MLP `gate`/`up` projections come from clean text (true
Fisher); ρ and the layers are chosen on canary set A, recitation is reported
on the held-out set B, with random / inverted / SVD controls at matched
perplexity.

    python -m launch.analyze --config=configs/curvature/lm_canaries.py --workdir=/tmp/canaries

Training is reused from WORKDIR/train on a rerun. `:runlocal` trains 40 steps
of a tiny LM on 32 canaries (its numbers are meaningless). `export_hf=True`
also writes the trained LM as a Hugging Face (Llama) folder with a byte
tokenizer, WORKDIR/hf_model, and its text and set-B canaries as files,
WORKDIR/hf_data, for `configs/curvature/hf_edit.py`. Run times and results:
docs/results/curvature.md.
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = 'curvature_lm_canaries'
  c.seed = 0
  c.progress = True
  c.export_hf = False
  c.data = ml_collections.ConfigDict(dict(source='pydoc_text', vocab='byte', data_dir=''))
  c.canary = ml_collections.ConfigDict(dict(num=256, prefix_len=16, suffix_len=16, repeats=96,
                                            rows=12))
  c.model = ml_collections.ConfigDict(dict(
      name='transformer_lm', d_model=128, num_layers=4, num_heads=4, mlp_dim=344,
      tie_embeddings=True, dtype='float32'))
  # num_steps is derived: num * repeats / rows, so each canary is seen exactly `repeats` times.
  c.train = ml_collections.ConfigDict(dict(
      batch_size=16, seq_len=48, learning_rate=3e-3, final_lr=3e-4, warmup_steps=100, b1=0.9,
      b2=0.99, weight_decay=0.0, grad_clip=1.0, steps_per_block=50))
  c.checkpoint_every = 400
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.curvature = ml_collections.ConfigDict(dict(
      fisher_type='true', factor_batches=40, factor_batch_size=16,
      candidate_layers=(0, 1, 2, 3), projections='gate|up', max_layers=3,
      rhos=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5), max_ppl_ratio=1.25, ekfac=True))
  c.eval = ml_collections.ConfigDict(dict(ppl_batches=16, ppl_batch_size=32, bisect_steps=8))
  if arg == 'runlocal':
    c.canary.num, c.canary.repeats, c.canary.rows = 32, 10, 8
    c.train.steps_per_block, c.train.warmup_steps, c.checkpoint_every = 10, 5, 20
    c.model.update(dict(d_model=32, num_layers=2, num_heads=2, mlp_dim=48))
    c.curvature.update(dict(factor_batches=2, candidate_layers=(0, 1), max_layers=2,
                            rhos=(1.0, 0.8, 0.6), ekfac=True))
    c.eval.update(dict(ppl_batches=2, ppl_batch_size=16, bisect_steps=3))
    c.progress = False
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use runlocal or nothing')
  return c
