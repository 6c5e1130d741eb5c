"""Which matmul precision pays off on the machine at hand.

bfloat16 operands with float32 accumulation (`TransformerLM(matmul_dtype=...)`)
halve the cost of a matrix product only where the hardware has bfloat16 dot
units: GPUs, TPUs, and CPUs with AVX512-BF16 or AMX (x86) or the BF16
extension (Arm). On other CPUs (AVX2-only x86, for instance) XLA emulates a
bfloat16 dot by converting both operands to float32 first, so the mixed path is
slower than plain float32 and loses precision for nothing.

`preferred_matmul_dtype(platform)` makes that choice from what the CPU reports
(`/proc/cpuinfo` on Linux, `sysctl` on macOS) rather than from the machine a
config was written on; configs select it with `model.matmul_dtype='auto'`.
"""
from __future__ import annotations

import functools
import platform as platform_lib
import subprocess

import jax.numpy as jnp

# CPU feature names (as /proc/cpuinfo spells them) that give bfloat16 dot products.
X86_BF16_FLAGS = ('avx512_bf16', 'amx_bf16')
ARM_BF16_FLAGS = ('bf16',)


def bf16_dot_flags(cpuinfo: str) -> tuple[str, ...]:
  """The bfloat16 dot-product features listed in a `/proc/cpuinfo` text."""
  flags: set[str] = set()
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(':')
    if key.strip().lower() in ('flags', 'features'):
      flags.update(value.split())
  return tuple(f for f in X86_BF16_FLAGS + ARM_BF16_FLAGS if f in flags)


@functools.cache
def cpu_has_bf16_dots() -> bool:
  """Whether this host's CPU has bfloat16 dot-product instructions."""
  try:
    with open('/proc/cpuinfo') as f:
      return bool(bf16_dot_flags(f.read()))
  except OSError:
    pass
  if platform_lib.system() == 'Darwin':
    try:
      out = subprocess.run(['sysctl', '-n', 'hw.optional.arm.FEAT_BF16'], capture_output=True,
                           text=True, timeout=5, check=False).stdout.strip()
      return out == '1'
    except (OSError, subprocess.SubprocessError):
      pass
  return False


def preferred_matmul_dtype(platform: str):
  """bfloat16 where `platform` (`jax.default_backend()`) has bfloat16 dots, else float32."""
  if platform == 'cpu':
    return jnp.bfloat16 if cpu_has_bf16_dots() else jnp.float32
  return jnp.bfloat16
