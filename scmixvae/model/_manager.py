"""An AnnData manager whose training minibatches carry their cells' indices, and neighbours' counts for ``"knn"``.

scvi-tools loads the rows of a backed AnnData in sorted order, whatever order a minibatch asks for; a training
loop that takes per-cell targets from the order it asked for then pairs cells with other cells' targets. Training
minibatches therefore ask for their rows in sorted order (the same rows, loaded in the same order in memory and
backed) and carry the index of each row (``REGISTRY_KEYS.INDICES_KEY``), from which targets and neighbours are
looked up. With ``augmentation="knn"`` they also carry one nearest neighbour's counts per cell: the neighbour
table is computed once per model and attached to the manager only while training. Read-outs and every other
loader see the plain scvi-tools dataset. Also here: the check of new data's batch and categorical covariate
columns against a model's registry (read-outs, :meth:`~scmixvae.model.CplMixVAE.load`, queries).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager, AnnTorchDataset
from scvi.data import fields as scvi_fields
from scvi.data.fields import CategoricalObsField
from scvi.dataloaders import DataSplitter
from torch.utils.data import Subset

from .._constants import NEIGHBOUR_X_KEY


def _rows(data, rows: np.ndarray) -> np.ndarray:
    """Dense float32 rows of a registered matrix (sparse, dense or backed), in the order of ``rows``."""
    unique, inverse = np.unique(rows, return_inverse=True)  # h5py needs sorted, unique indices
    block = data[unique]
    if sp.issparse(block) or hasattr(block, "toarray"):
        block = block.toarray()
    return np.asarray(block, dtype=np.float32)[inverse]


class IndexedDataset(AnnTorchDataset):
    """:class:`~scvi.data.AnnTorchDataset` whose minibatches hold their rows in sorted order, with their indices.

    ``REGISTRY_KEYS.INDICES_KEY`` holds the index of every row's cell, shape ``(n, 1)``. The rows are asked for
    in sorted order, so that scvi-tools' own sorting of backed rows leaves them where they are: the indices are
    those of the rows actually loaded, and a minibatch is the same in memory and backed.
    """

    def __getitem__(self, indexes: int | Sequence[int] | slice) -> dict[str, np.ndarray | torch.Tensor]:
        if isinstance(indexes, slice):
            indexes = np.arange(*indexes.indices(len(self)))
        idx = np.sort(np.atleast_1d(np.asarray(indexes, dtype=np.int64)))
        data = super().__getitem__(idx)
        data[REGISTRY_KEYS.INDICES_KEY] = idx[:, None]
        return data


class NeighbourDataset(IndexedDataset):
    """:class:`IndexedDataset` that adds, for every cell, the counts of a random one of its neighbours."""

    neighbours: np.ndarray

    def __getitem__(self, indexes: int | Sequence[int] | slice) -> dict[str, np.ndarray | torch.Tensor]:
        data = super().__getitem__(indexes)
        idx = data[REGISTRY_KEYS.INDICES_KEY][:, 0]
        k = self.neighbours.shape[1]
        pick = torch.randint(k, (len(idx),)).numpy()  # torch's RNG: seeded by scvi.settings.seed
        data[NEIGHBOUR_X_KEY] = _rows(self.data[REGISTRY_KEYS.X_KEY], self.neighbours[idx, pick])
        return data


class CplMixVAEAnnDataManager(AnnDataManager):
    """:class:`~scvi.data.AnnDataManager` whose datasets carry cell indices and neighbours' counts when asked.

    While :attr:`carry_indices` is set (training), its datasets are :class:`IndexedDataset`; while
    :attr:`neighbours` is set, :class:`NeighbourDataset`; otherwise scvi-tools' plain dataset.
    """

    #: ``(n_obs, k)`` indices of each cell's nearest neighbours, or ``None``.
    neighbours: np.ndarray | None = None
    #: Whether new datasets carry their cells' indices (``REGISTRY_KEYS.INDICES_KEY``), rows in sorted order.
    carry_indices: bool = False

    @contextmanager
    def indexed_minibatches(self) -> Iterator[None]:
        """Within this block, new data loaders' minibatches carry their cells' indices (see :class:`IndexedDataset`)."""
        previous, self.carry_indices = self.carry_indices, True
        try:
            yield
        finally:
            self.carry_indices = previous

    def create_torch_dataset(
        self,
        indices: Sequence[int] | Sequence[bool] | None = None,
        data_and_attributes: list[str] | dict[str, np.dtype] | None = None,
        load_sparse_tensor: bool = False,
    ) -> AnnTorchDataset:
        """Create the torch dataset (see :meth:`scvi.data.AnnDataManager.create_torch_dataset`)."""
        if self.neighbours is None and not self.carry_indices:
            return super().create_torch_dataset(indices, data_and_attributes, load_sparse_tensor)
        if self.neighbours is None:
            dataset = IndexedDataset(self, getitem_tensors=data_and_attributes, load_sparse_tensor=load_sparse_tensor)
        else:
            dataset = NeighbourDataset(self, getitem_tensors=data_and_attributes, load_sparse_tensor=load_sparse_tensor)
            dataset.neighbours = self.neighbours
        return Subset(dataset, indices) if indices is not None else dataset


class CategoricalJointObsField(scvi_fields.CategoricalJointObsField):
    """scvi-tools' field of the categorical covariates, coding new data by value.

    pandas leaves the codes of an unordered categorical unchanged when it is cast to a dtype of the same categories
    in another order, so a covariate column of new data with its categories reordered (``['d1', 'd0']``) kept its
    own codes against the model's (``d0`` read as ``d1``). The registered copy of the columns is cast from plain
    values instead. The batch field casts to an ordered dtype and is not affected.
    """

    def _make_array_categorical(self, adata: AnnData, category_dict: dict | None = None) -> dict:
        if category_dict is not None:  # a transfer: the columns copied into obsm by the registration
            frame = getattr(adata, self.attr_name)[self.attr_key]
            for key in self.attr_keys:
                frame[key] = frame[key].astype(object)
        return super()._make_array_categorical(adata, category_dict)


#: Code of a cell whose value of an :class:`OptionalObsField` is unknown to the model (column absent, value unseen).
UNKNOWN_CODE = -1


class OptionalObsField(CategoricalObsField):
    """A categorical ``obs`` field that data new to a model may lack, for columns inference does not read.

    The labels and the condition are read by no encoder: read-outs on new cells (and a query of
    :meth:`~scmixvae.model.CplMixVAE.load_query_data`) need neither. When an AnnData is registered from a model's
    registry (a transfer), a missing column, a missing value or a value the model has not seen gets the code
    :data:`UNKNOWN_CODE` instead of an error; the categories stay the model's. Registering the training data
    (no transfer) is unchanged.
    """

    def transfer_field(
        self, state_registry: dict, adata_target: AnnData, extend_categories: bool = False, **kwargs
    ) -> dict:
        """Register ``adata_target`` with the model's categories; unknown values get :data:`UNKNOWN_CODE`."""
        mapping = np.asarray(state_registry[self.CATEGORICAL_MAPPING_KEY])
        key = state_registry[self.ORIGINAL_ATTR_KEY]  # the column the model was set up with
        column = adata_target.obs.get(key) if not self.is_default else None
        if self.is_default or (
            column is not None and column.notna().all() and pd.Index(column.unique()).isin(mapping).all()
        ):
            return super().transfer_field(state_registry, adata_target, extend_categories=False, **kwargs)
        if column is None:
            codes = np.full(adata_target.n_obs, UNKNOWN_CODE, dtype=np.int64)
        else:  # values outside the model's categories (and missing ones) get code -1
            codes = pd.Categorical(column.astype(object), categories=pd.Index(mapping)).codes.astype(np.int64)
        adata_target.obs[self.attr_key] = codes
        return {self.CATEGORICAL_MAPPING_KEY: mapping.copy(), self.ORIGINAL_ATTR_KEY: key}


