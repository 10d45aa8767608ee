"""Checks of user input, raised before any work starts."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from pandas.api.types import is_float_dtype, is_numeric_dtype

logger = logging.getLogger(__name__)

_CHUNK = 10_000
#: Largest value accepted as the count of one gene in one cell (far above any real count).
MAX_COUNT = 2**31 - 1
#: Fewest counts of a cell that :func:`check_counts` takes without a warning (fewer tell nothing of a type).
MIN_INFORMATIVE_COUNTS = 10


def _iter_chunks(matrix, n: int | None = None):
    """Yield row blocks of the first ``n`` rows (all by default) of a dense, sparse or backed matrix, in memory."""
    n = matrix.shape[0] if n is None else min(n, matrix.shape[0])
    for start in range(0, n, _CHUNK):
        yield matrix[start : min(start + _CHUNK, n)]


def _values(block) -> np.ndarray:
    if sp.issparse(block):
        return np.asarray(block.data)
    return np.asarray(block)


def _check_no_duplicate_entries(block, where: str) -> None:
    """Refuse a sparse block that stores a count as several entries at one position (scipy sums them).

    The model reads a CSR minibatch's stored entries one by one on the CPU, so ``5`` stored as ``2 + 3`` would enter
    the likelihood as two counts; the check on integers would also judge the parts, not their sum.
    """
    if not sp.issparse(block) or block.format not in ("csr", "csc") or block.has_canonical_format:
        return
    summed = block.copy()
    summed.sum_duplicates()
    if summed.nnz != block.nnz:
        raise ValueError(
            f"{where} stores some counts as several entries at the same position (scipy sums them, the model would "
            f"not). Sum them once: `{where}.sum_duplicates()`."
        )


def check_anndata(adata, where: str = "`adata`") -> None:
    """Raise a :class:`TypeError` for anything but an AnnData (e.g. a numpy array or a DataFrame)."""
    if not isinstance(adata, AnnData):
        raise TypeError(
            f"{where} must be an AnnData object, got {type(adata).__name__}. Wrap a cells x genes count matrix "
            "with `anndata.AnnData(X=counts)`."
        )


def copy_of(adata: AnnData) -> AnnData:
    """Return a copy of ``adata`` for a verb's ``copy=True``; a backed AnnData gets a clear error instead.

    anndata copies a backed AnnData only into a new file (``.copy(filename=...)``), which a verb cannot choose.
    """
    if adata.isbacked:
        raise ValueError(
            "copy=True cannot copy a backed AnnData (anndata copies it only into a new file). Write the results "
            "into it (copy=False: they are kept in memory, the file is not changed), or read the cells into memory "
            "first: `adata.to_memory()`."
        )
    return adata.copy()


def check_model(model, where: str = "`model`") -> None:
    """Raise a :class:`TypeError` for anything but a CplMixVAE and a :class:`ValueError` for an untrained one."""
    # by name, so that this module imports no model (the model imports it)
    if not any(f"{c.__module__}.{c.__qualname__}" == "scmixvae.model._model.CplMixVAE" for c in type(model).__mro__):
        raise TypeError(f"{where} must be a trained scmixvae.model.CplMixVAE, got {type(model).__name__}.")
    model._check_if_trained()


def get_matrix(adata: AnnData, layer: str | None):
    """Return ``adata.X`` or ``adata.layers[layer]`` with a clear error when the layer is missing."""
    check_anndata(adata)
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty; pass `layer=` naming the layer that holds the raw counts.")
        return adata.X
    if not isinstance(layer, str):
        raise TypeError(f"`layer` must be a string or None, got {type(layer).__name__}.")
    if layer not in adata.layers:
        raise ValueError(
            f"Layer {layer!r} not found in adata.layers (available: {list(adata.layers.keys())}). "
            "Pass the name of the layer that holds the raw counts, or layer=None for adata.X." + _raw_hint(adata)
        )
    return adata.layers[layer]


def _raw_hint(adata: AnnData) -> str:
    """How to use counts kept in ``adata.raw`` (models read ``X`` or a layer), when there is a ``raw``."""
    if adata.raw is None:
        return ""
    return (
        " If adata.raw holds the counts, copy them into a layer first: "
        "`adata.layers['counts'] = adata.raw[:, adata.var_names].X`, then `layer='counts'`."
    )


def check_counts(
    adata: AnnData, layer: str | None = None, *, warn: bool = True, first_cells: int | None = None
) -> None:
    """Check that the registered matrix holds raw counts.

    Raises a :class:`ValueError` for fewer than two genes, NaN or infinite values, negative or non-integer values,
    values above :data:`MAX_COUNT` and cells without any count; with ``warn``, warns about a CSC matrix (slow to
    read by rows), genes without any count (they are kept; they cost time and carry no information, remove them
    with ``sc.pp.filter_genes(adata, min_counts=1)``) and cells with fewer than :data:`MIN_INFORMATIVE_COUNTS`
    counts (too few to tell a type: the model still gives them one, with a confidence that says nothing). Reads the
    matrix in chunks of cells (backed data included); ``first_cells``: only that many first cells (a check again,
    e.g. for a transformation of the whole matrix).
    """
    matrix = get_matrix(adata, layer)
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if warn and sp.issparse(matrix) and matrix.format == "csc":
        warnings.warn(
            f"{where} is a CSC matrix: every minibatch reads rows, which is slow in CSC. Convert it once with "
            f"`{where} = {where}.tocsr()`.",
            UserWarning,
            stacklevel=3,
        )
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"{where} is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    if adata.n_vars == 1:  # the Leiden start's SVD failed on it, after the model was built
        raise ValueError(f"{where} has 1 gene; the model needs at least two.")
    dtype = getattr(matrix, "dtype", None)
    if dtype is not None and not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
        raise TypeError(f"{where} has dtype {dtype}; raw counts must be numeric (integers stored as int or float).")
    if dtype is not None and np.issubdtype(dtype, np.complexfloating):
        raise TypeError(f"{where} has dtype {dtype}; raw counts are real numbers (integers stored as int or float).")
    if dtype == np.float16:
        raise TypeError(
            f"{where} has dtype float16, which cannot hold raw counts here (it holds integers exactly only up to "
            f"2,048, and sparse matrices cannot hold it). Convert it first: `{where} = {where}.astype('float32')`."
        )
    cell_totals = np.zeros(adata.n_obs if first_cells is None else min(first_cells, adata.n_obs))
    gene_totals = np.zeros(adata.n_vars)
    start = 0
    for block in _iter_chunks(matrix, cell_totals.size):
        _check_no_duplicate_entries(block, where)
        values = _values(block)
        if values.size:
            if not np.all(np.isfinite(values)):
                raise ValueError(
                    f"{where} contains NaN or infinite values. Raw counts are finite; remove or fix these entries."
                )
            if values.min() < 0:
                raise ValueError(
                    f"{where} contains negative values: the model needs raw counts. If the counts are in a layer, "
                    "pass `layer=` to setup_anndata."
                )
            if not np.all(np.equal(np.mod(values, 1), 0)):
                raise ValueError(
                    f"{where} contains non-integer values: the model needs raw (integer) counts, not normalised or "
                    "log-transformed data. Pass `layer=` naming the layer with the raw counts "
                    "(e.g. adata.layers['counts'])." + _raw_hint(adata)
                )
            if values.max() > MAX_COUNT:
                raise ValueError(
                    f"{where} contains values up to {values.max():.3g}, far above any count of one gene in one cell "
                    f"(at most {MAX_COUNT}); check that it holds raw counts."
                )
        n = block.shape[0]
        cell_totals[start : start + n] = np.asarray(block.sum(axis=1)).ravel()
        gene_totals += np.asarray(block.sum(axis=0)).ravel()
        start += n
    empty_cells = np.flatnonzero(cell_totals == 0)
    if empty_cells.size:
        names = ", ".join(map(str, adata.obs_names[empty_cells[:5]]))
        raise ValueError(
            f"{empty_cells.size} cells have no counts in {where} (e.g. {names}). Remove them first, e.g. "
            "`sc.pp.filter_cells(adata, min_counts=1)`."
        )
    if warn:
        _warn_uninformative(adata, where, cell_totals, gene_totals)


def _warn_uninformative(adata: AnnData, where: str, cell_totals: np.ndarray, gene_totals: np.ndarray) -> None:
    """Warn about genes without any count and cells with too few counts to tell a type (from :func:`check_counts`)."""
    n_empty_genes = int((gene_totals == 0).sum())
    if n_empty_genes:
        warnings.warn(
            f"{n_empty_genes} {'gene has' if n_empty_genes == 1 else 'genes have'} no counts in {where}; they are "
            "kept but carry no information. "
            "Remove them with `sc.pp.filter_genes(adata, min_counts=1)`.",
            UserWarning,
            stacklevel=4,
        )
    few = np.flatnonzero(cell_totals < MIN_INFORMATIVE_COUNTS)
    if few.size:
        names = ", ".join(map(str, adata.obs_names[few[:3]]))
        warnings.warn(
            f"{few.size} cells have fewer than {MIN_INFORMATIVE_COUNTS} counts in {where} (e.g. {names}): too few to "
            "tell their type, which the model gives them all the same, with a confidence that means nothing. Remove "
            f"them first, e.g. `sc.pp.filter_cells(adata, min_counts={MIN_INFORMATIVE_COUNTS})`.",
            UserWarning,
            stacklevel=4,
        )


def as_list(values) -> list:
    """Return ``values`` as a list: a single value (a string or a number) as a list of one, a sequence as a list."""
    return [values] if isinstance(values, str) or np.isscalar(values) else list(values)


def check_unique_names(adata: AnnData) -> None:
    """Raise for duplicated ``obs_names`` or ``var_names``."""
    for axis, names in (("obs_names", adata.obs_names), ("var_names", adata.var_names)):
        if not names.is_unique:
            dup = names[names.duplicated()].unique()[:5].tolist()
            fix = "adata.obs_names_make_unique()" if axis == "obs_names" else "adata.var_names_make_unique()"
            raise ValueError(f"adata.{axis} has duplicates (e.g. {dup}); call `{fix}` first.")


def check_obs_keys(adata: AnnData, **keys: str | list[str] | None) -> None:
    """Raise a clear error for keys that are not columns of ``adata.obs``."""
    for arg, value in keys.items():
        if value is None:
            continue
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
            raise TypeError(f"`{arg}` must be a column name (str) or a list of them, got {value!r}.")
        missing = [v for v in values if v not in adata.obs.columns]
        if missing:
            raise ValueError(
                f"`{arg}`: column(s) {missing} not found in adata.obs (available: {list(adata.obs.columns)})."
            )


def check_key_list(name: str, keys) -> list[str] | None:
    """Return the ``obs`` column names of a ``*_covariate_keys`` argument as a list (``None`` when there is none).

    A single string is refused (scvi-tools would read it letter by letter); a tuple is taken as a list.
    """
    if keys is None:
        return None
    if isinstance(keys, str):
        raise TypeError(f"`{name}` takes a list of obs columns, got the string {keys!r}; pass [{keys!r}].")
    if not isinstance(keys, list | tuple) or not all(isinstance(key, str) for key in keys):
        raise TypeError(f"`{name}` must be a list of obs column names (str), got {keys!r}.")
    return list(keys) or None


def warn_category_columns(adata: AnnData, **categorical: str | list[str] | None) -> None:
    """Warn about categorical ``obs`` columns (argument name, then column name or list) that hold odd categories.

    A column of non-integer numbers makes each value a category of its own (e.g. ``batch_key="library_size"``: one
    batch per cell); a categorical column with categories no cell has (e.g. left by subsetting) registers them too:
    a batch without cells, whose weights nothing trains, and which read-outs may decode in.
    """
    for arg, key in _named_columns(categorical):
        column = adata.obs[key]
        if is_float_dtype(column) and not np.all(np.mod(column.to_numpy(), 1) == 0):
            warnings.warn(
                f"adata.obs[{key!r}] (`{arg}`) holds non-integer numbers, {column.nunique()} distinct values for "
                f"{adata.n_obs} cells, and each becomes a category of its own. Is it a continuous covariate? "
                "Register it with `continuous_covariate_keys` instead.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        elif isinstance(column.dtype, pd.CategoricalDtype):
            _warn_unused_categories(column, key, arg)


def _warn_unused_categories(column: pd.Series, key: str, arg: str) -> None:
    unused = column.cat.categories.difference(column.unique().dropna())
    if len(unused) == 0:
        return
    named = ", ".join(map(repr, unused[:5].tolist())) + ("..." if len(unused) > 5 else "")
    warnings.warn(
        f"adata.obs[{key!r}] (`{arg}`) has {len(unused)} {'category' if len(unused) == 1 else 'categories'} that no "
        f"cell has ({named}); each is registered as one without cells, which the model cannot learn. Drop them "
        f"first: `adata.obs[{key!r}] = adata.obs[{key!r}].cat.remove_unused_categories()`.",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def _named_columns(categorical: dict[str, str | list[str] | None]):
    """Yield ``(argument, obs column)`` for keyword arguments that name one column, a list of them or none."""
    for arg, value in categorical.items():
        for key in [value] if isinstance(value, str) else value or []:
            yield arg, key


def check_covariates(adata: AnnData, *, continuous: list[str] | None = None, **categorical) -> None:
    """Raise a clear error for ``obs`` columns that scvi-tools cannot register as covariates.

    Continuous covariates (``continuous``) must be numeric and finite; categorical ones (keyword arguments:
    the argument name, then its column name or list of them) must have no missing value.
    """
    for key in continuous or []:
        column = adata.obs[key]
        if not is_numeric_dtype(column):
            raise ValueError(
                f"adata.obs[{key!r}] (`continuous_covariate_keys`) has dtype {column.dtype}; a continuous covariate "
                f"must be numeric. Convert it (`adata.obs[{key!r}] = adata.obs[{key!r}].astype(float)`) or register "
                "it with `categorical_covariate_keys`."
            )
        bad = ~np.isfinite(column.to_numpy(dtype=float))
        if bad.any():
            raise ValueError(
                f"adata.obs[{key!r}] (`continuous_covariate_keys`) has {int(bad.sum())} NaN or infinite value(s) "
                f"(e.g. cells {list(adata.obs_names[bad][:3])}); fill them or remove those cells."
            )
    for arg, key in _named_columns(categorical):
        missing = adata.obs[key].isna().to_numpy()
        if missing.any():
            raise ValueError(
                f"adata.obs[{key!r}] (`{arg}`) has {int(missing.sum())} missing value(s) (e.g. cells "
                f"{list(adata.obs_names[missing][:3])}); every cell needs a category. Remove those cells or give "
                f"them a category of their own, e.g. `adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)` "
                "(they become 'nan')."
            )


def check_int(name: str, value, *, minimum: int = 1, maximum: int | None = None) -> int:
    """Validate an integer parameter."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__} ({value!r}).")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"`{name}` must be {bound}, got {value}.")
    return int(value)


