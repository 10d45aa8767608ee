"""The choice of the number of types: category pruning (the published procedure) and restarts.

Start with too many categories; after training, repeatedly label the cells by each agent's argmax, score every
category by the agents' agreement on it, mask the categories that clearly fail, and train a little more. Every
round is recorded; the round finally kept is chosen by the consensus criterion of :func:`select_round`.

All category indices here are indices among the model's *initial* ``n_categories`` (the positions of
``module.category_mask``); arrays indexed by category have that full length.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import warnings
from typing import Any

import numpy as np
import pandas as pd
import scvi
import torch

from .. import _validation as check
from .._constants import category_name
from .._scoring import (
    _selection_key,
    categories_to_prune,
    category_agreement,
    check_collapse,
    mean_agreement,
    mean_consensus,
    medoid,
    select_round,
)
from ..train._callbacks import ConvergenceStopping
from ..train._progress import current as current_progress
from . import _fit, _start

logger = logging.getLogger(__name__)

#: Columns of the pruning history, in order.
HISTORY_COLUMNS = [
    "round", "n_categories", "mean_consensus", "train_loss", "epochs", "categories", "agreement", "pruned", "selected",
]  # fmt: skip
RESTART_COLUMNS = ["restart", "seed", "n_categories", "mean_consensus", "mean_ari", "selected"]
#: The options of :func:`prune` that ``train(prune_kwargs=...)`` sets; its batch size and the keyword arguments of
#: the Lightning runs are ``train()``'s own, which apply to the pruning rounds as given there.
PRUNE_OPTIONS = ("threshold", "min_categories", "max_rounds", "epochs_per_round")


class NoConsensusWarning(UserWarning):
    """No pruning round reached the consensus threshold: the agents agree on no number of types."""


# ------------------------------------------------------------------------------------------- training


def default_epochs_per_round(n_cells: int) -> int:
    """Most epochs of one pruning round: ``100,000 / n_cells`` clipped to ``[10, 40]`` (about 800 steps of 128)."""
    return int(np.clip(round(100_000 / max(n_cells, 1)), 10, 40))


def _snapshot(module: torch.nn.Module) -> dict[str, Any]:
    """Copy what a round leaves: the state dict on the CPU (weights, category mask) and the optimiser's state."""
    weights = {name: value.detach().to("cpu", copy=True) for name, value in module.state_dict().items()}
    return {"weights": weights, "optimizer": copy.deepcopy(module.carried_optimizer_state)}


