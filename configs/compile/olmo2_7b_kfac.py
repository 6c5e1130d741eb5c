"""K-FAC factors and the edit of an OLMo-2-7B-shaped model, compiled for a TPU pod.

    python -m launch.compile --config=configs/compile/olmo2_7b_kfac.py --topology=v5e:16x16

OLMo-2-7B's shape (Groeneveld et al. 2024 / OLMo 2 2025): d_model 4096, 32
layers, 32 heads, SwiGLU 11008, vocabulary 100278 padded to 100352, as
`models.TransformerLM` (pre-norm, no QK-norm: the same matrix shapes). Params
in bfloat16, computed in bfloat16 with float32 accumulation. Factors of the
`gate` and `up` layers of every block (64 layers: A 4096², G 11008²).

Mesh data=64 x model=4 on 256 chips: params FSDP over `data` and tensor
parallel over `model` (`parallel.transformer_rules`), the K-FAC batch (64
sequences of 1024 tokens) over `data`. The 64 factor pairs are stacked by
shape and their layer axis sharded over `data` (64): each device group of 4
holds one layer's A and G (552 MB in float32 instead of 35 GB for all), the
accumulation ends in a reduce-scatter, and the eigendecomposition and edit
run layer-parallel (`launch.compile.layer_parallel_eig_edit`): each device
group decomposes and edits its own layer (shard_map over the layer axis,
lax.map over a group's layers), with no factor gathered onto another device.
The kfac step fits (10.87 GiB per chip) and so does eig_edit with libtpu's
Jacobi eigensolver (3.36 GiB per chip); docs/results/pod_compile.md has the
figures and why not QDWH.
"""
from configs.compile import _base


def get_config(arg=None):
  c = _base.lm_config(d_model=4096, num_layers=32, num_heads=32, mlp_dim=11008,
                      vocab_size=100352, batch_size=64, seq_len=1024,
                      programs='kfac,fwd_bwd,eig_edit', mesh_data=-1, mesh_model=4,
                      param_dtype='bfloat16', dtype='bfloat16', fsdp=False)
  c.param_rules = tuple((pattern, tuple(spec)) for pattern, spec in _rules())
  c.kfac.batch_size = 64
  # libtpu's Jacobi kernel for the 4096² and 11008² factors: TPU's default eigh (QDWH) is a
  # program libtpu could not compile on a 23 GB host (a single 4096² eigh ran it out of
  # memory); --config.kfac.eigh=auto compiles QDWH where the host has the memory.
  c.kfac.eigh = 'jacobi'
  if arg == 'small':  # the same program at 2 layers, for a quick check
    c.model.num_layers = 2
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use small or nothing')
  return c


def _rules():
  from lossland import parallel  # pylint: disable=g-import-not-at-top
  return parallel.transformer_rules(fsdp_axis='data', tensor_axis='model')
