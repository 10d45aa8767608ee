"""Training plan of the coupled mixture VAE."""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.data import extract_batch_size
from scvi import REGISTRY_KEYS
from scvi.train import SaveCheckpoint, TrainingPlan
from torchmetrics import Metric

from .. import _validation as check
from ..module._components import recompute_norm_statistics

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """Training stopped because the loss became NaN or infinite; the model's weights are not usable."""


class CplMixVAETrainingPlan(TrainingPlan):
    """scvi-tools :class:`~scvi.train.TrainingPlan` with the published schedule of cpl-mixVAE.

    The published method trains with Adam at a constant learning rate and no KL warm-up, so
    ``n_epochs_kl_warmup`` defaults to ``None`` here (scVI's plan warms up over 400 epochs). Every term of
    the loss is logged per agent (``reconstruction_agent{a}``, ``kl_agent{a}``, ``neg_entropy_agent{a}``)
    together with ``coupling`` and the agents' ``agreement``, and lands in ``model.history``. When a run has trained
    the categorical path (at its end, or where its state phase begins), the running statistics of the encoder's
    batch norms are recomputed in one pass over the real training cells, which read-outs encode, in place of
    those of the agents' augmented views.

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
    defer_logging
        With epoch-level logging (the default), keep what each step logs on the device and hand it to Lightning
        once per epoch (see Notes); ``False`` logs at every step, as scvi-tools does.
    max_coupling_factor
        Factor of the module's ``coupling_weight`` after the coupling warm-up (throughout without one).
    min_coupling_factor
        Factor of ``coupling_weight`` at the start of the coupling warm-up.
    n_epochs_coupling_warmup
        Epochs over which the coupling weight rises geometrically (at every step; a constant factor per step) from
        ``min_coupling_factor`` to ``max_coupling_factor`` times ``coupling_weight``, as scvi-tools ramps the KL
        weight (linearly) with ``n_epochs_kl_warmup``: a rise of orders of magnitude needs as many steps for the
        weight's tenfold rises at its low end as at its high end. ``None``: no warm-up. The weight in use is
        logged as ``coupling_weight`` and, at the end of the run, kept with the module as ``coupling_factor``
        (where a later warm-up of a fit starts from).
    coupling_weight_cap
        Caps each category's weight in the coupling at this multiple of its running mean
        (:meth:`~scmixvae.module.CplMixVAEModule.coupling_weight_caps`); ``None``: no cap.
        :meth:`~scmixvae.model.CplMixVAE.train` sets it where the number of types is given.
    state_kl_weight
        Factor of the state KL weight in the state phase (the categorical path frozen). Below 1 the state
        latent keeps more of each type's within-type programs: at 1 (the published weight) moderate programs
        shrink towards the prior, and the state then follows a within-type PCA less closely (the state regimes of
        the benchmarks page). The categories train at the full weight.
    state_phase_start
        Epoch (counted from 0) from which the module's categorical path is frozen: the encoder trunk and the
        categorical heads read the real cell and learn nothing, so the types stay as they are, while the state
        posterior, the decoder and the dispersions go on learning (the state phase of
        :meth:`~scmixvae.model.CplMixVAE.train`). ``None``: never.
    **kwargs
        Further keyword arguments of :class:`~scvi.train.TrainingPlan` (``compile=True`` compiles the module
        with :func:`torch.compile`).

    Notes
    -----
    :meth:`~scmixvae.model.CplMixVAE.train` and :meth:`~scmixvae.model.CplMixVAE.prune` set ``max_coupling_factor``,
    ``min_coupling_factor``, ``n_epochs_coupling_warmup`` and ``state_phase_start`` for each run of a fit, and
    refuse them in ``plan_kwargs``.

    Each call of ``self.log`` costs Lightning's bookkeeping on the host (about a millisecond under a profiler),
    and a step logs about twenty values (the loss, scvi-tools' ELBO metrics, the per-agent terms). With the
    default epoch-level logging (``on_step=False``) these values are kept (on the device) during the epoch and
    reduced to their minibatch-size-weighted mean once, in the epoch's last training step (validation: at its
    epoch's end): the values Lightning would compute from per-step calls, in ``trainer.callback_metrics`` when
    callbacks look at the end of the epoch. ``kl_weight``, which scvi-tools logs at every step, is logged once per
    epoch like the rest when there is no KL warm-up (it is then constant); with a warm-up it is logged per step.
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
        defer_logging: bool = True,
        max_coupling_factor: float = 1.0,
        min_coupling_factor: float = 1e-3,
        n_epochs_coupling_warmup: int | None = None,
        coupling_weight_cap: float | None = None,
        state_kl_weight: float = 0.1,
        state_phase_start: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            module, lr=lr, weight_decay=weight_decay, eps=eps, n_epochs_kl_warmup=n_epochs_kl_warmup, **kwargs
        )
        self.fused_optimizer = fused_optimizer
        self.defer_logging = defer_logging
        self.state_phase_start = state_phase_start
        self.state_kl_weight = check.check_float("state_kl_weight", state_kl_weight)
        self.max_coupling_factor, self.min_coupling_factor = float(max_coupling_factor), float(min_coupling_factor)
        self.n_epochs_coupling_warmup = n_epochs_coupling_warmup
        if coupling_weight_cap is not None:
            check.check_float("coupling_weight_cap", coupling_weight_cap, strict=True)
            self.loss_kwargs["coupling_weight_cap"] = float(coupling_weight_cap)
        self.coupling_factor = self.max_coupling_factor if n_epochs_coupling_warmup is None else min_coupling_factor
        self._pending_logs: dict[str, dict[str, tuple]] = {}
        self._deferring: str | None = None
        self._current_batch_size = 1
        self._nonfinite: torch.Tensor | None = None  # whether a step of this epoch had a non-finite loss

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

    def configure_optimizers(self):
        """scvi-tools' optimiser, continuing from the state of the module's previous run where the parameters match.

        Each training stage of a fit (the categories, every pruning round, the state phase) is a Lightning run of
        its own; the optimiser's state (Adam's moments) at the end of a run is kept with the module
        (:meth:`on_train_end`) and loaded here when the next run optimises the same parameters with the same
        optimiser, so that consecutive runs of one model train on as one. The learning rate, ``eps`` and weight
        decay are this plan's. A new model (e.g. a restart) starts fresh.
        """
        config = super().configure_optimizers()
        optimizer = config["optimizer"]
        carried = self.module.carried_optimizer_state
        if carried is not None and carried[0] == self._optimizer_signature(optimizer):
            optimizer.load_state_dict(carried[1])
            for group in optimizer.param_groups:
                group.update(lr=self.lr, eps=self.eps, weight_decay=self.weight_decay)
        return config

    def _optimizer_signature(self, optimizer) -> tuple:
        """Return what must match for an optimiser state to carry over: the class, fused or not, the parameters."""
        names = {id(p): name for name, p in self.module.named_parameters()}
        groups = tuple(
            tuple((names.get(id(p)), tuple(p.shape)) for p in group["params"]) for group in optimizer.param_groups
        )
        return type(optimizer).__name__, bool(optimizer.defaults.get("fused")), groups

    def _keep_optimizer_state(self) -> None:
        optimizers = getattr(self.trainer, "optimizers", None) or []
        if len(optimizers) == 1:
            optimizer = optimizers[0]
            self.module.carried_optimizer_state = (self._optimizer_signature(optimizer), optimizer.state_dict())

    # ------------------------------------------------------------------ metrics
    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """:meth:`~lightning.pytorch.core.LightningModule.log`, deferred to the epoch's end for epoch-level values.

        Within a training or validation step (with ``defer_logging``), a value logged with ``on_step=False,
        on_epoch=True`` and the mean reduction is kept on the device (its minibatch-weighted sum) and logged once
        when the epoch ends (:meth:`_flush_logs`); a :class:`torchmetrics.Metric` accumulates by itself and is
        logged once then. Every other call goes straight to Lightning.
        """
        pending = self._pending_logs.get(self._deferring) if self._deferring else None
        if name == "kl_weight" and pending is not None and self._constant_kl_weight():
            # logged per step by scvi-tools; without a warm-up it never changes, so once per epoch says the same
            # at a fraction of Lightning's per-call cost
            kwargs = {**kwargs, "on_step": False, "on_epoch": True}
        if pending is None or args or not kwargs.get("on_epoch") or kwargs.get("on_step", True):
            return super().log(name, value, *args, **kwargs)
        if kwargs.get("reduce_fx", "mean") not in ("mean", torch.mean) or kwargs.get("enable_graph"):
            return super().log(name, value, *args, **kwargs)
        if isinstance(value, Metric):  # accumulates by itself: log it once, at the end
            pending[name] = (value, None, kwargs)
            return None
        weight = kwargs.get("batch_size")
        if weight is None:  # what Lightning would extract from the minibatch
            weight = self._current_batch_size
        value = value.detach() if isinstance(value, torch.Tensor) else value
        if name in pending:  # no tensor work per step: the values are reduced once, when the epoch ends
            values, weights, _ = pending[name]
            values.append(value)
            weights.append(float(weight))
        else:
            pending[name] = ([value], [float(weight)], kwargs)
        return None

    @property
    def kl_weight(self):
        """scvi-tools' KL weight (with its warm-up), times ``state_kl_weight`` in the state phase."""
        weight = super().kl_weight
        return weight * self.state_kl_weight if self.module.categories_frozen else weight

    def _constant_kl_weight(self) -> bool:
        return self.n_epochs_kl_warmup is None and self.n_steps_kl_warmup is None

    def _flush_logs(self, mode: str) -> None:
        """Log the values deferred during the epoch's ``mode`` steps, as Lightning would have reduced them."""
        for name, (values, weights, kwargs) in self._pending_logs.pop(mode, {}).items():
            if weights is None:  # a Metric
                super().log(name, values, **kwargs)
                continue
            # the minibatch-weighted mean, with the epoch's cell count as its weight (DDP: exact global mean)
            device = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
            stacked = torch.stack(
                [v if isinstance(v, torch.Tensor) else torch.tensor(v, device=device) for v in values]
            )
            total = sum(weights)
            mean = (stacked.float() * torch.tensor(weights, device=stacked.device)).sum() / max(total, 1.0)
            super().log(name, mean, **{**kwargs, "batch_size": int(total)})

    def _run_deferred(self, mode: str, step, batch, batch_idx):
        if not self.defer_logging or self.on_step or not self.on_epoch:
            return step(batch, batch_idx)
        self._pending_logs.setdefault(mode, {})
        x = batch.get(REGISTRY_KEYS.X_KEY) if isinstance(batch, dict) else None
        self._current_batch_size = x.shape[0] if isinstance(x, torch.Tensor) else extract_batch_size(batch)
        self._deferring = mode
        try:
            return step(batch, batch_idx)
        finally:
            self._deferring = None

    def _coupling_factor(self, batch_idx: int) -> float:
        """Factor of ``coupling_weight`` at this step (see ``n_epochs_coupling_warmup``)."""
        if not self.n_epochs_coupling_warmup:
            return self.max_coupling_factor
        n_batches = getattr(self.trainer, "num_training_batches", None) if self._trainer is not None else None
        n_batches = n_batches if isinstance(n_batches, int) and n_batches > 0 else 1
        progress = min((self.current_epoch + batch_idx / n_batches) / self.n_epochs_coupling_warmup, 1.0)
        low, high = self.min_coupling_factor, self.max_coupling_factor
        return low * (high / low) ** progress if low > 0 else high * progress

    def training_step(self, batch, batch_idx):
        """scvi-tools' training step; its epoch-level logging is deferred to the epoch's last step."""
        self.coupling_factor = self._coupling_factor(batch_idx)
        self.loss_kwargs["coupling_factor"] = self.coupling_factor
        # logged at every step during a warm-up (as scvi-tools' kl_weight); a constant weight once, at the epoch's end
        warmup = bool(self.n_epochs_coupling_warmup)
        if warmup or self._last_training_batch():
            weight = self.coupling_factor * self.module.coupling_weight
            self.log("coupling_weight", weight, on_step=warmup, on_epoch=not warmup)
        loss = self._run_deferred("train", super().training_step, batch, batch_idx)
        value = loss["loss"] if isinstance(loss, dict) else loss
        if isinstance(value, torch.Tensor):  # on the device: no host synchronisation per step
            nonfinite = ~torch.isfinite(value.detach())
            self._nonfinite = nonfinite if self._nonfinite is None else self._nonfinite | nonfinite
        if self._last_training_batch():
            # inside the last step, so that callbacks reading callback_metrics at the epoch's end see the values
            self._flush_logs("train")
        return loss

    def validation_step(self, batch, batch_idx):
        """scvi-tools' validation step; its epoch-level logging is deferred to the validation epoch's end."""
        return self._run_deferred("validation", super().validation_step, batch, batch_idx)

    def _last_training_batch(self) -> bool:
        try:
            progress = self.trainer.fit_loop.epoch_loop.batch_progress
            return bool(progress.is_last_batch or progress.current.ready >= self.trainer.num_training_batches)
        except (AttributeError, RuntimeError):  # no trainer attached
            return False

    def on_train_epoch_start(self) -> None:
        self._pending_logs.pop("train", None)
        self._nonfinite = None
        # from the epoch counter, so that a fit resumed from a checkpoint is in the right phase
        start = self.state_phase_start
        frozen = start is not None and self.current_epoch >= start
        if frozen and self.current_epoch == start > 0:  # the categorical path trained until now
            self._recompute_norm_statistics()
        self.module.categories_frozen = frozen
        super().on_train_epoch_start()

    def on_train_end(self) -> None:
        self._keep_optimizer_state()
        self.module.coupling_factor = self.coupling_factor  # where a later coupling warm-up of the fit starts
        if not self.module.categories_frozen:  # the last epoch trained the categorical path
            self._recompute_norm_statistics()
        self.module.categories_frozen = False  # a later train() trains everything again
        super().on_train_end()

    def _recompute_norm_statistics(self) -> None:
        """Set the running statistics of the encoder's batch norms from one pass over the real training cells.

        In training the encoder trunk normalises the agents' augmented views, while read-outs, pruning scores and
        the state phase encode the real cells with the running statistics: after the categorical path trains,
        they are recomputed from the real cells (:func:`~scmixvae.module._components.recompute_norm_statistics`).
        """
        module = self.module
        loader = self.trainer.train_dataloader
        if loader is None:
            return
        recompute_norm_statistics(
            module, loader, lambda tensors: module.inference(**module._get_inference_input(tensors))
        )

    def on_train_epoch_end(self) -> None:
        self._flush_logs("train")  # only if the last step did not (an epoch cut short)
        self._check_finite_loss()
        super().on_train_epoch_end()

    def _check_finite_loss(self) -> None:
        """Stop training with an error naming the likely causes when a step of the epoch had a non-finite loss.

        Checked once per epoch (one host synchronisation): the weights are then already non-finite, and
        every read-out would be NaN, with every cell in the first category.
        """
        if self._nonfinite is None or not bool(self._nonfinite.any()):
            return
        raise TrainingDivergedError(
            f"Training stopped: the loss became NaN or infinite in epoch {self.current_epoch} (lr={self.lr}). "
            "Likely causes: a learning rate too high (lower it with plan_kwargs={'lr': ...}; the default is "
            "1e-3), NaN or infinite values in the counts or covariates, or NaN weights in the model (changed "
            "by hand or by an earlier diverged training). The model's weights are not usable; create a new model."
        )

    def on_validation_epoch_start(self) -> None:
        self._pending_logs.pop("validation", None)
        super().on_validation_epoch_start()

    def on_validation_epoch_end(self) -> None:
        self._flush_logs("validation")
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
    continues at the saved epoch (``max_epochs`` counts from the start of the original fit); pass the callback
    again (``callbacks=[TrainingCheckpoint(...)]``) to keep checkpointing, which also answers Lightning's
    reminder about the callbacks that made the checkpoint. Only the fit's first run loads it: the state phase and
    pruning rounds that follow continue from there.

    A checkpoint is a Lightning (pickle) file: resume only from checkpoints you wrote. torch 2.6 and later read
    it with ``weights_only=True``, which refuses Python objects other than tensors and plain data.

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
