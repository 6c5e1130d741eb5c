"""Where memorized inputs live in the curvature spectrum.

Merullo et al. (2025), sec. 5: split a layer's eigenbasis pairs into bands by
curvature-mass rank (top 10%, 10-25%, 25-50%, bottom 50%) and compare the
output norm each band produces, ‖(C ⊙ M_band)ᵀ U_Aᵀ a‖, on memorized versus
clean inputs. A ratio above 1 in the low-mass bands means memorized inputs
lean on low-curvature directions. Also rank statistics comparing K-FAC and
EK-FAC pair rankings.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lossland import taps
from lossland.curvature import capture as capture_lib
from lossland.curvature import eigen as eigen_lib
from lossland.curvature import layer_views

BANDS = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 1.0))
BAND_NAMES = ('top10', '10-25', '25-50', 'bottom50')


def band_masks(mass: jax.Array, bands: Sequence[tuple[float, float]] = BANDS) -> jax.Array:
  """[num_bands, rows_in, d_out] masks of pairs whose descending-mass rank fraction is in a band."""
  flat = mass.ravel()
  order = jnp.argsort(-flat, stable=True)
  frac = jnp.zeros(flat.size).at[order].set(jnp.arange(flat.size) / flat.size).reshape(mass.shape)
  return jnp.stack([(frac >= lo) & (frac < hi) for lo, hi in bands])


@jax.jit
def band_output_norms(w: jax.Array, ua: jax.Array, ug: jax.Array, rows: jax.Array,
                      masks: jax.Array) -> jax.Array:
  """Mean over input rows [N, rows_in] of ‖(C ⊙ M_b)ᵀ (U_Aᵀ a)‖ per band b -> [num_bands].

  `w` is the layer matrix [rows_in, d_out] (`capture.layer_matrix`), `rows`
  its input rows (`layer_views.input_rows`). jit-safe.
  """
  c = eigen_lib.coefficients(w.astype(jnp.float32), ua, ug)  # [rows_in, d_out]
  projected = rows.astype(jnp.float32) @ ua  # [N, rows_in]
  out = jnp.einsum('ni,bij->bnj', projected, c[None] * masks)  # [bands, N, d_out]
  return jnp.linalg.norm(out, axis=-1).mean(axis=1)


def activation_ratio(w: jax.Array, basis: eigen_lib.LayerBasis, memorized: jax.Array,
                     clean: jax.Array, mass: jax.Array | None = None) -> np.ndarray:
  """Per band: mean band-output norm on memorized input rows / on clean input rows."""
  masks = band_masks(eigen_lib.pair_mass(basis) if mass is None else mass)
  mem = band_output_norms(w, basis.UA, basis.UG, memorized, masks)
  cln = band_output_norms(w, basis.UA, basis.UG, clean, masks)
  return np.asarray(mem / jnp.maximum(cln, 1e-30))


def band_activation_ratios(apply_fn: Callable, params, bases: Mapping[str, eigen_lib.LayerBasis],
                           memorized_inputs, clean_inputs, *, memorized_from: int = 0
                           ) -> dict[str, list[float]]:
  """Per layer, `activation_ratio` of memorized vs clean token inputs (sec. 5).

  Args:
    apply_fn: `(params, tokens) -> logits`.
    params: model variables.
    bases: {path: LayerBasis} of the layers to analyse.
    memorized_inputs: [n, T] tokens of memorized sequences (e.g. canaries
      without their last token).
    clean_inputs: [m, T'] tokens of clean text.
    memorized_from: only positions from this one on count as memorized (e.g.
      prefix_len - 1: the positions that predict the suffix).
  Returns:
    {path: [ratio per band of BAND_NAMES]}.
  """
  apply_fn, params = taps.as_function(apply_fn, params)
  _, mem_acts = taps.capture(apply_fn, params, jnp.asarray(memorized_inputs), select=list(bases))
  _, clean_acts = taps.capture(apply_fn, params, jnp.asarray(clean_inputs), select=list(bases))
  ratios = {}
  for name, basis in bases.items():
    mem = layer_views.input_rows(basis.view,
                                 taps.join_calls(mem_acts.inputs[name])[:, memorized_from:])
    clean = layer_views.input_rows(basis.view, taps.join_calls(clean_acts.inputs[name]))
    ratios[name] = [float(r) for r in activation_ratio(
        capture_lib.layer_matrix(params, basis.view), basis, mem, clean)]
  return ratios


def ranking_agreement(bases: Mapping[str, eigen_lib.LayerBasis], masses: Mapping[str, jax.Array],
                      rho: float) -> tuple[dict[str, float], dict[str, float]]:
  """K-FAC vs EK-FAC per layer: (Spearman of the pair masses, Jaccard of the kept sets at ρ)."""
  from lossland.curvature import edit  # pylint: disable=import-outside-toplevel
  kfac, ekfac = edit.curvature_masks(bases, rho), edit.curvature_masks(bases, rho, masses)
  return ({n: spearman(eigen_lib.pair_mass(b), masses[n]) for n, b in bases.items()},
          {n: jaccard(kfac[n], ekfac[n]) for n in bases})


def spearman(x: jax.Array, y: jax.Array) -> float:
  """Spearman rank correlation of two equally shaped arrays."""
  rx = np.argsort(np.argsort(np.asarray(x).ravel()))
  ry = np.argsort(np.argsort(np.asarray(y).ravel()))
  return float(np.corrcoef(rx, ry)[0, 1])


def jaccard(a: jax.Array, b: jax.Array) -> float:
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  return float((a & b).sum() / max((a | b).sum(), 1))
