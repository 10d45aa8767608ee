import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score

from scmixvae.data import simulate
from scmixvae.model import CplMixVAE
from scmixvae.model import _start as _init


@pytest.fixture(scope="module")
def separated():
    return simulate(n_cells=400, n_genes=150, n_types=4, type_separation=2.0, seed=3)


def test_log_normalised_matches_dense_formula(separated):
    x, rows = _init.log_normalised(separated.X)
    dense = separated.X.toarray()
    expected = np.log1p(dense / dense.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(x.toarray(), expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(rows, np.arange(separated.n_obs))
    sub, rows = _init.log_normalised(separated.X, max_cells=100)
    assert sub.shape[0] == 100 and len(np.unique(rows)) == 100


def test_leiden_labels_find_k_clusters_matching_the_truth(separated):
    labels = _init.leiden_labels(separated.X, 4, seed=0)
    assert labels.shape == (separated.n_obs,)
    assert len(np.unique(labels)) == 4
    assert adjusted_rand_score(separated.obs["type"], labels) > 0.9


def test_leiden_labels_on_a_subset_extend_to_every_cell(separated):
    labels = _init.leiden_labels(sp.csr_matrix(separated.X), 4, max_cells=200, seed=0)
    assert labels.shape == (separated.n_obs,)
    assert adjusted_rand_score(separated.obs["type"], labels) > 0.8


def test_leiden_init_runs_once_and_is_remembered(separated, tmp_path):
    adata = separated.copy()
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_categories=4, n_hidden=32)
    assert not getattr(model, "category_init_done_", False)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    assert model.category_init_done_
    assert adjusted_rand_score(adata.obs["type"], model.predict()) > 0.8
    model.save(tmp_path / "m", save_anndata=False)
    loaded = CplMixVAE.load(tmp_path / "m", adata=adata)
    assert loaded.category_init_done_


def test_leiden_start_runs_only_before_the_first_training(separated, monkeypatch):
    adata = separated.copy()
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_categories=4, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    head = model.module.category_head.weight.detach().clone()
    monkeypatch.setattr(_init, "leiden_labels", lambda *a, **k: pytest.fail("clustering must not run again"))
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)  # trains on from the weights reached
    assert model.category_init_done_ and not torch.equal(model.module.category_head.weight, head)


def test_removed_category_init_is_refused_by_name(separated):
    adata = separated.copy()
    CplMixVAE.setup_anndata(adata)
    with pytest.raises(TypeError, match=r"'category_init'\. It was removed: the model uses category_init='leiden'"):
        CplMixVAE(adata, category_init="random")


def test_balanced_graph_takes_neighbours_from_every_group_and_is_symmetric():
    rng = np.random.default_rng(0)
    rep = rng.normal(size=(120, 4))
    groups = np.repeat([0, 1, 2], 40)
    rep[groups == 1] += 20.0  # far apart: an ordinary k-NN graph would have no edge between groups
    graph = _init.balanced_knn_graph(rep, groups, n_neighbors=6)
    assert graph.shape == (120, 120)
    assert (graph != graph.T).nnz == 0 and graph.diagonal().sum() == 0
    assert graph.data.min() > 0 and graph.data.max() <= 1
    dense = graph.toarray()
    for g in range(3):  # every cell has at least two neighbours (6 / 3 groups) in every group
        assert ((dense[:, groups == g] > 0).sum(1) >= 2).all()


def test_leiden_init_with_conditions_follows_types_not_conditions():
    # two types, each split by a strong 'condition' program shared by both types
    adata = simulate(n_cells=600, n_genes=200, n_types=2, type_sizes="balanced", seed=1)
    rng = np.random.default_rng(1)
    stim = rng.random(adata.n_obs) < 0.5
    x = adata.X.toarray()
    x[np.ix_(stim, np.arange(30))] += rng.poisson(60, size=(stim.sum(), 30))
    matrix = sp.csr_matrix(x)
    plain = _init.leiden_labels(matrix, 2, seed=0)
    balanced = _init.leiden_labels(matrix, 2, seed=0, groups=stim.astype(int))
    assert adjusted_rand_score(adata.obs["type"], plain) < 0.5  # the condition muddles the ordinary graph
    assert adjusted_rand_score(adata.obs["type"], balanced) > 0.9
    assert abs(adjusted_rand_score(stim, balanced)) < 0.05