def check_indices(indices, n_obs: int, name: str = "indices") -> np.ndarray:
    """Return the positions of the cells that ``indices`` selects among ``n_obs`` (all of them for ``None``).

    Integer positions (negative ones count from the end, as in numpy) or a boolean mask with one value per cell;
    anything else, a position outside the cells or a selection of no cell raises before any work starts.
    """
    if indices is None:
        return np.arange(n_obs)
    idx = np.asarray(indices)
    if idx.ndim != 1:
        raise ValueError(f"`{name}` must be one-dimensional (positions or a boolean mask), got shape {idx.shape}.")
    if idx.size == 0:
        raise ValueError(f"`{name}` selects no cell.")
    if idx.dtype == bool:
        if idx.size != n_obs:
            raise ValueError(f"The boolean mask `{name}` has {idx.size} values; the AnnData has {n_obs} cells.")
        if not idx.any():
            raise ValueError(f"`{name}` selects no cell.")
        return np.flatnonzero(idx)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"`{name}` must hold integer positions or be a boolean mask, got dtype {idx.dtype}.")
    outside = idx[(idx < -n_obs) | (idx >= n_obs)]
    if outside.size:
        raise IndexError(
            f"`{name}` holds {outside.size} position(s) outside the AnnData's {n_obs} cells (e.g. {outside[0]})."
        )
    return np.where(idx < 0, idx + n_obs, idx).astype(np.int64)


