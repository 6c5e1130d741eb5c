"""What compiling the K-FAC eigendecomposition for TPU costs, per eigensolver and matrix size.

    python -m launch.eigh_compile_cost --sizes=1024,4096,11008 --methods=auto,jacobi

For each size n and method it compiles `curvature.eigen.layer_eigenbasis` of
one float32 n x n factor (the other factor 1 x 1) for one chip of v5e:2x2 with
libtpu, in a fresh spawned process (a compile that runs the host out of memory
is reported, not fatal), and prints one JSON line per pair: compile seconds,
the program's temporaries and generated code, and the child's peak host
memory (maxrss). 'auto' is TPU's default, QDWH spectral divide and conquer
(Nakatsukasa & Higham 2013), which jax expands into a large program above
256²; 'jacobi' is libtpu's Eigh kernel (docs/results/pod_compile.md).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from launch.isolated import run_isolated, signal_name


def compile_one(n: int, method: str) -> dict:
  """In the child process: compile the eigenbasis of one n x n factor; its figures."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import SingleDeviceSharding  # pylint: disable=g-import-not-at-top

  from launch import compile as compile_lib  # pylint: disable=g-import-not-at-top
  from lossland.curvature import eigen  # pylint: disable=g-import-not-at-top

  device = compile_lib.topology_devices('v5e:2x2')[0]
  factor = lambda d: jax.ShapeDtypeStruct((d, d), jnp.float32,  # noqa: E731
                                          sharding=SingleDeviceSharding(device))
  fn = jax.jit(lambda a, g: eigen.layer_eigenbasis(a, g, method))
  lowered = fn.lower(factor(n), factor(1))
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  return {'temp_bytes': int(memory.temp_size_in_bytes),
          'generated_code_bytes': int(memory.generated_code_size_in_bytes),
          'compile_seconds': seconds,
          'maxrss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measure(n: int, method: str) -> dict:
  """Figures of one compile in a spawned process; a crash, kill or error is reported as such."""
  start = time.perf_counter()
  try:
    figures, code = run_isolated(compile_one, n, method)
    if figures is None:  # died of a signal: SIGKILL is the kernel's OOM killer
      figures = {'failed': f'killed by {signal_name(code)} (exit code {code})'}
  except RuntimeError as e:  # libtpu refused the program (e.g. RESOURCE_EXHAUSTED)
    figures = {'failed': str(e)}
  result = {'n': n, 'method': method, 'wall_seconds': time.perf_counter() - start}
  result.update(figures)
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='1024,4096,11008', help='comma-separated n')
  parser.add_argument('--methods', default='auto,jacobi', help='comma-separated, of '
                      'curvature.eigen.EIGH_METHODS that run on TPU: auto, jacobi, qdwh')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  from launch import common  # pylint: disable=g-import-not-at-top
  common.quiet_platforms()  # the spawned compiles inherit its quiet libtpu environment
  from lossland.curvature import eigen  # pylint: disable=g-import-not-at-top
  try:
    sizes = [int(s) for s in args.sizes.split(',')]
    methods = [eigen.check_eigh_method(m.strip()) for m in args.methods.split(',')]
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None
  if 'qr' in methods:
    raise SystemExit("error: --methods: 'qr' does not run on TPU; use auto, jacobi or qdwh")
  for n in sizes:
    for method in methods:
      print(json.dumps(measure(n, method), sort_keys=True), flush=True)


if __name__ == '__main__':
  main()
