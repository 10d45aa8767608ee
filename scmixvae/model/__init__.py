"""scvi-tools models of scmixvae."""

from ._fit import default_max_epochs, default_n_restarts, default_state_epochs
from ._model import CplMixVAE, default_n_categories
from ._pruning import NoConsensusWarning

__all__ = [
    "CplMixVAE",
    "NoConsensusWarning",
    "default_max_epochs",
    "default_n_categories",
    "default_n_restarts",
    "default_state_epochs",
]
