"""The curvature edit of Merullo et al. (2025) on a Hugging Face checkpoint folder.

Loads a local folder (`lossland.interop.hf.load`: llama, qwen2, olmo2, gpt2),
estimates K-FAC factors (or EK-FAC with `curvature.ekfac`) of the selected MLP
projections on windows of a text file, applies the edit at `curvature.rho`,
and reports held-out perplexity (`data.heldout_path`, or the last
`data.heldout_fraction` of the text file's tokens) and, when
`data.recitation_path` names a JSONL file of {"prefix": ..., "suffix": ...}
lines, greedy-decoding recitation of each suffix, before and after. The
edited model is written to WORKDIR/edited/ in the same format.

    python -m launch.analyze --config=configs/curvature/hf_edit.py \\
        --config.model.path=DIR --config.data.path=TEXT --workdir=W \\
        [--config.data.recitation_path=PAIRS.jsonl] [--config.curvature.rho=0.6]

`:runlocal` uses few, short batches, for the tiny checkpoints that the tests
make (`lossland.interop.tiny.make_random_checkpoint`).
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = 'curvature_hf_edit'
  c.seed = 0
  # dtype: the params' dtype for the analysis; save_dtype: of the written folder
  # ('' = the checkpoint's own torch_dtype/dtype, float32 when it names none).
  c.model = ml_collections.ConfigDict(dict(path='', dtype='float32', save_dtype=''))
  c.data = ml_collections.ConfigDict(dict(path='', heldout_path='', heldout_fraction=0.1,
                                          recitation_path='', seq_len=256))
  c.curvature = ml_collections.ConfigDict(dict(
      layers=r'block_\d+/mlp/(gate|up)', rho=0.8, ekfac=False, fisher_type='true',
      factor_batches=40, factor_batch_size=16,
      # The factors' eigensolver (curvature.eigen.EIGH_METHODS): 'jacobi' on TPU for wide
      # MLPs, where the default QDWH takes libtpu minutes and many GB to compile.
      eigh='auto'))
  c.eval = ml_collections.ConfigDict(dict(ppl_batches=16, ppl_batch_size=16))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.param_rules = ()
  if arg == 'runlocal':
    c.data.seq_len = 32
    c.curvature.update(dict(factor_batches=2, factor_batch_size=8))
    c.eval.update(dict(ppl_batches=2, ppl_batch_size=8))
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use runlocal or nothing')
  return c
