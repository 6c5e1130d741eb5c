"""Per-token cross-attention maps from a model's attention probabilities.

The aggregation of Attend-and-Excite (Chefer et al. 2023, sec. 3.1-3.2), also
used by A-STAR (Agarwal et al. ICCV 2023, sec. 3): average the cross-attention
probabilities over heads and over all layers at one spatial resolution
(16x16 in Stable Diffusion), drop the start token (an attention sink),
re-normalize over the remaining text tokens with a softmax of the scaled
probabilities (scale 100 in A&E's code), and optionally smooth each token's
map with a Gaussian (3x3, σ = 0.5).

The probabilities are a list of [batch, heads, H*W, tokens] arrays, one per
layer call, as `attention.apply_with_attention` returns them (taps or sown
values, see `lossland.guidance.attention`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lossland.guidance import attention as attention_lib


def available_resolutions(records: Sequence[jax.Array]) -> dict[int, int]:
  """{resolution: number of layer calls}, for square maps [b, heads, res*res, tokens]."""
  counts: dict[int, int] = {}
  for leaf in records:
    res = math.isqrt(leaf.shape[2]) if leaf.ndim == 4 else -1
    counts[res] = counts.get(res, 0) + 1
  return dict(sorted(counts.items()))


def average_maps(records: Sequence[jax.Array], resolution: int) -> jax.Array:
  """Mean over heads and over the layer calls at `resolution`: [b, res, res, tokens].

  Every (layer call, head) map weighs the same, as in Attend-and-Excite's
  `AttentionStore.aggregate_attention` (diffusers' deprecated
  `StableDiffusionAttendAndExcitePipeline`); when every layer has the same
  number of heads this is the mean over layer calls of the head means (every
  call of a layer is one map, the policy of `lossland.taps`). Jit-safe (shapes
  are static). Raises ValueError listing the resolutions the model produced if
  none matches, or if the maps at `resolution` disagree on the number of tokens.
  """
  leaves = [leaf for leaf in records
            if leaf.ndim == 4 and leaf.shape[2] == resolution * resolution]
  if not leaves:
    raise ValueError(f'the model produced no cross-attention maps at resolution '
                     f'{resolution}x{resolution}; available resolutions (res: layers): '
                     f'{available_resolutions(records)}. Set the map resolution to one of them.')
  if len({leaf.shape[-1] for leaf in leaves}) > 1:
    raise ValueError(f'the attention maps at {resolution}x{resolution} have different numbers of '
                     f'keys {sorted({leaf.shape[-1] for leaf in leaves})}: self-attention is '
                     'mixed in; select only the cross-attention layers (AttentionSource.select)')
  heads = sum(leaf.shape[1] for leaf in leaves)
  mean = sum(leaf.astype(jnp.float32).sum(axis=1) for leaf in leaves) / heads  # [b, q, tokens]
  b, _, tokens = mean.shape
  return mean.reshape(b, resolution, resolution, tokens)


KERNELS = ('gaussian', 'attend_excite')


def gaussian_kernel(size: int = 3, sigma: float = 0.5, formula: str = 'gaussian') -> np.ndarray:
  """[size, size] normalized smoothing kernel, float32.

  Args:
    formula: 'gaussian', the textbook exp(−x² / (2σ²)); or 'attend_excite',
      exp(−(x / (2σ))²) = exp(−x² / (4σ²)) as Attend-and-Excite's
      `GaussianSmoothing` (its official code and diffusers' pipeline) computes
      it: a Gaussian of standard deviation σ·√2, so its σ = 0.5 is a textbook
      σ ≈ 0.71 (3x3 weights 0.0449 / 0.1221 / 0.3319 at corner / edge / centre,
      where the textbook σ = 0.5 gives 0.0113 / 0.0838 / 0.6193).
  """
  if formula not in KERNELS:
    raise ValueError(f'unknown smoothing kernel {formula!r}; available: {KERNELS}')
  ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
  if formula == 'gaussian':
    g = np.exp(-ax ** 2 / (2 * sigma ** 2))
  else:  # computed in float32 as torch does, normalized after the outer product
    ax32 = ax.astype(np.float32)
    g = np.float32(1 / (sigma * math.sqrt(2 * math.pi))) * np.exp(-((ax32 / np.float32(2 * sigma))
                                                                     ** 2))
    k = np.outer(g, g).astype(np.float32)
    return (k / k.sum(dtype=np.float32)).astype(np.float32)
  k = np.outer(g, g)
  return (k / k.sum()).astype(np.float32)


def gaussian_smooth(maps: jax.Array, size: int = 3, sigma: float = 0.5,
                    formula: str = 'gaussian') -> jax.Array:
  """Smooths [..., H, W, M] maps over H, W with reflect padding (A&E's GaussianSmoothing after
  `F.pad(..., mode='reflect')`); `formula` as in `gaussian_kernel`."""
  kernel = jnp.asarray(gaussian_kernel(size, sigma, formula))
  pad = size // 2
  lead = maps.shape[:-3]
  x = maps.reshape((-1,) + maps.shape[-3:])  # [n, H, W, M]
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')
  h, w = maps.shape[-3], maps.shape[-2]
  out = jnp.zeros((x.shape[0], h, w, x.shape[-1]), maps.dtype)
  for i in range(size):
    for j in range(size):
      out = out + kernel[i, j] * x[:, i:i + h, j:j + w, :]
  return out.reshape(lead + out.shape[1:])


def token_maps(attention: jax.Array, text_mask: jax.Array, token_indices: jax.Array, *,
               scale: float | None = 100.0, smooth_sigma: float | None = 0.5,
               smooth_size: int = 3, smooth_formula: str = 'gaussian') -> jax.Array:
  """Maps of the concept tokens, re-normalized over the prompt's text tokens.

  Args:
    attention: [b, H, W, T] head/layer-averaged probabilities (`average_maps`).
    text_mask: [b, T] bool, True for the tokens that compete in the
      re-normalization: the prompt's words, without the start token, the end
      token and padding (`lossland.guidance.tokens.text_mask`).
    token_indices: [b, M] int positions (in the full token sequence) of the M
      concept tokens of each prompt.
    scale: softmax over tokens of `scale * probs` (A&E); None divides by the
      sum over the masked tokens instead.
    smooth_sigma: Gaussian σ for 3x3 smoothing of each map; None skips it.
    smooth_formula: 'gaussian' or 'attend_excite' (`gaussian_kernel`).
  Returns:
    [b, H, W, M] maps. Jit-safe; `scale`, `smooth_sigma`, `smooth_size`,
    `smooth_formula` static.
  """
  if isinstance(token_indices, np.ndarray):
    t = attention.shape[-1]
    if token_indices.min() < 0 or token_indices.max() >= t:
      raise ValueError(f'token indices {token_indices.tolist()} out of range: the prompt has '
                       f'{t} token positions (0..{t - 1})')
  mask = text_mask[:, None, None, :]
  if scale is None:
    probs = jnp.where(mask, attention, 0.0)
    probs = probs / jnp.maximum(probs.sum(-1, keepdims=True), 1e-12)
  else:
    probs = jax.nn.softmax(jnp.where(mask, scale * attention, -jnp.inf), axis=-1)
    probs = jnp.where(mask, probs, 0.0)
  maps = jnp.take_along_axis(probs, token_indices[:, None, None, :], axis=-1)  # [b, H, W, M]
  if smooth_sigma:
    maps = gaussian_smooth(maps, smooth_size, smooth_sigma, smooth_formula)
  return maps


def concept_maps(apply_fn: Callable, params, batch: Mapping[str, Any], *, resolution: int,
                 attention: attention_lib.AttentionSource | None = None, apply_kwargs: Mapping[str, Any] | None = None,
                 scale: float | None = 100.0, smooth_sigma: float | None = 0.5) -> jax.Array:
  """The concept tokens' maps [b, res, res, M] of one model call, as the guidance losses see them.

  Args:
    apply_fn: `(params, x, t, tokens, **apply_kwargs) -> ε` (e.g. `model.apply`).
    params: the model's variables.
    batch: a dict with 'x' [b, H, W, C] (the noised input z_t), 't' [b]
      timesteps, 'tokens' [b, T], 'text_mask' [b, T] and 'token_indices' [b, M].
    resolution: the map resolution.
    attention: an `attention.AttentionSource` (default: taps' AttentionWeights layers).
    scale, smooth_sigma: as in `token_maps`.
  Jit-safe (wrap it in `jax.jit` with the keyword arguments static).
  """
  source = attention_lib.AttentionSource() if attention is None else attention
  missing = [k for k in ('x', 't', 'tokens', 'text_mask', 'token_indices') if k not in batch]
  if missing:
    raise ValueError(f'the batch lacks {missing}; concept_maps needs x, t, tokens, text_mask '
                     f'and token_indices (it has {sorted(batch)})')
  model_fn = attention_lib.apply_with_attention(apply_fn, source, apply_kwargs)
  _, records = model_fn(params, batch['x'], batch['t'], batch['tokens'])
  return token_maps(average_maps(records, resolution), batch['text_mask'],
                    batch['token_indices'], scale=scale, smooth_sigma=smooth_sigma)
