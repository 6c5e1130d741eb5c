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
"""
from lossland.curvature import (analysis, capture, edit, eigen, factors, layer_views,
                                likelihoods, metrics)
from lossland.curvature.capture import find_layers
from lossland.curvature.edit import curvature_edit, curvature_masks, masked_edit, svd_edit
from lossland.curvature.eigen import (LayerBasis, eigenbasis, estimate_eigencorrection,
                                      pair_mass)
from lossland.curvature.factors import LayerFactors, estimate_factors, make_factor_accumulator
from lossland.curvature.layer_views import MatrixView
from lossland.curvature.metrics import greedy_decode, perplexity, recitation_scores

__all__ = ['LayerBasis', 'LayerFactors', 'MatrixView', 'analysis', 'capture', 'curvature_edit',
           'curvature_masks', 'edit', 'eigen', 'eigenbasis', 'estimate_eigencorrection',
           'estimate_factors', 'factors', 'find_layers', 'greedy_decode', 'layer_views',
           'likelihoods', 'make_factor_accumulator', 'masked_edit', 'metrics', 'pair_mass',
           'perplexity', 'recitation_scores', 'svd_edit']
