"""2 processes x 4 CPU devices give the answers of 1 process x 8 devices.

One module-level run (to pay the JAX start-up of the two processes once):
`tests/multiprocess/workload.py` runs in this pytest process on its 8 fake
devices (the reference), then as 2 local processes with 4 devices each,
coordinated by `jax.distributed` on a free localhost port
(`lossland.parallel.run_local_processes`, the recipe of BUILD.md's
multi-host section). Each process loads only its rows of every global batch.
Checkpoints cross over: the 2 processes resume the 1-process run's step-4
checkpoint and save step 8, which this process then restores.

Tolerances: the programs are the same up to the device layout, so the only
difference is the order of the float32 reductions over the batch (an
all-reduce of 8 per-device partial sums, done within and across processes by
gloo instead of within one process). Each such sum differs by a few ulp
(~1e-7 relative to the sum of magnitudes); factors, Grams and HSIC sums are one
such reduction (rtol 1e-5 leaves ~100x headroom); 4 Adam steps at lr 1e-2
move params by ~1e-2, so a 1e-6-relative gradient difference moves them by
far less than 1e-5 (atol 1e-5).
"""
from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import pytest

from lossland import parallel

WORKLOAD = os.path.join(os.path.dirname(__file__), 'multiprocess', 'workload.py')


def _load_workload():
  spec = importlib.util.spec_from_file_location('multiprocess_workload', WORKLOAD)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


workload = _load_workload()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('multiprocess'))
  t0 = time.perf_counter()
  reference = workload.compute('reference', workdir)
  t1 = time.perf_counter()
  out_path = os.path.join(workdir, 'multi.npz')
  parallel.run_local_processes(
      parallel.python_argv(WORKLOAD, 'multi', workdir, out_path), num_processes=2,
      devices_per_process=4, timeout=480, env={**os.environ, 'OPENBLAS_NUM_THREADS': '1'})
  t2 = time.perf_counter()
  multi = dict(np.load(out_path))
  restored = workload.fit(workload.global_mesh(), workload.FIT_STEPS,
                          os.path.join(workdir, 'multi'))
  print(f'multiprocess timings: reference {t1 - t0:.1f} s, 2 processes {t2 - t1:.1f} s, '
        f'restore {time.perf_counter() - t2:.1f} s')
  return reference, multi, restored


def _close(reference, multi, prefix, *, rtol, atol):
  keys = sorted(k for k in reference if k.startswith(prefix))
  assert keys and keys == sorted(k for k in multi if k.startswith(prefix))
  for k in keys:
    np.testing.assert_allclose(multi[k], reference[k], rtol=rtol, atol=atol, err_msg=k)


def test_two_processes_share_eight_devices(runs):
  reference, multi, _ = runs
  assert (int(reference['process_count']), int(reference['device_count'])) == (1, 8)
  assert (int(multi['process_count']), int(multi['device_count'])) == (2, 8)


def test_fit_resumed_on_two_processes_matches_one(runs):
  """Steps 4-8 on 2 processes (from the 1-process checkpoint): same losses and params."""
  reference, multi, _ = runs
  assert multi['fit/losses'].shape == (workload.FIT_STEPS - workload.SAVED_STEP,)
  np.testing.assert_allclose(multi['fit/losses'], reference['fit/losses'][workload.SAVED_STEP:],
                             rtol=1e-5)
  _close(reference, multi, 'fit/params/', rtol=0, atol=1e-5)


def test_checkpoint_of_two_processes_restores_in_one(runs):
  reference, multi, restored = runs
  assert restored.already_finished and restored.resumed_from == workload.FIT_STEPS
  got = workload.params_out('fit/params', restored.state.params)
  for k, v in got.items():
    np.testing.assert_array_equal(v, multi[k], err_msg=k)  # the bytes the 2 processes saved
  _close(reference, got, 'fit/params/', rtol=0, atol=1e-5)


def test_kfac_factors_and_edit_match(runs):
  reference, multi, _ = runs
  _close(reference, multi, 'kfac/', rtol=1e-5, atol=1e-8)
  _close(reference, multi, 'edit/', rtol=0, atol=1e-5)


def test_streamed_cka_and_direct_matching_match(runs):
  reference, multi, _ = runs
  _close(reference, multi, 'cka', rtol=1e-5, atol=1e-7)
  _close(reference, multi, 'dm_stats/', rtol=1e-5, atol=1e-5)
  _close(reference, multi, 'dm/', rtol=1e-3, atol=1e-4)


def test_failing_process_reports_its_output(tmp_path):
  script = tmp_path / 'fail.py'
  script.write_text('import os, sys\nif os.environ["JAX_PROCESS_ID"] == "1":\n'
                    '  sys.exit("process one gives up")\nimport time\ntime.sleep(60)\n')
  with pytest.raises(parallel.LocalProcessError, match=r'(?s)process 1 of 2 exited with status 1'
                                                       r'.*process one gives up'):
    parallel.run_local_processes(parallel.python_argv(str(script)), num_processes=2,
                                 devices_per_process=1, timeout=60)
  with pytest.raises(parallel.LocalProcessError, match='did not finish within 1 s'):
    parallel.run_local_processes(parallel.python_argv(str(tmp_path / 'fail.py')),
                                 num_processes=1, devices_per_process=1, timeout=1)
