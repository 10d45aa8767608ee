from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse
from sklearn.neighbors import KNeighborsTransformer

from scmixvae import _neighbors
from scmixvae._neighbors import leiden, neighbors

GETNNZ_MSG = "'csr_array' object has no attribute 'getnnz'"


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    # Each test starts as a fresh process would: no getnnz failure seen yet.
    monkeypatch.setattr(_neighbors, "_GETNNZ_BROKEN", False)


def _random_adata(n_obs: int, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    adata = ad.AnnData(sparse.csr_matrix((n_obs, 5), dtype=np.float32))
    adata.obsm["X_rep"] = rng.normal(size=(n_obs, 10)).astype(np.float32)
    return adata


class _FastArrayTransformer:
    """Stands in for pynndescent ≥ 0.6: exact k-NN, returned as a scipy sparse *array* (what breaks scanpy 1.11)."""

    def __init__(self, n_neighbors: int = 15, metric: str = "euclidean", **kwargs):
        self.n_neighbors, self.metric = n_neighbors, metric

    def fit_transform(self, x):
        knn = KNeighborsTransformer(n_neighbors=self.n_neighbors - 1, metric=self.metric, algorithm="brute")
        return sparse.csr_array(knn.fit_transform(x))


def test_neighbors_5000_cells_writes_graph():
    adata = _random_adata(5000)
    neighbors(adata, use_rep="X_rep", n_neighbors=15)
    conn, dist = adata.obsp["connectivities"], adata.obsp["distances"]
    assert conn.shape == (5000, 5000)
    assert dist.shape == (5000, 5000)
    # k - 1 neighbours per cell besides itself, no self-loops.
    np.testing.assert_array_equal(np.diff(dist.indptr), 14)
    assert conn.diagonal().sum() == 0
    assert adata.uns["neighbors"]["params"]["n_neighbors"] == 15


def test_neighbors_key_added():
    adata = _random_adata(300)
    neighbors(adata, use_rep="X_rep", key_added="rep")
    assert set(adata.obsp) == {"rep_connectivities", "rep_distances"}
    assert adata.uns["rep"]["connectivities_key"] == "rep_connectivities"


def test_neighbors_handles_sparse_array_from_pynndescent(monkeypatch):
    # 5,000 cells with a non-euclidean metric make scanpy pick pynndescent; the stand-in returns the same
    # csr_array type without numba compilation. On a broken scanpy/scipy pair this exercises the real retry.
    import pynndescent

    monkeypatch.setattr(pynndescent, "PyNNDescentTransformer", _FastArrayTransformer)
    adata = _random_adata(5000)
    neighbors(adata, use_rep="X_rep", metric="cosine")
    expected = _random_adata(5000)
    sc.pp.neighbors(expected, use_rep="X_rep", metric="cosine", transformer="sklearn")
    assert adata.obsp["connectivities"].shape == (5000, 5000)
    np.testing.assert_allclose(
        adata.obsp["connectivities"].toarray(), expected.obsp["connectivities"].toarray(), atol=1e-6
    )


def test_neighbors_retries_getnnz_error_with_sklearn(monkeypatch, caplog):
    real = sc.pp.neighbors
    calls = []

    def fake(adata, **kwargs):
        calls.append(kwargs.get("transformer"))
        if kwargs.get("transformer") is None:
            raise AttributeError(GETNNZ_MSG)
        return real(adata, **kwargs)

    monkeypatch.setattr(sc.pp, "neighbors", fake)
    adata = _random_adata(200)
    with caplog.at_level(logging.WARNING, logger="scmixvae._neighbors"):
        neighbors(adata, use_rep="X_rep")
    assert calls == [None, "sklearn"]
    assert adata.obsp["connectivities"].shape == (200, 200)
    assert any("getnnz" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

    # Later calls go straight to scikit-learn.
    neighbors(_random_adata(100), use_rep="X_rep")
    assert calls == [None, "sklearn", "sklearn"]


def test_neighbors_reraises_other_errors(monkeypatch):
    def fake(adata, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(sc.pp, "neighbors", fake)
    adata = _random_adata(100)
    with pytest.raises(AttributeError, match="shape"):
        neighbors(adata, use_rep="X_rep")
    assert not _neighbors._GETNNZ_BROKEN
    assert len(adata.obsp) == 0
    assert "neighbors" not in adata.uns


def test_neighbors_reraises_non_attribute_errors(monkeypatch):
    def fake(adata, **kwargs):
        raise ValueError("Did not find X_missing in `.obsm.keys()`. You need to compute it first.")

    monkeypatch.setattr(sc.pp, "neighbors", fake)
    with pytest.raises(ValueError, match="X_missing"):
        neighbors(_random_adata(100), use_rep="X_missing")


def test_neighbors_keeps_user_transformer(monkeypatch):
    calls = []

    def fake(adata, **kwargs):
        calls.append(kwargs.get("transformer"))
        raise AttributeError(GETNNZ_MSG)

    monkeypatch.setattr(sc.pp, "neighbors", fake)
    with pytest.raises(AttributeError, match="getnnz"):
        neighbors(_random_adata(100), use_rep="X_rep", transformer="pynndescent")
    assert calls == ["pynndescent"]


def test_leiden_labels_every_cell():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=10.0, size=(3, 10))
    truth = np.repeat(np.arange(3), 100)
    adata = _random_adata(300)
    adata.obsm["X_rep"] = (centres[truth] + rng.normal(size=(300, 10))).astype(np.float32)
    neighbors(adata, use_rep="X_rep")
    leiden(adata, resolution=0.5, key_added="cl")
    labels = adata.obs["cl"]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    assert labels.notna().all()
    assert labels.nunique() == 3
    # Three well-separated blobs come back as three clusters, one per blob.
    assert all(labels[truth == k].nunique() == 1 for k in range(3))
    assert adata.uns["cl"]["params"]["resolution"] == 0.5
