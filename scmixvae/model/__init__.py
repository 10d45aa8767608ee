"""scvi-tools models of scmixvae."""

from ._model import (
    CplMixVAE,
    default_max_epochs,
    default_n_categories,
    default_n_restarts,
    default_options,
    default_state_epochs,
)

__all__ = [
    "CplMixVAE",
    "default_max_epochs",
    "default_n_categories",
    "default_n_restarts",
    "default_options",
    "default_state_epochs",
]
