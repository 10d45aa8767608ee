"""Training plan of the coupled mixture VAE."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from scvi.train import TrainingPlan


class CplMixVAETrainingPlan(TrainingPlan):
    """scvi-tools :class:`~scvi.train.TrainingPlan` with the published schedule of cpl-mixVAE.

    The published method trains with Adam at a constant learning rate and no KL warm-up, so
    ``n_epochs_kl_warmup`` defaults to ``None`` here (scVI's plan warms up over 400 epochs). Every term of
    the loss is logged per agent (``reconstruction_agent{a}``, ``kl_agent{a}``, ``neg_entropy_agent{a}``)
    together with ``coupling`` and the agents' ``agreement``, and lands in ``model.history``.

    Parameters
    ----------
    module
        A :class:`~scmixvae.module.CplMixVAEModule`.
    lr
        Learning rate of Adam.
    weight_decay
        Weight decay of Adam.
    n_epochs_kl_warmup
        Epochs over which the state KL weight rises from ``min_kl_weight`` to ``max_kl_weight``.
    **kwargs
        Further keyword arguments of :class:`~scvi.train.TrainingPlan`.
    """

    def __init__(
        self,
        module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        n_epochs_kl_warmup: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            module, lr=lr, weight_decay=weight_decay, eps=eps, n_epochs_kl_warmup=n_epochs_kl_warmup, **kwargs
        )


class InterruptFlag(Callback):
    """Record that training was stopped by ``KeyboardInterrupt`` (Lightning then exits through ``SystemExit``)."""

    def __init__(self):
        self.interrupted = False
        self.history = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted = True
            self.history = getattr(trainer.logger, "history", None)
