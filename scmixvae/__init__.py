"""scmixvae: cell types and within-type states from single-cell RNA-seq with coupled mixture VAEs."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from ._logging import follow_scvi_verbosity

if TYPE_CHECKING:
    from . import data, model, module, pl, tl, train

try:
    __version__ = version("scmixvae")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__", "data", "model", "module", "pl", "tl", "train"]
_SUBPACKAGES = frozenset(__all__) - {"__version__"}

follow_scvi_verbosity()  # the package's messages are shown at scvi-tools' verbosity (`scvi.settings.verbosity`)


def __getattr__(name: str):
    # the subpackages import torch, scvi-tools and scanpy: loaded on first use (PEP 562), so that
    # `import scmixvae` and the command line's --help stay fast
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBPACKAGES)
