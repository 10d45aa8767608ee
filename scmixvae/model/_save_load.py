"""Saved models that hold only tensors and plain data, so that loading one runs no code.

scvi-tools pickles a model's attributes (numpy arrays, pandas tables) into ``model.pt`` and reads them back with
``torch.load(weights_only=False)``, which runs whatever a crafted file asks for. Here the attributes are turned
into tensors, lists, dicts, strings and numbers when saving (:func:`encode`) and read with
``torch.load(weights_only=True)``, which refuses any other Python object before it is built.
"""

from __future__ import annotations

import hashlib
import inspect
import pickle
import zipfile
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import _validation as check
from .._io import atomic_write
from ._manager import check_known_categories

MODEL_FILE = "model.pt"
ADATA_FILE = "adata.h5ad"
FORMAT_KEY = "scmixvae_format"
FORMAT_VERSION = 1
#: Entry of ``model.pt`` with the :func:`cells_digest` of the AnnData saved beside it (``None``: saved without one).
SAVED_CELLS_KEY = "saved_cells"
#: :func:`read_model_file`'s value for a file written before the saved cells were recorded.
NOT_RECORDED = "not recorded"
_TAG = "__scmixvae_type__"
# numpy kinds held in tensors (bool, signed and unsigned integers, floats) or in lists (strings, objects)
_TENSOR_KINDS = "biuf"
_LIST_KINDS = "UO"
_PLAIN = (str, int, float, bool, type(None))
#: Options of :class:`~scmixvae.model.CplMixVAE` (and of its module) that were removed, with the value at which
#: they were fixed: a model saved with that value loads as it was saved (``augmentation_strength=None``: each
#: augmentation's own strength).
REMOVED_OPTIONS = {
    "category_init": "leiden",
    "n_hidden_state": 32,
    "gumbel_temperature": 1.0,
    "coupling_eps": 1e-8,
    "entropy_weight": 1.0,
    "initial_coupling_weight": None,
    "state_encoder": "separate",
    "coupling": "clr",
    "category_state_interaction": True,
    "augmentation_strength": None,
    "condition_weight": 1.0,
}
#: Removed options that only shaped the first training (its start, its coupling): a trained model loads whatever
#: their value.
TRAINING_ONLY_OPTIONS = ("category_init", "initial_coupling_weight")


