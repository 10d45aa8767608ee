"""Model order without knowing K: category pruning, consensus and the choice of the number of types.

Start with too many categories; after training, repeatedly label the cells by each agent's argmax, score every
category by the agents' agreement on it, mask the categories that clearly fail, and train a little more. Every
round is recorded; the round finally kept is chosen by the consensus criterion of :func:`select_round`.

All category indices here are indices among the model's *initial* ``n_categories`` (the positions of
``module.category_mask``); arrays indexed by category have that full length.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from .. import _validation as check
from .._constants import category_name
from .._scoring import (
    _selection_key,
    categories_to_prune,
    category_agreement,
    check_collapse,
    mean_consensus,
    select_round,
)

logger = logging.getLogger(__name__)

#: Columns of the pruning history, in order.
HISTORY_COLUMNS = [
    "round", "n_categories", "mean_consensus", "train_loss", "epochs", "categories", "agreement", "pruned", "selected",
]  # fmt: skip
RESTART_COLUMNS = ["restart", "seed", "n_categories", "mean_consensus", "mean_ari", "selected"]


# ------------------------------------------------------------------------------------------- training


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
        Epochs always trained.
    """

    def __init__(
        self,
        monitor: str = "train_loss",
        *,
        mode: Literal["min", "max"] = "min",
        rel_tol: float = 2e-3,
        patience: int = 3,
        min_epochs: int = 3,
    ):
        super().__init__()
        check.check_choice("mode", mode, ("min", "max"))
        self.monitor, self.mode, self.rel_tol = monitor, mode, rel_tol
        self.patience, self.min_epochs = patience, min_epochs
        self.best: float | None = None
        self.wait = 0
        self.epochs = 0
        self.stopped_epoch: int | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.best, self.wait, self.epochs, self.stopped_epoch = None, 0, 0, None

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        metrics = trainer.callback_metrics
        value = metrics.get(self.monitor, metrics.get(f"{self.monitor}_epoch"))
        if value is None:
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


def default_epochs_per_round(n_cells: int) -> int:
    """Most epochs of one pruning round: ``100,000 / n_cells`` clipped to ``[10, 40]`` (about 800 steps of 128)."""
    return int(np.clip(round(100_000 / max(n_cells, 1)), 10, 40))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copy the module's state dict to the CPU (weights and the category mask)."""
    return {name: value.detach().to("cpu", copy=True) for name, value in module.state_dict().items()}


def _last_loss(model) -> float:
    history = model.history_ if isinstance(model.history_, dict) else {}
    for key in ("train_loss", "train_loss_epoch", "elbo_train"):
        if key in history and len(history[key]):
            return float(history[key].iloc[-1, 0])
    return float("nan")


def _n_epochs(model) -> int:
    history = model.history_ if isinstance(model.history_, dict) else {}
    for key in ("train_loss", "train_loss_epoch", "elbo_train"):
        if key in history:
            return len(history[key])
    return 0