def _restore(module: torch.nn.Module, snapshot: dict[str, Any]) -> None:
    """Bring back a :func:`_snapshot`, the optimiser's state included: the state phase trains on from that round."""
    module.load_state_dict(snapshot["weights"])
    module.carried_optimizer_state = copy.deepcopy(snapshot["optimizer"])


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
    **train_kwargs: Any,
) -> pd.DataFrame:
    """Prune categories round by round and keep the round chosen by the consensus criterion.

    Round 0 scores the model as it is (an untrained model is first trained with ``model.train``'s default
    number of epochs). Every round then: labels all cells by each agent's argmax; masks the categories that no
    agent uses (this changes no label); records the number of surviving categories, the mean consensus
    (:func:`mean_consensus`), the last training loss and every category's agreement
    (:func:`category_agreement`); masks the categories that fail (:func:`categories_to_prune`); and trains on
    from the current weights. It stops when a round reaches ``threshold`` (later rounds have fewer
    categories and cannot be selected), at ``min_categories`` or after ``max_rounds``
    rounds. The round chosen by :func:`select_round` is restored (weights and mask) and the posteriors are
    checked for collapse (:func:`check_collapse`). An untrained model first trains weakly coupled
    (:data:`~scmixvae.model._fit.PRUNING_COUPLING_FACTOR` times ``coupling_weight``); the first round after weakly
    coupled training raises the weight geometrically to ``coupling_weight`` over the first half of its most epochs
    (:class:`ConvergenceStopping` watches only the epochs after it), so that the first categories pruned are
    scored on agents trained at the full coupling; later rounds train at ``coupling_weight``.

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
    _check_arguments(model, threshold, min_categories, max_rounds, epochs_per_round, batch_size, train_kwargs)
    if model.module.augmentation == "dropout" and model.module.input_dropout <= 0:
        warnings.warn(
            "Every agent reads the same cell (augmentation='dropout' at input_dropout=0, the default with "
            "n_categories given), so their agreement says little about which categories to keep. To choose the "
            "number of types, create the model with n_categories=None, or give each agent its own view "
            "(input_dropout=0.5, published, or another augmentation).",
            UserWarning,
            stacklevel=check.user_stacklevel(),
        )
    user_callbacks = list(train_kwargs.pop("callbacks", None) or [])
    if not model.is_trained_:  # the start and the category fit first, as train() runs them before its first round
        trainer = {"batch_size": batch_size, "callbacks": list(user_callbacks), **train_kwargs}
        schedule = _fit.resolve_schedule(
            model, max_epochs=None, state_epochs=0, prune=True, n_restarts=1, prune_kwargs=None, trainer=trainer
        )
        _fit.start(model, schedule)
        _fit.train_categories(model, schedule)
    max_epochs = default_epochs_per_round(model.adata.n_obs) if epochs_per_round is None else epochs_per_round
    module = model.module
    rows: list[dict[str, Any]] = []
    best_key, best_round, best_state = None, None, None
    round_ = epochs_before = 0
    while True:
        scores = _evaluate(model, batch_size, min_categories)
        row = _round_row(model, round_, scores, epochs_before)
        rows.append(row)
        epochs_before = _n_epochs(model)
        key = (_selection_key(row["n_categories"], row["mean_consensus"], threshold), -round_)
        if best_key is None or key > best_key:
            best_key, best_round, best_state = key, round_, _snapshot(module)
        logger.info(
            "Pruning round %d: %d categories, mean consensus %.3f.", round_, row["n_categories"], row["mean_consensus"]
        )
        if row["mean_consensus"] >= threshold or row["n_categories"] <= min_categories:
            break
        if max_rounds is not None and round_ >= max_rounds:
            break
        drop = categories_to_prune(scores["agreement"], scores["mask"], scores["counts"], min_categories=min_categories)
        if drop.size == 0:
            break
        row["pruned"] = json.dumps([category_name(k) for k in drop])
        module.category_mask[torch.as_tensor(drop, device=module.category_mask.device)] = False
        run_kwargs, warmup = _coupling_warmup(module, max_epochs, train_kwargs)
        callbacks = [
            *user_callbacks,
            *([ConvergenceStopping(warmup_epochs=warmup)] if epochs_per_round is None else []),
        ]
        try:  # a non-finite loss raises (the training plan checks every epoch) and stops the fit
            _fit.run(
                model,
                max_epochs=max_epochs,
                state_epochs=0,
                stage=f"K: pruning round {round_ + 1}",
                batch_size=batch_size,
                callbacks=callbacks,
                **run_kwargs,
            )
        except KeyboardInterrupt:  # Ctrl-C stops the whole fit; keep the best round so far
            _restore(module, best_state)
            raise
        round_ += 1
    return _keep_round(model, rows, best_round, best_state, threshold, batch_size)


_PRUNE_PARAMETERS = inspect.signature(prune).parameters  # its defaults, for check_prune_kwargs


def _coupling_warmup(module, max_epochs: int, train_kwargs: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Keyword arguments of a round's run and its warm-up epochs: a coupling warm-up after weakly coupled training.

    When the module last trained below ``coupling_weight`` (the weakly coupled start of a fit that prunes), the
    round raises the weight geometrically from there to ``coupling_weight`` over the first half of its most epochs
    (at least one), so that the agents train at the full coupling before the round is scored, without the
    thousandfold jump of a switch; otherwise there is no warm-up (0 epochs).
    """
    factor = float(module.coupling_factor)
    if factor >= 1.0:
        return train_kwargs, 0
    warmup = max(1, max_epochs // 2)
    plan_kwargs = {"min_coupling_factor": factor, "n_epochs_coupling_warmup": warmup}
    return {**train_kwargs, "plan_kwargs": {**(train_kwargs.get("plan_kwargs") or {}), **plan_kwargs}}, warmup


def _check_arguments(model, threshold, min_categories, max_rounds, epochs_per_round, batch_size, train_kwargs) -> None:
    """Check the arguments of :func:`prune` before any work starts."""
    check.check_float("threshold", threshold, maximum=1.0, strict=True)
    check.check_int("min_categories", min_categories, minimum=1)
    check.check_int("batch_size", batch_size, minimum=2)
    if max_rounds is not None:
        check.check_int("max_rounds", max_rounds, minimum=0)
    if epochs_per_round is not None:
        check.check_int("epochs_per_round", epochs_per_round, minimum=1)
    n_agents = model.module.n_agents
    if n_agents < 2:
        raise ValueError(f"Pruning needs the consensus of at least two agents; this model has n_agents={n_agents}.")
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
    _fit.check_trainer_options(train_kwargs, where="prune()")


def _round_row(model, round_: int, scores: dict[str, Any], epochs_before: int) -> dict[str, Any]:
    """Make the history row of a round (``epochs``: trained since the previous round; ``pruned`` filled in later)."""
    n_epochs = _n_epochs(model)
    return {
        "round": round_,
        "n_categories": scores["n_categories"],
        "mean_consensus": scores["mean_consensus"],
        "train_loss": _last_loss(model),
        "epochs": n_epochs - epochs_before if round_ else n_epochs,
        "categories": scores["categories"],
        "agreement": scores["agreement_json"],
        "pruned": "[]",
    }


def _keep_round(model, rows, best_round: int, best_state: dict, threshold: float, batch_size: int) -> pd.DataFrame:
    """Restore the round :func:`select_round` chooses, record the history and check the posteriors for collapse."""
    _restore(model.module, best_state)
    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS[:-1])
    selected = select_round(history, threshold)
    if selected != best_round:  # pragma: no cover - the running best and select_round share one order
        raise RuntimeError(f"Internal error: selected round {selected} but kept the weights of {best_round}.")
    history["selected"] = history["round"] == selected
    history.attrs["selected_round"] = int(selected)
    history.attrs["threshold"] = float(threshold)
    model.pruning_history_ = history
    n_kept, consensus = history.loc[history["selected"], ["n_categories", "mean_consensus"]].iloc[0]
    logger.info("Selected round %d: %d categories, mean consensus %.3f.", selected, n_kept, consensus)
    if not consensus >= threshold:
        warnings.warn(
            f"No pruning round reached the consensus threshold {threshold}: the round with the highest consensus "
            f"was kept ({int(n_kept)} categories, mean consensus {consensus:.3f}), and consensus rises as categories "
            "are removed, so this number of types is not a choice the agents agree on. The types may differ too "
            "little for it; see `model.pruning_history`, or give the number of types "
            "(`CplMixVAE(adata, n_categories=...)`).",
            NoConsensusWarning,
            stacklevel=check.user_stacklevel(),
        )
    _, q = _labels(model, batch_size)
    check_collapse(q, stacklevel=check.user_stacklevel() + 1)  # the user's line, through prune() or train()
    return history


