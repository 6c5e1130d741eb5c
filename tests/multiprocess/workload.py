"""The checks of tests/test_multiprocess.py, run on every process of a (multi-)process job.

`compute(stage, workdir)` trains, estimates K-FAC factors and an edit, streams
minibatch CKA and direct-matching statistics, and saves or resumes
checkpoints, with each process loading only its rows of every global batch.
The test runs it once in its own process (1 process x 8 devices) and once as
`python tests/multiprocess/workload.py STAGE WORKDIR OUT.npz` on 2 local
processes x 4 devices (`lossland.parallel.run_local_processes`); process 0
writes the fetched (replicated) results to OUT.npz.
"""
from __future__ import annotations

import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lossland import curvature, data, models, parallel, train

SEQ, BATCH, VOCAB = 8, 16, 32
FIT_STEPS, SAVED_STEP = 8, 4


def tokens() -> np.ndarray:
  return np.random.default_rng(0).integers(0, VOCAB, 4096).astype(np.int32)


def global_mesh():
  return parallel.make_mesh({'data': -1, 'model': 1}, jax.devices())


def lm():
  model = models.TransformerLM(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2,
                               mlp_dim=32)
  params = model.init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))
  return model, jax.device_get(params)


def batch_fn(step: int):
  return data.lm_batch(tokens(), step, batch_size=BATCH, seq_len=SEQ, seed=1,
                       process_index=jax.process_index(), process_count=jax.process_count())


def local_rows(x: np.ndarray) -> np.ndarray:
  """This process's contiguous share of the global rows of `x`."""
  n = len(x) // jax.process_count()
  return x[jax.process_index() * n:(jax.process_index() + 1) * n]


def fit(mesh, num_steps: int, workdir: str | None):
  """`train.fit` of the tiny LM, with a typed key (`fit` places it with `parallel.put_replicated`,
  since jax refuses to device_put typed keys onto a mesh that spans processes)."""
  model, params = lm()
  return train.fit(params=params, loss_fn=train.next_token_loss(model.apply),
                   optimizer=train.adamw(learning_rate=1e-2), batch_fn=batch_fn,
                   num_steps=num_steps, mesh=mesh, rng=jax.random.key(2), data_seed=1,
                   workdir=workdir, checkpoint_every=SAVED_STEP if workdir else 0,
                   steps_per_block=SAVED_STEP, show_progress=False)


def params_out(prefix: str, params) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
  return {f'{prefix}/{parallel.path_name(p)}': np.asarray(x) for p, x in flat}


def copy_workdir(source: str, target: str, *, drop_after: int) -> None:
  """Copies a run's workdir without the checkpoints after step `drop_after`."""
  def ignore(directory, names):
    if os.path.basename(directory) != 'checkpoints':
      return ['lock']
    return [n for n in names if n.isdigit() and int(n) > drop_after]
  shutil.copytree(source, target, ignore=ignore)


def kfac_and_edit(mesh) -> dict[str, np.ndarray]:
  model, params = lm()
  rng = np.random.default_rng(3)
  batches = [{'inputs': local_rows(rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)),
              'targets': local_rows(rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32))}
             for _ in range(2)]
  params = jax.device_put(params, parallel.replicated(mesh))
  factors = curvature.estimate_factors(model.apply, params, batches, rng=jax.random.PRNGKey(4),
                                       select=r'block_\d+/mlp/(gate|up)', mesh=mesh)
  bases = curvature.eigenbasis(factors)
  edited = curvature.curvature_edit(params, bases, rho=0.8)
  out = {}
  for name, f in factors.items():
    out[f'kfac/{name}/A'] = np.asarray(jax.device_get(f.A))
    out[f'kfac/{name}/G'] = np.asarray(jax.device_get(f.G))
    out[f'kfac/{name}/count'] = np.asarray(f.count)
  edited = jax.device_get(edited)
  for name in factors:
    out[f'edit/{name}'] = np.asarray(edited['params'][name.split('/')[0]]['mlp'][
        name.split('/')[-1]]['kernel'])
  return out


