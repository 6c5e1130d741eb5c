"""Model stitching and representation similarity (Balogh & Jelasity, AAAI 2025).

Any linen model, as an `nn.Module` or an `apply_fn`, with `apply_kwargs`;
batches are dicts of host arrays ({'inputs'[, 'labels']}); `mesh=None` uses
all local devices on the `data` axis; pairwise results are keyed by
`Pair(source, target)`. Typical use:

    layers = st.layer_names(model, params_a, x)[:4]
    pairs = st.all_pairs(layers, layers)
    dm = st.dm_statistics(model, params_a, model, params_b, train_batches,
                          layers_a=layers, layers_b=layers)
    stitches = dm.solve_all()                                    # {Pair: {'w', 'b'}}
    scores = st.evaluate_stitches(model, params_a, model, params_b, stitches,
                                  dm.gaussians(), test_batches)  # {Pair: StitchScores}
    tlm = st.TaskLossMatching(model, model, pairs).fit(
        stitches, params_a, params_b, batch_fn, num_steps=1000)
    cka = st.streamed_cka(model, params_a, model, params_b, batches,
                          layers_a=layers, layers_b=layers, unit='tokens')

* capture / splice: `layer_names`, `capture`, `replace_layer`, `stitched_apply`
* stitches and direct matching: `apply_stitch`, `init_stitch`, `init_stitches`,
  `DirectMatching` / `dm_statistics` -> `DMStatistics`, `solve_direct`
* evaluation: `StitchEvaluator` / `evaluate_stitches` -> {Pair: `StitchScores`},
  `scores_matrix`, `more_similar_than_itself`
* task loss matching: `TaskLossMatching` (`fit` -> `TLMResult`), `tlm_optimizer`
* similarity: `similarity_matrices`, `layer_similarity`, `streamed_cka` ->
  `SimilarityMatrix`; indices `cka`, `linear_cka`, `cka_matrix`,
  `minibatch_cka_matrix`, `mean_cca`, `svcca`, `pwcca`, `procrustes`, `mutual_knn`
* units for token/spatial axes: `units.UNITS` ('tokens', 'pooled')
* models with different tokenizers: `token_alignment` (units where both tokenizations
  have a boundary, windows of whole units, `aligned_features`); a permutation null
  for a CKA matrix: `cka_null` -> `CKANull` (null mean, percentiles, p-values)
* OOD: `Gaussian`, `gaussian`, `mahalanobis_sum`; data: `load_digit_pairs`
"""
from lossland.stitching import plots, token_alignment, units
from lossland.stitching.alignment import (cka, cka_from_hsic, cka_matrix, hsic_biased,
                                          hsic_matrix_update, hsic_unbiased, linear_cka)
from lossland.stitching.cca import canonical_correlations, mean_cca, procrustes, pwcca, svcca
from lossland.stitching.digit_pairs import DigitPairs, load_digit_pairs, make_pairs
from lossland.stitching.knn import mutual_knn
from lossland.stitching.matching import (Layout, apply_stitch, init_stats, init_stitch,
                                         make_layout, solve_direct, stitch_inputs,
                                         structural_residual, target_moments, target_rows,
                                         update_stats)
from lossland.stitching.ood import Gaussian, gaussian, mahalanobis_sum
from lossland.stitching.pairs import (Pair, StitchScores, all_pairs, more_similar_than_itself,
                                      scores_matrix)
from lossland.stitching.pairwise import (DirectMatching, DMStatistics, StitchEvaluator,
                                         dm_statistics, evaluate_stitches, layer_shapes)
from lossland.stitching.permutation_null import CKANull, cka_null, permuted_cka
from lossland.stitching.similarity import (INDICES, SimilarityMatrix, layer_similarity,
                                           select_layers, similarity_matrices, streamed_cka)
from lossland.stitching.splice import capture, layer_names, replace_layer, stitched_apply
from lossland.stitching.streaming import make_hsic_update, minibatch_cka_matrix
from lossland.stitching.tlm import (TaskLossMatching, TLMBlock, TLMResult, init_stitches,
                                    stitch_dims, stitched_losses, tlm_optimizer)
from lossland.stitching.units import UNITS