def check_gene_list(gene_list, var_names: pd.Index) -> np.ndarray:
    """Return the mask of ``var_names`` that ``gene_list`` selects (every gene for ``None``).

    A gene the model does not have, a single string instead of a list, or an empty list raises: none of them may
    silently return fewer genes than asked for.
    """
    if gene_list is None:
        return np.ones(len(var_names), dtype=bool)
    if isinstance(gene_list, str):
        raise TypeError(
            f"`gene_list` must be a list of gene names, got the string {gene_list!r}: pass [{gene_list!r}]."
        )
    genes = pd.Index(list(gene_list))
    if genes.empty:
        raise ValueError("`gene_list` is empty; pass None for every gene.")
    missing = genes.difference(var_names)
    if len(missing):
        raise ValueError(
            f"`gene_list` holds {len(missing)} gene(s) that are not the model's, e.g. {list(missing[:5])}."
        )
    return np.asarray(var_names.isin(genes))


def check_float(name: str, value, *, minimum: float = 0.0, maximum: float | None = None, strict: bool = False):
    """Validate a real parameter (``strict``: strictly above ``minimum``)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__} ({value!r}).")
    value = float(value)
    if (
        not np.isfinite(value)
        or value < minimum
        or (strict and value == minimum)
        or (maximum is not None and value > maximum)
    ):
        lo = f"> {minimum}" if strict else f">= {minimum}"
        hi = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"`{name}` must be {lo}{hi}, got {value}.")
    return value


def check_choice(name: str, value, choices) -> str:
    """Validate a string option."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
    return value


