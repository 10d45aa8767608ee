"""Loaders for the real single-cell data sets used in tests, benchmarks and tutorials."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from tqdm.auto import tqdm

from scmixvae._constants import DATA_DIR_ENV, NORMALISATION_SCALE
from scmixvae._io import not_hdf5_reason

logger = logging.getLogger(__name__)

#: Where the loaders look for and download files when neither an argument nor ``$SCMIXVAE_DATA_DIR`` says.
DEFAULT_DATA_DIR = Path("~/.cache/scmixvae")
#: ``obs`` column with the reference labels, the same in every loaded data set.
CELL_TYPE_KEY = "cell_type"
#: Source columns copied into ``obs["cell_type"]``, by priority.
_LABEL_KEYS = ("cell_type", "label")
_DOWNLOAD_BLOCK = 1 << 16
_TIMEOUT_S = 60


class _Source(NamedTuple):
    """Where a data set lives: its local ``.h5ad`` and the public file it is built from."""

    #: Name of the local ``.h5ad`` (as in the project's shared data folder).
    file_name: str
    #: Public URL of the source file.
    url: str
    #: Format of the source file: ``"h5ad"``, ``"kang_h5ad"`` (pertpy's Kang 2018 file) or ``"scdcc_h5"``.
    source_format: str
    #: Name under which the converted download is cached in the data folder.
    cache_name: str
    #: SHA-256 of the source file, checked before the download is kept (``None``: not known, only logged).
    sha256: str | None = None


_SCDCC = "https://github.com/ttgump/scDCC/raw/84f29c345b2b6b0d61131f733fb6180fa0b6e56e/data/Small_Datasets"
_SCDEEPCLUSTER = "https://github.com/ttgump/scDeepCluster/raw/ae033d7e366e68e68fe8ac5792744aa19cbc20f9/scRNA-seq%20data"

#: Data set name -> where it lives. The scDCC / scDeepCluster files (pinned commits) are HDF5 with a dense count
#: matrix ``X`` (cells x genes) and integer labels ``Y``; they are converted to ``.h5ad`` on download. The public
#: source of ``ifnb`` is pertpy's copy of the *full* Kang et al. 2018 data (24,673 cells, 8 coarser types),
#: cached as ``kang_2018.h5ad``; the 2,800-cell ``ifnb_2800.h5ad`` (13 types) is used when present locally.
#: A download is checked against the source's ``sha256`` where it is recorded and cached in the data folder (read
#: from there afterwards, as scanpy's loaders do); none is recorded yet, so each download logs its SHA-256.
DATASETS: dict[str, _Source] = {
    "ifnb": _Source("ifnb_2800.h5ad", "https://figshare.com/ndownloader/files/34464122", "kang_h5ad", "kang_2018.h5ad"),
    "pbmc_10x": _Source("10X_PBMC_top2000.h5ad", f"{_SCDCC}/10X_PBMC_top2000.h5", "scdcc_h5", "10X_PBMC_top2000.h5ad"),
    "mouse_bladder": _Source(
        "mouse_bladder_cell_top2000.h5ad",
        f"{_SCDCC}/mouse_bladder_cell_top2000.h5",
        "scdcc_h5",
        "mouse_bladder_cell_top2000.h5ad",
    ),
    "worm_neuron": _Source(
        "worm_neuron_cell.h5ad", f"{_SCDEEPCLUSTER}/worm_neuron_cell.h5", "scdcc_h5", "worm_neuron_cell.h5ad"
    ),
    "human_kidney": _Source(
        "human_kidney_counts_top2000.h5ad",
        f"{_SCDCC}/human_kidney_counts_top2000.h5",
        "scdcc_h5",
        "human_kidney_counts_top2000.h5ad",
    ),
}


def data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Folder where the loaders look for (and download) data files.

    Parameters
    ----------
    path
        Explicit folder; wins over everything else.

    Returns
    -------
    ``path`` if given, else ``$SCMIXVAE_DATA_DIR`` if set, else ``~/.cache/scmixvae``; user-expanded. The folder is
    not created here (downloads create it).
    """
    if path is None:
        path = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(path).expanduser()