def _categorical_columns(registry: dict) -> dict[str, np.ndarray]:
    """Return the ``obs`` columns that enter the encoders one-hot (batch, categorical covariates), with categories."""
    fields = registry["field_registries"]
    columns = {}
    batch = fields.get(REGISTRY_KEYS.BATCH_KEY, {}).get("state_registry", {})
    if registry["setup_args"].get("batch_key") is not None:
        columns[registry["setup_args"]["batch_key"]] = np.asarray(batch["categorical_mapping"])
    covariates = fields.get(REGISTRY_KEYS.CAT_COVS_KEY, {}).get("state_registry", {})
    for key, mapping in covariates.get("mappings", {}).items():
        columns[key] = np.asarray(mapping)
    return columns


def unseen_categories(adata: AnnData, registry: dict) -> dict[str, list]:
    """Values of the batch and categorical covariate columns of ``adata`` that the registry does not hold.

    A column missing from ``adata`` is left to the checks of :meth:`~scmixvae.model.CplMixVAE.setup_anndata`.
    """
    unseen = {}
    for key, mapping in _categorical_columns(registry).items():
        if key in adata.obs.columns:
            values = pd.Index(adata.obs[key].dropna().unique())
            new = values[~values.isin(mapping)]
            if len(new):
                unseen[key] = list(new)
    return unseen


