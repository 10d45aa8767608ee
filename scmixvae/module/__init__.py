"""Torch modules of scmixvae."""

from ._augment import AugmenterModule
from ._components import StackedBatchNorm, StackedLinear, StackedMLP
from ._losses import category_condition_discrepancy
from ._module import CplMixVAEModule, check_temperature

__all__ = [
    "AugmenterModule",
    "CplMixVAEModule",
    "StackedBatchNorm",
    "StackedLinear",
    "StackedMLP",
    "category_condition_discrepancy",
    "check_temperature",
]
