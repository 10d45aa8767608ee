"""One progress display for a whole fit.

Every training run of a fit (restarts, pruning rounds, the state phase) advances the same bar, which names the stage
and shows the stage's epochs and the time it has left.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from typing import Any

from lightning.pytorch.callbacks import Callback

_ACTIVE: contextvars.ContextVar[FitProgress | None] = contextvars.ContextVar("scmixvae_fit_progress", default=None)


class FitProgress(Callback):
    """The progress bar of one fit, as a Lightning callback added to each of its training runs.

    The stage is named by the fit (``K: pruning round r`` for the training after each pruning step) or from what
    the run trains: ``categories`` (the first training of a model), ``states`` (the state phase, alone or at the
    end of a run), ``training`` (a trained model trained on), prefixed by ``restart i/n`` with restarts.
    """

    def __init__(self):
        super().__init__()
        self.bar = None
        self.restart: str = ""
        self.name, self.state_phase_start = "", None

    def __getstate__(self) -> dict[str, Any]:  # a spawned process gets no bar (tqdm cannot be pickled)
        return {**self.__dict__, "bar": None}

    def start_restart(self, restart: int, n_restarts: int) -> None:
        """Prefix the stages with ``restart restart+1/n_restarts``."""
        self.restart = f"restart {restart + 1}/{n_restarts} · "

    def run(self, *, max_epochs: int, state_epochs: int, trained: bool, stage: str | None = None) -> FitProgress:
        """Name the stage of the training run about to start (``stage``, if the fit names it); return the callback."""
        if not max_epochs:  # the state phase of the fit kept (after its restarts, if any)
            self.restart, self.name = "", "states"
        elif stage is not None:
            self.name = stage
        else:
            self.name = "training" if trained else "categories"
        self.state_phase_start = max_epochs if max_epochs and state_epochs else None
        return self

    def _describe(self, epoch: int, refresh: bool = True) -> None:
        name = "states" if self.state_phase_start is not None and epoch >= self.state_phase_start else self.name
        self.bar.set_description(f"{self.restart}{name}", refresh=refresh)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        if self.bar is None:  # on stderr, as tqdm's bars: stdout holds results (those of the CLI, for one)
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=self.name, total=trainer.max_epochs, unit="epoch", file=sys.stderr)
        else:
            self.bar.reset(total=trainer.max_epochs)
            self.bar.set_postfix_str("", refresh=False)
        self.bar.update(trainer.current_epoch)  # a run resumed from a checkpoint
        self._describe(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.bar is None or not trainer.is_global_zero:
            return
        loss = trainer.callback_metrics.get("train_loss_epoch", trainer.callback_metrics.get("train_loss"))
        if loss is not None:
            self.bar.set_postfix(train_loss=f"{float(loss):.4g}", refresh=False)
        self._describe(trainer.current_epoch + 1, refresh=False)  # drawn once, by the update
        self.bar.update(1)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.bar is not None and trainer.is_global_zero:
            self.bar.clear()  # the messages logged between runs start on a line of their own

    def close(self) -> None:
        """Close the bar (at the end of the fit)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def current(callbacks: list | None = None) -> FitProgress | None:
    """Return the progress display of the fit in progress, or ``None``.

    ``None`` too when ``callbacks`` (a training run's) hold a progress bar of the user's, which then shows instead.
    """
    from lightning.pytorch.callbacks import ProgressBar

    if any(isinstance(callback, ProgressBar) for callback in callbacks or ()):
        return None
    return _ACTIVE.get()


@contextlib.contextmanager
def fit_progress(enabled: bool) -> Iterator[FitProgress | None]:
    """Scope of one fit (a call of ``train`` or ``prune``): its training runs share one display (when ``enabled``).

    A fit inside a fit in progress shares the outer one's display.
    """
    outer = _ACTIVE.get()
    if outer is not None:
        yield outer
        return
    if not enabled:
        yield None
        return
    progress = FitProgress()
    token = _ACTIVE.set(progress)
    try:
        yield progress
    finally:
        _ACTIVE.reset(token)
        progress.close()
