"""Torch modules of scmixvae."""

from ._augment import AugmenterModule
from ._components import StackedBatchNorm, StackedLinear, StackedMLP
from ._module import CplMixVAEModule, check_temperature

__all__ = ["AugmenterModule", "CplMixVAEModule", "StackedBatchNorm", "StackedLinear", "StackedMLP", "check_temperature"]
