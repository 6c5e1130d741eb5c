"""Scoring generated shape scenes against their prompts, and McNemar's test between arms.

Metrics (per sample, from `lossland.data.shapes.detect`):
* success: every prompted (colour, shape) pair is detected (two-object
  success for two-object prompts, single-object success otherwise);
* presence: the fraction of prompted pairs detected;
* binding: among detected objects whose colour and shape both occur in the
  prompt, the fraction whose pairing is one of the prompt's (NaN if none).

McNemar's exact test (McNemar 1947) compares two arms on paired samples
(same prompt and seed): with b = #(arm A succeeds, B fails) and c the reverse,
p = P(Binomial(b + c, 1/2) is at least as extreme as b), two-sided.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats

from lossland.data import shapes

Object = tuple[str, str]


def score(images: np.ndarray, prompts: Sequence[Sequence[Object]]) -> dict[str, np.ndarray]:
  """Per-sample `success`, `presence`, `binding` (float arrays [n]) of uint8 images [n,H,W,3]."""
  if len(images) != len(prompts):
    raise ValueError(f'{len(images)} images but {len(prompts)} prompts')
  success, presence, binding = [], [], []
  for image, objects in zip(images, prompts):
    found = {(d.colour, d.shape) for d in shapes.detect(image)}
    hits = [o in found for o in objects]
    success.append(float(all(hits)))
    presence.append(float(np.mean(hits)))
    colours = {c for c, _ in objects}
    kinds = {s for _, s in objects}
    relevant = [o for o in found if o[0] in colours and o[1] in kinds]
    binding.append(np.mean([o in objects for o in relevant]) if relevant else np.nan)
  return {'success': np.array(success), 'presence': np.array(presence),
          'binding': np.array(binding, dtype=np.float64)}


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
  """Exact two-sided McNemar test of paired binary outcomes `a`, `b` ([n] of 0/1)."""
  a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
  if a.shape != b.shape:
    raise ValueError(f'paired outcomes need equal shapes, got {a.shape} and {b.shape}')
  only_a = int(np.sum(a & ~b))
  only_b = int(np.sum(~a & b))
  n = only_a + only_b
  p = 1.0 if n == 0 else float(stats.binomtest(only_a, n, 0.5).pvalue)
  return {'only_a': only_a, 'only_b': only_b, 'p': p}
