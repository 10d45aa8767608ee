"""What a user sees while scmixvae works: its messages, and fits free of other libraries' repeated notices.

The package's messages are shown at scvi-tools' verbosity; a fit hides the notices and warnings that the libraries
below it raise because of how scmixvae drives them.

* The ``scmixvae`` logger hands its records to scvi-tools' ``scvi`` logger (:func:`follow_scvi_verbosity`), as if
  it were one of its children: they are shown by scvi-tools' console handler at ``scvi.settings.verbosity``
  (``logging.INFO`` by default; ``logging.WARNING`` silences them).
* :func:`quiet_fit` is the scope of one fit (training, pruning rounds, restarts): it hides what Lightning and torch
  would otherwise repeat for every trainer the fit opens, and nothing else.

This module imports neither torch nor scvi-tools at import time (``import scmixvae`` stays fast).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import warnings
from collections.abc import Iterator

#: Lightning's loggers whose INFO lines a fit repeats for every trainer it opens: "GPU available: ...",
#: "TPU available: ...", the LitLogger tip, "`Trainer.fit` stopped: ...", on a GPU "LOCAL_RANK: 0 -
#: CUDA_VISIBLE_DEVICES: ..." and, for restarts, "Seed set to ...".
_LIGHTNING_NOTICES = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.fabric.utilities.seed",
)

#: Warnings raised below the package because of how it trains, as (message regex, category): torch's notice that
#: sparse CSR support is in beta (the fit's sparse minibatches, ``load_sparse_tensor``), and Lightning's use of
#: torch's deprecated ``LeafSpec`` (raised on every trainer, whatever the model).
_FIT_WARNINGS = (
    (r"Sparse CSR tensor support is in beta", UserWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


def follow_scvi_verbosity(name: str = "scmixvae") -> None:
    """Make the ``name`` logger (and so every ``scmixvae.*`` logger) a child of scvi-tools' ``scvi`` logger.

    Its level then follows ``scvi.settings.verbosity`` and its records reach the handler scvi-tools sets up (and
    stop there, as scvi-tools' own do). A level set on a ``scmixvae`` logger itself still takes precedence.
    """
    logging.getLogger(name).parent = logging.getLogger("scvi")


def log_interval(n_cells: int, batch_size: int, train_size: float | None = None) -> int:
    """Lightning's ``log_every_n_steps`` for a fit: scvi-tools' 10, or fewer when an epoch has fewer minibatches.

    Lightning warns when an epoch has fewer training minibatches than the interval. The count is taken low
    (``floor(n_cells * train_size / batch_size)``, scvi-tools' default ``train_size`` 0.9), at least 1.
    """
    n_batches = math.floor(n_cells * (0.9 if train_size is None else train_size) / batch_size)
    return max(1, min(10, n_batches))


@contextlib.contextmanager
def quiet_fit() -> Iterator[None]:
    """Scope of one fit: hide the notices and warnings that every trainer it opens would repeat.

    * Lightning's INFO lines (:data:`_LIGHTNING_NOTICES`) are raised to WARNING, unless scvi-tools' verbosity is
      DEBUG or lower (or those loggers are already at WARNING or above); their levels are restored afterwards.
    * Sparse tensor invariant checks are set explicitly to their current value (off unless the user turned them
      on), which is what torch asks for instead of warning that they are "implicitly disabled".
    * The warnings of :data:`_FIT_WARNINGS` are ignored, inside this scope only (:func:`warnings.catch_warnings`).

    Every other warning and message passes as before.
    """
    import torch

    loggers = [logging.getLogger(name) for name in _LIGHTNING_NOTICES]
    levels = [lg.level for lg in loggers]
    if logging.getLogger("scvi").getEffectiveLevel() > logging.DEBUG:
        for lg in loggers:
            if lg.getEffectiveLevel() < logging.WARNING:
                lg.setLevel(logging.WARNING)
    check_invariants = torch.sparse.check_sparse_tensor_invariants
    try:
        with warnings.catch_warnings(), check_invariants(enable=check_invariants.is_enabled()):
            for message, category in _FIT_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class _WithoutTrainRunnerPrint:
    """A text stream that passes everything on to ``stream`` but scvi-tools' print of a training run's exception.

    scvi-tools' training runner prints ``Exception raised during training. <class 'NameError'> <error>`` to stdout
    for any exception of a run (a Ctrl-C included), then raises it: the caller gets the error itself. ``print``
    writes each argument, separator and end on its own, so the line is dropped from its first piece to its end.
    """

    _FIRST_PIECE = "Exception raised during training."

    def __init__(self, stream) -> None:
        self._stream = stream
        self._dropping = False

    def write(self, text: str) -> int:
        if text == self._FIRST_PIECE:
            self._dropping = True
        if not self._dropping:
            return self._stream.write(text)
        self._dropping = text != "\n"
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def without_train_runner_print() -> Iterator[None]:
    """Scope of a training run whose errors reach the caller without scvi-tools' stray print of them."""
    with contextlib.redirect_stdout(_WithoutTrainRunnerPrint(sys.stdout)):
        yield
