"""Reference mapping (scArches): place the cells of new batches on the types of a trained reference model.

The batch (and every categorical covariate) enters the agents' encoders and decoders one-hot, through the rows of
the covariate weights ``weight_cov`` of :class:`~scmixvae.module.StackedLinear` (and, with
``dispersion="gene-batch"``, the rows of ``px_r``). The surgery of :meth:`CplMixVAEQueryMixin.load_query_data`
adds rows for the query's new categories and trains only those: every weight of the reference stays as it was, so
the query's cells are read out with the reference's categories.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS

from .. import _validation as check
from ..module._components import StackedBatchNorm, StackedLinear
from ._fit import check_devices
from ._manager import unseen_categories
from ._save_load import MODEL_FILE, read_model_file

logger = logging.getLogger(__name__)

#: Below this fraction of the reference's genes in a query, :meth:`~CplMixVAEQueryMixin.prepare_query_anndata` warns.
MIN_GENE_FRACTION = 0.8


def _read_reference(cls, reference_model) -> tuple[dict, np.ndarray, dict]:
    """Registry, init parameters, genes and state dict (CPU copies) of a trained model or of a saved folder.

    A folder is read with :func:`~scmixvae.model._save_load.read_model_file` (``torch.load(weights_only=True)``):
    a file holding other Python objects is refused, never unpickled.
    """
    if isinstance(reference_model, cls):
        attrs = {"registry_": reference_model.registry_, "init_params_": reference_model.init_params_}
        attrs = copy.deepcopy({**attrs, "is_trained_": reference_model.is_trained_})
        genes = reference_model.registry_["field_registries"][REGISTRY_KEYS.X_KEY]["state_registry"]["column_names"]
        state = {k: v.detach().cpu().clone() for k, v in reference_model.module.state_dict().items()}
    elif isinstance(reference_model, str | os.PathLike):
        folder = Path(reference_model)
        if not folder.is_dir():
            raise ValueError(
                f"{folder} is not a folder: pass a trained {cls.__name__} or the folder written by its `save`."
            )
        prefixed = sorted(path.name for path in folder.glob(f"?*{MODEL_FILE}"))
        if not (folder / MODEL_FILE).exists() and prefixed:
            prefix = prefixed[0][: -len(MODEL_FILE)]
            raise ValueError(
                f"{folder} holds {prefixed} (saved with a `prefix`), not {MODEL_FILE}. Load the reference first and "
                f"pass the model: `reference = {cls.__name__}.load({str(folder)!r}, prefix={prefix!r}, adata=...)`."
            )
        attrs, genes, state, _ = read_model_file(folder / MODEL_FILE)
        name = attrs["registry_"].get("model_name", cls.__name__)
        if name != cls.__name__:
            raise ValueError(f"{folder} holds a {name} model, not a {cls.__name__}.")
    else:
        raise TypeError(
            f"`reference_model` must be a {cls.__name__} or the folder of a saved one, got "
            f"{type(reference_model).__name__}."
        )
    if not attrs.get("is_trained_", False):
        raise ValueError("The reference model has not been trained; train it before mapping a query onto it.")
    return attrs, np.asarray(genes, dtype=object), state


def _check_query_genes(adata: AnnData, genes: np.ndarray) -> None:
    """Raise a clear error when the query's genes are not the reference's, in the same order."""
    problem = check.gene_mismatch(adata.var_names, genes, "the reference")
    if problem is None:
        return
    raise ValueError(
        f"The query AnnData {problem}. Pad and order it as the reference's genes first: "
        "`CplMixVAE.prepare_query_anndata(adata, reference_model)` (missing genes become zero counts)."
    )


def _pad_and_order(adata: AnnData, genes: pd.Index) -> AnnData:
    """Return a new AnnData with ``genes`` in order: the query's counts, zeros for the genes it lacks."""
    missing = genes.difference(adata.var_names)
    if len(missing) == 0:
        return adata[:, genes].copy()

    def pad(matrix):
        if sp.issparse(matrix):
            return sp.hstack([matrix, sp.csr_matrix((adata.n_obs, len(missing)), dtype=matrix.dtype)], format="csr")
        matrix = np.asarray(matrix)
        return np.hstack([matrix, np.zeros((adata.n_obs, len(missing)), dtype=matrix.dtype)])

    padded = AnnData(
        X=None if adata.X is None else pad(adata.X),
        obs=adata.obs.copy(),
        var=_padded_var(adata.var, missing),
        uns=copy.deepcopy(dict(adata.uns)),
        obsm={k: v.copy() for k, v in adata.obsm.items()},
        obsp={k: v.copy() for k, v in adata.obsp.items()},
        layers={k: pad(v) for k, v in adata.layers.items()},
    )
    if adata.raw is not None:
        padded.raw = adata.raw.to_adata()
    return padded[:, genes].copy()