def test_knn_neighbours_with_conditions_come_equally_from_each_condition():
    from scmixvae.model._start import neighbour_table

    adata = simulate(n_cells=300, n_genes=100, n_types=3, seed=2)
    groups = np.random.default_rng(0).integers(3, size=adata.n_obs)
    plain = neighbour_table(adata.X, n_neighbors=6)
    table = neighbour_table(adata.X, n_neighbors=6, groups=groups)
    assert plain.shape == table.shape == (adata.n_obs, 6)
    assert not (table == np.arange(adata.n_obs)[:, None]).any()
    for g in range(3):  # two neighbours from each of the three conditions
        assert ((groups[table] == g).sum(1) == 2).all()
    assert (groups[table[:, :2]] == 0).all() and (groups[table[:, 4:]] == 2).all()


def test_backed_fit_gives_the_labels_of_the_in_memory_fit(monkeypatch, tmp_path):
    """Backed rows load sorted inside a minibatch: the heads' targets must follow the cells actually loaded."""
    import anndata
    import scvi

    simulate(n_cells=400, n_genes=100, n_types=4, seed=0).write_h5ad(tmp_path / "sim.h5ad")
    fit_heads = _init.fit_categorical_heads
    accuracies, starts, fits = [], [], []
    monkeypatch.setattr(
        _init, "fit_categorical_heads", lambda model, labels, **kw: accuracies.append(fit_heads(model, labels, **kw))
    )
    for backed in (None, "r"):
        adata = anndata.read_h5ad(tmp_path / "sim.h5ad", backed=backed)
        scvi.settings.seed = 0
        CplMixVAE.setup_anndata(adata)
        model = CplMixVAE(adata, n_categories=4, n_hidden=32)
        model.train(max_epochs=2, state_epochs=0, batch_size=64, enable_progress_bar=False)
        starts.append(model._initial_labels)
        fits.append(model.predict(soft=True))
    np.testing.assert_array_equal(starts[0], starts[1])
    assert accuracies[0] > 0.9 and accuracies[1] == pytest.approx(accuracies[0])
    np.testing.assert_array_equal(fits[1].to_numpy().argmax(1), fits[0].to_numpy().argmax(1))
    np.testing.assert_allclose(fits[1].to_numpy(), fits[0].to_numpy(), atol=1e-5)


def test_start_is_balanced_over_batches_and_follows_the_types():
    # a strong batch effect: an ordinary k-NN graph splits the cells by batch as much as by type
    adata = simulate(n_cells=600, n_genes=200, n_types=3, type_sizes="balanced", n_batches=2, batch_effect=1.0, seed=1)
    CplMixVAE.setup_anndata(adata, batch_key="batch")
    model = CplMixVAE(adata, n_categories=3, n_hidden=16)
    plain = _init.leiden_labels(adata.X, 3, seed=0)
    start = _init.initial_partition(model)
    assert adjusted_rand_score(adata.obs["type"], plain) < 0.5
    assert adjusted_rand_score(adata.obs["type"], start) > 0.9
    assert abs(adjusted_rand_score(adata.obs["batch"], start)) < 0.05
    np.testing.assert_array_equal(_init.balance_groups(model), adata.obs["batch"].cat.codes.to_numpy())


def test_start_groups_are_the_combinations_of_batch_and_condition():
    adata = simulate(n_cells=200, n_genes=60, n_types=2, n_batches=2, seed=0)
    adata.obs["condition"] = np.where(np.arange(adata.n_obs) % 3 == 0, "stim", "ctrl")
    CplMixVAE.setup_anndata(adata, batch_key="batch", condition_key="condition")
    groups = _init.balance_groups(CplMixVAE(adata, n_categories=2, n_hidden=16))
    pairs = adata.obs["batch"].astype(str) + "/" + adata.obs["condition"]
    assert len(np.unique(groups)) == 4
    assert adjusted_rand_score(pairs, groups) == 1.0  # one group per (batch, condition) pair
    CplMixVAE.setup_anndata(adata)
    assert _init.balance_groups(CplMixVAE(adata, n_categories=2, n_hidden=16)) is None
