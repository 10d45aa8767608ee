from __future__ import annotations

from fractions import Fraction

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score

from scmixvae.data import simulate

SMALL = {"n_cells": 600, "n_genes": 300, "n_types": 4, "n_marker_genes": 20, "n_state_genes": 20}


def _log_normalise(x: sp.csr_matrix) -> np.ndarray:
    x = x.toarray()
    return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)


@pytest.fixture(scope="module")
def small() -> ad.AnnData:
    return simulate(**SMALL, seed=3)


@pytest.fixture(scope="module")
def default() -> ad.AnnData:
    return simulate()


def test_counts_are_integer_float32_csr(small):
    x = small.X
    assert type(x) is sp.csr_matrix
    assert x.dtype == np.float32
    assert small.shape == (600, 300)
    assert x.has_sorted_indices
    assert np.all(x.data > 0)
    np.testing.assert_array_equal(x.data, np.rint(x.data))


def test_names_and_obs_columns(small):
    assert small.obs_names[:2].tolist() == ["cell_0", "cell_1"]
    assert small.var_names[:2].tolist() == ["gene_0", "gene_1"]
    assert isinstance(small.obs["type"].dtype, pd.CategoricalDtype)
    assert small.obs["type"].cat.categories.tolist() == ["type_0", "type_1", "type_2", "type_3"]
    assert small.obs["batch"].cat.categories.tolist() == ["batch_0"]
    assert small.obs["state"].dtype == np.float64
    assert small.obs["state"].between(0, 1).all()
    assert (small.obs["library_size"] > 0).all()
    assert "shared_state" not in small.obs


def test_ground_truth_in_uns(small):
    truth = small.uns["simulation"]
    n_types, n_genes = 4, 300
    assert truth["type_programs"].shape == (n_types, n_genes)
    assert truth["state_programs"].shape == (n_types, n_genes)
    assert truth["batch_effects"].shape == (1, n_genes)
    np.testing.assert_array_equal(truth["batch_effects"], 0)
    np.testing.assert_array_equal(truth["shared_program"], np.zeros(n_genes))
    assert truth["params"]["n_cells"] == 600
    assert truth["params"]["type_sizes"] == "unbalanced"
    for t, name in enumerate(small.obs["type"].cat.categories):
        state_genes = truth["state_genes"][name]
        assert len(state_genes) == SMALL["n_state_genes"]
        idx = small.var_names.get_indexer(state_genes)
        assert np.all(truth["state_programs"][t, idx] != 0)
        assert np.count_nonzero(truth["state_programs"][t]) == SMALL["n_state_genes"]
        # state genes are drawn outside the type's own markers
        markers = small.var_names.get_indexer(truth["marker_genes"][name])
        assert np.count_nonzero(truth["type_programs"][t]) == SMALL["n_marker_genes"]
        assert not set(idx) & set(markers)


def test_survives_h5ad_round_trip(tmp_path):
    adata = simulate(**SMALL, n_batches=2, shared_state=True, seed=1)
    adata.write_h5ad(tmp_path / "sim.h5ad")
    back = ad.read_h5ad(tmp_path / "sim.h5ad")
    assert (back.X != adata.X).nnz == 0
    pd.testing.assert_frame_equal(back.obs, adata.obs)
    truth, back_truth = adata.uns["simulation"], back.uns["simulation"]
    assert back_truth["params"] == truth["params"]
    for key in ("type_programs", "state_programs", "shared_program", "batch_effects", "baseline"):
        np.testing.assert_array_equal(back_truth[key], truth[key])
    np.testing.assert_array_equal(back_truth["state_genes"]["type_1"], truth["state_genes"]["type_1"])


def test_h5ad_round_trip_without_shared_state(tmp_path, small):
    small.write_h5ad(tmp_path / "sim.h5ad")
    back = ad.read_h5ad(tmp_path / "sim.h5ad")
    assert len(back.uns["simulation"]["shared_genes"]) == 0


def test_same_seed_same_data_other_seed_other_data(small):
    again = simulate(**SMALL, seed=3)
    assert (again.X != small.X).nnz == 0
    pd.testing.assert_frame_equal(again.obs, small.obs)
    np.testing.assert_array_equal(again.uns["simulation"]["type_programs"], small.uns["simulation"]["type_programs"])
    other = simulate(**SMALL, seed=4)
    assert (other.X != small.X).nnz > 0
    assert not np.array_equal(other.obs["state"], small.obs["state"])


def test_dense_output_equals_sparse(small):
    dense = simulate(**SMALL, seed=3, sparse=False)
    assert isinstance(dense.X, np.ndarray)
    assert dense.X.dtype == np.float32
    np.testing.assert_array_equal(dense.X, small.X.toarray())


def test_unbalanced_sizes_by_default(default):
    sizes = default.obs["type"].value_counts()
    assert 5 <= sizes.max() / sizes.min() <= 10
    assert sizes["type_0"] == sizes.max()


