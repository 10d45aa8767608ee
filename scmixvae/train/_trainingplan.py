"""Training plan of the coupled mixture VAE."""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from scvi.train import SaveCheckpoint, TrainingPlan

logger = logging.getLogger(__name__)


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
    eps
        Epsilon of Adam.
    n_epochs_kl_warmup
        Epochs over which the state KL weight rises from ``min_kl_weight`` to ``max_kl_weight``.
    fused_optimizer
        Use the fused implementation of Adam (one kernel for all parameters; on the CPU about a third of the
        time of the default loop over parameters) where the parameters' device supports it.
    **kwargs
        Further keyword arguments of :class:`~scvi.train.TrainingPlan` (``compile=True`` compiles the module
        with :func:`torch.compile`).

    Notes
    -----
    With the default epoch-level logging (``on_step=False``) the per-agent metrics are summed on the device
    during the epoch and logged once, in the epoch's last step, weighted by the minibatch sizes: the value
    Lightning would compute from per-step calls of ``self.log``, at a fraction of their cost (a dozen calls per
    step), and in ``trainer.callback_metrics`` when callbacks look at the end of the epoch.
    """

    def __init__(
        self,
        module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        n_epochs_kl_warmup: int | None = None,
        fused_optimizer: bool = True,
        **kwargs: Any,
    ):
        super().__init__(
            module, lr=lr, weight_decay=weight_decay, eps=eps, n_epochs_kl_warmup=n_epochs_kl_warmup, **kwargs
        )
        self.fused_optimizer = fused_optimizer
        self._metric_sums: dict[str, tuple[list[str], torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ optimiser
    def _optimizer_creator_fn(self, optimizer_cls):
        """Adam or AdamW, fused where the parameters' device supports it."""

        def create(params):
            params = list(params)
            kwargs = {"lr": self.lr, "eps": self.eps, "weight_decay": self.weight_decay}
            devices = {p.device.type for p in params}
            if self.fused_optimizer and devices <= {"cpu", "cuda", "mps"} and len(devices) == 1:
                try:
                    return optimizer_cls(params, fused=True, **kwargs)
                except (RuntimeError, TypeError, ValueError) as err:  # older torch, unsupported dtype
                    logger.debug("fused %s not available (%s); using the default", optimizer_cls.__name__, err)
            return optimizer_cls(params, **kwargs)

        return create

    # ------------------------------------------------------------------ metrics
    def compute_and_log_metrics(self, loss_output, metrics, mode: str) -> None:
        """Log the ELBO terms as scvi-tools does; accumulate the scalar extra metrics for the epoch's end."""
        extra = loss_output.extra_metrics
        if self.on_step or not self.on_epoch or not extra:
            return super().compute_and_log_metrics(loss_output, metrics, mode)
        names = [k for k, v in extra.items() if isinstance(v, torch.Tensor) and v.dim() == 0]
        rest = {k: v for k, v in extra.items() if k not in names}
        if names:
            values = torch.stack([extra[k].detach().float() for k in names])
            n_obs = float(loss_output.n_obs_minibatch)
            if mode in self._metric_sums and self._metric_sums[mode][0] == names:
                _, sums, weight = self._metric_sums[mode]
                sums.add_(values, alpha=n_obs)
                weight.add_(n_obs)
            else:
                self._metric_sums[mode] = (names, values * n_obs, values.new_tensor(n_obs))
        object.__setattr__(loss_output, "extra_metrics", rest)  # LossOutput is frozen
        try:
            super().compute_and_log_metrics(loss_output, metrics, mode)
        finally:
            object.__setattr__(loss_output, "extra_metrics", extra)
        if mode == "train" and self._last_training_batch():
            # log inside the last step, so that callbacks reading callback_metrics at the epoch's end see them
            self._log_epoch_metrics("train")

    def _last_training_batch(self) -> bool:
        try:
            progress = self.trainer.fit_loop.epoch_loop.batch_progress
            return bool(progress.is_last_batch or progress.current.ready >= self.trainer.num_training_batches)
        except (AttributeError, RuntimeError):  # no trainer attached
            return False

    def _log_epoch_metrics(self, mode: str) -> None:
        entry = self._metric_sums.pop(mode, None)
        if entry is None:
            return
        names, sums, weight = entry
        means = sums / weight.clamp(min=1.0)
        for name, value in zip(names, means.unbind(), strict=True):
            self.log(f"{name}_{mode}", value, on_step=False, on_epoch=True, sync_dist=self.use_sync_dist)

    def on_train_epoch_start(self) -> None:
        self._metric_sums.pop("train", None)
        super().on_train_epoch_start()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")
        super().on_train_epoch_end()

    def on_validation_epoch_start(self) -> None:
        self._metric_sums.pop("validation", None)
        super().on_validation_epoch_start()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("validation")
        super().on_validation_epoch_end()


