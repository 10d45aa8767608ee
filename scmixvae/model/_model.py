"""The coupled mixture VAE as an scvi-tools model."""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import scvi
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data.fields import (
    CategoricalObsField,
    LayerField,
    NumericalJointObsField,
)
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from .. import _validation as check
from .._constants import CONDITION_KEY, category_name
from .._logging import quiet_fit
from .._scoring import agreement_matrix, co_assignment
from ..module import CplMixVAEModule
from ..module._augment import AUGMENTATIONS, Augmentation
from ..module._module import CovariateLayout, Likelihood, eval_mode
from ..train import CplMixVAETrainingPlan
from ..train._progress import fit_progress
from . import _fit, _pruning, _start
from ._fit import FitInterrupted, default_max_epochs, option_defaults
from ._likelihood import CplMixVAELikelihoodMixin
from ._manager import (
    CategoricalJointObsField,
    CplMixVAEAnnDataManager,
    CplMixVAEDataSplitter,
    OptionalObsField,
    check_known_categories,
)
from ._query import CplMixVAEQueryMixin
from ._registry import CplMixVAERegistryMixin
from ._rnaseq import CplMixVAERNAMixin
from ._save_load import REMOVED_OPTIONS, load_model, read_registry, save_model

#: Options of scvi-tools' data loader that would reorder or drop the cells of a read-out (refused there).
READ_ORDER_OPTIONS = ("shuffle", "drop_last", "sampler", "batch_sampler")
#: Cells of the registered AnnData whose counts every read-out checks again (setup checked them all).
READOUT_RECHECKED_CELLS = 1_000


def _stops_whole_fit_on_interrupt(fit):
    """Wrap :meth:`CplMixVAE.train` or :meth:`CplMixVAE.prune` so that one Ctrl-C stops the whole fit.

    A training run stopped by Ctrl-C raises :class:`~scmixvae.model._fit.FitInterrupted`, which passes through
    every later stage of the fit (pruning rounds, restarts, state phase); here it becomes a warning and ``None``.
    """

    @functools.wraps(fit)
    def wrapper(self, *args, **kwargs):
        self.interrupted_ = False
        try:
            # one progress display for the whole fit; no notice or warning repeated by every trainer of it
            with quiet_fit(), fit_progress(kwargs.get("enable_progress_bar", True)):
                return fit(self, *args, **kwargs)
        except FitInterrupted:
            self.interrupted_ = True
            message = (
                "Training was interrupted (KeyboardInterrupt): the fit stopped there, and none of its later stages "
                "(training, pruning rounds, restarts, state phase) ran. The model keeps the weights reached so far "
                "(with pruning: those of the best round so far; with restarts: the last completed restart) and is "
                "ready for read-outs; call train() to train it further."
            )
            warnings.warn(message, UserWarning, stacklevel=2)
            return None

    return wrapper


def _check_registrable_counts(adata: AnnData, layer: str | None) -> None:
    """Raise a clear error, before anything is registered, where scvi-tools cannot read the counts' type.

    scvi-tools 1.4 reads scipy sparse *matrices* but not sparse *arrays* (``csr_array``), and fails with
    "data type not understood"; converting is the user's call, since ``setup_anndata`` never changes the data.
    """
    try:
        LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True).validate_field(adata)
    except TypeError as err:
        matrix = check.get_matrix(adata, layer)
        if not (sp.issparse(matrix) and not isinstance(matrix, sp.spmatrix)):
            raise
        where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
        raise TypeError(
            f"{where} is a scipy sparse array ({type(matrix).__name__}), which scvi-tools {scvi.__version__} cannot "
            f"register. Convert it once to a sparse matrix: `{where} = scipy.sparse.csr_matrix({where})`."
        ) from err


