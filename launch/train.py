"""Train a model from a config and write `WORKDIR/results.json`.

    python -m launch.train --config=configs/lm/pydoc_byte.py --workdir=/tmp/lm
    python -m launch.train --config=configs/lm/shakespeare_char.py \
        --config.data.path=../shared/data/tinyshakespeare.txt --workdir=/tmp/shakespeare

Re-running the same command resumes from the latest checkpoint in the workdir.
"""
from __future__ import annotations

import sys
import time

from launch import common  # sets XLA_FLAGS before jax is imported
from launch import config_cli
from launch import tasks

import jax  # noqa: E402

from lossland import parallel, train as train_lib  # noqa: E402


def run(config, workdir: str | None) -> dict:
  """Trains per `config`; returns the results dict (also written to the workdir)."""
  start = time.perf_counter()
  t = config.train
  task = tasks.build_task(config)
  mesh = common.build_mesh(config.mesh, t.batch_size)
  result = train_lib.fit(
      params=task.init_params, loss_fn=task.loss_fn, optimizer=common.build_optimizer(t),
      batch_fn=task.batch_fn, num_steps=t.num_steps, mesh=mesh,
      rng=jax.random.key(config.seed + 1), data_seed=config.seed,
      param_rules=common.param_rules(config), eval_sets=task.eval_sets,
      eval_every=config.eval.every, workdir=workdir, checkpoint_every=config.checkpoint.every,
      keep_checkpoints=config.checkpoint.keep, steps_per_block=t.steps_per_block,
      show_progress=config.get('progress', True))
  final = result.evals[-1] if result.evals else {}
  results = {
      'steps': int(result.state.step),
      'final_train_loss': final.get('train_loss', float(result.train_losses[-1])
                                    if len(result.train_losses) else float('nan')),
      'final_val_loss': final.get('val_loss', final.get('test_loss', float('nan'))),
      'tokens_per_second': train_lib.tokens_per_second(result, task.tokens_per_step),
      'compile_seconds': result.compile_seconds,
      'wall_seconds': time.perf_counter() - start,
      'devices': int(mesh.devices.size),
      'resumed_from': result.resumed_from if result.resumed_from is not None else -1,
  }
  results.update({f'final_{k}': v for k, v in final.items() if k != 'step'})
  common.write_results(workdir, results)
  return results


def main(argv=None) -> None:
  args, config = config_cli.parse(sys.argv[1:] if argv is None else argv, __doc__)
  if args.multihost:
    parallel.initialize_multihost()
  with config_cli.user_errors():
    results = run(config, args.workdir)
  if jax.process_index() == 0:
    common.print_table(results)


if __name__ == '__main__':
  main()