def check_key_added(key_added) -> str:
    """Validate a ``key_added``: a string that survives ``write_h5ad``/``read_h5ad`` as a key of ``obs``/``uns``.

    h5ad stores keys as HDF5 names: a ``/`` nests groups (the file then cannot be read back), ``"."`` names the
    group itself (the entry is lost) and a NUL character cannot be written.
    """
    if not isinstance(key_added, str) or not key_added:
        raise TypeError(f"`key_added` must be a non-empty string, got {key_added!r}.")
    if "/" in key_added or "\x00" in key_added or key_added in (".", ".."):
        raise ValueError(
            f"`key_added` {key_added!r} cannot be stored in an .h5ad file (no '/', NUL character, '.' or '..'); "
            "use letters, digits, '_' or '-', e.g. 'cplmixvae_run1'."
        )
    return key_added


def gene_mismatch(names, genes, owner: str = "the model") -> str | None:
    """Describe how the genes ``names`` differ from ``genes`` (``owner``'s, in order); ``None`` when they match.

    Returns e.g. ``"has the model's genes in another order"`` or ``"has 90 genes; the model was trained on 100
    (10 missing, e.g. [...])"``, to be completed by the caller's fix.
    """
    names = np.asarray(pd.Index(names).astype(str))
    genes = np.asarray(pd.Index(genes).astype(str))
    if len(names) == len(genes) and np.array_equal(names, genes):
        return None
    missing = pd.Index(genes).difference(names)
    extra = pd.Index(names).difference(genes)
    if len(missing) == 0 and len(extra) == 0 and len(names) == len(genes):
        return f"has {owner}'s genes in another order"
    return (
        f"has {len(names)} genes; {owner} was trained on {len(genes)}"
        + (f" ({len(missing)} missing, e.g. {list(missing[:5])})" if len(missing) else "")
        + (f" ({len(extra)} not in {owner}, e.g. {list(extra[:5])})" if len(extra) else "")
    )


def user_stacklevel() -> int:
    """``stacklevel`` of a warning that names the first caller outside scmixvae (called as its argument).

    A warning raised deep inside a fit (e.g. by a pruning round of ``train()`` or of ``prune()``) then points at
    the user's line, however many of the package's frames lie between.
    """
    package = Path(__file__).resolve().parent
    frame, level = sys._getframe(1), 1  # level 1: the function that calls warnings.warn
    while frame is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(package):
        frame, level = frame.f_back, level + 1
    return level


def check_finite_posteriors(q: np.ndarray, state: np.ndarray | None = None) -> None:
    """Refuse read-outs of a model whose posteriors are NaN or infinite (its weights are not finite)."""
    if not (np.isfinite(q).all() and (state is None or np.isfinite(state).all())):
        raise ValueError(
            "The model's posteriors are NaN or infinite: its weights are not finite (a training that diverged, "
            "or weights changed by hand). Train a new model, with a lower learning rate if training diverged."
        )