def test_balanced_and_custom_sizes():
    balanced = simulate(**SMALL, type_sizes="balanced").obs["type"].value_counts()
    assert balanced.tolist() == [150] * 4
    custom = simulate(**SMALL, type_sizes=[0.5, 0.25, 0.125, 0.125]).obs["type"].value_counts()
    assert custom.sort_index().tolist() == [300, 150, 75, 75]


def test_counts_look_like_10x(default):
    totals = np.asarray(default.X.sum(axis=1)).ravel()
    assert 1000 < np.median(totals) < 5000
    zeros = 1 - default.X.nnz / np.prod(default.shape)
    assert 0.65 < zeros < 0.9
    assert np.corrcoef(np.log(totals), np.log(default.obs["library_size"]))[0, 1] > 0.9


def test_counts_follow_the_negative_binomial():
    # one type, no programs, no library-size spread: every gene is i.i.d. NB(mu_g, phi_g) across cells
    adata = simulate(
        4000, 50, 1, n_marker_genes=1, n_state_genes=0, type_separation=0.0, library_size_sigma=0.0, seed=5
    )
    truth = adata.uns["simulation"]
    weights = np.exp(truth["baseline"])
    mu = 2500.0 * weights / weights.sum()
    phi = truth["gene_dispersion"]
    x = adata.X.toarray()
    genes = mu > 2  # enough counts for a precise check
    assert genes.sum() >= 5
    np.testing.assert_allclose(x.mean(axis=0)[genes], mu[genes], rtol=0.06)
    np.testing.assert_allclose(x.var(axis=0)[genes], (mu + phi * mu**2)[genes], rtol=0.2)
    rare = mu < 0.05
    np.testing.assert_allclose((x[:, rare] > 0).mean(), mu[rare].mean(), rtol=0.3)


def test_state_tracks_its_types_state_genes(default):
    x = _log_normalise(default.X)
    programs = default.uns["simulation"]["state_programs"]
    for t, name in enumerate(default.obs["type"].cat.categories):
        cells = (default.obs["type"] == name).to_numpy()
        up = programs[t] > 0
        rho = spearmanr(default.obs["state"][cells], x[cells][:, up].mean(axis=1)).statistic
        assert rho > 0.5, (name, rho)
        # another type's state genes do not go up with it (they go slightly down: the means are proportions)
        other = (programs[(t + 1) % len(programs)] > 0) & (programs[t] == 0)
        rho_other = spearmanr(default.obs["state"][cells], x[cells][:, other].mean(axis=1)).statistic
        assert rho_other < 0.2, (name, rho_other)


def test_types_are_recovered_by_pca_and_leiden(default):
    ig = pytest.importorskip("igraph")
    from sklearn.decomposition import PCA
    from sklearn.neighbors import kneighbors_graph

    pcs = PCA(30, random_state=0).fit_transform(_log_normalise(default.X))
    knn = kneighbors_graph(pcs, 15)
    knn = knn.maximum(knn.T).tocoo()
    graph = ig.Graph(n=knn.shape[0], edges=list(zip(knn.row.tolist(), knn.col.tolist(), strict=True))).simplify()
    clusters = graph.community_leiden(objective_function="modularity", resolution=1.0, n_iterations=-1)
    # the state is a gradient inside each type: it does not split types into clusters
    assert len(set(clusters.membership)) == 8
    assert adjusted_rand_score(default.obs["type"], clusters.membership) > 0.9


def test_batches_present_and_effect_visible():
    adata = simulate(**SMALL, n_batches=3, batch_effect=0.5, seed=2)
    assert adata.obs["batch"].cat.categories.tolist() == ["batch_0", "batch_1", "batch_2"]
    assert adata.obs["batch"].value_counts().min() > 100
    effects = adata.uns["simulation"]["batch_effects"]
    assert effects.shape == (3, 300)
    x = adata.X.toarray()
    in_batch = [(adata.obs["batch"] == f"batch_{k}").to_numpy() for k in (0, 1)]
    means = [x[cells].sum(axis=0) / x[cells].sum() for cells in in_batch]
    expressed = np.minimum(*means) * 1e4 > 5
    log_ratio = np.log(means[0][expressed] / means[1][expressed])
    assert np.corrcoef(log_ratio, (effects[0] - effects[1])[expressed])[0, 1] > 0.8


def test_shared_state_program():
    adata = simulate(**SMALL, shared_state=True, seed=6)
    truth = adata.uns["simulation"]
    assert adata.obs["shared_state"].between(0, 1).all()
    assert np.count_nonzero(truth["shared_program"]) == SMALL["n_state_genes"]
    assert set(truth["shared_genes"]) == set(adata.var_names[truth["shared_program"] != 0])
    up = truth["shared_program"] > 0
    rho = spearmanr(adata.obs["shared_state"], _log_normalise(adata.X)[:, up].mean(axis=1)).statistic
    assert rho > 0.5


