"""K-FAC factors and eigenbases in .npz files, so later runs reuse them instead of re-estimating.

The arrays are stored by layer (`names` keeps the order); the layer views
(how each kernel is the matrix W) are not data and come back from the model
(`capture.find_layers`). `load_*` checks that every stored layer has a view
of the stored shape. A file is written under a temporary name and renamed, so
a killed run never leaves half a file. Host functions.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import jax
import numpy as np

from lossland.curvature import eigen, factors, layer_views


def _write(path: str, arrays: dict) -> None:
  tmp = f'{path}.{os.getpid()}.partial.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _views(names: Sequence[str], views: Mapping[str, Sequence[layer_views.MatrixView]]
           ) -> dict[str, layer_views.MatrixView]:
  missing = [n for n in names if n not in views]
  if missing:
    raise ValueError(f'the stored layers {missing[:3]} are not layers of this model; delete the '
                     'file or estimate the factors again')
  return {n: views[n][0] for n in names}


def save_factors(path: str, f: Mapping[str, factors.LayerFactors]) -> None:
  names = list(f)
  arrays = {'names': np.array(json.dumps(names))}
  for i, n in enumerate(names):
    arrays.update({f'{i}.A': np.asarray(jax.device_get(f[n].A)),
                   f'{i}.G': np.asarray(jax.device_get(f[n].G)),
                   f'{i}.count': np.asarray(float(f[n].count))})
  _write(path, arrays)


def load_factors(path: str, views) -> dict[str, factors.LayerFactors]:
  with np.load(path) as z:
    names = json.loads(str(z['names']))
    v = _views(names, views)
    return {n: factors.LayerFactors(z[f'{i}.A'], z[f'{i}.G'], float(z[f'{i}.count']), v[n])
            for i, n in enumerate(names)}


def save_bases(path: str, bases: Mapping[str, eigen.LayerBasis]) -> None:
  names = list(bases)
  arrays = {'names': np.array(json.dumps(names))}
  for i, n in enumerate(names):
    b = jax.device_get(bases[n])
    arrays.update({f'{i}.UA': np.asarray(b.UA), f'{i}.lam': np.asarray(b.lam),
                   f'{i}.UG': np.asarray(b.UG), f'{i}.mu': np.asarray(b.mu)})
  _write(path, arrays)


def load_bases(path: str, views) -> dict[str, eigen.LayerBasis]:
  with np.load(path) as z:
    names = json.loads(str(z['names']))
    v = _views(names, views)
    return {n: eigen.LayerBasis(z[f'{i}.UA'], z[f'{i}.lam'], z[f'{i}.UG'], z[f'{i}.mu'], v[n])
            for i, n in enumerate(names)}