def ifnb(
    path: str | os.PathLike[str] | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> AnnData:
    """Interferon-β stimulated and control PBMCs (Kang et al. 2018).

    Cell types **and** a within-type state: the interferon response raises ISG15 in every type without splitting
    the cells into separate clusters. Locally ``ifnb_2800.h5ad`` (every 5th cell of the Seurat ``ifnb`` set:
    2,800 cells x 14,053 genes, 13 types in ``obs["cell_type"]``, ``obs["condition"]`` CTRL / STIM). When absent,
    pertpy's public copy of the full data (24,673 cells, 8 types) is downloaded, its ``obs["label"]``
    (ctrl / stim) copied to ``obs["condition"]`` (CTRL / STIM), and cached as ``kang_2018.h5ad``.

    Parameters
    ----------
    path
        Read this ``.h5ad`` instead of looking in the data folder.
    data_dir
        Data folder; see :func:`scmixvae.data.data_dir`.
    progress
        Show a progress bar while downloading.

    Returns
    -------
    AnnData with raw counts in ``X`` (CSR, float32) and the labels in ``obs["cell_type"]`` (categorical).
    """
    return _load("ifnb", path, folder=data_dir, progress=progress)


def pbmc_10x(
    path: str | os.PathLike[str] | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> AnnData:
    """10x Genomics PBMC 4k, top 2,000 genes (4,271 cells, 8 types), via scDCC.

    Local file ``10X_PBMC_top2000.h5ad``; otherwise scDCC's ``10X_PBMC_top2000.h5`` is downloaded and converted
    (see :func:`read_scdcc_h5`). Parameters and return value as in :func:`ifnb`; the original labels stay in
    ``obs["label"]``.
    """
    return _load("pbmc_10x", path, folder=data_dir, progress=progress)


def mouse_bladder(
    path: str | os.PathLike[str] | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> AnnData:
    """Mouse bladder (Han et al. 2018, Microwell-seq), 2,003 genes (2,746 cells, 16 unbalanced types).

    Local file ``mouse_bladder_cell_top2000.h5ad``; otherwise downloaded from scDCC and converted. Parameters and
    return value as in :func:`ifnb`; the original labels stay in ``obs["label"]``.
    """
    return _load("mouse_bladder", path, folder=data_dir, progress=progress)


def worm_neuron(
    path: str | os.PathLike[str] | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> AnnData:
    """Worm neurons (Cao et al. 2017, sci-RNA-seq), all 13,488 genes (4,186 cells, 10 types).

    Local file ``worm_neuron_cell.h5ad``; otherwise downloaded from scDeepCluster and converted. Parameters and
    return value as in :func:`ifnb`; the original labels stay in ``obs["label"]``.
    """
    return _load("worm_neuron", path, folder=data_dir, progress=progress)


def human_kidney(
    path: str | os.PathLike[str] | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> AnnData:
    """Human kidney (Young et al. 2018), top 2,000 genes (5,685 cells, 11 types), via scDCC.

    Local file ``human_kidney_counts_top2000.h5ad``; otherwise downloaded from scDCC and converted. Parameters and
    return value as in :func:`ifnb`; the original labels stay in ``obs["label"]``.
    """
    return _load("human_kidney", path, folder=data_dir, progress=progress)


def pbmc68k_counts() -> AnnData:
    """Integer counts of scanpy's ``pbmc68k_reduced`` (700 cells x 765 genes, 10 ``bulk_labels``).

    The data set ships with scanpy (no download). Its ``.raw.X`` holds ``log1p(counts / n_counts * 1e4)`` rounded
    to 3 decimals, so ``rint(expm1(raw.X) * n_counts / 1e4)`` gives back the counts. scanpy's copy is not changed.

    Returns
    -------
    AnnData with the counts in ``X`` (CSR, float32) over the ``.raw`` genes (``var`` from ``.raw.var``), all
    ``obs`` columns of the scanpy data set, and ``obs["cell_type"]`` = ``obs["bulk_labels"]``.
    """
    import scanpy as sc

    source = sc.datasets.pbmc68k_reduced()
    log_normalised = sp.csr_matrix(source.raw.X, dtype=np.float64)
    n_counts = source.obs["n_counts"].to_numpy(dtype=np.float64)
    counts = log_normalised.copy()
    counts.data = np.expm1(counts.data)
    counts = sp.csr_matrix(sp.diags(n_counts / NORMALISATION_SCALE) @ counts)
    counts.data = np.rint(counts.data)
    counts.eliminate_zeros()
    obs = source.obs.copy()
    obs[CELL_TYPE_KEY] = obs["bulk_labels"].astype("category")
    return AnnData(X=counts.astype(np.float32), obs=obs, var=source.raw.var.copy())


def read_counts(
    name_or_path: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> AnnData:
    """Load a data set by name (see :data:`DATASETS`, or ``"pbmc68k"``) or read a count ``.h5ad`` by path.

    Parameters
    ----------
    name_or_path
        A data set name (``"ifnb"``, ``"pbmc_10x"``, ``"mouse_bladder"``, ``"worm_neuron"``, ``"human_kidney"``,
        ``"pbmc68k"``) or the path of an ``.h5ad`` with raw counts in ``X``.
    data_dir
        Data folder for named data sets; see :func:`scmixvae.data.data_dir`.
    progress
        Show a progress bar while downloading.

    Returns
    -------
    AnnData with raw counts in ``X`` (CSR, float32) and, when the file has a ``cell_type`` or ``label`` column,
    the labels in ``obs["cell_type"]`` (categorical).
    """
    name = os.fspath(name_or_path)
    if name == "pbmc68k":
        return pbmc68k_counts()
    if name in DATASETS:
        return _load(name, None, folder=data_dir, progress=progress)
    path = Path(name).expanduser()
    if not path.is_file():
        raise ValueError(
            f"{name!r} is neither a data set name ({', '.join([*DATASETS, 'pbmc68k'])}) nor an existing file."
        )
    return _standardise(_read_h5ad(path), path)


def _check_hdf5(path: Path) -> None:
    """Refuse a file that is not HDF5 before a reader fails inside h5py."""
    if (reason := not_hdf5_reason(path)) is not None:
        raise ValueError(f"{reason}.")


def _read_h5ad(path: Path) -> AnnData:
    _check_hdf5(path)
    with h5py.File(path, "r") as f:
        if "X" in f and "Y" in f and isinstance(f["X"], h5py.Dataset) and "obs" not in f:
            raise ValueError(f"{os.fspath(path)!r} is an scDCC file, not an .h5ad; read it with read_scdcc_h5(path).")
        if "obs" not in f or "var" not in f:
            raise ValueError(f"{os.fspath(path)!r} is an HDF5 file but not an .h5ad (it has no 'obs' and 'var').")
    return ad.read_h5ad(path)


def read_scdcc_h5(path: str | os.PathLike[str]) -> AnnData:
    """Convert an HDF5 file of the scDCC / scDeepCluster repositories to AnnData.

    Those files hold a dense count matrix ``X`` (cells x genes; transposed ones are recognised by the length of
    ``Y``) and integer labels ``Y``. Genes and cells have no names there; they become ``gene0, gene1, ...`` and
    ``cell0, cell1, ...``, and label ``y`` becomes ``f"type{y}"`` in ``obs["label"]`` (the naming of the
    project's shared ``.h5ad`` files).

    Parameters
    ----------
    path
        The ``.h5`` file.

    Returns
    -------
    AnnData with the counts in ``X`` (CSR, float32) and ``obs["label"]`` (categorical).
    """
    _check_hdf5(Path(path))
    with h5py.File(path, "r") as f:
        if "X" not in f or "Y" not in f:
            raise ValueError(f"{os.fspath(path)!r} is not an scDCC file: it needs datasets 'X' and 'Y'.")
        x = np.asarray(f["X"])
        y = np.asarray(f["Y"]).ravel()
    if x.ndim != 2:
        raise ValueError(f"'X' in {os.fspath(path)!r} must be a matrix, got shape {x.shape}.")
    if x.shape[0] != y.size and x.shape[1] == y.size:
        x = x.T
    if x.shape[0] != y.size:
        raise ValueError(f"'X' in {os.fspath(path)!r} has shape {x.shape} but 'Y' has {y.size} labels.")
    if y.dtype.kind in "iuf":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(
                f"'Y' in {os.fspath(path)!r} holds missing or non-integer labels; scDCC labels are integers."
            )
        labels = [f"type{int(v)}" for v in y]
    else:
        labels = [v.decode() if isinstance(v, bytes) else str(v) for v in y]
    obs = pd.DataFrame({"label": pd.Categorical(labels)}, index=[f"cell{i}" for i in range(x.shape[0])])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(x.shape[1])])
    return AnnData(X=sp.csr_matrix(x, dtype=np.float32), obs=obs, var=var)


def _load(
    name: str,
    path: str | os.PathLike[str] | None,
    *,
    folder: str | os.PathLike[str] | None,
    progress: bool,
) -> AnnData:
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(f"No file at {os.fspath(path)!r}; pass an existing .h5ad or leave `path` out.")
        return _standardise(_read_h5ad(path), path)
    source = DATASETS[name]
    folder = data_dir(folder)
    for file_name in dict.fromkeys((source.file_name, source.cache_name)):
        if (folder / file_name).is_file():
            logger.info("Reading %s from %s.", name, folder / file_name)
            return _standardise(_read_h5ad(folder / file_name), folder / file_name)
    adata = _download_and_convert(name, source, folder, progress=progress)
    return _standardise(adata, folder / source.cache_name)


def _download_and_convert(name: str, source: _Source, folder: Path, *, progress: bool) -> AnnData:
    """Download ``name`` into ``folder`` and convert it; a failure leaves nothing, not even a folder it made."""
    made = [parent for parent in (folder, *folder.parents) if not parent.exists()]  # innermost first
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("%s not found in %s; downloading it from %s.", name, folder, source.url)
    try:
        return _convert_download(source, folder, progress=progress, description=name)
    except ConnectionError as err:  # the file to place is the converted .h5ad, not the source at the URL
        raise ConnectionError(f"{err} The loader reads {source.file_name!r} there.") from err
    finally:
        if made and not (folder / source.cache_name).is_file():  # e.g. a misspelt folder without internet
            with contextlib.suppress(OSError):
                for parent in made:
                    parent.rmdir()


def _convert_download(source: _Source, folder: Path, *, progress: bool, description: str) -> AnnData:
    """Download ``source`` through a temporary folder in ``folder`` and write its converted AnnData there."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        raw = Path(tmp) / "source"
        _download(source.url, raw, progress=progress, description=description, folder=folder, sha256=source.sha256)
        if source.source_format == "scdcc_h5":
            adata = read_scdcc_h5(raw)
        elif source.source_format == "kang_h5ad":
            adata = _from_kang_2018(ad.read_h5ad(raw))
        else:
            adata = ad.read_h5ad(raw)
        converted = Path(tmp) / source.cache_name
        adata.write_h5ad(converted)
        os.replace(converted, folder / source.cache_name)
    return ad.read_h5ad(folder / source.cache_name)


def _from_kang_2018(adata: AnnData) -> AnnData:
    """Adapt pertpy's Kang 2018 file: ``obs["label"]`` (ctrl / stim) -> ``obs["condition"]`` (CTRL / STIM)."""
    if "label" in adata.obs and "condition" not in adata.obs:
        adata.obs["condition"] = pd.Categorical(adata.obs["label"].astype(str).str.upper())
    return adata


def _download(
    url: str,
    destination: Path,
    *,
    progress: bool = True,
    description: str = "",
    folder: Path | None = None,
    sha256: str | None = None,
) -> str:
    """Download ``url`` to ``destination`` through a temporary file in the same folder, renamed when complete.

    ``folder`` is the data folder named in error messages (``destination.parent`` when not given). With ``sha256``
    the download is kept only when its SHA-256 matches (a :class:`ConnectionError` otherwise, nothing left
    behind). Returns the SHA-256 of the download.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    folder = destination.parent if folder is None else folder
    fd, partial = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=_TIMEOUT_S)
            except urllib.error.HTTPError as err:
                raise ConnectionError(
                    f"Downloading {url} failed: HTTP {err.code} {err.reason}. Place the file in the data folder "
                    f"({folder}) or point ${DATA_DIR_ENV} at a folder that has it."
                ) from err
            except (urllib.error.URLError, TimeoutError, OSError) as err:
                raise ConnectionError(
                    f"Downloading {url} failed: {getattr(err, 'reason', err)}. Check the network, or place the "
                    f"file in the data folder ({folder}) or point ${DATA_DIR_ENV} at a folder that has it."
                ) from err
            with response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                received, digest = 0, hashlib.sha256()
                with tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=description or destination.name,
                    disable=not progress,
                ) as bar:
                    try:
                        while block := response.read(_DOWNLOAD_BLOCK):
                            out.write(block)
                            digest.update(block)
                            received += len(block)
                            bar.update(len(block))
                    except (http.client.HTTPException, OSError) as err:
                        raise ConnectionError(
                            f"Downloading {url} failed after {received} bytes: {err!r}. Try again, or place the "
                            f"file in the data folder ({folder})."
                        ) from err
            if total is not None and received != total:
                raise ConnectionError(
                    f"Downloading {url} failed: got {received} of {total} bytes. Try again, or place the file in "
                    f"the data folder ({folder})."
                )
            _check_digest(url, digest.hexdigest(), sha256, folder)
        os.replace(partial, destination)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    logger.info("Downloaded %s to %s (SHA-256 %s).", url, destination, digest.hexdigest())
    return digest.hexdigest()


def _check_digest(url: str, digest: str, expected: str | None, folder: Path) -> None:
    if expected is None:
        logger.info("No known SHA-256 for %s to check the download against.", url)
    elif digest != expected.lower():
        raise ConnectionError(
            f"Downloading {url} gave a file whose SHA-256 is {digest}, not the expected {expected}: it is corrupt "
            f"or has changed at the source; nothing was kept. Try again, or place the file in the data folder "
            f"({folder})."
        )


def _standardise(adata: AnnData, path: Path) -> AnnData:
    """Raw counts as CSR float32 in ``X``, labels in ``obs["cell_type"]`` (the original column kept)."""
    x = adata.X
    if x is None:
        raise ValueError(f"{os.fspath(path)!r} has no X; the loaders need raw counts in X.")
    if not isinstance(x, np.ndarray) and not sp.issparse(x):  # backed or other array types
        x = sp.csr_matrix(np.asarray(x))
    x = x.astype(np.float32, copy=False) if sp.issparse(x) and x.format == "csr" else sp.csr_matrix(x, dtype=np.float32)
    values = x.data
    if values.size and (not np.all(np.isfinite(values)) or values.min() < 0 or not np.all(values == np.round(values))):
        raise ValueError(
            f"X of {os.fspath(path)!r} does not hold raw counts (negative, non-integer or infinite values); the "
            "loaders need raw counts in X. Put the counts back in X (e.g. from a 'counts' layer) before loading."
        )
    adata.X = x
    for key in _LABEL_KEYS:
        if key in adata.obs:
            adata.obs[CELL_TYPE_KEY] = _label_column(adata.obs[key])
            break
    return adata


def _label_column(column: pd.Series) -> pd.Series:
    """Labels as a categorical of strings: missing labels stay missing, the file's category order is kept."""
    labels = column.astype("category")  # a categorical keeps its order; numbers are ordered as numbers
    return labels.cat.rename_categories(labels.cat.categories.astype(str))