def default_n_categories(n_cells: int) -> int:
    """Categories to start from when the number of types is unknown: ``n_cells / 50`` clipped to ``[2, 50]``.

    Pruning only removes categories, so the start must exceed the number of types: 50 covers data with up to
    about 50 types, and on small data every category keeps about 50 cells on average.
    """
    return int(np.clip(n_cells // 50, 2, 50))


def _check_init_arguments(
    *,
    n_agents: int,
    choose_n_categories: bool,
    n_categories: int,
    n_state: int,
    n_hidden: int,
    n_layers: int,
    n_latent: int,
    likelihood: str,
    input_dropout: float,
    tau: float | None,
    beta: float,
    coupling_weight: float,
    augmentation: str,
) -> None:
    """Check the arguments of :class:`CplMixVAE` (its defaults resolved) before the module is built."""
    if choose_n_categories and n_agents < 2:
        raise ValueError(
            "Choosing the number of categories (n_categories=None) needs the consensus of at least two "
            "agents; give n_categories or use n_agents >= 2."
        )
    check.check_int("n_categories", n_categories, minimum=1)
    check.check_int("n_state", n_state, minimum=1)
    check.check_int("n_hidden", n_hidden, minimum=1)
    check.check_int("n_layers", n_layers, minimum=1)
    check.check_int("n_latent", n_latent, minimum=1)
    check.check_choice("likelihood", likelihood, ("nb", "zinb", "gaussian"))
    check.check_float("input_dropout", input_dropout, maximum=0.95)
    check.check_float("beta", beta)
    check.check_float("coupling_weight", coupling_weight)
    check.check_choice("augmentation", augmentation, AUGMENTATIONS)
    if tau is not None:
        check.check_float("tau", tau, strict=True)


def _check_module_kwargs(model_cls, module_kwargs: dict) -> None:
    """Refuse keyword arguments that the module does not take, or that the model sets itself."""
    module_params = inspect.signature(model_cls._module_cls.__init__).parameters
    model_params = inspect.signature(model_cls.__init__).parameters
    set_by_model = {"n_input", "covariates"}
    accepted = [p for p in module_params if p != "self" and p not in model_params and p not in set_by_model]
    for name in module_kwargs:
        if name in accepted:
            continue
        removed = ""
        if name == "initial_coupling_weight":
            removed = " It was removed: a fit that prunes warms the coupling up from 0.001 x coupling_weight itself."
        elif name == "augmentation_strength":
            removed = " It was removed: each augmentation has its own strength (thinning 0.5, knn 0.3, learned 4)."
        elif name in REMOVED_OPTIONS:
            removed = f" It was removed: the model uses {name}={REMOVED_OPTIONS[name]!r}."
        raise TypeError(
            f"{model_cls.__name__} got an unexpected keyword argument {name!r}.{removed} Its further keyword "
            f"arguments, passed on to the module, are {accepted}."
        )


class CplMixVAE(
    CplMixVAEQueryMixin,
    CplMixVAERNAMixin,
    CplMixVAELikelihoodMixin,
    CplMixVAERegistryMixin,
    UnsupervisedTrainingMixin,
    BaseModelClass,
):
    """Coupled mixture VAE (cpl-mixVAE): cell types and continuous within-type states.

    ``n_agents`` autoencoders that share no weights each see their own augmented copy of a cell and
    infer a category (the type) and a continuous state conditioned on it; a coupling loss pulls the
    agents' categorical posteriors together, so the category is what survives within-type
    perturbation. See the user guide for the generative story and the loss.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`; raw counts.
    n_agents
        Number of coupled agents ``A`` (published: 2).
    n_categories
        Number of categories ``K``. ``None`` (default): the number of types is unknown; the model starts from
        :func:`default_n_categories` (50 from 2,500 cells on, covering up to about 50 types) and its first
        :meth:`train` also prunes them and chooses ``K`` (:meth:`prune`; three restarts on up to 50,000 cells,
        see ``n_restarts`` of :meth:`train`). Give ``K`` when you know it.
    n_state
        Dimension of the continuous state latent (published: 2).
    n_hidden
        Width of the hidden layers (published: 100).
    n_layers
        Hidden layers of each encoder and decoder.
    n_latent
        Width of the encoder trunk's output (published: 10).
    likelihood
        ``"nb"`` (default) or ``"zinb"``: negative binomial (zero-inflated) on the counts with the observed
        library size as offset, as in scVI; ``"gaussian"``: unit-variance Gaussian on log1p of library-normalised
        expression (the published squared error). The Gaussian costs less per step, but its target still
        depends on sequencing depth, which the state latent then follows instead of moderate within-type
        programs (the state regimes of the :doc:`benchmarks </benchmarks>`); use it for types alone.
    input_dropout
        Independent per-agent input dropout at training time (published: 0.5), applied on top of any
        ``augmentation``. ``None`` (default): 0.5 when the model chooses the number of types
        (``n_categories=None``), 0 when it is given, where dropout would make the categories drift from types
        that differ in a few genes to what both agents' halves of a cell show alike (its depth).
    augmentation
        Each agent's view of a cell during training (read-outs always use the real cell):
        ``"dropout"`` (input dropout only; published fallback), ``"thinning"`` (binomial thinning of the counts,
        as a shallower sequencing would give), ``"knn"`` (mixing with one of the cell's 15 nearest neighbours,
        found once in a truncated SVD of log-normalised counts) or ``"learned"`` (copies from a generator trained
        by :meth:`train_augmenter`, called by the first :meth:`train` if needed). ``None`` (default): ``"knn"``
        when the model chooses the number of types (``n_categories=None``), ``"dropout"`` when it is given
        (with the default ``input_dropout`` of 0 there, every agent reads the real cell; see the augmentation
        guide).
    tau
        Temperature of the categorical head; ``None`` ties it to ``1 / K`` (published: 0.005 at K = 120).
        A warning is raised when it does not fit ``K``.
    beta
        Weight of the state KL divergence (published: 1).
    coupling_weight
        Weight ``lambda`` of the coupling distance (published: 1). A fit that prunes (:meth:`train` of a model
        created without ``n_categories``, :meth:`prune`) trains its many categories at ``0.001 * coupling_weight``,
        so that the agents keep similar types apart (each over-split into pure categories) instead of merging
        them, which pruning cannot undo; the weight then rises smoothly to ``coupling_weight`` over the first
        half of the first pruning round (geometrically, logged as ``coupling_weight`` in :attr:`history`).
    **module_kwargs
        Further keyword arguments of :class:`~scmixvae.module.CplMixVAEModule`: ``dispersion`` (of the count
        likelihoods).

    Notes
    -----
    The state posterior reads a one-layer encoder of its own (32 units) that sees the real cell, and the decoder
    gives each category its own map of the state; with a condition registered
    (``setup_anndata(condition_key=...)``), a penalty keeps any condition from lacking a category that the others
    hold, so that the condition's effect goes to the state rather than splitting types (see the user guide).

    Before its first training, the model fits the agents' categorical heads to a Leiden partition of the cells
    with ``n_categories`` clusters (on a truncated SVD of log-normalised counts), then refines it with the coupled
    objective; the published model started from random weights.

    Examples
    --------
    >>> import scmixvae
    >>> adata = scmixvae.data.simulate(n_cells=3000, n_genes=1000, n_types=8)
    >>> scmixvae.model.CplMixVAE.setup_anndata(adata)
    >>> model = scmixvae.model.CplMixVAE(adata, n_categories=8)
    >>> model.train(max_epochs=50)
    >>> adata.obs["type_pred"] = model.predict()
    >>> adata.obsm["X_state"] = model.get_latent_representation()
    """

    # The fit's state lives in attributes its stages set (those whose names end in "_" are saved with the model):
    # choose_n_categories_ (K is still to be chosen: created without n_categories, cleared once a choice completes),
    # given_options_ (the augmentation options the user gave), category_init_done_ (no Leiden start is left to do),
    # _initial_labels (the Leiden start's partition, read as start_labels; not saved), neighbours_ (the "knn" neighbour
    # table, found by the first run that mixes neighbours), pruning_history_ and restart_history_ (the choice of K),
    # augmenter_history_ (train_augmenter), interrupted_ (the last train() or prune() was stopped by Ctrl-C).
    _module_cls = CplMixVAEModule
    _training_plan_cls = CplMixVAETrainingPlan
    _data_splitter_cls = CplMixVAEDataSplitter
    interrupted_ = False  # whether the last train() or prune() was stopped by Ctrl-C

    def __init__(
        self,
        adata: AnnData | None = None,
        *,
        n_agents: int = 2,
        n_categories: int | None = None,
        n_state: int = 2,
        n_hidden: int = 100,
        n_layers: int = 2,
        n_latent: int = 10,
        likelihood: Likelihood = "nb",
        input_dropout: float | None = None,
        tau: float | None = None,
        beta: float = 1.0,
        coupling_weight: float = 1.0,
        augmentation: Augmentation | None = None,
        **module_kwargs,
    ):
        super().__init__(adata)
        _check_module_kwargs(type(self), module_kwargs)
        check.check_int("n_agents", n_agents, minimum=1)
        # K unknown: start from many categories; the first train() prunes them (see train(prune=...))
        self.choose_n_categories_ = n_categories is None
        if self.choose_n_categories_:
            n_categories = default_n_categories(adata.n_obs if adata is not None else 50 * 50)
        given = {"augmentation": augmentation, "input_dropout": input_dropout}
        self.given_options_ = {key: value for key, value in given.items() if value is not None}
        defaults = option_defaults(self.choose_n_categories_)
        augmentation = defaults["augmentation"] if augmentation is None else augmentation
        input_dropout = defaults["input_dropout"] if input_dropout is None else input_dropout
        _check_init_arguments(
            n_agents=n_agents,
            choose_n_categories=self.choose_n_categories_,
            n_categories=n_categories,
            n_state=n_state,
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_latent=n_latent,
            likelihood=likelihood,
            input_dropout=input_dropout,
            tau=tau,
            beta=beta,
            coupling_weight=coupling_weight,
            augmentation=augmentation,
        )
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            covariates=self._covariate_layout(),
            n_agents=n_agents,
            n_categories=n_categories,
            n_state=n_state,
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_latent=n_latent,
            likelihood=likelihood,
            input_dropout=input_dropout,
            tau=tau,
            beta=beta,
            coupling_weight=coupling_weight,
            augmentation=augmentation,
            **module_kwargs,
        )
        self._model_summary_string = (
            f"CplMixVAE model with the following parameters: \nn_agents: {n_agents}, n_categories: {n_categories}"
            f"{' (maximum; train() prunes)' if self.choose_n_categories_ else ''}, "
            f"n_state: {n_state}, n_hidden: {n_hidden}, n_layers: {n_layers}, n_latent: {n_latent}, "
            f"likelihood: {likelihood}, input_dropout: {input_dropout}, tau: {tau if tau is not None else '1/K'}, "
            f"beta: {beta}, coupling_weight: {coupling_weight}, augmentation: {augmentation}."
        )
        self.init_params_ = self._get_init_params(locals())

    def _covariate_layout(self) -> CovariateLayout:
        """Describe the registered covariates and condition to the module."""
        n_cats_per_cov = ()
        if REGISTRY_KEYS.CAT_COVS_KEY in self.adata_manager.data_registry:
            n_cats_per_cov = self.adata_manager.get_state_registry(REGISTRY_KEYS.CAT_COVS_KEY).n_cats_per_key
        return CovariateLayout(
            n_batch=self.summary_stats.n_batch,
            n_cats_per_cov=tuple(n_cats_per_cov),
            n_continuous_cov=self.summary_stats.get("n_extra_continuous_covs", 0),
            n_conditions=self.summary_stats.get(f"n_{CONDITION_KEY}", 0),
        )

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        condition_key: str | None = None,
        **kwargs,
    ) -> None:
        """Register an AnnData object with raw counts for :class:`CplMixVAE`.

        The counts are checked first (finite, non-negative integers up to ``2**31 - 1``, no empty cell), then
        the covariates (continuous ones numeric and finite, categorical ones without missing values), before
        anything is registered. ``X``, the layers, ``var`` and the user's ``obs`` columns are not changed;
        scvi-tools' registration adds:

        - ``uns["_scvi_uuid"]`` and ``uns["_scvi_manager_uuid"]``, which identify the registration;
        - ``obs["_scvi_batch"]`` and ``obs["_scvi_labels"]`` (and ``obs["_scvi_condition"]`` with a
          ``condition_key``): integer codes of the batch, the labels and the condition, from which scvi-tools
          reads them during training and read-outs (all zeros when the key is not given). They are part of the
          registration and are re-created by it; do not edit them;
        - with covariates, ``obsm["_scvi_extra_categorical_covs"]`` (their codes) and
          ``obsm["_scvi_extra_continuous_covs"]`` (their values).

        Read-outs on a new AnnData register it the same way (the same keys). They need the covariates that
        inference reads (batch, categorical and continuous covariates, with values the model was trained on; new
        batches are mapped with :meth:`load_query_data`) but not the labels or the condition: a column that is
        missing there, or a value the model has not seen, gets code ``-1`` in ``obs["_scvi_labels"]`` or
        ``obs["_scvi_condition"]``.

        Parameters
        ----------
        adata
            AnnData with raw counts in ``X`` or in ``layer``.
        layer
            Layer holding the raw counts; ``None`` for ``X``.
        batch_key
            ``obs`` column of the batch, injected one-hot into every agent's encoder and decoder.
        labels_key
            ``obs`` column of known labels (not used in training; kept for downstream comparisons).
        categorical_covariate_keys
            ``obs`` columns of further categorical covariates (one-hot, like the batch).
        continuous_covariate_keys
            ``obs`` columns of continuous covariates.
        condition_key
            ``obs`` column of an experimental condition whose effect belongs to the cells' states rather than
            to their types (control vs stimulated, healthy vs disease, time points): a penalty in the loss keeps
            any condition from lacking a category that the others hold (a type's share may still change between
            conditions), and the condition is given to no encoder or decoder, so its effect is carried by the
            state latent. Unlike a batch, it is not removed. Use it when every type is present in every condition.
        """
        check.check_anndata(adata)
        if adata.is_view:  # scvi-tools: "Please run `adata = adata.copy()`", without saying why
            raise ValueError(
                "`adata` is a view of another AnnData (e.g. `adata[mask]`); setup_anndata adds columns to it, which a "
                "view cannot hold. Make it an AnnData of its own first: `adata = adata[mask].copy()`."
            )
        check.check_unique_names(adata)
        categorical_covariate_keys = check.check_key_list("categorical_covariate_keys", categorical_covariate_keys)
        continuous_covariate_keys = check.check_key_list("continuous_covariate_keys", continuous_covariate_keys)
        # from a model's registry (load, read-outs, a query): the labels and the condition may be absent
        transfer = kwargs.get("source_registry") is not None
        check.check_obs_keys(
            adata,
            batch_key=batch_key,
            labels_key=None if transfer else labels_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            condition_key=None if transfer else condition_key,
        )
        if condition_key is not None and not transfer:
            if condition_key in (batch_key, labels_key):
                raise ValueError(
                    f"`condition_key` {condition_key!r} is also the batch or labels key; use it for one only."
                )
            if adata.obs[condition_key].isna().any():
                raise ValueError(
                    f"adata.obs[{condition_key!r}] has {int(adata.obs[condition_key].isna().sum())} missing value(s); "
                    "every cell needs a condition."
                )
            if adata.obs[condition_key].nunique() < 2:
                warnings.warn(
                    f"adata.obs[{condition_key!r}] holds a single condition; the condition has no effect.",
                    UserWarning,
                    stacklevel=2,
                )
        check.check_covariates(
            adata,
            continuous=continuous_covariate_keys,
            batch_key=batch_key,
            labels_key=None if transfer else labels_key,
            categorical_covariate_keys=categorical_covariate_keys,
        )
        if not transfer:
            check.warn_category_columns(
                adata,
                batch_key=batch_key,
                condition_key=condition_key,
                categorical_covariate_keys=categorical_covariate_keys,
            )
        check.check_counts(adata, layer, warn=not transfer)  # the model fixes the genes of new data
        arguments = {key: value for key, value in locals().items() if key != "transfer"}  # the call's, not ours
        setup_method_args = cls._get_setup_method_args(**arguments)
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            OptionalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            CategoricalJointObsField(REGISTRY_KEYS.CAT_COVS_KEY, categorical_covariate_keys),
            NumericalJointObsField(REGISTRY_KEYS.CONT_COVS_KEY, continuous_covariate_keys),
        ]
        if condition_key is not None:  # registered only when given: models saved without it load unchanged
            anndata_fields.append(OptionalObsField(CONDITION_KEY, condition_key))
        _check_registrable_counts(adata, layer)
        adata_manager = CplMixVAEAnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        with warnings.catch_warnings():  # check_counts warned of a CSC matrix, with the line that converts it
            warnings.filterwarnings("ignore", message="Training will be faster when sparse matrix is formatted as CSR")
            adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @_stops_whole_fit_on_interrupt
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        batch_size: int = 128,
        early_stopping: bool = False,
        plan_kwargs: dict | None = None,
        prune: bool | None = None,
        prune_kwargs: dict | None = None,
        n_restarts: int | None = None,
        state_epochs: int | None = None,
        **kwargs,
    ):
        """Train the model with scvi-tools' trainer (same arguments as :meth:`scvi.model.SCVI.train`).

        Parameters
        ----------
        max_epochs
            Epochs of training every part of the model; ``None`` uses :func:`default_max_epochs` (``250,000 /
            n_cells`` clipped to ``[20, 100]``: the agents' consensus settles within a few thousand minibatch
            steps). ``0`` on a trained model: the state phase alone (of the default length unless
            ``state_epochs`` is given), e.g. after :meth:`prune`.
        accelerator, devices
            Lightning accelerator and devices (``"auto"`` picks a GPU when there is one).
        train_size, validation_size
            Fractions of cells for training and validation. ``None``: every cell trains (the categories and the
            states) when nothing asks for validation (early stopping, checkpoints, ``check_val_every_n_epoch``, a
            ``validation_size``) and the call does not resume from a checkpoint; with a ``validation_size``
            alone, the other cells train; otherwise scvi-tools' defaults, 0.9 / 0.1.
        batch_size
            Minibatch size.
        early_stopping
            Stop when the validation ELBO stops improving (scvi-tools' ``early_stopping_*`` options apply). It
            ends the category fit; the state phase then runs on its own and stops the same way.
        plan_kwargs
            Keyword arguments of :class:`~scmixvae.train.CplMixVAETrainingPlan` (``lr``, ``weight_decay``,
            ``n_epochs_kl_warmup``...). Without pruning, each category's weight in the coupling is capped at
            ``coupling_weight_cap`` (``sqrt(2)``) times its running mean; ``None``: the published weights.
        prune
            Choose the number of categories with :meth:`prune` (its history in :attr:`pruning_history`), after
            training ``max_epochs`` first if the model is untrained. ``None`` (default): prune when the model
            was created without ``n_categories`` and has not been trained yet. When the model starts untrained
            and no round of the fit kept reaches the consensus threshold, the agents agree on no number of types,
            and the model becomes the fit with as many categories given as Leiden finds at resolution 1 (scanpy's
            default) on the start's graph, at the same seed, with a :class:`~scmixvae.model.NoConsensusWarning`
            (:meth:`prune` alone, or on a trained model, keeps its round of highest consensus, as published);
            ``pruning_history.attrs["fallback_n_categories"]`` records it.
        prune_kwargs
            Options of :meth:`prune`: ``threshold``, ``min_categories``, ``max_rounds``, ``epochs_per_round``
            (its batch size and training options are this call's own), checked before any work starts; only
            for a call that prunes.
        n_restarts
            With pruning: fit the model this many times from fresh weights (training and pruning, no state
            phase), then keep the fit whose categories agree best with the others' (the medoid: highest mean
            adjusted Rand index of its :meth:`predict` labels with every other fit's; the earliest on a tie; among
            the fits whose pruning reached the consensus threshold, when there are any) and train the states of
            that one. Restart 0 is the model as created; restart ``r`` is a new model built with
            the same arguments after setting ``scvi.settings.seed`` to a seed drawn from the current seed and ``r``
            (the ``seed`` column of :attr:`restart_history`; restored afterwards; fits at two seeds share no
            restart), so it is the fit a new model created with that seed would give; the model becomes the fit
            kept. Fits from many categories vary between seeds; the medoid is the most typical of them. Two
            restarts always tie (the first is kept): use three or more. See :attr:`restart_history`. ``None``
            (default): :func:`default_n_restarts`, ``3`` when this call chooses the number of types of a model
            created without ``n_categories`` (its first training) on up to 50,000 cells, else ``1``, a single fit.
        state_epochs
            Epochs of the state phase, after ``max_epochs`` (and after pruning): the encoder trunk and the
            categorical heads are frozen (they read the real cell, as in a read-out, and learn nothing), so the
            types and :meth:`predict` stay exactly as they are, while the state encoder, the decoder and the
            dispersions go on learning the within-type programs, which take longer than the types. ``None``:
            :func:`default_state_epochs` (three times ``max_epochs`` on up to about 12,500 cells, fewer on larger
            data); ``0``: none. Its epochs cost less than the others (no backward pass through the trunk) and
            follow them in :attr:`history`. With several devices, a DDP strategy given by name (``"ddp"``,
            ``"ddp_notebook"``...) gets its ``_find_unused_parameters_true`` variant, since the frozen weights
            receive no gradient; a :class:`~lightning.pytorch.strategies.DDPStrategy` object needs
            ``find_unused_parameters=True``.
        **kwargs
            Further keyword arguments of :meth:`scvi.model.base.UnsupervisedTrainingMixin.train` and of the
            Lightning trainer (``enable_progress_bar``, ``callbacks``, ``strategy``...). A name that none of them
            takes (here or in ``plan_kwargs``) is refused before any work starts.

        Notes
        -----
        An interruption (Ctrl-C, ``KeyboardInterrupt``) stops training cleanly: the call returns with a warning
        and the model keeps the weights of the last completed step, ready for read-outs or another ``train()``.
        It stops the whole fit: no later stage (pruning round, restart, state phase) runs; an interrupted pruning
        keeps the best round so far, interrupted restarts the last completed one. ``model.interrupted_`` tells
        whether the last ``train()`` or ``prune()`` call was interrupted.
        With ``n_categories`` given, a fit whose training leaves a category without a cell (the Leiden start fills
        every one) warns: it merged types.
        A long fit that saves :class:`~scmixvae.train.TrainingCheckpoint` files resumes in a new model built
        with the same arguments: ``train(max_epochs=..., ckpt_path=".../last.ckpt")`` restores the weights,
        the optimiser and the epoch counter (the category initialisation is then skipped).

        On the CPU, counts stored as a CSR matrix (in memory or backed) reach the training steps as sparse
        minibatches (scvi-tools' ``load_sparse_tensor``), from which the module reads the non-zero counts
        directly; ``load_sparse_tensor=False`` loads them dense instead.
        """
        trainer = {
            "accelerator": accelerator, "devices": devices, "train_size": train_size,
            "validation_size": validation_size, "batch_size": batch_size, "early_stopping": early_stopping,
            "plan_kwargs": plan_kwargs, **kwargs,
        }  # fmt: skip
        schedule = _fit.resolve_schedule(
            self,
            max_epochs=max_epochs,
            state_epochs=state_epochs,
            prune=prune,
            n_restarts=n_restarts,
            prune_kwargs=prune_kwargs,
            trainer=trainer,
        )
        if schedule.prune:  # the start, the category fit and the choice of K (restarts: fresh models)
            _pruning.choose_n_categories(self, schedule)
        else:
            _fit.start(self, schedule)
            _fit.train_categories(self, schedule)  # the state phase too, in the same run, unless it has one of its own
        _fit.state_phase(self, schedule)  # a run of its own: after a choice of K, or with early stopping

    def train_augmenter(
        self,
        max_epochs: int | None = None,
        *,
        labels: np.ndarray | pd.Series | None = None,
        batch_size: int = 256,
        lr: float = 1e-3,
    ) -> pd.DataFrame:
        """Train the learned augmenter (``augmentation="learned"``); :meth:`train` calls it first if needed.

        The augmenter is a small VAE with a type classifier: copies of a cell vary along the generator's latent
        while the classifier, trained on real cells, must still give them the cell's type (see
        :class:`~scmixvae.module.AugmenterModule`). It is saved and loaded with the model. An augmenter trained
        before :meth:`train` (e.g. on known types) is the one the whole fit uses, its restarts and the fit without
        consensus included.

        Parameters
        ----------
        max_epochs
            Passes over the data; ``None`` uses a quarter of :func:`default_max_epochs` (at least 5).
        labels
            Types of the training cells for the classifier; ``None`` uses a Leiden partition with
            ``n_categories`` clusters (the one the model starts its categories from).
        batch_size
            Minibatch size.
        lr
            Learning rate of Adam.

        Returns
        -------
        The mean of each loss term per epoch (also in :attr:`augmenter_history_`).
        """
        if self.module.augmenter is None:
            raise ValueError(
                f"This model uses augmentation={self.module.augmentation!r}; only augmentation='learned' has an "
                "augmenter to train. Create the model with CplMixVAE(adata, augmentation='learned')."
            )
        if max_epochs is None:
            max_epochs = max(5, round(default_max_epochs(self.adata.n_obs) / 4))
        check.check_int("max_epochs", max_epochs, minimum=1)
        check.check_int("batch_size", batch_size, minimum=2)
        check.check_float("lr", lr, strict=True)
        if labels is None:
            codes = _start.initial_partition(self)
        else:
            codes = _start.label_codes(labels, self.adata.n_obs, self.module.n_categories)
        self.augmenter_history_ = _start.train_augmenter(
            self, codes, max_epochs=max_epochs, batch_size=batch_size, lr=lr
        )
        return self.augmenter_history_

    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True) -> AnnData:
        """Check a read-out AnnData before scvi-tools registers it.

        A view is copied here rather than turned into an actual AnnData in place (scvi-tools' behaviour), so
        the user's object is left as it was; an AnnData whose genes differ from the training genes gets an
        error naming the difference. New data (not yet registered with the model) gets the checks of
        :meth:`setup_anndata`: raw counts in the registered layer, no cell without counts, covariates present,
        finite and complete.
        """
        if adata is not None:
            if not isinstance(adata, AnnData):
                raise TypeError(f"Expected an AnnData object, got {type(adata).__name__}.")
            if adata.is_view and adata.isbacked:  # anndata: "To copy an AnnData object in backed mode, pass a filename"
                raise ValueError(
                    "`adata` is a view of a backed AnnData (e.g. `backed[:100]`), which read-outs cannot copy. Pass "
                    "the backed AnnData with `indices=` (the cells' positions), or read the cells into memory: "
                    "`backed[cells].to_memory()`."
                )
            if adata.is_view:
                adata = adata.copy()
            genes = self.registry_["field_registries"][REGISTRY_KEYS.X_KEY]["state_registry"]["column_names"]
            if (problem := check.gene_mismatch(adata.var_names, genes)) is not None:
                raise ValueError(
                    f"The AnnData {problem}. Subset and order it as the training data: "
                    "`adata[:, model.adata.var_names]`."
                )
            if self.adata_manager is not None and not self._registered(adata):
                self._check_new_data(adata)
            elif self.adata_manager is not None:
                self._recheck_counts(adata)
        elif self.adata_manager is not None:
            self._recheck_counts(self.adata)
        with warnings.catch_warnings():  # registering a few new cells for a read-out trains nothing
            warnings.filterwarnings("ignore", message=r"Category .* has fewer than 3 cells", category=UserWarning)
            return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    def _registered(self, adata: AnnData) -> bool:
        """Whether ``adata`` itself (not a copy carrying its registration) is registered with this model."""
        store = getattr(type(self), "_per_instance_manager_store", {}).get(self.id, {})
        manager = store.get(adata.uns.get("_scvi_uuid"))
        return manager is not None and manager.adata is adata

    def _recheck_counts(self, adata: AnnData) -> None:
        """Check the first cells of a registered AnnData's counts again (:data:`READOUT_RECHECKED_CELLS`).

        Counts normalised in place since setup (a common next step in scanpy, e.g. for plots) were otherwise read as
        counts without a word.
        """
        layer = self.adata_manager.registry["setup_args"].get("layer")
        check.check_counts(adata, layer, warn=False, first_cells=READOUT_RECHECKED_CELLS)

    def _check_new_data(self, adata: AnnData) -> None:
        """Run :meth:`setup_anndata`'s checks of the counts and covariates on an AnnData new to the model.

        A copy of the training data counts as new (scvi-tools transfers the registration to it). The labels and the
        condition, which inference does not read, may be absent or hold other values; batches and categorical
        covariates must be the model's (:func:`~scmixvae.model._manager.check_known_categories`).
        """
        registry = self.adata_manager.registry
        args = registry.get("setup_args", {})
        covariates = {key: args.get(key) for key in ("batch_key", "categorical_covariate_keys")}
        continuous = args.get("continuous_covariate_keys")
        check.check_obs_keys(adata, continuous_covariate_keys=continuous, **covariates)
        check.check_covariates(adata, continuous=continuous, **covariates)
        check.check_counts(adata, args.get("layer"), warn=False)
        _check_registrable_counts(adata, args.get("layer"))
        check_known_categories(adata, registry)

    def _check_if_trained(self, warn: bool = True, message: str | None = None) -> None:
        """Raise a :class:`ValueError` when the model was never trained: its read-outs would be random.

        Every read-out (and every ``tl`` verb) calls this; unlike scvi-tools, ``warn`` does not turn the error
        into a warning.
        """
        if not self.is_trained_:
            raise ValueError(
                "This model has not been trained: its types and states would be random. Call `model.train()` "
                "first (or load a trained model with `CplMixVAE.load`)."
            )

    # ------------------------------------------------------------------ saving and loading
    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        save_kwargs: dict | None = None,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model to a folder: ``model.pt`` (and ``adata.h5ad`` with ``save_anndata=True``).

        ``model.pt`` holds only tensors and plain data (numpy arrays and pandas tables are stored as tensors and
        lists), so :meth:`load` reads it without unpickling any Python object. Each file is written to a
        temporary file in the folder and moved into place, so a failed save leaves each earlier file intact;
        ``model.pt`` records which cells were saved with it, and :meth:`load` refuses an ``adata.h5ad`` of
        another save (left by a save that failed between the two files).

        Parameters
        ----------
        dir_path
            Folder to save in; created if needed.
        prefix
            Prefix of the file names.
        overwrite
            Replace the model of an existing folder (otherwise it is an error); without ``save_anndata``, an
            ``adata.h5ad`` saved there earlier is left in place (never deleted), and :meth:`load` does not pair it
            with this model.
        save_anndata
            Also save the model's AnnData.
        save_kwargs
            Keyword arguments of :func:`torch.save`.
        **anndata_write_kwargs
            Keyword arguments of :meth:`anndata.AnnData.write_h5ad`.
        """
        save_model(
            self,
            dir_path,
            prefix=prefix,
            overwrite=overwrite,
            save_anndata=save_anndata,
            save_kwargs=save_kwargs,
            **anndata_write_kwargs,
        )

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        backup_url: str | None = None,
    ) -> CplMixVAE:
        """Load a model saved by :meth:`save`.

        ``model.pt`` is read with ``torch.load(weights_only=True)``: a file that holds any Python object other
        than tensors and plain data (as a crafted or foreign file may, to run code when unpickled) is refused
        with a :class:`ValueError`, as is a file that is not a saved model.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            AnnData with the training genes in the training order (it is registered like the training data);
            ``None``: the AnnData saved with ``save_anndata=True``. Other genes or another order are an error.
        accelerator
            Lightning accelerator to load the model on (``"auto"``, ``"cpu"``, ``"gpu"``).
        device
            Device index or ``"auto"``.
        prefix
            Prefix of the file names given to :meth:`save`.
        backup_url
            URL to download ``model.pt`` from when it is not in ``dir_path``.

        Returns
        -------
        The loaded model, in evaluation mode.
        """
        _fit.check_devices(accelerator, device)
        return load_model(
            cls, dir_path, adata, accelerator=accelerator, device=device, prefix=prefix, backup_url=backup_url
        )

    @staticmethod
    def load_registry(dir_path: str | os.PathLike, prefix: str | None = None) -> dict:
        """Return the scvi-tools registry saved with a model (read as safely as :meth:`load`)."""
        return read_registry(dir_path, prefix)

    @staticmethod
    def view_setup_args(dir_path: str | os.PathLike, prefix: str | None = None) -> None:
        """Print the arguments of :meth:`setup_anndata` saved with a model (read as safely as :meth:`load`)."""
        import rich.pretty  # noqa: F401  (scvi-tools prints with it but does not import it)
        from scvi.data import AnnDataManager

        AnnDataManager.view_setup_method_args(read_registry(dir_path, prefix))

    # ------------------------------------------------------------------ read-outs
    @property
    def n_categories(self) -> int:
        """Number of categories that survive pruning."""
        return self.module.n_active_categories

    @property
    def category_names(self) -> list[str]:
        """Names of the surviving categories (their index among the initial ``n_categories``)."""
        return [category_name(k) for k in np.flatnonzero(self.module.category_mask.cpu().numpy())]

    def iter_inference(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        batch_size: int | None = None,
        data_loader_kwargs: dict | None = None,
    ) -> Iterator[tuple[dict[str, torch.Tensor | None], dict[str, torch.Tensor]]]:
        """Run the model's inference over minibatches of the real cells in evaluation mode.

        The one read-out loop: :meth:`predict`, :meth:`get_latent_representation`,
        :meth:`get_normalized_expression`, the :mod:`scmixvae.tl` verbs and the choice of the number of types all
        read the model through it. The module stays in evaluation mode (no input dropout or augmentation;
        BatchNorm running statistics) until the iteration ends; no gradient is recorded.

        Parameters
        ----------
        adata, indices, batch_size
            As in :meth:`get_category_probabilities`.
        data_loader_kwargs
            Further keyword arguments of scvi-tools' data loader.

        Yields
        ------
        For each minibatch, in the order of ``indices``: the module's inference inputs (counts, batch, covariates)
        and its inference outputs (``q``: posteriors ``(A, n, K)`` over all initial categories, masked ones 0;
        ``hs``: the state features; ``qs_m``, ``qs_v``: each agent's state posterior given its own category).
        """
        adata, indices = self._read_out_cells(adata, indices)
        yield from self._inference(adata, indices, batch_size, data_loader_kwargs)

    def _read_out_cells(self, adata: AnnData | None, indices: Sequence[int] | None) -> tuple[AnnData, np.ndarray]:
        """Check, once per read-out, that the model is trained, then ``adata`` (as registered) and ``indices``."""
        self._check_if_trained(warn=True)
        adata = self._validate_anndata(adata)
        return adata, check.check_indices(indices, adata.n_obs)

    def _inference(
        self, adata: AnnData, indices: np.ndarray, batch_size: int | None, data_loader_kwargs: dict | None = None
    ) -> Iterator[tuple[dict[str, torch.Tensor | None], dict[str, torch.Tensor]]]:
        """:meth:`iter_inference` of cells a read-out has already checked (:meth:`_read_out_cells`)."""
        module = self.module
        with eval_mode(module):
            for tensors in self._read_minibatches(adata, indices, batch_size, data_loader_kwargs):
                with torch.inference_mode():  # per minibatch: the grad mode is not left changed between yields
                    inputs = module._get_inference_input(tensors)
                    outputs = module.inference(**inputs)
                yield inputs, outputs

    def _read_minibatches(
        self, adata: AnnData, indices: np.ndarray, batch_size: int | None, data_loader_kwargs: dict | None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield the registered tensors of the cells ``indices`` of ``adata``, in minibatches and in that order.

        scvi-tools loads the rows of a backed AnnData in sorted order within each minibatch; the rows of such a
        minibatch are put back in the order asked for. Options of the data loader that would reorder or drop
        cells are refused: every read-out returns one row per cell of ``indices``, in that order.
        """
        if batch_size is not None:  # torch's sampler said "batch_size should be a positive integer value"
            check.check_int("batch_size", batch_size, minimum=1)
        kwargs = dict(data_loader_kwargs or {})
        refused = sorted(set(kwargs) & set(READ_ORDER_OPTIONS))
        if refused:
            raise ValueError(
                f"data_loader_kwargs may not set {refused}: a read-out returns one row per cell of `indices`, "
                "in that order."
            )
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size, **kwargs)
        start = 0
        for tensors in loader:
            asked = indices[start : start + tensors[REGISTRY_KEYS.X_KEY].shape[0]]
            start += asked.size
            if adata.isbacked and (np.diff(asked) < 0).any():  # loaded as np.sort(asked): undo that sort
                restore = torch.from_numpy(np.argsort(np.argsort(asked, kind="stable"), kind="stable"))
                tensors = {
                    key: (value if value.layout == torch.strided else value.to_dense())[restore]
                    if isinstance(value, torch.Tensor)
                    else value
                    for key, value in tensors.items()
                }
            yield tensors

    @torch.inference_mode()
    def _posteriors(
        self,
        adata: AnnData | None,
        indices: Sequence[int] | None,
        batch_size: int | None,
        *,
        state: Literal["own", "consensus"] | None = None,
        give_mean: bool = True,
    ) -> tuple[pd.Index, np.ndarray, np.ndarray | None]:
        """Category posteriors ``(A, n, K)`` and optionally state latents ``(A, n, S)`` of the real cells."""
        adata, indices = self._read_out_cells(adata, indices)
        module = self.module
        qs, states = [], []
        for _, out in self._inference(adata, indices, batch_size):
            qs.append(out["q"].cpu())
            if state is None:
                continue
            if state == "consensus":
                _, mean, var = module.consensus_state(out["q"], out["hs"])
            else:
                mean, var = out["qs_m"], out["qs_v"]
            states.append((mean if give_mean else mean + var.sqrt() * torch.randn_like(mean)).cpu())
        active = module.category_mask.cpu().numpy()
        q = torch.cat(qs, dim=1).numpy()[..., active]
        s = torch.cat(states, dim=1).numpy() if states else None
        check.check_finite_posteriors(q, s)
        return adata.obs_names[indices], q, s

    def _check_agent(self, agent: int | None, name: str = "agent") -> None:
        if agent is not None:
            check.check_int(name, agent, minimum=0, maximum=self.module.n_agents - 1)

    def get_category_probabilities(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        agent: int | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Posterior probability of each surviving category, one column per category.

        Parameters
        ----------
        adata
            AnnData with the training genes; defaults to the one the model was set up with.
        indices
            Cells to use, as integer positions or a boolean mask; all by default.
        agent
            One agent's posterior ``q_a(c | x)``; ``None`` averages over the agents (the consensus).
        batch_size
            Minibatch size (``scvi.settings.batch_size`` by default).
        """
        self._check_agent(agent)
        names, q, _ = self._posteriors(adata, indices, batch_size)
        probs = q.mean(0) if agent is None else q[agent]
        return pd.DataFrame(probs, index=names, columns=self.category_names)

    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        soft: bool = False,
        agent: int | None = None,
        batch_size: int | None = None,
    ) -> pd.Series | pd.DataFrame:
        """Consensus category of each cell: the argmax of the agents' mean posterior.

        Parameters
        ----------
        adata, indices, batch_size
            As in :meth:`get_category_probabilities`.
        soft
            Return the probabilities (one column per category) instead of the labels.
        agent
            Use one agent's posterior instead of the consensus.

        Returns
        -------
        A categorical :class:`~pandas.Series` of category names indexed by ``obs_names``, or a
        :class:`~pandas.DataFrame` when ``soft=True``.
        """
        probs = self.get_category_probabilities(adata, indices, agent=agent, batch_size=batch_size)
        if soft:
            return probs
        labels = pd.Categorical(probs.columns[probs.to_numpy().argmax(1)], categories=probs.columns)
        return pd.Series(labels, index=probs.index, name="category")

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        agent: int | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Continuous state latent of each cell, ``(n_cells, n_state)``.

        Parameters
        ----------
        adata, indices, batch_size
            As in :meth:`get_category_probabilities`.
        agent
            ``None`` (consensus): agent 0's state posterior conditioned on the consensus category, so
            that cells of one type share one state space. An integer: that agent's state posterior
            conditioned on its own category.
        give_mean
            Return the posterior mean rather than a sample.
        """
        self._check_agent(agent)
        _, _, s = self._posteriors(
            adata, indices, batch_size, state="consensus" if agent is None else "own", give_mean=give_mean
        )
        return s[0 if agent is None else agent]

    def get_agent_agreement(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Fraction of cells on which each pair of agents assigns the same category, ``(A, A)``."""
        _, q, _ = self._posteriors(adata, indices, batch_size)
        agents = [f"agent{a}" for a in range(q.shape[0])]
        return pd.DataFrame(agreement_matrix(q.argmax(-1)), index=agents, columns=agents)

    def get_consensus_matrix(
        self,
        agent_a: int = 0,
        agent_b: int = 1,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        normalize: bool = True,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Co-assignment matrix of two agents over the surviving categories.

        Entry ``(k, l)`` counts the cells that agent ``agent_a`` puts in ``k`` and ``agent_b`` in ``l``;
        with ``normalize=True`` each row is divided by its sum (rows of empty categories stay zero), so
        the diagonal is the per-category consensus.
        """
        if self.module.n_agents < 2:
            raise ValueError("A consensus matrix compares two agents; this model has one (n_agents=1).")
        self._check_agent(agent_a, "agent_a")
        self._check_agent(agent_b, "agent_b")
        _, q, _ = self._posteriors(adata, indices, batch_size)
        matrix = co_assignment(q[agent_a].argmax(-1), q[agent_b].argmax(-1), q.shape[-1]).astype(float)
        if normalize:
            rows = matrix.sum(1, keepdims=True)
            matrix = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
        names = self.category_names
        return pd.DataFrame(
            matrix, index=pd.Index(names, name=f"agent{agent_a}"), columns=pd.Index(names, name=f"agent{agent_b}")
        )

    # ------------------------------------------------------------------ model order
    @_stops_whole_fit_on_interrupt
    def prune(
        self,
        *,
        threshold: float = 0.95,
        min_categories: int = 2,
        max_rounds: int | None = None,
        epochs_per_round: int | None = None,
        batch_size: int = 128,
        **train_kwargs,
    ) -> pd.DataFrame:
        """Choose the number of categories: prune the ones the agents do not agree on, keep the best round.

        Start from more categories than there are types (``n_categories``), with agents that read different views
        of a cell (``input_dropout=0.5``, the published value; with ``n_categories`` given the default is 0, the
        agents read the same cell and agree trivially, and ``prune()`` warns). Round 0 scores the model as it
        is (an untrained model is trained first). Each round labels the cells by each agent's argmax, scores
        every category by the agents' agreement on it (co-assignment ``M_kk / max(row_k, col_k)``, averaged
        over agent pairs), masks the empty ones and those far below the rest (at least one, at most 20% of
        the surviving ones per round), and trains on for a few epochs until the loss settles. The round kept
        is the one with the most categories whose mean consensus reaches ``threshold`` (or, when none does,
        the one with the highest consensus, with a warning: consensus rises as categories are removed, so that
        round is no choice the agents agree on); its weights and category mask are restored, so
        :attr:`n_categories`, :meth:`predict` and every read-out reflect it. A warning is raised when the
        kept posteriors look collapsed. See :func:`scmixvae.model._pruning.prune` for the exact rules.

        Parameters
        ----------
        threshold
            Mean consensus a round must reach (published: 0.95).
        min_categories
            Never prune below this number of categories.
        max_rounds
            Most pruning rounds; ``None``: until ``threshold`` is reached or ``min_categories`` is left.
        epochs_per_round
            Epochs trained after each pruning step; ``None``: until the training loss stops improving, at
            most ``100,000 / n_cells`` clipped to ``[10, 40]``.
        batch_size
            Minibatch size of training and of the read-outs.
        **train_kwargs
            Keyword arguments of :meth:`train` other than ``max_epochs`` and ``state_epochs`` (``plan_kwargs``,
            ``accelerator``, ``enable_progress_bar``, ``callbacks``...). Pruning trains no state phase: follow it
            with ``train(max_epochs=0)``, or use ``train(prune=True)``, which does both.

        Returns
        -------
        The history of the rounds (also :attr:`pruning_history`): ``round``, ``n_categories``,
        ``mean_consensus``, ``train_loss``, ``epochs``, ``categories`` and ``pruned`` (JSON lists of category
        names), ``agreement`` (JSON object: category → agreement) and ``selected``.

        Examples
        --------
        >>> model = scmixvae.model.CplMixVAE(adata, n_categories=30, input_dropout=0.5)
        >>> history = model.prune()
        >>> model.n_categories, history.loc[history["selected"], "mean_consensus"]
        """
        return _pruning.prune(
            self,
            threshold=threshold,
            min_categories=min_categories,
            max_rounds=max_rounds,
            epochs_per_round=epochs_per_round,
            batch_size=batch_size,
            **train_kwargs,
        )

    @property
    def start_labels(self) -> np.ndarray | None:
        """The Leiden partition the categorical heads were fitted to before the first training, one code per cell.

        Codes ``0 .. n_categories - 1`` of the cells the model was set up with (when restarts ran, the start of
        the restart kept); ``None`` when the model had no Leiden start (a query model, a resumed fit, a loaded
        model). Compare it with :meth:`predict` to see how far
        training moved the types from their start.
        """
        return getattr(self, "_initial_labels", None)

    @property
    def restart_history(self) -> pd.DataFrame:
        """One row per restart of ``train(n_restarts=...)``; empty without restarts. Saved with the model.

        Columns: ``restart``, ``seed`` (``scvi.settings.seed`` the restart ran with; restart 0 is the model
        as created, ``<NA>`` when unseeded, and then the others' seeds are drawn afresh), ``n_categories`` and
        ``mean_consensus`` of its chosen pruning round, ``mean_ari`` (mean adjusted Rand index of its labels with
        every other restart's) and ``selected`` (the fit kept; none when no restart reached the consensus
        threshold and the model was fitted with the number of Leiden clusters,
        ``pruning_history.attrs["fallback_n_categories"]``). ``attrs["ari"]`` holds the matrix of adjusted Rand
        indices between the restarts. A later ``train(prune=True)`` clears it.
        """
        history = getattr(self, "restart_history_", None)
        if history is None:
            return pd.DataFrame(columns=_pruning.RESTART_COLUMNS)
        return history

    @property
    def pruning_history(self) -> pd.DataFrame:
        """One row per pruning round (see :meth:`prune`); empty before pruning. Saved with the model."""
        history = getattr(self, "pruning_history_", None)
        if history is None:
            return pd.DataFrame(columns=_pruning.HISTORY_COLUMNS)
        return history
