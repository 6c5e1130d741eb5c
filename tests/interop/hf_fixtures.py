"""Fixture folders, their reference logits and loaded checkpoints for the interop tests."""
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from lossland.interop import hf

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / 'fixtures' / 'hf'
NAMES = ('llama3_gqa', 'llama_tied', 'qwen2', 'olmo2', 'gpt2', 'gemma3', 'qwen3', 'mistral',
         'olmo3', 'gemma2', 'phi3', 'gpt_neox', 'qwen3_moe')
STORED_DTYPES = {'llama3_gqa': 'float32', 'llama_tied': 'bfloat16', 'qwen2': 'float16',
                 'olmo2': 'float32', 'gpt2': 'float32', 'gemma3': 'bfloat16', 'qwen3': 'float32',
                 'mistral': 'bfloat16', 'olmo3': 'float32', 'gemma2': 'bfloat16',
                 'phi3': 'float32', 'gpt_neox': 'float16', 'qwen3_moe': 'float32'}
# Fixtures with sliding-window layers (windows of 5-8 positions, under the 20 test tokens).
SLIDING = ('gemma3', 'mistral', 'olmo3', 'gemma2', 'phi3')


def logit_tolerance(ref: np.ndarray) -> float:
  """Float32 rounding bound for logits computed by two implementations of the same maths.

  Each logit passes through two blocks of about eight stages that round
  (norms, dot products of up to 128 terms summed in a library-specific order,
  softmax, residual adds); reassociating a K-term sum changes it by about
  sqrt(K) units of float32 epsilon of its terms' scale. 32 epsilon relative
  to the logit scale bounds that with margin (measured: 6-7 epsilon).
  """
  return 32 * float(jnp.finfo(jnp.float32).eps) * (1.0 + float(np.abs(ref).max()))


@functools.cache
def _load(name: str, dtype):
  return hf.load(FIXTURES / name, dtype=dtype)


def checkpoint(name: str, dtype=jnp.float32) -> hf.Checkpoint:
  """The fixture `name` loaded once per session (treat it as read-only)."""
  return _load(name, None if dtype is None else jnp.dtype(dtype).name)


@functools.cache
def forward(name: str):
  """jit of the float32 fixture model's `apply` (compiled once per session and shape)."""
  return jax.jit(checkpoint(name).model.apply)


def reference(name: str):
  ref = np.load(FIXTURES / name / 'reference.npz')
  return ref['tokens'], ref['logits']
