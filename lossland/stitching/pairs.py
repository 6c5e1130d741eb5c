"""Layer pairs and the per-pair scores of stitching (Balogh & Jelasity, AAAI 2025, Sec. 3-5).

A stitch connects a layer of the front network A (`Pair.source`) to a layer of
the back network B (`Pair.target`). Every pairwise entry point keys its
results by `Pair`, a NamedTuple, so results are plain dicts that are also
pytrees (stitch params `{Pair: {'w', 'b'}}` train and jit as they are).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Sequence

import numpy as np


class Pair(NamedTuple):
  """A stitch from layer `source` of A into layer `target` of B ('/'-joined module paths)."""
  source: str
  target: str

  def __str__(self) -> str:
    return f'{self.source}->{self.target}'


def all_pairs(layers_a: Sequence[str], layers_b: Sequence[str]) -> list[Pair]:
  """Every (layer of A, layer of B) pair, rows (A) major: the L_A x L_B matrix in reading order."""
  return [Pair(a, b) for a in layers_a for b in layers_b]


def as_pairs(pairs: Sequence) -> list[Pair]:
  """`pairs` (Pair or (source, target) tuples) as a list of `Pair`; rejects anything else."""
  out = []
  for p in pairs:
    if isinstance(p, str) or not isinstance(p, Sequence) or len(p) != 2:
      raise TypeError(f'a layer pair is Pair(source, target) or a (source, target) tuple of '
                      f'layer paths; got {p!r}')
    out.append(Pair(*p))
  return out


@dataclasses.dataclass(frozen=True)
class StitchScores:
  """What `StitchEvaluator` measures for one stitched network (Sec. 3.2, 5).

  Attributes:
    accuracy: fraction of examples whose stitched prediction equals the label.
    structural: ‖T(a) − b‖² / ‖b‖², the stitched activation's squared error
      relative to the target layer's own activation (DM minimizes it).
    ood_ratio: mean Mahalanobis distance of stitched activations from the
      target layer's Gaussian, divided by that of the real activations (~1:
      in distribution).
  """
  accuracy: float
  structural: float
  ood_ratio: float


METRICS = tuple(f.name for f in dataclasses.fields(StitchScores))


def scores_matrix(scores: Mapping[Pair, StitchScores], rows: Sequence[str], cols: Sequence[str],
                  metric: str) -> np.ndarray:
  """[len(rows), len(cols)] matrix of one metric; M[i, j] is the stitch rows[i] -> cols[j]."""
  if metric not in METRICS:
    raise ValueError(f'unknown metric {metric!r}; StitchScores has {METRICS}')
  return np.array([[getattr(scores[Pair(a, b)], metric) for b in cols] for a in rows])


def more_similar_than_itself(m: np.ndarray, margin: float) -> int:
  """Off-diagonal entries M[i, j] > M[j, j] + margin: source i beats target j's own layer (Sec. 4)."""
  m = np.asarray(m)
  if m.ndim != 2 or m.shape[0] != m.shape[1]:
    raise ValueError(f'expected a square layer x layer matrix, got shape {m.shape}')
  off = ~np.eye(len(m), dtype=bool)
  return int(((m > np.diag(m)[None, :] + margin) & off).sum())
