"""Model stitching and representation similarity (Balogh & Jelasity, AAAI 2025).

* capture / splice: `layer_names`, `capture`, `replace_layer`, `stitched_apply`
* stitching layers and direct matching: `apply_stitch`, `init_stitch`,
  `dm_statistics`, `solve_direct`, `solve_all`, `make_evaluator`
* task loss matching: `make_tlm_trainer`, `tlm_optimizer`
* similarity indices: `cka`, `linear_cka`, `minibatch_cka_matrix`, `mean_cca`,
  `svcca`, `pwcca`, `procrustes`, `mutual_knn`
* OOD: `gaussian`, `mahalanobis_sum`; data: `load_digit_pairs`
"""
from lossland.stitching.splice import capture, layer_names, replace_layer, stitched_apply
from lossland.stitching.cca import canonical_correlations, mean_cca, procrustes, pwcca, svcca
from lossland.stitching.alignment import (cka, cka_from_hsic, cka_matrix, hsic_biased,
                                    hsic_matrix_update, hsic_unbiased, linear_cka)
from lossland.stitching.digit_pairs import DigitPairs, load_digit_pairs, make_pairs
from lossland.stitching.knn import mutual_knn
from lossland.stitching.matching import (Layout, apply_stitch, init_stitch, make_layout,
                                         solve_direct, stitch_inputs, structural_residual,
                                         target_moments, target_rows, update_stats, init_stats)
from lossland.stitching import plots
from lossland.stitching.ood import gaussian, mahalanobis_sum
from lossland.stitching.pairwise import (dm_statistics, layer_shapes, make_dm_statistics,
                                         make_evaluator, pair_key,
                                         solve_all)
from lossland.stitching.streaming import make_hsic_update, minibatch_cka_matrix
from lossland.stitching.tlm import make_tlm_trainer, stitched_losses, tlm_optimizer
