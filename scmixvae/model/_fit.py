"""One straight fit: the schedule of :meth:`CplMixVAE.train <scmixvae.model.CplMixVAE.train>` and its stages.

``train()`` resolves its :class:`Schedule` once and runs the stages in order, each a function of the model:
:func:`start` (the categorical heads fitted to a Leiden partition, the learned augmenter), :func:`train_categories`
(one Lightning run), the choice of the number of types (:mod:`scmixvae.model._pruning`: pruning rounds, restarts)
and :func:`state_phase`. No stage calls ``train()`` back; every Lightning run goes through :func:`run`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import logging
import math
import os
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import scvi
import torch
from lightning.pytorch import Trainer as LightningTrainer
from scvi import REGISTRY_KEYS
from scvi.model.base import UnsupervisedTrainingMixin
from scvi.train import Trainer as ScviTrainer
from scvi.train import TrainingPlan, TrainRunner

from .. import _validation as check
from .._logging import log_interval, quiet_fit, without_train_runner_print
from ..train._progress import current as current_progress
from ..train._trainingplan import CplMixVAETrainingPlan, InterruptFlag
from . import _start

logger = logging.getLogger(__name__)


#: Factor of ``coupling_weight`` at which a fit that prunes trains its many categories before the first round: the
#: agents keep similar types apart (each over-split into pure categories) instead of merging them, which pruning
#: cannot undo; the first pruning round warms the weight up to ``coupling_weight`` (:mod:`._pruning`).
PRUNING_COUPLING_FACTOR = 1e-3
#: Options of the training plan that the fit sets for each of its runs (refused in ``plan_kwargs``).
FIT_PLAN_OPTIONS = ("max_coupling_factor", "min_coupling_factor", "n_epochs_coupling_warmup", "state_phase_start")

#: With the number of types given, the coupling's weight of each category is capped at this multiple of its running
#: mean (the training plan's ``coupling_weight_cap``): a minibatch that holds no cell of a type of a few percent no
#: longer multiplies its weight by ~20, while the gradient that keeps categories from emptying still flows. Pruning
#: keeps the published normalisation, on which its consensus rests.
COUPLING_WEIGHT_CAP = 2**0.5


#: Cells whose counts :meth:`CplMixVAE.train` checks again (setup checked them all): a chunk of the count check.
RECHECKED_CELLS = 10_000
#: Fewest cells a model trains on (a minibatch of one cell cannot be trained; the splits need some of each).
MIN_TRAINING_CELLS = 3


#: The published per-agent input dropout: the default of a model that chooses the number of types, and what pruning
#: needs (agents reading the same cell agree trivially).
PUBLISHED_INPUT_DROPOUT = 0.5


def option_defaults(choose_n_categories: bool) -> dict[str, str | float | None]:
    """Return the defaults of :class:`CplMixVAE`'s options that depend on whether it chooses the number of types.

    With ``K`` given, ``augmentation="dropout"`` at ``input_dropout=0``: every agent reads the real cell and the
    categories refine their Leiden start, which keeps types that differ in a few genes. When the model starts from
    many categories and prunes them (``n_categories=None``), ``"knn"`` with the published ``input_dropout=0.5``.
    Evidence for both: the :doc:`benchmarks page </benchmarks>`.

    Parameters
    ----------
    choose_n_categories
        Whether the model chooses the number of categories.

    Returns
    -------
    ``{"augmentation": ..., "input_dropout": ...}``.
    """
    if choose_n_categories:
        return {"augmentation": "knn", "input_dropout": PUBLISHED_INPUT_DROPOUT}
    return {"augmentation": "dropout", "input_dropout": 0.0}


class FitInterrupted(KeyboardInterrupt):
    """A Ctrl-C in one Lightning run of a fit: it stops every later stage (see :meth:`CplMixVAE.train`)."""


def default_max_epochs(n_cells: int) -> int:
    """Default number of training epochs: ``250,000 / n_cells`` clipped to ``[20, 100]``.

    The agents agree on the types within a few thousand minibatch steps. The state latent keeps improving for
    longer: train longer (``max_epochs``) when the states are what you are after (see the user guide).
    """
    return int(np.clip(round(250_000 / max(n_cells, 1)), 20, 100))


def default_state_epochs(n_cells: int, max_epochs: int | None = None) -> int:
    """Default length of the state phase of :meth:`CplMixVAE.train`: ``750,000 / n_cells`` clipped to ``[0, 300]``.

    Three times :func:`default_max_epochs` on data of up to about 12,500 cells, where the agents settle on the types
    long before the state latent has learned the within-type programs of the smaller types; on larger data the
    types' own epochs hold enough minibatch steps, and the phase shrinks (8 epochs at 100,000 cells, none above
    1.5 million). With ``max_epochs`` given: the same multiple of it as the defaults have; ``max_epochs=0`` (the
    state phase alone, e.g. after :meth:`CplMixVAE.prune`): the default length.
    """
    n_state_epochs = int(np.clip(round(750_000 / max(n_cells, 1)), 0, 300))
    if not max_epochs:
        return n_state_epochs
    return round(max_epochs * n_state_epochs / default_max_epochs(n_cells))


def validates(early_stopping: bool, kwargs: dict, plan_kwargs: dict | None) -> bool:
    """Whether a Lightning run with these options validates: scvi-tools then holds out a tenth of the cells.

    Early stopping, ``check_val_every_n_epoch``, checkpoints (or resuming from one, which a fit that validated
    wrote), a learning-rate monitor, or a learning rate reduced on a plateau of a validation metric; none of them
    with ``limit_val_batches=0``, which switches validation off.
    """
    from scvi.train import SaveCheckpoint

    if kwargs.get("limit_val_batches") == 0:
        return False
    plan_kwargs = plan_kwargs or {}
    monitored = str(plan_kwargs.get("lr_scheduler_metric", "elbo_validation"))
    return bool(
        early_stopping
        or kwargs.get("ckpt_path") is not None
        or any(kwargs.get(key) for key in ("check_val_every_n_epoch", "enable_checkpointing", "learning_rate_monitor"))
        or any(isinstance(callback, SaveCheckpoint) for callback in kwargs.get("callbacks") or [])
        or (plan_kwargs.get("reduce_lr_on_plateau") and monitored.endswith("_validation"))
    )


def default_train_size(
    early_stopping: bool, validation_size: float | None, kwargs: dict, plan_kwargs: dict | None = None
) -> float | None:
    """``train_size`` of a Lightning run given none: ``1.0`` where it validates nothing (:func:`validates`).

    A run that validates nothing trains on every cell, categories and states alike, so that no type loses a
    tenth of its cells (some real types have a dozen); otherwise scvi-tools' default applies (``None``). A
    ``validation_size`` given alone trains on the other cells (scvi-tools would add its default 0.9 to it and
    refuse the sum).
    """
    if validation_size is not None:
        return 1.0 - validation_size
    return None if validates(early_stopping, kwargs, plan_kwargs) else 1.0


def check_validation_cells(trainer: dict[str, Any], n_cells: int) -> None:
    """Refuse a call that validates on a split of the cells that leaves none for validation.

    Lightning fails on it only when the first run starts (after the Leiden start), with an error about a
    missing data loader. The split is scvi-tools': ``ceil(train_size * n)`` cells train.
    """
    if not validates(trainer.get("early_stopping", False), trainer, trainer.get("plan_kwargs")):
        return
    validation_size = trainer.get("validation_size")
    train_size = trainer.get("train_size")
    if validation_size is not None:
        n_validation = math.floor(validation_size * n_cells)
    else:
        n_validation = n_cells - math.ceil((0.9 if train_size is None else train_size) * n_cells)
    if n_validation < 1:
        raise ValueError(
            f"This call validates (early stopping, check_val_every_n_epoch, checkpoints or a plateau of a validation "
            f"metric), but its split of the {n_cells} cells (train_size={train_size}, validation_size="
            f"{validation_size}) leaves none for validation. Give a validation_size that holds some cells, or "
            "validate nothing."
        )


def default_n_restarts(choose_n_categories: bool, n_cells: int) -> int:
    """Fits of :meth:`CplMixVAE.train` to choose from: 3 when the model chooses the number of types, else 1.

    The types chosen by pruning from many categories vary between seeds; keeping the medoid of three fits (the
    one agreeing best with the other two) avoids relying on a single, possibly atypical fit, at three times the
    cost of the training and pruning. Above 50,000 cells, where one fit takes a quarter of an hour or more on a
    CPU, the default is one fit; ask for restarts with ``train(n_restarts=3)``.
    """
    return 3 if choose_n_categories and n_cells <= 50_000 else 1


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What one :meth:`CplMixVAE.train` call does, resolved once before any work starts.

    ``max_epochs`` epochs of every part, then (after the choice of K when ``prune``) ``state_epochs`` of the state
    phase; ``n_restarts`` fits to choose the medoid from; ``trainer``: the keyword arguments of every Lightning
    run (``accelerator``, ``batch_size``, ``plan_kwargs``, callbacks...).
    """

    max_epochs: int
    state_epochs: int
    prune: bool
    n_restarts: int
    resuming: bool
    prune_kwargs: dict[str, Any]
    trainer: dict[str, Any]

    @property
    def later_runs(self) -> dict[str, Any]:
        """``trainer`` for every Lightning run after the category fit: a checkpoint resumes the first run only.

        Passed on, it made each later run (the state phase, every pruning round) load it again and train nothing.
        """
        return {key: value for key, value in self.trainer.items() if key != "ckpt_path"}

    @property
    def separate_state_phase(self) -> bool:
        """Whether the state phase is a Lightning run of its own, after the categories' run.

        After a choice of K (pruning retrains the categories), and with early stopping, which would otherwise end
        the one run of both, state phase included, as soon as the categories' validation ELBO stops improving.
        """
        return self.prune or bool(self.trainer.get("early_stopping"))


