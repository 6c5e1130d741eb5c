"""Shared shape of the pod-compile configs (`python -m launch.compile`).

A config here is a `launch.train` LM config (task, model, train, mesh,
param_rules) plus the `compile`, `kfac` and `lowrank` sections that
`launch.compile` reads; `data` is never loaded (the vocabulary size is
`compile.vocab_size`).
"""
import ml_collections


def lm_config(*, d_model, num_layers, num_heads, mlp_dim, vocab_size, batch_size, seq_len,
              programs, mesh_data=-1, mesh_model=1, param_dtype='', fsdp=True,
              dtype='float32', matmul_dtype='bfloat16', tie_embeddings=False):
  c = ml_collections.ConfigDict()
  c.task = 'lm'
  c.seed = 0
  c.progress = False
  c.data = ml_collections.ConfigDict(dict(source='none (compile only)', path='', vocab='byte',
                                          data_dir=''))
  c.model = ml_collections.ConfigDict(dict(
      name='transformer_lm', d_model=d_model, num_layers=num_layers, num_heads=num_heads,
      mlp_dim=mlp_dim, tie_embeddings=tie_embeddings, dtype=dtype, matmul_dtype=matmul_dtype))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=batch_size, seq_len=seq_len, num_steps=10000, learning_rate=1e-3,
      final_lr=1e-4, warmup_steps=1000, b1=0.9, b2=0.95, weight_decay=0.0, grad_clip=1.0,
      steps_per_block=1))
  c.eval = ml_collections.ConfigDict(dict(every=0, num_batches=1, batch_size=batch_size))
  c.checkpoint = ml_collections.ConfigDict(dict(every=0, keep=1))
  c.mesh = ml_collections.ConfigDict(dict(data=mesh_data, model=mesh_model))
  c.param_rules = ()
  c.compile = ml_collections.ConfigDict(dict(programs=programs, param_dtype=param_dtype,
                                             fsdp=fsdp, vocab_size=vocab_size,
                                             residual_sharding=False))
  c.kfac = ml_collections.ConfigDict(dict(select=r'block_\d+/mlp/(gate|up)',
                                          batch_size=batch_size, rho=0.6, eigh='auto'))
  c.lowrank = ml_collections.ConfigDict(dict(kind='dense', param_fraction=0.5, sparsity=0.05,
                                             gamma=0.5))
  return c