def test_shared_program_alone_has_its_own_size():
    adata = simulate(**{**SMALL, "n_state_genes": 0}, shared_state=True, n_shared_genes=25, seed=6)
    truth = adata.uns["simulation"]
    assert not truth["state_programs"].any()
    assert np.count_nonzero(truth["shared_program"]) == 25 == len(truth["shared_genes"])
    assert truth["params"]["n_shared_genes"] == 25
    up = truth["shared_program"] > 0
    rho = spearmanr(adata.obs["shared_state"], _log_normalise(adata.X)[:, up].mean(axis=1)).statistic
    assert rho > 0.5


def test_shared_program_size_defaults_to_the_state_programs():
    default = simulate(**SMALL, shared_state=True, seed=2)
    explicit = simulate(**SMALL, shared_state=True, n_shared_genes=SMALL["n_state_genes"], seed=2)
    assert (default.X != explicit.X).nnz == 0
    with pytest.raises(ValueError, match="n_shared_genes"):
        simulate(**SMALL, shared_state=True, n_shared_genes=SMALL["n_genes"] + 1)
    # without the shared program the size was ignored, yet recorded in uns["simulation"]["params"]
    with pytest.raises(ValueError, match=r"`n_shared_genes` \(10\) sizes the shared program, .*shared_state=True"):
        simulate(**SMALL, n_shared_genes=10)
    assert simulate(**SMALL, seed=2).uns["simulation"]["params"]["n_shared_genes"] == 0  # recorded the default 40
    # no state programs and no size given: a shared program of no gene, which changed nothing
    with pytest.raises(
        ValueError, match=r"shared_state=True with n_state_genes=0: .*give its size with n_shared_genes"
    ):
        simulate(**{**SMALL, "n_state_genes": 0}, shared_state=True)


def test_program_sizes_default_to_what_the_genes_allow():
    assert simulate(200, 100, 2).uns["simulation"]["params"]["n_state_genes"] == 40
    few = simulate(100, 20, 2)
    assert few.uns["simulation"]["params"]["n_marker_genes"] == 10
    assert few.uns["simulation"]["params"]["n_state_genes"] == 10
    assert simulate(10, 2, 1).shape == (10, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_cells": 0}, "n_cells"),
        ({"n_genes": -1}, "n_genes"),
        ({"n_genes": 1, "n_types": 3}, "`n_genes` must be >= 2, got 1"),  # one gene: every type alike
        ({"n_types": 0}, "n_types"),
        ({"n_cells": 5, "n_types": 8}, "must not exceed `n_cells`"),
        ({"n_marker_genes": 2000}, "n_marker_genes"),
        ({"n_state_genes": 990}, "n_state_genes"),
        ({"n_batches": 0}, "n_batches"),
        ({"type_sizes": "skewed"}, "type_sizes"),
        ({"type_sizes": [0.5, 0.5]}, "one proportion per type"),
        ({"n_types": 2, "type_sizes": ["0.25", "0.75"]}, "a sequence of numbers"),
        ({"type_sizes": [0.2] * 8}, "sum to 1"),
        ({"type_sizes": [0.5, -0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]}, "positive"),
        ({"library_size_mean": 0.0}, "library_size_mean"),
        ({"dispersion": 0.0}, "dispersion"),
        ({"dispersion": float("nan")}, "dispersion"),
        ({"batch_effect": -1.0}, "batch_effect"),
        ({"state_strength": -0.5}, "state_strength"),
        ({"seed": -1}, "seed"),
        # beyond these, exp() overflowed (cells without counts), numpy's Poisson failed, the NB tail was cut, or
        # the seed could not be written to h5ad
        ({"state_strength": 500.0}, r"`state_strength` must be >= 0.0 and <= 20.0, got 500"),
        ({"type_separation": 1e308}, r"`type_separation` must be >= 0.0 and <= 20.0"),
        ({"library_size_mean": 1e20}, r"`library_size_mean` must be > 0.0 and <= 100000000.0"),
        ({"dispersion": 1e5}, r"`dispersion` must be > 0.0 and <= 100.0"),
        ({"seed": 2**70}, r"`seed` must be in \[0, 18446744073709551615\]"),
    ],
)
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"n_cells": 2.5}, {"n_genes": True}, {"type_separation": Fraction(1, 2)}, {"seed": "1"}]
)
def test_parameters_of_the_wrong_type_raise_a_type_error(kwargs):
    with pytest.raises(TypeError, match=f"`{next(iter(kwargs))}` must be"):
        simulate(**kwargs)


def test_flags_must_be_bool():
    with pytest.raises(TypeError, match="shared_state"):
        simulate(**SMALL, shared_state="yes")
