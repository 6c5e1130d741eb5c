"""LOST pre-training of a 1B LLaMA-shaped model at sequence 256 (LOST, Li et al. 2025).

    python -m launch.compile --config=configs/compile/llama_1b_lost.py --topology=v5e:16x16

`llama_1b_dense` with every attention and MLP linear map replaced by
`lowrank.LostDense` at half the dense parameters (sparsity 0.05, gamma 0.5:
the settings of `configs/lowrank/pretrain_compare.py`); embeddings, norms
and head stay dense. FSDP of every large param over all chips.

`:rank512` sets every LOST layer's rank to 512 instead of the half-budget
ranks (461 for attention, 670 for the MLP): 670 and the MLP width 5461 have no
factor 256 divides, so at the budget ranks the MLP factors stay replicated;
at 512 every factor but the 102-row sparse columns of gate/up shards over
256 chips (538 M instead of 604 M linear params).
"""
from configs.compile import _base


def get_config(arg=None):
  c = _base.lm_config(d_model=2048, num_layers=24, num_heads=32, mlp_dim=5461, vocab_size=32000,
                      batch_size=512, seq_len=256, programs='train', fsdp=True)
  c.lowrank.kind = 'lost'
  if arg == 'rank512':
    c.lowrank.rank = 512  # wins over param_fraction (lowrank.budget.plan)
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use rank512 or nothing')
  return c
