"""Lightning callbacks of scmixvae's fits."""

from __future__ import annotations

import math
from typing import Any, Literal

from lightning.pytorch.callbacks import Callback

from .. import _validation as check


class ConvergenceStopping(Callback):
    """Lightning callback: stop training when an epoch-level metric stops improving.

    The metric (``trainer.callback_metrics[monitor]``, logged every epoch by the training plan) improves when
    it beats its best value so far by more than ``rel_tol * |best|``; training stops after ``patience``
    epochs without improvement, never before ``min_epochs``. Relative, so that it needs no tuning to the
    scale of the loss (which grows with the number of genes).

    Parameters
    ----------
    monitor
        Metric to watch (``"train_loss"``, ``"elbo_train"``, ``"agreement_train"``...).
    mode
        ``"min"`` or ``"max"``.
    rel_tol
        Relative improvement that counts.
    patience
        Epochs without improvement before stopping.
    min_epochs
        Epochs always trained (after ``warmup_epochs``).
    warmup_epochs
        First epochs neither judged nor remembered: a warm-up during which the metric changes by design (e.g. a
        rising loss weight).
    """

    def __init__(
        self,
        monitor: str = "train_loss",
        *,
        mode: Literal["min", "max"] = "min",
        rel_tol: float = 2e-3,
        patience: int = 3,
        min_epochs: int = 3,
        warmup_epochs: int = 0,
    ):
        super().__init__()
        check.check_choice("mode", mode, ("min", "max"))
        self.monitor, self.mode, self.rel_tol = monitor, mode, rel_tol
        check.check_int("warmup_epochs", warmup_epochs, minimum=0)
        self.patience, self.min_epochs, self.warmup_epochs = patience, min_epochs, warmup_epochs
        self.warmed = 0
        self.best: float | None = None
        self.wait = 0
        self.epochs = 0
        self.stopped_epoch: int | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.best, self.wait, self.epochs, self.stopped_epoch, self.warmed = None, 0, 0, None, 0

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        metrics = trainer.callback_metrics
        value = metrics.get(self.monitor, metrics.get(f"{self.monitor}_epoch"))
        if value is None:
            return
        if self.warmed < self.warmup_epochs:
            self.warmed += 1
            return
        value = float(value) if self.mode == "min" else -float(value)
        self.epochs += 1
        if not math.isfinite(value):
            trainer.should_stop = True
            self.stopped_epoch = self.epochs
            return
        if self.best is None or value < self.best - self.rel_tol * abs(self.best):
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        if self.epochs >= self.min_epochs and self.wait >= self.patience:
            trainer.should_stop = True
            self.stopped_epoch = self.epochs