def encode(value, where: str = "value"):
    """Turn ``value`` into tensors and plain Python data that ``torch.load(weights_only=True)`` reads.

    Numpy arrays, numpy scalars, pandas tables, series and indexes and ``defaultdict`` are tagged so that
    :func:`decode` rebuilds them; anything else raises a :class:`TypeError` naming ``where``.
    """
    if isinstance(value, _PLAIN):
        return value
    if value is pd.NA:  # the missing value of pandas' nullable columns
        return {_TAG: "NA"}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.generic):
        return encode(value.item(), where)
    if isinstance(value, np.ndarray):
        return _encode_array(value, where)
    if isinstance(value, pd.DataFrame):
        columns = [encode(c, f"{where}.columns") for c in value.columns]
        data = [encode(value.iloc[:, i], f"{where}[{c!r}]") for i, c in enumerate(value.columns)]
        attrs = encode(dict(value.attrs), f"{where}.attrs")
        return {
            _TAG: "DataFrame",
            "columns": columns,
            "data": data,
            "index": encode(value.index, where),
            "attrs": attrs,
        }
    if isinstance(value, pd.Series):
        return {_TAG: "Series", "name": encode(value.name, where), "values": _encode_values(value, where)}
    if isinstance(value, pd.RangeIndex):
        return {_TAG: "RangeIndex", "start": value.start, "stop": value.stop, "step": value.step, "name": value.name}
    if isinstance(value, pd.Index):
        return {_TAG: "Index", "name": encode(value.name, where), "values": _encode_values(value, where)}
    if isinstance(value, dict):
        items = [[encode(k, where), encode(v, f"{where}[{k!r}]")] for k, v in value.items()]
        if isinstance(value, defaultdict) and value.default_factory in (dict, list):
            return {_TAG: "defaultdict", "factory": value.default_factory.__name__, "items": items}
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: v for k, v in items}
        return {_TAG: "dict", "items": items}
    if isinstance(value, list | tuple):
        encoded = [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(encoded) if isinstance(value, tuple) else encoded
    raise TypeError(
        f"Cannot save {where} of type {type(value).__name__}: a saved model holds only tensors, numpy arrays, "
        "pandas tables and plain Python values (str, int, float, bool, None, lists, tuples, dicts)."
    )


def _encode_array(array: np.ndarray, where: str) -> dict:
    kind = array.dtype.kind
    if kind in _TENSOR_KINDS and array.dtype.byteorder in "=|" and array.dtype != np.float16:
        try:
            data = torch.from_numpy(np.ascontiguousarray(array)).clone()
        except TypeError:  # dtypes torch has no tensor for (e.g. uint16 on older torch)
            data = [encode(v, where) for v in array.ravel().tolist()]
    elif kind in _TENSOR_KINDS + _LIST_KINDS:
        data = [encode(v, f"{where}[...]") for v in array.ravel().tolist()]
    else:
        raise TypeError(f"Cannot save {where}: numpy arrays of dtype {array.dtype} are not saved.")
    return {_TAG: "ndarray", "dtype": array.dtype.str, "shape": list(array.shape), "data": data}


def _encode_values(values: pd.Series | pd.Index, where: str) -> dict:
    if isinstance(values.dtype, pd.CategoricalDtype):
        return {
            _TAG: "Categorical",
            "codes": _encode_array(
                np.asarray(values.cat.codes if isinstance(values, pd.Series) else values.codes), where
            ),
            "categories": encode(values.dtype.categories, where),
            "ordered": bool(values.dtype.ordered),
        }
    if isinstance(values.dtype, np.dtype):
        return _encode_array(values.to_numpy(), where)
    return {_TAG: "extension", "dtype": str(values.dtype), "values": _encode_array(values.to_numpy(object), where)}


def decode(value):
    """Rebuild what :func:`encode` tagged; plain data and tensors are returned as they are."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(decode(v) for v in value)
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: decode(v) for k, v in value.items()}
    if tag == "NA":
        return pd.NA
    if tag == "ndarray":
        return _decode_array(value)
    if tag == "DataFrame":
        columns = [decode(c) for c in value["columns"]]
        data = [decode(v) for v in value["data"]]
        frame = pd.concat(data, axis=1) if data else pd.DataFrame(index=decode(value["index"]))
        frame.columns = pd.Index(columns)
        frame.index = decode(value["index"])
        frame.attrs = decode(value.get("attrs", {}))
        return frame
    if tag == "Series":
        return pd.Series(_decode_values(value["values"]), name=decode(value["name"]), copy=False)
    if tag == "RangeIndex":
        return pd.RangeIndex(value["start"], value["stop"], value["step"], name=value["name"])
    if tag == "Index":
        return pd.Index(_decode_values(value["values"]), name=decode(value["name"]), copy=False)
    if tag in ("dict", "defaultdict"):
        items = {decode(k): decode(v) for k, v in value["items"]}
        if tag == "dict":
            return items
        return defaultdict({"dict": dict, "list": list}[value["factory"]], items)
    raise ValueError(f"unknown tag {tag!r}")


def _decode_array(value: dict) -> np.ndarray:
    dtype = np.dtype(value["dtype"])
    if dtype.kind not in _TENSOR_KINDS + _LIST_KINDS:
        raise ValueError(f"unexpected array dtype {dtype}")
    data = value["data"]
    if isinstance(data, torch.Tensor):
        return data.numpy().astype(dtype, copy=False).reshape(value["shape"])
    array = np.empty(len(data), dtype=dtype)
    array[:] = [decode(v) for v in data] if dtype.kind == "O" else data
    return array.reshape(value["shape"])


def _decode_values(value: dict):
    if value[_TAG] == "Categorical":
        categories = decode(value["categories"])
        return pd.Categorical.from_codes(_decode_array(value["codes"]), categories, ordered=value["ordered"])
    if value[_TAG] == "extension":
        return pd.array(_decode_array(value["values"]), dtype=pd.api.types.pandas_dtype(value["dtype"]))
    return _decode_array(value)


def model_file_content(state_dict: dict, var_names: np.ndarray, attr_dict: dict, saved_cells: str | None) -> dict:
    """Return what ``model.pt`` holds: the state dict, the genes, the attributes (plain data), the saved cells.

    ``saved_cells``: the :func:`cells_digest` of the AnnData saved beside it (``None``: saved without one).
    """
    return {
        FORMAT_KEY: FORMAT_VERSION,
        "model_state_dict": OrderedDict((k, v.detach().cpu()) for k, v in state_dict.items()),
        "var_names": [str(v) for v in var_names],
        "attr_dict": encode(attr_dict, "model attribute"),
        SAVED_CELLS_KEY: saved_cells,
    }


def cells_digest(adata) -> str:
    """SHA-256 of the cell names of ``adata``, in order: what pairs a saved ``model.pt`` with its ``adata.h5ad``."""
    digest = hashlib.sha256(str(adata.n_obs).encode())
    for start in range(0, adata.n_obs, 100_000):
        digest.update("\n".join(map(str, adata.obs_names[start : start + 100_000])).encode() + b"\n")
    return digest.hexdigest()


def read_model_file(path: Path) -> tuple[dict, np.ndarray, dict, str | None]:
    """Read ``model.pt`` written by :func:`save_model`; refuse any file that holds other Python objects.

    Returns the attributes, the training genes, the module's state dict (on the CPU) and the digest of the cells
    saved beside it (:data:`NOT_RECORDED` for files written before it was recorded).
    """
    path = Path(path)
    not_a_model = f"{path} is not a saved scmixvae model"
    if not path.is_file():
        raise ValueError(f"{not_a_model}: the file does not exist. Pass the folder written by `CplMixVAE.save`.")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; not one: empty, truncated, text, ...
        raise ValueError(f"{not_a_model}: it is empty, truncated or not a file written by `CplMixVAE.save`.")
    try:  # torch.load does not check the archive's checksums: damaged weights would load as others
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception as err:
        raise ValueError(f"{not_a_model} (it could not be read: {type(err).__name__}: {err}).") from None
    if damaged is not None:
        raise ValueError(f"{not_a_model} intact: the checksum of its part {damaged!r} does not match (damaged).")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower() and "unsupported global" not in str(err).lower():
            raise ValueError(f"{not_a_model} (it could not be read: {err}).") from None
        raise ValueError(
            f"{not_a_model} in the safe format: it holds Python objects other than tensors and plain data, "
            "which are not unpickled because doing so could run code from the file. Models saved by "
            "`CplMixVAE.save` hold only tensors and plain data; files of other scvi-tools models and of development "
            "versions of scmixvae before 0.1.0 are refused: train and save such a model again with this version."
        ) from None
    except Exception as err:  # a damaged archive fails in many ways (RuntimeError, KeyError, EOFError, ...)
        raise ValueError(f"{not_a_model} (it could not be read: {type(err).__name__}: {err}).") from None
    if not isinstance(content, dict) or content.get(FORMAT_KEY) != FORMAT_VERSION:
        raise ValueError(f"{not_a_model}: it lacks the {FORMAT_KEY!r} entry that `CplMixVAE.save` writes.")
    try:
        attr_dict = decode(content["attr_dict"])
        var_names = np.asarray(content["var_names"], dtype=object)
        state_dict = content["model_state_dict"]
        if not isinstance(attr_dict, dict) or "registry_" not in attr_dict or "init_params_" not in attr_dict:
            raise ValueError("attributes without a registry or init parameters")
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
            raise ValueError("state dict with entries other than tensors")
        saved_cells = content.get(SAVED_CELLS_KEY, NOT_RECORDED)
        if not (saved_cells is None or isinstance(saved_cells, str)):
            raise ValueError(f"{SAVED_CELLS_KEY} of type {type(saved_cells).__name__}")
    except Exception as err:  # whatever the content gets wrong, it is not a model this package saved
        raise ValueError(f"{not_a_model}: its content is malformed ({type(err).__name__}: {err}).") from None
    return attr_dict, var_names, state_dict, saved_cells


def save_model(
    model, dir_path, *, prefix: str | None, overwrite: bool, save_anndata: bool, save_kwargs, **write_kwargs
):
    """Write ``model`` to ``dir_path`` as :meth:`~scmixvae.model.CplMixVAE.save` documents it."""
    _check_save_arguments(prefix, save_kwargs, write_kwargs)
    folder = Path(dir_path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; pass a folder to save the model in.")
    if folder.exists() and not overwrite:
        raise ValueError(f"{folder} already exists; pass overwrite=True to replace its model, or another folder.")
    prefix = prefix or ""
    attributes = {name: value for name, value in model._get_user_attributes() if name.endswith("_")}
    # encoded first: an attribute that cannot be saved stops the save before any file is written
    genes = np.asarray(model.adata.var_names.astype(str))
    saved_cells = cells_digest(model.adata) if save_anndata else None
    content = model_file_content(model.module.state_dict(), genes, attributes, saved_cells)
    folder.mkdir(parents=True, exist_ok=True)
    if save_anndata:
        atomic_write(folder / f"{prefix}{ADATA_FILE}", lambda tmp: model.adata.write_h5ad(tmp, **write_kwargs))
    # without save_anndata, an adata.h5ad of an earlier save stays (it may be the user's only copy): model.pt
    # records that no cells were saved with it, and load() does not pair the two
    atomic_write(folder / f"{prefix}{MODEL_FILE}", lambda tmp: torch.save(content, tmp, **(save_kwargs or {})))


def _check_save_arguments(prefix, save_kwargs, write_kwargs: dict) -> None:
    """Refuse, before any folder or file is made, arguments that would fail half-way through a save."""
    from anndata import AnnData

    if prefix is not None and (not isinstance(prefix, str) or Path(prefix).name != prefix or prefix in (".", "..")):
        raise ValueError(f"`prefix` must be a file-name prefix without a folder, got {prefix!r}.")
    if save_kwargs is not None and not isinstance(save_kwargs, dict):
        raise TypeError(f"`save_kwargs` must be a dict of torch.save's arguments, got {type(save_kwargs).__name__}.")
    for what, name, function, given, internal in (
        ("save_kwargs", "torch.save", torch.save, save_kwargs or {}, {"obj", "f"}),
        ("keyword argument", "AnnData.write_h5ad", AnnData.write_h5ad, write_kwargs, {"self", "filename"}),
    ):
        accepted = set(inspect.signature(function).parameters) - internal
        unknown = sorted(set(given) - accepted)
        if unknown:
            raise TypeError(f"save(): {what} {unknown} not taken by {name} (it takes {sorted(accepted)}).")


def read_registry(dir_path, prefix: str | None = None) -> dict:
    """Return the scvi-tools registry saved with a model, read safely."""
    attr_dict, _, _, _ = read_model_file(Path(dir_path) / f"{prefix or ''}{MODEL_FILE}")
    return attr_dict["registry_"]


def check_genes(adata, genes: np.ndarray, path: Path) -> None:
    """Raise a clear error when ``adata``'s genes are not the saved model's, in the same order."""
    problem = check.gene_mismatch(adata.var_names, genes)
    if problem is None:
        return
    raise ValueError(
        f"The AnnData {problem} (model saved in {path}); its predictions would be wrong. Subset and order it as "
        "the training data: "
        f"`adata[:, genes].copy()` with `genes = CplMixVAE.load_registry({str(path)!r})"
        "['field_registries']['X']['state_registry']['column_names']`."
    )


def without_removed_options(init_params: dict, trained: bool, path: Path) -> dict:
    """Return the saved ``init_params`` without the options this version no longer has.

    An option saved at the value it is now fixed at (:data:`REMOVED_OPTIONS`) is dropped; a trained model's
    :data:`TRAINING_ONLY_OPTIONS` too, whatever their value, since they only shaped its training. Any other
    value raises a :class:`ValueError` naming the option.
    """
    kept = {}
    for name, value in init_params.items():
        if name not in REMOVED_OPTIONS:
            kept[name] = value
        elif value != REMOVED_OPTIONS[name] and not (name in TRAINING_ONLY_OPTIONS and trained):
            raise ValueError(
                f"The model in {path} was saved with {name}={value!r}, an option this version of scmixvae no longer "
                f"has (only {name}={REMOVED_OPTIONS[name]!r} is kept, built in). Load it with the version that "
                "saved it, or train the model again with this version."
            )
    return kept


def load_model(cls, dir_path, adata, *, accelerator: str, device, prefix: str | None, backup_url: str | None):
    """Build a ``cls`` model from ``dir_path`` as :meth:`~scmixvae.model.CplMixVAE.load` documents it."""
    from anndata import AnnData, read_h5ad
    from scvi.model._utils import parse_device_args

    folder = Path(dir_path)
    prefix = prefix or ""
    model_path = folder / f"{prefix}{MODEL_FILE}"
    if backup_url is not None and not model_path.exists():
        from scvi.data._download import _download

        _download(backup_url, str(folder), model_path.name)
    attr_dict, genes, state_dict, saved_cells = read_model_file(model_path)
    registry = attr_dict.pop("registry_")
    if registry.get("model_name", cls.__name__) != cls.__name__:
        raise ValueError(f"{model_path} holds a {registry['model_name']} model, not a {cls.__name__}.")
    if adata is None:
        adata_path = folder / f"{prefix}{ADATA_FILE}"
        if not adata_path.is_file() or saved_cells is None:
            raise ValueError(
                f"{folder} holds no saved AnnData of this model ({adata_path.name}); pass the data with `adata=`."
            )
        adata = read_h5ad(adata_path)
        if saved_cells is not NOT_RECORDED and cells_digest(adata) != saved_cells:
            raise ValueError(
                f"{adata_path} holds other cells than those saved with {model_path.name} (a save that failed "
                "half-way left files of two saves); pass the data with `adata=`, or save the model again."
            )
    elif not isinstance(adata, AnnData):
        raise TypeError(f"`adata` must be an AnnData object or None, got {type(adata).__name__}.")
    check_genes(adata, genes, folder)
    check_known_categories(adata, registry)
    _, _, torch_device = parse_device_args(
        accelerator=accelerator, devices=device, return_device="torch", validate_single_device=True
    )
    cls.setup_anndata(adata, source_registry=registry, **registry["setup_args"])
    init_params = attr_dict.pop("init_params_")
    kwargs = {k: v for group in init_params["kwargs"].values() for k, v in group.items()}
    kwargs = without_removed_options(
        {**init_params["non_kwargs"], **kwargs}, bool(attr_dict.get("is_trained_")), folder
    )
    model = cls(adata, **kwargs)
    for name, value in attr_dict.items():
        if not name.endswith("_") or name.startswith("_"):  # save() writes the public attributes ending in "_"
            raise ValueError(f"{model_path} is not a saved scmixvae model: it sets the attribute {name!r}.")
        setattr(model, name, value)
    try:
        model.module.load_state_dict(state_dict)
    except RuntimeError as err:  # missing, unexpected or misshapen weights
        raise ValueError(
            f"The weights in {model_path} do not fit a model of the options saved with them (a file of another "
            f"version of scmixvae, or edited). {' '.join(str(err).split())[:400]}"
        ) from err
    model.to_device(torch_device)
    model.module.eval()
    model._validate_anndata(adata)
    return model