class InterruptFlag(Callback):
    """Record that training was stopped by ``KeyboardInterrupt`` (Lightning then exits through ``SystemExit``)."""

    def __init__(self):
        self.interrupted = False
        self.history = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted = True
            self.history = getattr(trainer.logger, "history", None)


class TrainingCheckpoint(SaveCheckpoint):
    """Lightning checkpoints of the whole training state, to resume a long fit after an interruption.

    Every ``every_n_epochs`` epochs a ``.ckpt`` file with the module's weights (category mask included), the
    optimiser's state and the epoch and step counters is written to ``dirpath``, and ``last.ckpt`` points to
    the newest. To resume, build the model again on the same data with the same arguments and pass the file
    to :meth:`~scmixvae.model.CplMixVAE.train`: ``model.train(max_epochs=..., ckpt_path=".../last.ckpt")``
    continues at the saved epoch (``max_epochs`` counts from the start of the original fit).

    It is a :class:`scvi.train.SaveCheckpoint` only so that scvi-tools' trainer turns checkpointing on
    without adding its own callback; it writes Lightning checkpoints (:class:`~lightning.pytorch.callbacks.
    ModelCheckpoint`) rather than model folders. Like any checkpoint callback it makes scvi-tools' trainer
    validate every epoch; without a validation set (``train_size=1.0``) also pass ``limit_val_batches=0``.

    Parameters
    ----------
    dirpath
        Folder of the checkpoint files.
    every_n_epochs
        Epochs between two checkpoints.
    save_top_k
        Checkpoints kept besides ``last.ckpt`` (``-1``: all); without ``monitor`` the newest are kept.
    monitor
        Metric that ranks the checkpoints kept (``None``: the newest).
    **kwargs
        Further keyword arguments of :class:`~lightning.pytorch.callbacks.ModelCheckpoint`.

    Examples
    --------
    >>> from scmixvae.train import TrainingCheckpoint
    >>> model.train(max_epochs=100, callbacks=[TrainingCheckpoint("checkpoints/")])
    >>> # after an interruption, in a new session:
    >>> model = scmixvae.model.CplMixVAE(adata, n_categories=8)
    >>> model.train(max_epochs=100, ckpt_path="checkpoints/last.ckpt")
    """

    def __init__(
        self,
        dirpath: str,
        *,
        every_n_epochs: int = 1,
        save_top_k: int = 1,
        monitor: str | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("filename", "{epoch}-{step}")
        ModelCheckpoint.__init__(
            self,
            dirpath=dirpath,
            every_n_epochs=every_n_epochs,
            save_top_k=save_top_k,
            monitor=monitor,
            save_last=True,
            **kwargs,
        )
        self.load_best_on_end = False
        self.loss_is_nan = False
        self.check_nan_gradients = False

    # Lightning's own behaviour, not scvi-tools' model folders
    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        return ModelCheckpoint.on_save_checkpoint(self, trainer, pl_module, checkpoint)

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        ModelCheckpoint._remove_checkpoint(self, trainer, filepath)

    def _update_best_and_save(self, current, trainer, monitor_candidates) -> None:
        ModelCheckpoint._update_best_and_save(self, current, trainer, monitor_candidates)

    def on_train_end(self, trainer, pl_module) -> None:
        return ModelCheckpoint.on_train_end(self, trainer, pl_module)