def check_prune_kwargs(model, schedule: _fit.Schedule) -> None:
    """Check ``train(prune_kwargs=...)`` before any work starts: only :data:`PRUNE_OPTIONS`, with valid values."""
    unknown = sorted(set(schedule.prune_kwargs) - set(PRUNE_OPTIONS), key=str)
    if unknown:
        raise ValueError(
            f"prune_kwargs holds {unknown}, which train() does not pass to the pruning: it takes "
            f"{list(PRUNE_OPTIONS)}. Give training options (batch_size, plan_kwargs, callbacks...) to train() "
            "itself; they apply to the pruning rounds too."
        )
    defaults = {name: p.default for name, p in _PRUNE_PARAMETERS.items() if name in PRUNE_OPTIONS}
    options = {**defaults, **schedule.prune_kwargs}
    _check_arguments(model, **options, batch_size=schedule.trainer["batch_size"], train_kwargs=schedule.trainer)


def choose_n_categories(model, schedule: _fit.Schedule) -> None:
    """Choose K as :meth:`CplMixVAE.train` does: start, category fit and :func:`prune`, once or per restart.

    The options of the pruning are checked first (:func:`check_prune_kwargs`). When the model starts untrained
    (not from a checkpoint) and the fit kept has no round that reaches the consensus threshold,
    :func:`fit_without_consensus` replaces it; a trained model that is pruned keeps its round of highest consensus,
    as :func:`prune` does. Only a choice that completes marks K as chosen (a later ``train()`` trains on): after
    one that fails (e.g. a misspelt option of the trainer), the next ``train()`` chooses K again.
    """
    check_prune_kwargs(model, schedule)
    from_scratch = not model.is_trained_ and not schedule.resuming
    augmenter = _fit.trained_augmenter(model)  # one trained before train(): every fresh model uses it
    with warnings.catch_warnings():  # one warning for the whole choice, from fit_without_consensus
        if from_scratch:
            warnings.simplefilter("ignore", NoConsensusWarning)
        if schedule.n_restarts > 1:  # each restart a fresh model
            fit_restarts(model, schedule, augmenter)
        else:
            _fit.start(model, schedule)
            _fit.train_categories(model, schedule)
            prune(model, **schedule.prune_kwargs, **schedule.later_runs)
            model.restart_history_ = None  # those of an earlier train() describe a fit this model no longer is
    if from_scratch:
        fit_without_consensus(model, schedule, augmenter)
    model.choose_n_categories_ = False


