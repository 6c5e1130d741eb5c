"""Heatmaps of layer x layer matrices (PNG files)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def save_heatmaps(path: str, matrices: Mapping[str, np.ndarray], *, rows: Sequence[str],
                  cols: Sequence[str], title: str = '', xlabel: str = 'target layer (B)',
                  ylabel: str = 'source layer (A)', max_cols: int = 4) -> str:
  """One panel per matrix, annotated with values; writes `path` and returns it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(matrices)
  ncols = min(len(names), max_cols)
  nrows = -(-len(names) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.4 * nrows), squeeze=False)
  for ax in axes.flat[len(names):]:
    ax.axis('off')
  for ax, name in zip(axes.flat, names):
    m = np.asarray(matrices[name], np.float64)
    im = ax.imshow(m, cmap='viridis')
    ax.set_title(name, fontsize=9)
    ax.set_xticks(range(len(cols)), [c.split('/')[-1] for c in cols], rotation=90, fontsize=6)
    ax.set_yticks(range(len(rows)), [r.split('/')[-1] for r in rows], fontsize=6)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    for i in range(m.shape[0]):
      for j in range(m.shape[1]):
        ax.text(j, i, f'{m[i, j]:.2g}', ha='center', va='center', fontsize=5, color='w')
    fig.colorbar(im, ax=ax, fraction=0.046)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
