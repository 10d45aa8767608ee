"""scvi-tools models of scmixvae."""

from ._model import CplMixVAE

__all__ = ["CplMixVAE"]