def fit_without_consensus(model, schedule: _fit.Schedule, augmenter=None) -> None:
    """Fit with K given when the agents of the fit kept agreed on no number of types (no round at the threshold).

    :func:`prune` then keeps the round with the highest consensus, and consensus rises as categories are removed:
    that round has about the fewest categories rather than a number of types the agents agree on (ten simulated
    types that differ in 2% of the genes end in two). With no evidence from the agents, the number of types is
    that of the Leiden clusters of the start's graph at resolution 1 (scanpy's default; at least 2, at most the
    model's ``n_categories``), and ``model`` becomes the fit with that many categories given, from fresh weights
    at the same seed: its types are those of ``CplMixVAE(adata, n_categories=K, ...).train(state_epochs=0)`` (the
    defaults of K given where the user chose no ``augmentation`` or ``input_dropout``), and the fit's state phase
    follows. It keeps the pruning and restart histories (no restart ``selected``: none is the fit kept);
    ``pruning_history_.attrs["fallback_n_categories"]`` records K. ``augmenter``: a learned augmenter trained
    before ``train()`` (:func:`~._fit.trained_augmenter`), which the new fit uses instead of training its own.
    """
    history = model.pruning_history_
    kept = history.loc[history["selected"]].iloc[0]
    if kept["mean_consensus"] >= history.attrs["threshold"]:
        return
    found = _start.default_resolution_clusters(model)
    n_categories = int(np.clip(found, 2, model.module.n_categories))  # within what the model may have
    bound = "" if n_categories == found else f" ({found}, bounded by the model's 2 to {model.module.n_categories})"
    warnings.warn(
        f"No pruning round reached the consensus threshold {history.attrs['threshold']} (the closest: "
        f"{int(kept['n_categories'])} categories, mean consensus {kept['mean_consensus']:.3f}), so the agents "
        f"agree on no number of types; the model was fitted instead with {n_categories} categories, the number of "
        f"Leiden clusters at resolution 1{bound}. The types may differ too little for the agents to find them; see "
        "`model.pruning_history`, or give the number of types (`CplMixVAE(adata, n_categories=...)`).",
        NoConsensusWarning,
        stacklevel=check.user_stacklevel(),
    )
    if scvi.settings.seed is not None:
        scvi.settings.seed = scvi.settings.seed  # not a no-op: the setter seeds the generators again, as at creation
    options = {**_fit.option_defaults(False), **getattr(model, "given_options_", {})}  # the defaults of K given
    fit = _fit.fresh_model(model, n_categories=n_categories, **options)
    _fit.give_augmenter(fit, augmenter)
    given_k = dataclasses.replace(schedule, prune=False, n_restarts=1, state_epochs=0)  # the states come next
    _fit.start(fit, given_k)
    _fit.train_categories(fit, given_k)
    restarts = getattr(model, "restart_history_", None)
    if restarts is not None:  # none of them is the fit kept
        restarts["selected"] = False
    _fit.adopt_fit(model, fit)
    model._model_summary_string = fit._model_summary_string  # its options are no longer those of the model created
    history.attrs["fallback_n_categories"] = n_categories
    model.pruning_history_, model.restart_history_ = history, restarts