def _padded_var(var: pd.DataFrame, missing: pd.Index) -> pd.DataFrame:
    """``var`` with rows of missing values for the ``missing`` genes, in dtypes that h5ad files can hold.

    Bool and integer columns become pandas' nullable ``boolean`` and ``Int64`` (``<NA>`` for the padded genes):
    with NaN they would turn into object columns (scanpy's ``highly_variable``), which ``write_h5ad`` refuses.
    """
    var = var.copy()
    for column in var.columns:
        values = var[column]
        if isinstance(values.dtype, pd.CategoricalDtype):
            continue
        if pd.api.types.is_bool_dtype(values):
            var[column] = values.astype("boolean")
        elif pd.api.types.is_integer_dtype(values):
            var[column] = values.astype("Int64")
    return var.reindex(var.index.append(missing))


def _covariate_blocks(n_batch: int, n_cats_per_cov, n_continuous: int) -> list[tuple[int, int]]:
    """``(rows, categories)`` of each block of the covariate vector: batch, categorical covariates, continuous.

    The batch has rows only with more than one batch (see :meth:`~scmixvae.module.CplMixVAEModule.covariates`).
    """
    blocks = [(n_batch if n_batch > 1 else 0, n_batch)]
    blocks += [(n, n) for n in n_cats_per_cov]
    return [*blocks, (n_continuous, n_continuous)]