def _labels(model, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each agent's hard label ``(A, n)`` (indices among all categories) and the posteriors ``(A, n, K_active)``."""
    _, q, _ = model._posteriors(None, None, batch_size)
    active = np.flatnonzero(model.module.category_mask.cpu().numpy())
    return active[q.argmax(-1)], q


def _evaluate(model, batch_size: int, min_categories: int) -> dict[str, Any]:
    """Score the current model; first mask categories no agent uses (labels do not change)."""
    module = model.module
    labels, _ = _labels(model, batch_size)
    mask = module.category_mask.cpu().numpy()
    counts = np.bincount(labels.ravel(), minlength=mask.size)
    empty = np.flatnonzero(mask & (counts == 0))[: max(int(mask.sum()) - min_categories, 0)]
    if empty.size:  # the tempered softmax is monotone: no agent's argmax moves
        module.category_mask[torch.as_tensor(empty, device=module.category_mask.device)] = False
        mask = module.category_mask.cpu().numpy()
    agreement = category_agreement(labels, mask)
    surviving = np.flatnonzero(mask)
    return {
        "labels": labels,
        "mask": mask,
        "counts": counts,
        "agreement": agreement,
        "n_categories": int(surviving.size),
        "mean_consensus": mean_consensus(labels, mask),
        "categories": json.dumps([category_name(k) for k in surviving]),
        "agreement_json": json.dumps({category_name(k): round(float(agreement[k]), 6) for k in surviving}),
    }


def prune(
    model,
    *,
    threshold: float = 0.95,
    min_categories: int = 2,
    max_rounds: int | None = None,
    epochs_per_round: int | None = None,
    batch_size: int = 128,
    stop_at_threshold: bool = True,
    **train_kwargs: Any,
) -> pd.DataFrame:
    """Prune categories round by round and keep the round chosen by the consensus criterion.

    Round 0 scores the model as it is (an untrained model is first trained with ``model.train``'s default
    number of epochs). Every round then: labels all cells by each agent's argmax; masks the categories that no
    agent uses (this changes no label); records the number of surviving categories, the mean consensus
    (:func:`mean_consensus`), the last training loss and every category's agreement
    (:func:`category_agreement`); masks the categories that fail (:func:`categories_to_prune`); and trains on
    from the current weights. It stops when a round reaches ``threshold`` (with ``stop_at_threshold``: later
    rounds have fewer categories and cannot be selected), at ``min_categories`` or after ``max_rounds``
    rounds. The round chosen by :func:`select_round` is restored (weights and mask) and the posteriors are
    checked for collapse (:func:`check_collapse`). A model with an ``initial_coupling_weight`` trains at that
    weight only while no category is masked (its first training); the rounds train at ``coupling_weight``.

    Parameters
    ----------
    model
        A :class:`~scmixvae.model.CplMixVAE` with at least two agents.
    threshold
        Mean consensus a round must reach (published: 0.95).
    min_categories
        Never prune below this number of categories.
    max_rounds
        Most pruning rounds (trainings); ``None``: no limit.
    epochs_per_round
        Epochs trained after each pruning step. ``None``: until the training loss stops improving
        (:class:`ConvergenceStopping`: 0.2% over 3 epochs), at most :func:`default_epochs_per_round`.
    batch_size
        Minibatch size of training and of the read-outs.
    stop_at_threshold
        Stop at the first round that reaches ``threshold``; ``False`` prunes down to ``min_categories`` (or
        ``max_rounds``) to record the whole curve.
    **train_kwargs
        Keyword arguments of ``model.train`` (not ``max_epochs``), e.g. ``plan_kwargs``, ``accelerator``,
        ``enable_progress_bar``, ``callbacks``.

    Returns
    -------
    The history, also stored as ``model.pruning_history_``: one row per round with columns ``round``,
    ``n_categories``, ``mean_consensus``, ``train_loss`` (last epoch before the round was scored), ``epochs``
    (trained since the previous round), ``categories`` (JSON list of the surviving category names),
    ``agreement`` (JSON object: category name → agreement), ``pruned`` (JSON list of the names masked after
    the round) and ``selected``; ``attrs["selected_round"]`` and ``attrs["threshold"]``.
    """
    module = model.module
    check.check_float("threshold", threshold, maximum=1.0, strict=True)
    check.check_int("min_categories", min_categories, minimum=1)
    check.check_int("batch_size", batch_size, minimum=2)
    if max_rounds is not None:
        check.check_int("max_rounds", max_rounds, minimum=0)
    if epochs_per_round is not None:
        check.check_int("epochs_per_round", epochs_per_round, minimum=1)
    if module.n_agents < 2:
        raise ValueError(
            f"Pruning needs the consensus of at least two agents; this model has n_agents={module.n_agents}."
        )
    if min_categories > model.n_categories:
        raise ValueError(
            f"min_categories={min_categories} is larger than the model's {model.n_categories} categories; "
            "start from more categories (n_categories) or lower min_categories."
        )
    if "max_epochs" in train_kwargs:
        raise ValueError("Pass the epochs of each round as `epochs_per_round`, not `max_epochs`.")
    if "state_epochs" in train_kwargs:
        raise ValueError(
            "Pruning trains no state phase; train the states of the chosen categories afterwards with "
            "`model.train(max_epochs=0)` (or use `model.train(prune=True)`, which does both)."
        )
    train_kwargs["state_epochs"] = 0
    user_callbacks = list(train_kwargs.pop("callbacks", None) or [])

    if not model.is_trained_:  # prune=False: train only (pruning is what this call does next)
        model.train(batch_size=batch_size, callbacks=list(user_callbacks), prune=False, **train_kwargs)
    if epochs_per_round is None:
        max_epochs = default_epochs_per_round(model.adata.n_obs)
    else:
        max_epochs = epochs_per_round

    rows: list[dict[str, Any]] = []
    best_key, best_round, best_state = None, None, None
    epochs_before = 0
    round_ = 0
    while True:
        scores = _evaluate(model, batch_size, min_categories)
        n_epochs = _n_epochs(model)
        row = {
            "round": round_,
            "n_categories": scores["n_categories"],
            "mean_consensus": scores["mean_consensus"],
            "train_loss": _last_loss(model),
            "epochs": n_epochs - epochs_before if round_ else n_epochs,
            "categories": scores["categories"],
            "agreement": scores["agreement_json"],
            "pruned": "[]",
        }
        epochs_before = n_epochs
        rows.append(row)
        key = (_selection_key(row["n_categories"], row["mean_consensus"], threshold), -round_)
        if best_key is None or key > best_key:
            best_key, best_round, best_state = key, round_, _snapshot(module)
        logger.info(
            "Pruning round %d: %d categories, mean consensus %.3f.", round_, row["n_categories"], row["mean_consensus"]
        )
        if (stop_at_threshold and row["mean_consensus"] >= threshold) or row["n_categories"] <= min_categories:
            break
        if max_rounds is not None and round_ >= max_rounds:
            break
        drop = categories_to_prune(scores["agreement"], scores["mask"], scores["counts"], min_categories=min_categories)
        if drop.size == 0:
            break
        row["pruned"] = json.dumps([category_name(k) for k in drop])
        module.category_mask[torch.as_tensor(drop, device=module.category_mask.device)] = False
        callbacks = list(user_callbacks)
        if epochs_per_round is None:
            callbacks.append(ConvergenceStopping())
        try:  # a non-finite loss raises (the training plan checks every epoch) and stops the fit
            model.train(max_epochs=max_epochs, batch_size=batch_size, callbacks=callbacks, **train_kwargs)
        except KeyboardInterrupt:  # Ctrl-C stops the whole fit; keep the best round so far
            module.load_state_dict(best_state)
            raise
        round_ += 1

    module.load_state_dict(best_state)
    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS[:-1])
    selected = select_round(history, threshold)
    if selected != best_round:  # pragma: no cover - the running best and select_round share one order
        raise RuntimeError(f"Internal error: selected round {selected} but kept the weights of {best_round}.")
    history["selected"] = history["round"] == selected
    history.attrs["selected_round"] = int(selected)
    history.attrs["threshold"] = float(threshold)
    model.pruning_history_ = history
    logger.info(
        "Selected round %d: %d categories, mean consensus %.3f.",
        selected,
        history.loc[history["selected"], "n_categories"].iloc[0],
        history.loc[history["selected"], "mean_consensus"].iloc[0],
    )
    _, q = _labels(model, batch_size)
    check_collapse(q, stacklevel=4)  # user -> CplMixVAE.prune -> prune -> check_collapse
    return history