def restart_seed(seed: int, restart: int) -> int:
    """Return the ``scvi.settings.seed`` of restart ``restart`` of a fit at ``seed``.

    ``seed`` itself for restart 0, else a number drawn from both by numpy's :class:`~numpy.random.SeedSequence`,
    so that fits at two seeds share no restart (with ``seed + restart``, seeds 1 and 2 would share two of three).
    """
    if restart == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**32, restart]).generate_state(1)[0])


def kept_restart(labels: list[np.ndarray], reached: list[bool]) -> tuple[int, np.ndarray]:
    """Index of the restart kept and the matrix of ARIs between the restarts' labels (see :func:`medoid`).

    Among the restarts whose chosen round ``reached`` the consensus threshold (all, when none did), the one whose
    labels agree best with every restart's (highest mean ARI; the earliest on a tie): the medoid whenever it
    reached the threshold, and never a fit on which the agents disagree when another fit has their agreement.
    """
    best, agreement = medoid(labels)
    candidates = np.flatnonzero(reached)
    if candidates.size:
        best = int(candidates[np.argmax(mean_agreement(agreement)[candidates])])
    return best, agreement


def fit_restarts(model, schedule: _fit.Schedule, augmenter=None) -> None:
    """Fit ``n_restarts`` models from fresh weights and keep the medoid fit (see :meth:`CplMixVAE.train`).

    Restart 0 is ``model`` itself; restart ``r`` a :func:`~scmixvae.model._fit.fresh_model` built after
    ``scvi.settings.seed`` is set to :func:`restart_seed` of the seed and ``r`` (restored afterwards, with the
    flags scvi-tools' seed setter changes). Each runs the start, the category fit and :func:`prune`; ``model``
    becomes the fit whose labels agree best with the others' among those that reached the consensus threshold
    (:func:`kept_restart`; a Ctrl-C: the last completed fit). ``augmenter``: a learned augmenter trained before
    ``train()`` (:func:`~._fit.trained_augmenter`), which every restart uses instead of training its own.
    """
    base_seed = scvi.settings.seed
    # unseeded (None): restarts from a fresh draw, so that two unseeded fits share no restart
    first_seed = int(np.random.SeedSequence().generate_state(1)[0]) if base_seed is None else base_seed
    fits, labels, rows = [], [], []
    caller = _fit.seed_settings()
    try:
        for restart in range(schedule.n_restarts):
            if (progress := current_progress()) is not None:
                progress.start_restart(restart, schedule.n_restarts)
            if restart:  # a fresh model, as CplMixVAE(...) after `scvi.settings.seed = restart_seed(...)`
                scvi.settings.seed = restart_seed(first_seed, restart)
            fit = _fit.fresh_model(model) if restart else model
            if restart:
                _fit.give_augmenter(fit, augmenter)
            _fit.start(fit, schedule)
            _fit.train_categories(fit, schedule)
            history = prune(fit, **schedule.prune_kwargs, **schedule.later_runs)
            chosen = history.loc[history["selected"]].iloc[0]
            labels.append(fit.predict(batch_size=schedule.trainer["batch_size"]).to_numpy())
            fits.append(fit)
            rows.append({
                "restart": restart,
                "seed": restart_seed(first_seed, restart) if restart or base_seed is not None else pd.NA,
                "n_categories": int(chosen["n_categories"]),
                "mean_consensus": float(chosen["mean_consensus"]),
            })  # fmt: skip
            logger.info("Restart %d: %d categories, mean consensus %.3f.", restart, *list(rows[-1].values())[2:])
    except KeyboardInterrupt:  # Ctrl-C stops the restarts; keep the last completed fit, if any
        if len(fits) > 1:
            _fit.adopt_fit(model, fits[-1])
        raise
    finally:
        _fit.restore_seed_settings(caller)
    threshold = model.pruning_history_.attrs["threshold"]
    best, agreement = kept_restart(labels, [row["mean_consensus"] >= threshold for row in rows])
    if best:
        _fit.adopt_fit(model, fits[best])
    history = pd.DataFrame(rows, columns=RESTART_COLUMNS[:-2]).astype({"seed": "Int64"})  # <NA>: unseeded
    history["mean_ari"] = mean_agreement(agreement)
    history["selected"] = history["restart"] == best
    history.attrs["ari"] = agreement.tolist()
    model.restart_history_ = history
    logger.info("Kept restart %d (mean adjusted Rand index with the others %.3f).", best, history["mean_ari"][best])