@functools.cache
def _accepted(kind: str) -> frozenset[str]:
    """Names of the keyword arguments of every Lightning run (``"trainer"``) or of its training plan (``"plan"``)."""
    if kind == "plan":
        callables = (CplMixVAETrainingPlan.__init__, TrainingPlan.__init__)
        internal = {"self", "module"}
    else:  # scvi-tools' train() hands what it does not take to its runner, its trainer, then Lightning's
        callables = (UnsupervisedTrainingMixin.train, TrainRunner.__init__, ScviTrainer.__init__, LightningTrainer)
        internal = {"self", "model", "training_plan", "data_splitter", "max_epochs"}
    names = {"ckpt_path"} if kind == "trainer" else set()  # scvi-tools' runner takes it out of its **kwargs
    for function in callables:
        for name, parameter in inspect.signature(function).parameters.items():
            if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                names.add(name)
    return frozenset(names - internal)


def check_trainer_options(trainer: dict[str, Any], *, where: str = "train()") -> None:
    """Refuse, before any work starts, options that a run would refuse (or silently replace) later.

    Those are keyword arguments that no Lightning run or training plan takes, a learning rate that is not positive,
    a split of the cells scvi-tools refuses, and an accelerator or devices Lightning cannot use here.
    """
    plan_kwargs = trainer.get("plan_kwargs")
    if plan_kwargs is not None and not isinstance(plan_kwargs, dict):
        raise TypeError(f"`plan_kwargs` must be a dict, got {type(plan_kwargs).__name__}.")
    if managed := [name for name in FIT_PLAN_OPTIONS if name in (plan_kwargs or {})]:
        raise TypeError(
            f"plan_kwargs may not hold {managed}: the fit sets them for each of its runs (the coupling's warm-up of "
            "a fit that prunes, the start of the state phase). Set the coupling with CplMixVAE(coupling_weight=...) "
            "and the state phase with train(state_epochs=...)."
        )
    for kind, options, what, nor in (
        ("trainer", trainer, where, "scvi-tools' or Lightning's trainer"),
        ("plan", plan_kwargs or {}, "plan_kwargs", "scvi-tools' training plan"),
    ):
        accepted = _accepted(kind)
        for name in options:
            if name not in accepted:
                close = difflib.get_close_matches(name, sorted(accepted | {"max_epochs"}), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"{what} has no option {name!r} (nor does {nor}).{hint}")
    if "lr" in (plan_kwargs or {}):  # torch refuses it only when the first run builds its optimiser
        check.check_float("plan_kwargs['lr']", plan_kwargs["lr"], strict=True)
    for name in ("weight_decay", "eps", "max_kl_weight", "min_kl_weight"):  # read in the first step
        if name in (plan_kwargs or {}):
            check.check_float(f"plan_kwargs[{name!r}]", plan_kwargs[name])
    ckpt_path = trainer.get("ckpt_path")  # Lightning: "KeyError: 101" for a file that is no checkpoint
    if isinstance(ckpt_path, str | os.PathLike) and Path(ckpt_path).is_file() and not zipfile.is_zipfile(ckpt_path):
        raise ValueError(f"ckpt_path={str(ckpt_path)!r} is not a checkpoint written by TrainingCheckpoint (Lightning).")
    if isinstance(trainer.get("logger"), bool):  # no logger object: the fit would have no history to read
        raise ValueError(
            f"logger={trainer['logger']} leaves the fit without the history it reads (its losses and epochs); pass "
            "a Lightning logger object (e.g. CSVLogger or TensorBoardLogger), which gets every run's metrics."
        )
    monitor = trainer.get("early_stopping_monitor")  # Lightning: a RuntimeError at the first validation
    if monitor is not None and not (isinstance(monitor, str) and monitor.endswith("_validation")):
        raise ValueError(
            f"early_stopping_monitor={monitor!r} is no validation metric; they end in '_validation' (scvi-tools' "
            "default: 'elbo_validation'; `model.history` lists those a fit logs)."
        )
    check_split(trainer.get("train_size"), trainer.get("validation_size"))
    check_devices(trainer.get("accelerator", "auto"), trainer.get("devices", "auto"))


