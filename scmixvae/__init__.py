"""scmixvae: cell types and within-type states from single-cell RNA-seq with coupled mixture VAEs."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import data, model, module, pl, tl, train

try:
    __version__ = version("scmixvae")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__", "data", "model", "module", "pl", "tl", "train"]
