"""Low-rank and sparse weight parameterizations for pre-training (LOST and its baselines).

Paper: "LOST: Low-rank and Sparse Pre-training for Large Language Models" (Li
et al. 2025); baselines SLTrain (Han et al. 2024), CoLA (Liu et al. 2024),
plain low-rank, GaLore (Zhao et al. 2024) and full rank.

    from lossland import lowrank
    dense = lowrank.dense_factory('lost', param_fraction=0.5, sparsity=0.05, gamma=0.5)
    model = TransformerLM(vocab_size=256, d_model=256, dense=dense)

    # any linen model, its code untouched:
    fm = lowrank.replace_dense(my_model, 'lost', select=r'.*mlp/.*', param_fraction=0.5)
    variables = fm.init(rng, x, train=False)
    y = fm.apply(variables, x, train=True, rngs={'dropout': key})
    variables = fm.convert(trained_dense_variables, x, train=False)

- `factorize`: pure functions W0 -> factors (`svd_factors`, `lost_factors`, ...).
- `layers`: linen layers with `nn.Dense`'s signature (`LostDense`, `LowRankDense`,
  `ColaDense`, `SLTrainDense`).
- `budget`: parameter / FLOP formulas and ranks for a parameter fraction.
- `factory`: `dense_factory`, `linear_layers`, `layer_plans`, `cost_table`.
- `replace`: `replace_dense`, factorizing the Dense/DenseGeneral layers of any
  linen model through `lossland.taps`, and converting its trained dense variables.
- `convert`: a trained dense kernel -> each layer's factors.
- `galore`: GaLore as an optax gradient transformation.
- `compare`: the pre-training comparison's arms (`arm_spec`, `OptimizerRecipe`,
  `train_arm`, `summarize_arm`); loaded on first use, since it imports
  `lossland.train` (and orbax).
"""
import importlib

from lossland.lowrank.budget import KINDS, LayerPlan, equal_param_rank, plan, rank_for_budget
from lossland.lowrank.convert import lost_from_dense, lowrank_from_dense, sltrain_from_dense
from lossland.lowrank.factorize import (LostFactors, lost_factors, sltrain_support, svd_factors,
                                        xavier_factors)
from lossland.lowrank.factory import (LinearLayer, cost_table, dense_factory, format_table,
                                      layer_plans, linear_layers, linear_param_count)
from lossland.lowrank.galore import galore_adamw, scale_by_galore
from lossland.lowrank.layers import CONSTANTS, ColaDense, LostDense, LowRankDense, SLTrainDense
from lossland.lowrank.replace import FactorizedModel, Site, replace_dense

__all__ = ['CONSTANTS', 'ColaDense', 'FactorizedModel', 'KINDS', 'LayerPlan', 'LinearLayer',
           'LostDense', 'LostFactors', 'LowRankDense', 'SLTrainDense', 'Site', 'cost_table',
           'dense_factory', 'equal_param_rank', 'format_table', 'galore_adamw', 'layer_plans',
           'linear_layers', 'linear_param_count', 'lost_factors', 'lost_from_dense',
           'lowrank_from_dense', 'plan', 'rank_for_budget', 'replace_dense', 'scale_by_galore',
           'sltrain_from_dense', 'sltrain_support', 'svd_factors', 'xavier_factors']

# Names of `lossland.lowrank.compare`, imported on first use (PEP 562).
_COMPARE = ('ARMS', 'ARM_SETTINGS', 'Arm', 'ArmRun', 'ArmSummary', 'OptimizerRecipe', 'arm_spec',
            'cached_arm_run', 'galore_mask', 'relative_to', 'summarize_arm', 'train_arm')
__all__ += list(_COMPARE)


def __getattr__(name: str):
  if name in _COMPARE:
    return getattr(importlib.import_module('lossland.lowrank.compare'), name)
  raise AttributeError(f'module lossland.lowrank has no attribute {name!r}')


def __dir__():
  return sorted(set(globals()) | set(_COMPARE))
