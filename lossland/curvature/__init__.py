"""K-FAC curvature eigenbasis and memorization-removing weight edits.

Merullo, Vatsavaya, Bushnaq, Lewis (2025), "From Memorization to Reasoning in
the Spectrum of Loss Curvature". Typical use on any linen model:

    f = factors.estimate_factors(model.apply, params, batches,
                                 pattern=r'block_\\d+/mlp/(gate|up)', mesh=mesh, rng=rng)
    bases = eigen.eigenbasis(f)
    edited = edit.curvature_edit(params, {n: bases[n] for n in chosen}, rho=0.9)
"""
from lossland.curvature import analysis, capture, edit, eigen, factors, metrics
from lossland.curvature.capture import find_layers
from lossland.curvature.edit import curvature_edit, curvature_masks, masked_edit, svd_edit
from lossland.curvature.eigen import eigenbasis, estimate_eigencorrection, pair_mass
from lossland.curvature.factors import estimate_factors, make_factor_accumulator
from lossland.curvature.metrics import greedy_decode, perplexity, recitation_scores

__all__ = ['analysis', 'capture', 'curvature_edit', 'curvature_masks', 'edit', 'eigen',
           'eigenbasis', 'estimate_eigencorrection', 'estimate_factors', 'factors',
           'find_layers', 'greedy_decode', 'make_factor_accumulator', 'masked_edit', 'metrics',
           'pair_mass', 'perplexity', 'recitation_scores', 'svd_edit']