def _extend_rows(old: torch.Tensor, old_blocks, new_blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """Covariate weights ``(A, rows, out)`` with rows for the new categories, and which rows are new.

    The rows of the reference's categories are kept (zeros for a batch the reference had no rows for: one
    batch); a new category starts from the mean of its block's reference rows.
    """
    pieces, new_rows, start = [], [], 0
    for (rows_old, cats_old), (rows_new, cats_new) in zip(old_blocks, new_blocks, strict=True):
        block = old.narrow(1, start, rows_old)
        start += rows_old
        if rows_new == rows_old:
            pieces.append(block)
            new_rows += [False] * rows_new
            continue
        if rows_old:
            kept, init = block, block.mean(1, keepdim=True)
        else:
            a, _, n_out = old.shape
            kept, init = old.new_zeros(a, cats_old, n_out), old.new_zeros(a, 1, n_out)
        pieces += [kept, init.expand(-1, cats_new - cats_old, -1)]
        new_rows += [False] * cats_old + [True] * (cats_new - cats_old)
    return torch.cat(pieces, dim=1).contiguous(), torch.tensor(new_rows, dtype=torch.bool)


def extend_state_dict(module, state: dict, old_blocks, *, old_n_batch: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """Fit the reference's state dict to ``module`` (built for the query), and the new rows of each weight.

    Returns the state dict to load and, for each weight that gained rows, a boolean ``(rows,)`` mask of them.
    """
    new_blocks = _covariate_blocks(module.n_batch, module.n_cats_per_cov, old_blocks[-1][0])
    target = module.state_dict()
    extended, new_rows = {}, {}
    for name, layer in module.named_modules():
        if isinstance(layer, StackedLinear) and layer.weight_cov is not None:
            key = f"{name}.weight_cov"
            old = state.get(key, target[key].new_zeros(target[key].shape[0], 0, target[key].shape[2]))
            extended[key], new_rows[key] = _extend_rows(old, old_blocks, new_blocks)
    if getattr(module, "dispersion", None) == "gene-batch" and "px_r" in state:
        batch = [(old_n_batch, old_n_batch)], [(module.n_batch, module.n_batch)]
        extended["px_r"], new_rows["px_r"] = _extend_rows(state["px_r"], *batch)
    result = {}
    for key, value in target.items():
        tensor = extended.get(key, state.get(key))
        if tensor is None or tensor.shape != value.shape:
            raise ValueError(
                f"The reference's weights do not fit a model of the query ({key}: "
                f"{None if tensor is None else tuple(tensor.shape)} vs {tuple(value.shape)})."
            )
        result[key] = tensor
    return result, {k: v for k, v in new_rows.items() if v.any()}


def _mask_gradient(rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad * rows.to(device=grad.device, dtype=grad.dtype).view(1, -1, 1)


def freeze_reference(module, new_rows: dict[str, torch.Tensor]) -> None:
    """Train only ``new_rows`` of ``module``: other parameters need no gradient, the rows' neighbours get none.

    The running statistics of the batch normalisation stay the reference's (momentum 0), as scvi-tools'
    ``freeze_batchnorm_encoder``.
    """
    for name, param in module.named_parameters():
        rows = new_rows.get(name)
        param.requires_grad_(rows is not None)
        if rows is not None:
            param.register_hook(functools.partial(_mask_gradient, rows))
    for layer in module.modules():
        if isinstance(layer, StackedBatchNorm):
            layer.momentum = 0.0


class CplMixVAEQueryMixin:
    """Reference mapping with scvi-tools' ``ArchesMixin`` API: :meth:`prepare_query_anndata`, :meth:`load_query_data`.

    Unlike scvi-tools' mixin, a reference saved in a folder is read with ``torch.load(weights_only=True)``
    (see :meth:`~scmixvae.model.CplMixVAE.load`): nothing read from the folder is unpickled. Of scvi-tools'
    freezing options only ``unfrozen`` is taken: the reference's weights, dropout and batch normalisation are
    frozen together (``freeze_dropout``, ``freeze_batchnorm_encoder`` and the like have no counterpart), and the
    query's genes are padded by :meth:`prepare_query_anndata` (no ``inplace_subset_query_vars``).
    """

    @classmethod
    def prepare_query_anndata(
        cls,
        adata: AnnData,
        reference_model,
        return_reference_var_names: bool = False,
        inplace: bool = True,
    ) -> AnnData | pd.Index | None:
        """Give a query the reference's genes, in the reference's order, as :meth:`load_query_data` needs.

        Genes of the reference that the query lacks are added with zero counts (in ``X`` and every layer);
        genes the reference lacks are dropped. ``varm`` and ``varp`` are not kept when genes are added.

        Parameters
        ----------
        adata
            The query: raw counts of new cells, in memory (a backed query whose genes need a change: read it with
            ``adata.to_memory()`` first).
        reference_model
            A trained :class:`CplMixVAE` or the folder it was saved in with :meth:`save`.
        return_reference_var_names
            Return only the reference's genes (a :class:`~pandas.Index`).
        inplace
            Change ``adata`` itself (scvi-tools' default) and return ``None``; ``False``: return a new AnnData
            and leave ``adata`` as it was.

        Returns
        -------
        ``None``, the new AnnData (``inplace=False``) or the reference's genes.
        """
        _, genes, _ = _read_reference(cls, reference_model)
        genes = pd.Index(genes.astype(str))
        if return_reference_var_names:
            return genes
        if not isinstance(adata, AnnData):
            raise TypeError(f"`adata` must be an AnnData object, got {type(adata).__name__}.")
        check.check_unique_names(adata)
        shared = adata.var_names.intersection(genes)
        if len(shared) == 0:
            raise ValueError(
                "The query holds none of the reference's genes (e.g. "
                f"{list(genes[:5])}); are the gene names of the same kind (symbols or IDs)?"
            )
        if len(shared) < MIN_GENE_FRACTION * len(genes):
            warnings.warn(
                f"The query holds {len(shared)} of the reference's {len(genes)} genes; the {len(genes) - len(shared)} "
                "others are set to zero counts, which can place its cells poorly.",
                UserWarning,
                stacklevel=2,
            )
        matches = adata.n_vars == len(genes) and adata.var_names.equals(genes)
        if matches and inplace:
            return None
        if adata.isbacked:  # anndata copies a backed AnnData only into a file
            raise ValueError(
                "`adata` is backed (read with backed='r'); giving it the reference's genes builds a new AnnData in "
                "memory. Read the query into memory first: `adata = adata.to_memory()`."
            )
        padded = adata.copy() if matches else _pad_and_order(adata, genes)
        if not inplace:
            return padded
        adata._init_as_actual(padded)
        return None

    @classmethod
    def load_query_data(
        cls,
        adata: AnnData,
        reference_model,
        *,
        accelerator: str = "auto",
        device: int | str = "auto",
        unfrozen: bool = False,
    ):
        """Build a model of the query's cells on the reference's types (scArches surgery), to train on the query.

        The query is registered with the reference's setup (its batches, and values of categorical
        covariates, that the reference lacks are added; its labels and condition may be absent). The new model
        has the reference's weights plus, in every layer that reads the batch (and categorical covariates),
        rows for the new batches, started from the mean of the reference's rows. Only those rows train
        (``unfrozen=False``): the reference's weights, its batch-normalisation statistics and its categories
        stay as they are, so after ``model.train()`` the read-outs (:meth:`predict`,
        :meth:`get_latent_representation`, ``scmixvae.tl.annotate``) give the query's cells the reference's
        categories. ``train`` then neither initialises nor prunes the categories; ``state_epochs=0`` skips the
        state phase, which only trains the new rows of the state encoder and decoder. Keep the training plan's
        ``weight_decay`` at 0 (the default): a weight decay would also shrink the frozen rows of the weights that
        gained rows.

        The freezing lives on the returned model; a query model saved and loaded again trains every weight.

        Parameters
        ----------
        adata
            The query, with the reference's genes in its order (:meth:`prepare_query_anndata`), raw counts and
            the reference's batch column; it is registered like data of :meth:`setup_anndata`.
        reference_model
            A trained :class:`CplMixVAE` or the folder it was saved in with :meth:`save` (read safely, as by
            :meth:`load`).
        accelerator, device
            Where to put the model, as in :meth:`load`.
        unfrozen
            Train every weight of the model on the query (the reference's types can then drift).

        Returns
        -------
        The query model, not trained yet (``is_trained_`` is ``False``).
        """
        from scvi.model._utils import parse_device_args

        if not isinstance(adata, AnnData):
            raise TypeError(f"`adata` must be an AnnData object, got {type(adata).__name__}.")
        check_devices(accelerator, device)
        attrs, genes, state = _read_reference(cls, reference_model)
        registry, init_params = copy.deepcopy(attrs["registry_"]), attrs["init_params_"]
        _check_query_genes(adata, genes)
        unseen = _check_query_covariates(adata, registry)
        _, _, torch_device = parse_device_args(
            accelerator=accelerator, devices=device, return_device="torch", validate_single_device=True
        )
        setup_args = registry["setup_args"]
        cls.setup_anndata(adata, source_registry=registry, extend_categories=True, **setup_args)
        kwargs = {k: v for group in init_params["kwargs"].values() for k, v in group.items()}
        model = cls(adata, **init_params["non_kwargs"], **kwargs)
        fields = registry["field_registries"]
        old_n_batch = int(fields[REGISTRY_KEYS.BATCH_KEY]["summary_stats"]["n_batch"])
        old_cats = fields.get(REGISTRY_KEYS.CAT_COVS_KEY, {}).get("state_registry", {}).get("n_cats_per_key", [])
        n_continuous = int(model.summary_stats.get("n_extra_continuous_covs", 0))
        old_blocks = _covariate_blocks(old_n_batch, list(old_cats), n_continuous)
        weights, new_rows = extend_state_dict(model.module, state, old_blocks, old_n_batch=old_n_batch)
        model.module.load_state_dict(weights)
        model.to_device(torch_device)
        model.module.eval()
        if not unfrozen:
            freeze_reference(model.module, new_rows)
        model.is_trained_ = False
        model.choose_n_categories_ = False  # the reference's categories: train() neither initialises nor prunes
        model.category_init_done_ = True
        logger.info("Query model: new %s on the reference's %d categories.", unseen, model.n_categories)
        return model


def _check_query_covariates(adata: AnnData, registry: dict) -> dict[str, list]:
    """Return the query's new batches (and covariate values); raise when it has none or lacks the batch column."""
    batch_key = registry["setup_args"].get("batch_key")
    if batch_key is not None and batch_key not in adata.obs.columns:
        raise ValueError(
            f"The query lacks adata.obs[{batch_key!r}], the reference's `batch_key`: give every query cell its batch "
            "(new samples get new batch names)."
        )
    unseen = unseen_categories(adata, registry)
    if not unseen:
        where = (
            "the reference was set up without a `batch_key`"
            if batch_key is None and not registry["setup_args"].get("categorical_covariate_keys")
            else "every batch and covariate value of the query is one of the reference's"
        )
        raise ValueError(
            f"The query has no new batch to learn: {where}. Read such cells out with the reference model itself "
            "(`reference.predict(adata)`); to map new batches, set up the reference with `batch_key`."
        )
    return unseen
