"""Memorization metrics of Merullo et al. (2025), sec. 4.1.

* Recitation: greedy-decode `L` tokens after a prefix and compare them with
  the true suffix. Strict = exact match; loose = 1 - Levenshtein/L >= 0.75;
  also the mean normalized Levenshtein distance.
* Perplexity: exp of the mean next-token NLL over all scored tokens (the
  paper's code averages exp(loss) per batch; we do not).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


def cache_model(apply_fn: Callable):
  """The `CausalLM` that `apply_fn` is the bound `apply` of, or None (no KV cache to use).

  Only `lossland.models.CausalLM` has a KV cache; `TransformerLM` and other
  models re-run the whole buffer per token.
  """
  from lossland.models import hf_lm  # pylint: disable=import-outside-toplevel
  model = getattr(apply_fn, '__self__', None)
  if isinstance(model, hf_lm.CausalLM) and getattr(apply_fn, '__name__', '') == 'apply':
    return model
  return None


def greedy_decode(apply_fn: Callable, params, prefixes: jax.Array, num_tokens: int, *,
                  use_cache: bool | None = None) -> jax.Array:
  """Greedy continuation of `prefixes` [n, P] by `num_tokens` tokens -> [n, num_tokens].

  With a KV cache (`apply_fn` is a `CausalLM`'s `apply`; `use_cache=None`
  picks it then) the prefixes are run once and each further token costs one
  position (`lossland.models.hf_lm.greedy_decode`). Without one, the model
  runs on a fixed [n, P + num_tokens] buffer each step, so it compiles once per
  shape. Both give the same tokens up to float32 rounding of near-tied logits
  (the tests check they agree token for token). `use_cache=True` on a model
  without a cache is a ValueError. jit-safe; `apply_fn`, `num_tokens` and
  `use_cache` are static.
  """
  model = cache_model(apply_fn)
  if use_cache and model is None:
    raise ValueError('use_cache=True needs a lossland.models.CausalLM (pass its model.apply); '
                     f'{apply_fn!r} has no KV cache: use use_cache=None or False')
  if model is not None and use_cache is not False:
    from lossland.models import hf_lm  # pylint: disable=import-outside-toplevel
    return hf_lm.greedy_decode(model, params, prefixes, num_tokens)
  n, plen = prefixes.shape
  buffer = jnp.concatenate([prefixes, jnp.zeros((n, num_tokens), prefixes.dtype)], axis=1)

  def body(i, buf):
    logits = apply_fn(params, buf)  # [n, P + L, vocab]; causal, so the zeros are not seen
    nxt = jnp.argmax(logits[:, plen + i - 1], axis=-1).astype(buf.dtype)
    return buf.at[:, plen + i].set(nxt)

  buffer = jax.lax.fori_loop(0, num_tokens, body, buffer)
  return buffer[:, plen:]


def levenshtein(a, b) -> int:
  """Edit distance between two token sequences (insertions, deletions, substitutions)."""
  a, b = list(np.asarray(a)), list(np.asarray(b))
  prev = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    cur = [i] + [0] * len(b)
    for j, y in enumerate(b, 1):
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
    prev = cur
  return prev[-1]


def recitation_scores(generated: np.ndarray, suffixes: np.ndarray,
                      loose_threshold: float = 0.75) -> dict[str, float]:
  """Strict, loose and mean normalized Levenshtein of generated vs true suffixes [n, L]."""
  generated, suffixes = np.asarray(generated), np.asarray(suffixes)
  if generated.shape != suffixes.shape:
    raise ValueError(f'generated {generated.shape} and suffixes {suffixes.shape} differ in shape')
  length = suffixes.shape[1]
  dist = np.array([levenshtein(g, s) / length for g, s in zip(generated, suffixes)])
  return {'strict': float(np.mean(np.all(generated == suffixes, axis=1))),
          'loose': float(np.mean(1.0 - dist >= loose_threshold)),
          'levenshtein': float(np.mean(dist))}


def nll_sum(apply_fn: Callable, params, batch) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token NLL, number of scored tokens) of `batch` {'inputs','targets'[,'mask']}."""
  logits = apply_fn(params, batch['inputs'])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
  mask = batch.get('mask', jnp.ones_like(nll))
  return (nll * mask).sum(), mask.sum()


def perplexity(total_nll: float, count: float) -> float:
  """exp(mean NLL)."""
  if count <= 0:
    raise ValueError('perplexity of zero tokens; give at least one scored token')
  return float(np.exp(total_nll / count))
