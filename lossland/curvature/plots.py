"""Figures: factor spectra and kept curvature mass per layer (Merullo et al. 2025, fig. 2)."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lossland.curvature import eigen as eigen_lib  # noqa: E402


def plot_spectra(bases: Mapping, path: str) -> None:
  """Eigenvalues of A (λ) and G (μ) per layer, log scale."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  for name, b in bases.items():
    axes[0].semilogy(np.maximum(np.asarray(b.lam), 1e-12), label=name)
    axes[1].semilogy(np.maximum(np.asarray(b.mu), 1e-20), label=name)
  axes[0].set_title('A = E[a aᵀ] eigenvalues λ')
  axes[1].set_title('G = E[g gᵀ] eigenvalues μ')
  for ax in axes:
    ax.set_xlabel('index (descending)')
  axes[1].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def kept_mass_curve(mass: np.ndarray, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
  """(fraction of pairs kept, fraction of mass kept) with pairs taken in descending mass."""
  flat = np.sort(np.asarray(mass).ravel())[::-1]
  cum = np.cumsum(flat) / max(flat.sum(), 1e-30)
  idx = np.unique(np.geomspace(1, flat.size, points).astype(int)) - 1
  return (idx + 1) / flat.size, cum[idx]


def plot_kept_mass(bases: Mapping, path: str, rhos: Sequence[float] = ()) -> None:
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, b in bases.items():
    x, y = kept_mass_curve(np.asarray(eigen_lib.pair_mass(b)))
    ax.semilogx(x, y, label=name)
  for rho in rhos:
    ax.axhline(rho, color='gray', lw=0.5, ls=':')
  ax.set_xlabel('fraction of pairs kept (descending mass)')
  ax.set_ylabel('fraction of curvature mass kept')
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_sweep(rhos, series: Mapping[str, Sequence[float]], path: str, ylabel: str,
               xlabel: str = 'ρ (fraction of curvature mass kept)') -> None:
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for label, values in series.items():
    ax.plot(rhos, values, marker='o', label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_bands(ratios: Mapping[str, Sequence[float]], band_names: Sequence[str], path: str) -> None:
  fig, ax = plt.subplots(figsize=(5, 3.5))
  width = 0.8 / max(len(ratios), 1)
  for i, (name, r) in enumerate(ratios.items()):
    ax.bar(np.arange(len(band_names)) + i * width, r, width, label=name)
  ax.axhline(1.0, color='gray', lw=0.5)
  ax.set_xticks(np.arange(len(band_names)) + 0.4 - width / 2)
  ax.set_xticklabels(band_names)
  ax.set_ylabel('‖C a‖ memorized / clean')
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
