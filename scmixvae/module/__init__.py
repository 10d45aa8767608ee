"""Torch modules of scmixvae."""

from ._augment import AugmenterModule
from ._components import StackedBatchNorm, StackedLinear, StackedMLP
from ._losses import category_condition_discrepancy, category_condition_divergence, condition_category_means
from ._module import CovariateLayout, CplMixVAEModule, check_temperature

__all__ = [
    "AugmenterModule",
    "CovariateLayout",
    "CplMixVAEModule",
    "StackedBatchNorm",
    "StackedLinear",
    "StackedMLP",
    "category_condition_discrepancy",
    "category_condition_divergence",
    "check_temperature",
    "condition_category_means",
]
