"""Neighbour graph and Leiden clustering that work on every supported scanpy/scipy combination.

scanpy 1.11 reads the k-NN graph from its transformer with ``getnnz``, which sparse *arrays* lack under
scipy ≥ 1.14; pynndescent ≥ 0.6 returns a ``csr_array``. Together, ``sc.pp.neighbors`` fails whenever scanpy
picks pynndescent: by default at ≥ 8,192 cells with the euclidean metric and at ≥ 4,096 cells with any other.
:func:`neighbors` retries such a call with scanpy's exact scikit-learn transformer — the same one scanpy itself
uses below those sizes — and remembers, for the rest of the process, that the combination is broken so that
later calls go straight to it.

Both functions leave torch's and numba's thread counts as they found them (see :mod:`scmixvae._threads`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import scanpy as sc

from ._threads import keep_thread_settings

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

#: Set to ``True`` once this process has seen scanpy fail with the ``getnnz`` error.
_GETNNZ_BROKEN = False


def _is_getnnz_error(err: BaseException) -> bool:
    return isinstance(err, AttributeError) and "getnnz" in str(err)


def neighbors(
    adata: AnnData,
    *,
    use_rep: str | None = None,
    n_neighbors: int = 15,
    key_added: str | None = None,
    random_state: int = 0,
    **kwargs: Any,
) -> AnnData | None:
    """Compute the neighbour graph with :func:`scanpy.pp.neighbors`, working around the ``getnnz`` failure.

    A drop-in replacement for :func:`scanpy.pp.neighbors`. Where scanpy fails with
    ``AttributeError: 'csr_array' object has no attribute 'getnnz'`` (scanpy 1.11 with scipy ≥ 1.14 and
    pynndescent ≥ 0.6, on more than 4,096 or 8,192 cells), the call is repeated with ``transformer="sklearn"``:
    an exact brute-force k-NN search, the one scanpy uses itself on smaller data. The first such retry is
    logged as a warning; afterwards, calls without a ``transformer`` use scikit-learn directly.

    Parameters
    ----------
    adata
        Annotated data matrix.
    use_rep
        Representation to use, a key of ``adata.obsm`` or ``"X"``; ``None`` lets scanpy choose
        (``obsm["X_pca"]`` when present).
    n_neighbors
        Number of nearest neighbours, the cell itself included.
    key_added
        Where to store the graph: ``obsp["connectivities"]``, ``obsp["distances"]`` and ``uns["neighbors"]``
        when ``None``, else ``obsp[f"{key_added}_connectivities"]``, ``obsp[f"{key_added}_distances"]`` and
        ``uns[key_added]``.
    random_state
        Seed of the approximate search.
    **kwargs
        Passed on to :func:`scanpy.pp.neighbors` (``n_pcs``, ``metric``, ``transformer``, ``copy``, …). An
        explicit ``transformer`` is used as given and never replaced; its errors are raised.

    Returns
    -------
    ``None``, or the annotated copy when ``copy=True`` is passed.

    Raises
    ------
    AttributeError
        The ``getnnz`` error when the caller chose the transformer; any other ``AttributeError`` as raised.

    Notes
    -----
    scanpy fails before it writes the graph, so on the retry ``adata`` holds only what scanpy writes before
    the search (``obsm["X_pca"]`` when ``use_rep`` is ``None`` and it has to compute a PCA).

    Examples
    --------
    >>> import scanpy as sc
    >>> from scmixvae._neighbors import leiden, neighbors
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> neighbors(adata, use_rep="X_pca")
    >>> leiden(adata, resolution=1.0)
    >>> adata.obs["leiden"].cat.categories.size > 1
    True
    """
    with keep_thread_settings():
        return _neighbors(
            adata, use_rep=use_rep, n_neighbors=n_neighbors, key_added=key_added, random_state=random_state, **kwargs
        )


def _neighbors(adata: AnnData, **call_kwargs: Any) -> AnnData | None:
    global _GETNNZ_BROKEN
    user_transformer = call_kwargs.get("transformer") is not None
    if _GETNNZ_BROKEN and not user_transformer:
        # Identical to scanpy's own choice wherever it would not pick pynndescent.
        logger.info("scanpy cannot read pynndescent's graph here; computing neighbours with transformer='sklearn'.")
        return sc.pp.neighbors(adata, **{**call_kwargs, "transformer": "sklearn"})
    try:
        return sc.pp.neighbors(adata, **call_kwargs)
    except AttributeError as err:
        if user_transformer or not _is_getnnz_error(err):
            raise
        _GETNNZ_BROKEN = True
        logger.warning(
            "sc.pp.neighbors failed with %r (scanpy and scipy versions that do not work together on %d cells); "
            "retrying with transformer='sklearn', an exact k-NN search.",
            str(err),
            adata.n_obs,
        )
    return sc.pp.neighbors(adata, **{**call_kwargs, "transformer": "sklearn"})


def leiden(
    adata: AnnData,
    *,
    resolution: float = 1.0,
    key_added: str = "leiden",
    random_state: int = 0,
    **kwargs: Any,
) -> AnnData | None:
    """Cluster the neighbour graph with :func:`scanpy.tl.leiden`, using scanpy's future defaults.

    Runs the igraph implementation (``flavor="igraph"``, ``n_iterations=2``, ``directed=False``), which is
    faster than leidenalg and does not raise scanpy's ``FutureWarning`` about the default flavor changing.

    Parameters
    ----------
    adata
        Annotated data matrix with a neighbour graph (see :func:`neighbors`).
    resolution
        Higher values give more clusters.
    key_added
        ``obs`` column of the cluster labels (a categorical of strings ``"0"``, ``"1"``, …).
    random_state
        Seed of the optimisation.
    **kwargs
        Passed on to :func:`scanpy.tl.leiden` (``neighbors_key``, ``restrict_to``, ``copy``, …); they override
        the defaults above, ``flavor`` included.

    Returns
    -------
    ``None``, or the annotated copy when ``copy=True`` is passed.
    """
    call_kwargs = {"flavor": "igraph", "n_iterations": 2, "directed": False, **kwargs}
    with keep_thread_settings():
        return sc.tl.leiden(adata, resolution=resolution, key_added=key_added, random_state=random_state, **call_kwargs)