def _check_same_names_of_another_type(key: str, column: pd.Series, mapping: np.ndarray) -> None:
    """Raise when a column holds the model's categories written as another type (``"1"`` or ``True`` for ``1``).

    pandas finds ``True`` among ``[0, 1]``, but scvi-tools cannot register a bool column on integer categories.
    """
    values = pd.Index(column.dropna().unique())
    new = values[~values.isin(mapping)]
    other_kind = pd.api.types.is_bool_dtype(values) != pd.api.types.is_bool_dtype(mapping)
    trained = [str(v) for v in mapping]
    if (len(new) and all(str(v) in trained for v in new)) or (other_kind and len(values) and not len(new)):
        shown = list(new if len(new) else values)
        kind, trained_kind = type(shown[0]).__name__, type(mapping[0]).__name__
        raise ValueError(
            f"adata.obs[{key!r}] holds {shown[:5]} as {kind}; the model was trained on the same names as "
            f"{trained_kind} ({mapping[:5].tolist()}). Convert the column to the training data's type, e.g. "
            f"adata.obs[{key!r}] = adata.obs[{key!r}].astype({trained_kind!r})."
        )


def check_known_categories(adata: AnnData, registry: dict) -> None:
    """Raise a clear error when ``adata``'s batch or categorical covariate columns hold values the model lacks.

    Such values need weights of their own (a query model); values that are the model's categories written as
    another type (``"1"`` or ``True`` for ``1``) are named as such.
    """
    for key, mapping in _categorical_columns(registry).items():
        if key in adata.obs.columns:
            _check_same_names_of_another_type(key, adata.obs[key], mapping)
    unseen = unseen_categories(adata, registry)
    if not unseen:
        return
    key, values = next(iter(unseen.items()))
    raise ValueError(
        f"adata.obs[{key!r}] holds {len(values)} value(s) the model was not trained on (e.g. {values[:5]}). The "
        "batch and categorical covariates enter every encoder, so new values need weights of their own: map these "
        "cells with `CplMixVAE.load_query_data(adata, model)` and train the query model on them."
    )


#: Fewest cells of a training minibatch left over at an epoch's end (``n_train % batch_size``): one or two cells give
#: the coupling the inverse spread of one or two cells (gradient norms 4 to 25 times a full minibatch's).
MIN_LAST_BATCH_CELLS = 3


class CplMixVAEDataSplitter(DataSplitter):
    """:class:`~scvi.dataloaders.DataSplitter` that keeps sparse CSR counts sparse in CPU minibatches.

    scvi-tools densifies sparse minibatches after they reach the device (``load_sparse_tensor`` only saves the
    transfer); on the CPU the module reads the non-zero counts from the CSR structure instead, so the counts
    stay sparse there. Other sparse tensors, and every tensor on an accelerator, are densified as before.

    With ``train_size`` given (every cell trains when nothing validates), a last minibatch of one or two cells is
    dropped (``drop_last``): the shuffle leaves other cells over each epoch. Not with several devices, where each
    device's share has a remainder of its own. scvi-tools' own split (``train_size`` left out) moves those cells to
    the validation set instead, and warns where neither happens.
    """

    def __init__(self, adata_manager: AnnDataManager, train_size: float | None = None, *args, **kwargs):
        own_split = kwargs.get("external_indexing") is None and not kwargs.get("distributed_sampler")
        if train_size and "drop_last" not in kwargs and own_split:
            batch_size = kwargs.get("batch_size") or settings.batch_size
            n_train = math.ceil(float(train_size) * adata_manager.adata.n_obs)  # scvi-tools' split
            if n_train > batch_size and 0 < n_train % batch_size < MIN_LAST_BATCH_CELLS:
                kwargs["drop_last"] = True
        super().__init__(adata_manager, train_size, *args, **kwargs)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        """Densify sparse tensors, except CSR counts on the CPU."""
        x = batch.get(REGISTRY_KEYS.X_KEY)
        if isinstance(x, torch.Tensor) and x.layout is torch.sparse_csr and x.device.type == "cpu":
            batch = super().on_after_batch_transfer(
                {k: v for k, v in batch.items() if k != REGISTRY_KEYS.X_KEY}, dataloader_idx
            )
            batch[REGISTRY_KEYS.X_KEY] = x
            return batch
        return super().on_after_batch_transfer(batch, dataloader_idx)