def stitching_stats(mesh) -> dict[str, np.ndarray]:
  from lossland import stitching  # noqa: PLC0415 (imported where used)
  model = models.MLP(features=(12, 10), num_classes=3)
  x = np.random.default_rng(5).normal(size=(128, 6)).astype(np.float32)
  pa = jax.device_get(model.init(jax.random.key(6), x[:1]))
  pb = jax.device_get(model.init(jax.random.key(7), x[:1]))
  layers = ['dense_0', 'dense_1']
  _, acts_a = stitching.capture(model, pa, x, layers)
  _, acts_b = stitching.capture(model, pb, x, layers)
  feats = [np.asarray(acts_a[n]) for n in layers] + [np.asarray(acts_b[n]) for n in layers]
  # 64 rows a batch: streaming.minibatch_cka_matrix checks rows per device with this
  # process's rows (not the global batch), so each process needs 4 per device itself.
  batches = [[local_rows(f[i:i + 64]) for f in feats] for i in (0, 64)]
  cka = stitching.minibatch_cka_matrix(batches, 2, mesh=mesh)
  matching = stitching.dm_statistics(
      model, pa, model, pb, [{'inputs': local_rows(x[:64])}, {'inputs': local_rows(x[64:])}],
      layers_a=layers, layers_b=layers, mesh=mesh)
  out = {'cka': np.asarray(jax.device_get(cka))}
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(matching.stats))[0]
  out.update({f'dm_stats/{parallel.path_name(p)}': np.asarray(v) for p, v in flat})
  for src in layers:
    for tgt in layers:
      sol = jax.device_get(matching.solve((src, tgt)))
      out[f'dm/{src}->{tgt}/w'] = np.asarray(sol['w'])
      out[f'dm/{src}->{tgt}/b'] = np.asarray(sol['b'])
  return out


def compute(stage: str, workdir: str) -> dict[str, np.ndarray]:
  """The arrays to compare, for stage 'reference' (1 process) or 'multi' (several).

  reference: trains FIT_STEPS steps in WORKDIR/one, with checkpoints at
  SAVED_STEP and at the end. multi: copies WORKDIR/one without its last
  checkpoint to WORKDIR/multi and resumes it: the state saved by one process
  is restored by several, which train the remaining steps and save the end
  state (restored by one process in the test). Both: K-FAC factors and the
  edit, streamed CKA and direct-matching statistics.
  """
  mesh = global_mesh()
  out = {}
  if stage == 'reference':
    result = fit(mesh, FIT_STEPS, os.path.join(workdir, 'one'))
  elif stage == 'multi':
    target = os.path.join(workdir, 'multi')
    if jax.process_index() == 0:
      copy_workdir(os.path.join(workdir, 'one'), target, drop_after=SAVED_STEP)
    sync('copied')
    result = fit(mesh, FIT_STEPS, target)
    if result.resumed_from != SAVED_STEP:
      raise AssertionError(f'resumed from {result.resumed_from}, not {SAVED_STEP}')
  else:
    raise ValueError(f'unknown stage {stage!r}')
  out['fit/losses'] = result.train_losses
  out.update(params_out('fit/params', result.state.params))
  out.update(kfac_and_edit(mesh))
  out.update(stitching_stats(mesh))
  out['process_count'] = np.asarray(jax.process_count())
  out['device_count'] = np.asarray(jax.device_count())
  return out


def sync(name: str) -> None:
  """All processes wait here (a no-op in one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def main(stage: str, workdir: str, out_path: str) -> None:
  parallel.initialize_multihost()
  out = compute(stage, workdir)
  if jax.process_index() == 0:
    np.savez(out_path, **out)
  sync('saved')


if __name__ == '__main__':
  main(*sys.argv[1:])
