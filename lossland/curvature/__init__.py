"""K-FAC curvature eigenbasis and memorization-removing weight edits.

Merullo, Vatsavaya, Bushnaq, Lewis (2025), "From Memorization to Reasoning in
the Spectrum of Loss Curvature". Works on any linen model's Dense,
DenseGeneral, Einsum and Conv layers (reached through `lossland.taps`, viewed
as matrices by `layer_views`). Typical use:

    f = factors.estimate_factors(model.apply, params, batches, rng=rng,
                                 select=r'block_\\d+/mlp/(gate|up)')
    bases = eigen.eigenbasis(f)                      # {path: LayerBasis}
    edited = edit.curvature_edit(params, {n: bases[n] for n in chosen}, rho=0.9)

`likelihood='gaussian'` (regression) or a callable fits the Fisher to other
models; `homogeneous=True` includes biases; `apply_kwargs={'train': False}`
passes keyword arguments to the model.

The experiment logic of the paper is here too: `evaluate.LMEvaluator`
(held-out perplexity and recitation), `selection` (layers and ρ chosen on a
sweep set, sec. 4.1; ρ for classifiers, sec. 4.3) and `controls` (random,
inverted and SVD edits at matched perplexity, sec. 4.1).
"""
from lossland.curvature import (analysis, capture, controls, edit, eigen, evaluate, factors,
                                layer_views, likelihoods, metrics, selection)
from lossland.curvature.capture import find_layers
from lossland.curvature.controls import Bisection, matched_control, same_count_controls
from lossland.curvature.edit import curvature_edit, curvature_masks, masked_edit, svd_edit
from lossland.curvature.eigen import (LayerBasis, eigenbasis, estimate_eigencorrection,
                                      pair_mass)
from lossland.curvature.evaluate import LMEvaluator, Recitation
from lossland.curvature.factors import LayerFactors, estimate_factors, make_factor_accumulator
from lossland.curvature.layer_views import MatrixView
from lossland.curvature.metrics import greedy_decode, perplexity, recitation_scores
from lossland.curvature.selection import RhoSweep, Selection, SweepPoint, select_layers_and_rho

__all__ = ['Bisection', 'LMEvaluator', 'LayerBasis', 'LayerFactors', 'MatrixView', 'Recitation',
           'RhoSweep', 'Selection', 'SweepPoint', 'analysis', 'capture', 'controls',
           'curvature_edit', 'curvature_masks', 'edit', 'eigen', 'eigenbasis',
           'estimate_eigencorrection', 'estimate_factors', 'evaluate', 'factors', 'find_layers',
           'greedy_decode', 'layer_views', 'likelihoods', 'make_factor_accumulator',
           'masked_edit', 'matched_control', 'metrics', 'pair_mass', 'perplexity',
           'recitation_scores', 'same_count_controls', 'select_layers_and_rho', 'selection',
           'svd_edit']
