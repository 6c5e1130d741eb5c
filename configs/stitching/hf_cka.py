"""Layer-by-layer CKA between two Hugging Face causal LMs on a text file.

    python -m launch.analyze --config=configs/stitching/hf_cka.py \
        --config.model_a=DIR_A --config.model_b=DIR_B --config.data.path=TEXT --workdir=W

Both folders are read with `lossland.interop.hf.load` (llama, qwen2, olmo2,
gpt2; float32 for the analysis) and must share a tokenizer: the text is
tokenized once, cut into non-overlapping windows of `data.seq_len` tokens and
streamed in batches of `data.batch_size` windows through both models; the
minibatch linear CKA (Nguyen et al., ICLR 2021, Eq. 2) between the residual
stream after every block of A (`layers_a`, a regex over module paths) and of
B (`layers_b`) is accumulated over all batches. `unit`: 'tokens' (every token
position is an example; default) or 'pooled' (the mean over each window's
tokens is one example). Writes `W/results.json`, `W/cka.npz` (values, rows,
cols) and `W/cka.png`.

Each device's share of a batch is one minibatch and needs at least 4 rows:
tokens per device = batch_size · seq_len / devices, windows per device for
'pooled'. `:runlocal` is the small setting of the tests (two tiny random
checkpoints; seconds on CPU).
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = 'stitching_hf_cka'
  c.model_a = ''  # Hugging Face folder (config.json, *.safetensors, tokenizer.json)
  c.model_b = ''
  c.data = ml_collections.ConfigDict(dict(path='', seq_len=128, batch_size=16, max_batches=0))
  c.layers_a = r'block_\d+'  # the residual stream after each decoder block
  c.layers_b = r'block_\d+'
  c.unit = 'tokens'
  c.dtype = 'float32'
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.figures = True
  if arg == 'runlocal':
    c.data.seq_len, c.data.batch_size, c.data.max_batches = 16, 8, 4
  elif arg not in (None, ''):
    raise ValueError(f'unknown config arg {arg!r}; use runlocal or nothing')
  return c