def check_split(train_size: Any, validation_size: Any) -> None:
    """Refuse a split of the cells scvi-tools would refuse after the start, or silently replace (``train_size=0``)."""
    if train_size is not None:
        check.check_float("train_size", train_size, strict=True, maximum=1.0)
    if validation_size is not None:
        check.check_float("validation_size", validation_size, maximum=1.0)
        if validation_size == 1.0:
            raise ValueError("`validation_size` must be < 1: some cells must train.")
    if train_size is not None and validation_size is not None and train_size + validation_size > 1.0:
        raise ValueError(
            f"train_size={train_size} and validation_size={validation_size} add up to more than all the cells."
        )


def check_devices(accelerator: Any, devices: Any) -> None:
    """Refuse, before any work starts, an accelerator or devices that Lightning cannot use on this machine.

    Lightning itself would refuse them only when the first run's trainer is built (after the Leiden start), or
    :meth:`CplMixVAE.load` after reading the files.
    """
    try:  # a trainer that is never run: Lightning's own resolution of the two, nothing else; its notices and
        # warnings (e.g. "GPU available but not used") are the real trainer's to give
        with quiet_fit(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            LightningTrainer(
                accelerator=accelerator,
                devices=devices,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
    except Exception as err:  # Lightning raises several types here (misconfiguration, a missing backend, ...)
        raise ValueError(
            f"accelerator={accelerator!r} with devices={devices!r} cannot be used on this machine: {err}"
        ) from err


def check_training_cells(model) -> None:
    """Refuse too few cells to train on (checked here, not in ``CplMixVAE()``: a loaded model reads out a few)."""
    n_cells = model.adata.n_obs
    if n_cells < MIN_TRAINING_CELLS:
        raise ValueError(
            f"The AnnData has {n_cells} cell(s); training needs at least {MIN_TRAINING_CELLS} (in practice "
            "hundreds). To read out a few new cells, pass them to a trained model's read-outs instead."
        )
    if not model.is_trained_ and model.module.n_categories > n_cells:  # the start needs a cell per category
        raise ValueError(f"n_categories={model.module.n_categories} is larger than the number of cells ({n_cells}).")


#: Environment variables that scvi-tools' and Lightning's seed setters change: jax's determinism flags and the seed
#: that a later ``lightning.seed_everything()`` without a seed would reuse.
SEED_ENVIRONMENT = ("XLA_FLAGS", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def seed_settings() -> dict[str, Any]:
    """Return scvi-tools' seed and what its setter changes besides: cuDNN's flags and :data:`SEED_ENVIRONMENT`."""
    cudnn = torch.backends.cudnn
    return {
        "seed": scvi.settings.seed,
        "cudnn": (cudnn.deterministic, cudnn.benchmark),
        "environment": {name: os.environ.get(name) for name in SEED_ENVIRONMENT},
    }


def restore_seed_settings(settings: dict[str, Any]) -> None:
    """Give back what :func:`seed_settings` returned; the random generators stay where the work left them.

    Setting the seed again re-seeds numpy's, Python's and torch's generators: the caller's next draws would repeat
    those that followed its own seeding.
    """
    if scvi.settings.seed != settings["seed"]:
        numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002 (the global generator)
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # torch's, CUDA's included
            scvi.settings.seed = settings["seed"]
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = settings["cudnn"]
    for name, value in settings["environment"].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def resolve_schedule(
    model,
    *,
    max_epochs: int | None,
    state_epochs: int | None,
    prune: bool | None,
    n_restarts: int | None,
    prune_kwargs: dict | None,
    trainer: dict[str, Any],
) -> Schedule:
    """Resolve the defaults of a :meth:`CplMixVAE.train` call and check its arguments before any work starts."""
    n_cells = model.adata.n_obs
    check_training_cells(model)
    given_max_epochs = max_epochs
    if max_epochs is not None:
        check.check_int("max_epochs", max_epochs, minimum=0)
    if state_epochs is None:
        state_epochs = default_state_epochs(n_cells, max_epochs)
    if max_epochs is None:
        max_epochs = default_max_epochs(n_cells)
    check.check_int("state_epochs", state_epochs, minimum=0)
    check.check_int("batch_size", trainer["batch_size"], minimum=2)
    check_trainer_options(trainer)
    CplMixVAETrainingPlan(model.module, **(trainer.get("plan_kwargs") or {}))  # its own checks, before the start
    check_validation_cells(trainer, n_cells)
    if max_epochs + state_epochs == 0:
        raise ValueError("max_epochs and state_epochs are both 0: there is nothing to train.")
    if max_epochs == 0 and not model.is_trained_:
        raise ValueError(
            "max_epochs=0 trains the states of a trained model only; train the model first (max_epochs > 0)."
        )
    resuming = trainer.get("ckpt_path") is not None  # the checkpoint holds the initialised weights
    if prune is None:
        prune = model.choose_n_categories_ and not model.is_trained_ and not resuming
    if n_restarts is None:
        chooses = model.choose_n_categories_ and prune and not model.is_trained_ and not resuming
        n_restarts = default_n_restarts(chooses, n_cells)
    check.check_int("n_restarts", n_restarts, minimum=1)
    if prune and model.is_trained_ and given_max_epochs:  # train_categories trains a trained model no further
        raise ValueError(
            f"max_epochs={given_max_epochs} trains a model before its first pruning; this model is trained, and "
            "pruning retrains it round by round (prune_kwargs={'epochs_per_round': ...}). Leave max_epochs out."
        )
    if n_restarts > 1 and not prune:
        raise ValueError(
            f"n_restarts={n_restarts} restarts the choice of the number of categories; it needs prune=True "
            "(the default for a model created without n_categories)."
        )
    if prune_kwargs is not None and not isinstance(prune_kwargs, dict):
        raise TypeError(f"`prune_kwargs` must be a dict, got {type(prune_kwargs).__name__}.")
    if prune_kwargs and not prune:
        raise ValueError(
            f"prune_kwargs={prune_kwargs} sets options of the pruning, but this train() call does not prune "
            "(prune=False, a model given n_categories, or one already trained). Pass prune=True to prune, or leave "
            "prune_kwargs out."
        )
    if n_restarts > 1 and (model.is_trained_ or resuming):
        raise ValueError(
            f"n_restarts={n_restarts} fits the model from fresh weights; this model is already trained "
            "(or resumes from a checkpoint). Create a new model to fit it with restarts."
        )
    # setup_anndata checked every cell; a normalisation in place since (a common next step in scanpy) changes
    # them all, and would otherwise be trained on without a word: the first cells tell, without a second full pass
    layer = model.adata_manager.registry["setup_args"].get("layer")
    check.check_counts(model.adata, layer, warn=False, first_cells=RECHECKED_CELLS)
    return Schedule(max_epochs, state_epochs, prune, n_restarts, resuming, dict(prune_kwargs or {}), trainer)


def start(model, schedule: Schedule) -> None:
    """Start a fit: fit the categorical heads to a Leiden partition and train the learned augmenter, if needed.

    Each happens once per model (the Leiden start: before its first training; ``augmentation="learned"``: while its
    augmenter is untrained) and never when resuming from a checkpoint, which holds the weights.
    """
    if schedule.resuming:
        return
    if not model.is_trained_ and not getattr(model, "category_init_done_", False):
        _start.fit_categorical_heads(model, _start.initial_partition(model))
        model.category_init_done_ = True
    if model.module.augmentation == "learned" and not bool(model.module.augmenter.trained):
        model.train_augmenter()


def train_categories(model, schedule: Schedule) -> None:
    """Train every part of the model for ``max_epochs``, in one Lightning run.

    Without a choice of K the state phase follows in the same run (``max_epochs=0``: the state phase alone), unless
    early stopping asks for a run of its own (:attr:`Schedule.separate_state_phase`); with one, it comes after the
    choice (:func:`state_phase`), the categories train weakly coupled (:data:`PRUNING_COUPLING_FACTOR`), and a
    trained model's categories are not trained again. Without one, the coupling's category weights are capped
    (:data:`COUPLING_WEIGHT_CAP`).
    """
    if schedule.prune and model.is_trained_:
        return
    trainer = dict(schedule.trainer)
    given = trainer.get("plan_kwargs") or {}
    if schedule.prune:
        trainer["plan_kwargs"] = {**given, "max_coupling_factor": PRUNING_COUPLING_FACTOR}
    else:  # the caller's plan_kwargs may set another cap, or none
        trainer["plan_kwargs"] = {"coupling_weight_cap": COUPLING_WEIGHT_CAP, **given}
    state_epochs = 0 if schedule.separate_state_phase else schedule.state_epochs
    if schedule.max_epochs + state_epochs:
        run(model, max_epochs=schedule.max_epochs, state_epochs=state_epochs, **trainer)
    if not schedule.prune and schedule.max_epochs and model.start_labels is not None:
        warn_empty_categories(model)


def warn_empty_categories(model) -> None:
    """Warn when training left one of the ``n_categories`` given without a cell: it merged types silently.

    Only for a model with a Leiden start (:attr:`~scmixvae.model.CplMixVAE.start_labels`), which fills every category:
    an empty one after training means the fit merged it into others (a learning rate too high, or fewer
    distinguishable types than ``n_categories``). Pruning fits skip the check (their many categories empty by
    design), as do query models (a query may lack some of the reference's types).
    """
    sizes = model.predict().value_counts(sort=False)
    empty = [str(name) for name, size in sizes.items() if size == 0]
    if empty:
        which = f"category {empty[0]} holds no cell" if len(empty) == 1 else f"categories {', '.join(empty)} hold none"
        warnings.warn(
            f"After training, {which} of the {sizes.size} given: the fit merged {'it' if len(empty) == 1 else 'them'} "
            "into others. The data may hold fewer distinguishable types than n_categories, or training was unstable "
            "(lower plan_kwargs['lr'] if you raised it).",
            UserWarning,
            stacklevel=check.user_stacklevel(),
        )


def state_phase(model, schedule: Schedule) -> None:
    """Train the states for ``state_epochs`` in a run of their own (:attr:`Schedule.separate_state_phase`)."""
    if schedule.separate_state_phase and schedule.state_epochs:
        run(model, max_epochs=0, state_epochs=schedule.state_epochs, **schedule.later_runs)


def run(
    model,
    *,
    max_epochs: int,
    state_epochs: int,
    stage: str | None = None,
    accelerator: str = "auto",
    devices: int | list[int] | str = "auto",
    train_size: float | None = None,
    validation_size: float | None = None,
    batch_size: int = 128,
    early_stopping: bool = False,
    plan_kwargs: dict | None = None,
    **kwargs,
) -> None:
    """One Lightning run of scvi-tools' trainer: ``max_epochs`` of every part, then ``state_epochs`` of the states.

    In the state phase the categorical path is frozen (the training plan's ``state_phase_start``). ``stage`` names
    the run on the fit's progress display (by default, from what it trains). A Ctrl-C keeps
    the weights reached so far and raises :class:`FitInterrupted`; a non-finite loss raises
    :class:`~scmixvae.train.TrainingDivergedError`.
    """
    if train_size is None:
        train_size = default_train_size(early_stopping, validation_size, kwargs, plan_kwargs)
        if train_size == 1.0:  # no validation set: none must be asked for
            kwargs.setdefault("limit_val_batches", 0)
    if state_epochs:
        plan_kwargs = {**(plan_kwargs or {}), "state_phase_start": max_epochs}
        strategy = kwargs.get("strategy")
        if isinstance(strategy, str) and strategy.startswith("ddp") and "find_unused" not in strategy:
            # the frozen categorical path gets no gradients in the state phase: DDP must expect that
            kwargs["strategy"] = f"{strategy}_find_unused_parameters_true"
    # the agents' views, neighbours included, are made only while the categorical path trains
    mixes_neighbours = model.module.augmentation == "knn" and max_epochs > 0
    table = _start.neighbours(model) if mixes_neighbours else None
    model.module.train()
    flag = InterruptFlag()
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), flag]
    if (progress := current_progress(kwargs["callbacks"])) is not None:  # the fit's display, not the run's bar
        kwargs["enable_progress_bar"] = False
        trained = model.is_trained_
        kwargs["callbacks"].append(
            progress.run(max_epochs=max_epochs, state_epochs=state_epochs, trained=trained, stage=stage)
        )
    if kwargs.get("logger") is not None:  # the user's logger(s) beside scvi-tools', from which the history comes
        from scvi.train._logger import SimpleLogger

        given = kwargs["logger"]
        kwargs["logger"] = [SimpleLogger(), *(given if isinstance(given, list | tuple) else [given])]
    kwargs.setdefault("log_every_n_steps", log_interval(model.adata.n_obs, batch_size, train_size))
    if "load_sparse_tensor" not in (kwargs.get("datasplitter_kwargs") or {}):
        kwargs.setdefault("load_sparse_tensor", sparse_minibatches(model, accelerator))
    # the neighbours' counts are loaded into the training minibatches only while training; their rows are
    # loaded in sorted order, the same in memory and backed
    model.adata_manager.neighbours = table
    try:
        with without_train_runner_print(), model.adata_manager.indexed_minibatches():
            UnsupervisedTrainingMixin.train(
                model,
                max_epochs=max_epochs + state_epochs,
                accelerator=accelerator,
                devices=devices,
                train_size=train_size,
                validation_size=validation_size,
                batch_size=batch_size,
                early_stopping=early_stopping,
                plan_kwargs=plan_kwargs,
                **kwargs,
            )
    except SystemExit:
        if not flag.interrupted:
            raise
        # Ctrl-C: Lightning shut down cleanly; keep the weights reached so far and stop the whole fit
        model.module.eval()
        model.is_trained_ = True
        if flag.history is not None and not model.history_:  # scvi-tools 1.4 already merged it into history_
            model.history_ = flag.history
        raise FitInterrupted from None
    finally:
        model.adata_manager.neighbours = None
        model.module.categories_frozen = False


def sparse_minibatches(model, accelerator: str) -> bool:
    """Whether training loads its minibatches as sparse CSR tensors: on the CPU, with CSR counts.

    The module then reads the non-zero counts from the CSR structure instead of searching a dense minibatch for
    them (see :meth:`CplMixVAE.train`); on an accelerator every step works densely anyway.
    """
    on_cpu = accelerator == "cpu" or (
        accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )
    if not on_cpu or model.adata.n_obs == 0:
        return False
    # what the loader gets for a minibatch (in memory or backed): scvi-tools converts CSR matrices only
    matrix = model.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    return isinstance(matrix[np.array([0])], sp.csr_matrix)


def fresh_model(model, **changes):
    """Build a new, untrained model like ``model`` (from its ``init_params_``, with ``changes``) on the same data.

    Built after ``scvi.settings.seed`` is set, it is the model ``CplMixVAE(adata, ...)`` would create with that seed.
    """
    params = model.init_params_
    kwargs = {key: value for group in params["kwargs"].values() for key, value in group.items()}
    return type(model)(model.adata, **{**params["non_kwargs"], **kwargs, **changes})


def trained_augmenter(model) -> tuple[dict[str, torch.Tensor], Any] | None:
    """Return the learned augmenter of ``model`` as trained so far (weights, history); ``None`` when untrained.

    Taken before a fit that builds fresh models (restarts, the fit without consensus), so that an augmenter the
    user trained first (``train_augmenter(labels=...)``) is the one every fresh model uses (:func:`give_augmenter`).
    """
    augmenter = model.module.augmenter
    if augmenter is None or not bool(augmenter.trained):
        return None
    weights = {key: value.detach().clone() for key, value in augmenter.state_dict().items()}
    return weights, getattr(model, "augmenter_history_", None)


def give_augmenter(fit, augmenter: tuple[dict[str, torch.Tensor], Any] | None) -> None:
    """Load a :func:`trained_augmenter` into the fresh model ``fit``, whose :func:`start` then trains none.

    The classifier, which only trains the augmenter, is left out where ``fit`` has another number of categories.
    """
    if augmenter is None:
        return
    weights, history = augmenter
    own = fit.module.augmenter.state_dict()
    fit.module.augmenter.load_state_dict({k: v for k, v in weights.items() if v.shape == own[k].shape}, strict=False)
    fit.module.augmenter.trained.fill_(True)
    fit.augmenter_history_ = history


def adopt_fit(model, fitted) -> None:
    """Make ``model`` the fit of ``fitted`` (a :func:`fresh_model` of it): its module, histories and fit state.

    Every attribute is taken over except the model's identity (its ``id`` in scvi-tools' registry of managers)
    and its description as created (its summary and the options the user gave, ``given_options_``: a restart
    is built with every option resolved).
    """
    kept = ("id", "_model_summary_string", "given_options_")
    model.__dict__.update({k: v for k, v in vars(fitted).items() if k not in kept})
