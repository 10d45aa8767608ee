"""Augmentation options: the agents' training views, the neighbour loader and the learned augmenter."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch
from scvi import REGISTRY_KEYS

from scmixvae._constants import NEIGHBOUR_X_KEY
from scmixvae.data import simulate
from scmixvae.model import CplMixVAE
from scmixvae.model._model import default_max_epochs
from scmixvae.model._start import neighbour_table
from scmixvae.module import AugmenterModule, CplMixVAEModule
from scmixvae.module._augment import mix_neighbours, thin_counts

OPTIONS = ["dropout", "thinning", "knn", "learned"]


def _batch(n_cells=40, n_genes=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.full((n_cells, n_genes), 2.0), generator=g)
    x[:, 0] += 1  # no empty cell
    return x


def _views(module, x, x_neighbour=None):
    library = x.sum(-1, keepdim=True)
    x_norm = module.normalise(x, library)
    nonzero = x.nonzero(as_tuple=True) if module.training else None
    return module._augment(x, x_norm, library, nonzero, x_neighbour), x_norm


@pytest.mark.parametrize("augmentation", OPTIONS)
def test_each_option_changes_the_training_views_and_not_the_read_out_input(augmentation):
    torch.manual_seed(0)
    module = CplMixVAEModule(30, n_agents=2, n_categories=3, augmentation=augmentation, input_dropout=0.0)
    if module.augmenter is not None:
        module.augmenter.trained.fill_(True)
    x = _batch()
    neighbour = _batch(seed=1) if augmentation == "knn" else None
    module.train()
    views, x_norm = _views(module, x, neighbour)
    if augmentation == "dropout":  # no dropout asked for: every agent reads the real cell
        assert views is x_norm
    else:
        assert views.shape == (2, *x.shape)
        assert not torch.allclose(views[0], x_norm) and not torch.allclose(views[0], views[1])
        assert torch.all(views >= 0)
    module.eval()
    views, x_norm = _views(module, x, neighbour)
    assert views is x_norm


def test_dropout_zeroes_only_non_zero_entries_independently_per_agent():
    torch.manual_seed(0)
    module = CplMixVAEModule(30, n_agents=3, n_categories=3, input_dropout=0.5).train()
    x = _batch()
    x[:, 5] = 0
    views, x_norm = _views(module, x)
    assert views.shape == (3, *x.shape)
    assert torch.all(views[:, :, 5] == 0)
    kept = views > 0
    assert 0.4 < kept.float().mean() / (x > 0).float().mean() < 0.6
    torch.testing.assert_close(views[kept], (x_norm.expand(3, -1, -1) / 0.5)[kept])
    assert not torch.equal(kept[0], kept[1])


def test_thinning_keeps_integer_counts_below_the_original():
    torch.manual_seed(0)
    x = _batch(200, 50)
    rows, cols = x.nonzero(as_tuple=True)
    thinned, library = thin_counts(x[rows, cols], rows, x.shape[0], 2, 0.3)
    assert thinned.shape == (2, rows.shape[0])
    assert torch.equal(thinned, thinned.round()) and torch.all(thinned <= x[rows, cols])
    assert abs(float(thinned.sum() / (2 * x.sum())) - 0.7) < 0.02
    dense = torch.zeros((2, *x.shape))
    dense[:, rows, cols] = thinned
    torch.testing.assert_close(library, dense.sum(-1))


def test_neighbour_mixing_weights_stay_within_the_strength():
    torch.manual_seed(0)
    x, other = _batch(seed=0), _batch(seed=1)
    library = x.sum(-1, keepdim=True)
    torch.testing.assert_close(mix_neighbours(x, library, other, 2, 0.0)[0], torch.log1p(x * 1e4 / library))
    mixed = torch.expm1(mix_neighbours(x, library, other, 2, 0.5))
    own, nb = x * 1e4 / library, other * 1e4 / other.sum(-1, keepdim=True)
    w = ((mixed - own) * (nb - own)).sum(-1) / ((nb - own) ** 2).sum(-1)  # least-squares weight per view and cell
    assert torch.all(w > -1e-4) and torch.all(w < 0.5 + 1e-4)


def test_neighbour_table_excludes_the_cell_and_finds_its_type():
    adata = simulate(n_cells=300, n_genes=200, n_types=3, type_separation=3.0, seed=0)
    table = neighbour_table(adata.X, n_neighbors=10)
    assert table.shape == (300, 10) and table.dtype == np.int64
    assert not np.any(table == np.arange(300)[:, None])
    types = adata.obs["type"].to_numpy()
    assert (types[table] == types[:, None]).mean() > 0.9


def test_knn_training_loads_a_neighbours_counts_and_detaches_the_table(sim_adata):
    scvi.settings.seed = 0
    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3, n_hidden=16, augmentation="knn")
    seen = []
    original = model.module.inference

    def spy(*args, **kwargs):
        if model.module.training:
            x = kwargs["x"]  # a sparse CSR minibatch on the CPU
            seen.append((x.to_dense() if x.layout == torch.sparse_csr else x.clone(), kwargs["x_neighbour"]))
        return original(*args, **kwargs)

    model.module.inference = spy
    model.train(max_epochs=1, batch_size=100, enable_progress_bar=False)
    assert model.neighbours_.shape == (sim_adata.n_obs, 15)
    assert model.adata_manager.neighbours is None
    x, neighbour = seen[-1]  # a training step's minibatch (the Leiden start's head fit, before it, reads none)
    assert neighbour is not None and neighbour.shape == x.shape
    dense = np.asarray(sim_adata.X.toarray())
    cells = [int(np.flatnonzero((dense == row).all(1))[0]) for row in x.numpy()[:10]]
    for cell, row in zip(cells, neighbour.numpy()[:10], strict=True):
        candidates = dense[model.neighbours_[cell]]
        assert (candidates == row).all(1).any()
    loader = model._make_data_loader(adata=sim_adata, batch_size=50)
    assert NEIGHBOUR_X_KEY not in next(iter(loader))  # read-outs load the real cells only
    # a fit that is all state phase makes no views: no neighbours' counts are loaded
    seen.clear()
    model.train(max_epochs=0, state_epochs=1, batch_size=100, enable_progress_bar=False)
    assert seen and all(neighbour is None for _, neighbour in seen)


def test_neighbour_dataset_reads_backed_anndata(sim_adata, tmp_path):
    import anndata

    sim_adata.X = sp.csr_matrix(sim_adata.X)
    sim_adata.write_h5ad(tmp_path / "sim.h5ad")
    backed = anndata.read_h5ad(tmp_path / "sim.h5ad", backed="r")
    CplMixVAE.setup_anndata(backed)
    model = CplMixVAE(backed, n_categories=3, n_hidden=16, augmentation="knn")
    model.neighbours_ = np.roll(np.arange(backed.n_obs), 1)[:, None]  # neighbour of cell i: cell i - 1
    model.adata_manager.neighbours = model.neighbours_
    batch = model.adata_manager.create_torch_dataset()[np.array([7, 3, 5])]
    dense = sim_adata.X.toarray()
    np.testing.assert_array_equal(batch[REGISTRY_KEYS.X_KEY], dense[[3, 5, 7]])
    np.testing.assert_array_equal(batch[REGISTRY_KEYS.INDICES_KEY], [[3], [5], [7]])
    np.testing.assert_array_equal(batch[NEIGHBOUR_X_KEY], dense[[2, 4, 6]])


@pytest.mark.parametrize("backed", [None, "r"])
def test_training_minibatches_carry_the_indices_of_their_rows(sim_adata, tmp_path, backed):
    import anndata

    sim_adata.write_h5ad(tmp_path / "sim.h5ad")
    adata = anndata.read_h5ad(tmp_path / "sim.h5ad", backed=backed)
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_categories=3, n_hidden=16)
    order = np.random.default_rng(0).permutation(adata.n_obs)
    with model.adata_manager.indexed_minibatches():
        loader = model._make_data_loader(adata=adata, indices=order, batch_size=64, shuffle=False)
    assert not model.adata_manager.carry_indices
    dense, seen = sim_adata.X.toarray(), []
    for batch in loader:
        cells = batch[REGISTRY_KEYS.INDICES_KEY].numpy().reshape(-1)
        np.testing.assert_array_equal(batch[REGISTRY_KEYS.X_KEY].numpy(), dense[cells])
        seen.append(cells)
    asked = [np.sort(order[start : start + 64]) for start in range(0, len(order), 64)]
    np.testing.assert_array_equal(np.concatenate(seen), np.concatenate(asked))  # each minibatch's rows, sorted
    assert REGISTRY_KEYS.INDICES_KEY not in next(iter(model._make_data_loader(adata=adata, batch_size=64)))


def test_learned_augmenter_trains_on_the_same_targets_backed(sim_adata, tmp_path):
    import anndata

    sim_adata.write_h5ad(tmp_path / "sim.h5ad")
    histories = []
    for backed in (None, "r"):
        adata = anndata.read_h5ad(tmp_path / "sim.h5ad", backed=backed)
        scvi.settings.seed = 0
        CplMixVAE.setup_anndata(adata)
        model = CplMixVAE(adata, n_categories=3, n_hidden=16, augmentation="learned")
        histories.append(model.train_augmenter(3, labels=adata.obs["type"].to_numpy(), batch_size=64))
    assert histories[0]["classification"].iloc[-1] < histories[0]["classification"].iloc[0]
    pd.testing.assert_frame_equal(histories[1], histories[0], rtol=1e-6)


def test_every_augmenter_loss_term_passes_gradient_to_what_it_trains():
    torch.manual_seed(0)
    augmenter = AugmenterModule(30, 3, n_hidden=16)
    x = torch.log1p(_batch())
    labels = torch.randint(3, (x.shape[0],))
    expected = {
        "reconstruction": {"encoder", "decoder"},
        "kl": {"encoder"},
        "classification": {"classifier"},
        "preservation": {"encoder", "decoder"},
    }
    for term, parts in expected.items():
        augmenter.zero_grad()
        augmenter.loss(x, labels)[term].backward()
        for part in ("encoder", "decoder", "classifier"):
            grads = [p.grad for p in getattr(augmenter, part).parameters()]
            moved = any(g is not None and float(g.abs().sum()) > 0 for g in grads)
            assert moved == (part in parts), (term, part)


def test_learned_augmenter_trains_first_and_round_trips(sim_adata, tmp_path):
    scvi.settings.seed = 0
    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3, n_hidden=16, augmentation="learned")
    assert not bool(model.module.augmenter.trained)
    model.train(max_epochs=1, batch_size=100, enable_progress_bar=False)
    assert bool(model.module.augmenter.trained)
    history = model.augmenter_history_
    assert list(history.columns) == ["loss", "reconstruction", "kl", "classification", "preservation"]
    assert len(history) == max(5, round(default_max_epochs(sim_adata.n_obs) / 4))
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    model.save(tmp_path / "m", save_anndata=False)
    loaded = CplMixVAE.load(tmp_path / "m", adata=sim_adata)
    assert bool(loaded.module.augmenter.trained)
    for name, value in model.module.augmenter.state_dict().items():
        assert torch.equal(value, loaded.module.augmenter.state_dict()[name]), name
    pd.testing.assert_frame_equal(model.predict(soft=True), loaded.predict(soft=True))
    np.testing.assert_array_equal(model.get_latent_representation(), loaded.get_latent_representation())


def test_knn_table_round_trips(sim_adata, tmp_path):
    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3, n_hidden=16, augmentation="knn")
    model.train(max_epochs=1, batch_size=100, enable_progress_bar=False)
    model.save(tmp_path / "m", save_anndata=False)
    loaded = CplMixVAE.load(tmp_path / "m", adata=sim_adata)
    np.testing.assert_array_equal(loaded.neighbours_, model.neighbours_)


def test_read_outs_do_not_depend_on_the_augmentation(sim_adata):
    CplMixVAE.setup_anndata(sim_adata)
    models = [CplMixVAE(sim_adata, n_categories=3, n_hidden=16, augmentation=a) for a in ("dropout", "thinning", "knn")]
    for m in models[1:]:
        m.module.load_state_dict(models[0].module.state_dict())
    for m in models:
        m.is_trained_ = True
    ref = models[0].get_latent_representation()
    for m in models[1:]:
        np.testing.assert_array_equal(m.get_latent_representation(), ref)
        pd.testing.assert_frame_equal(m.predict(soft=True), models[0].predict(soft=True))


def test_augmentation_arguments_are_checked(sim_adata):
    CplMixVAE.setup_anndata(sim_adata)
    with pytest.raises(ValueError, match="`augmentation` must be one of"):
        CplMixVAE(sim_adata, augmentation="mixup")
    model = CplMixVAE(sim_adata, n_categories=3)
    with pytest.raises(ValueError, match="only augmentation='learned' has an augmenter"):
        model.train_augmenter()
    learned = CplMixVAE(sim_adata, n_categories=3, augmentation="learned")
    with pytest.raises(ValueError, match="one entry per cell"):
        learned.train_augmenter(labels=np.zeros(5))
    with pytest.raises(ValueError, match="missing values"):
        learned.train_augmenter(labels=np.array(["a", None] * (sim_adata.n_obs // 2), dtype=object))
    with pytest.raises(ValueError, match="at most n_categories=3"):
        learned.train_augmenter(labels=np.arange(sim_adata.n_obs) % 5)


def test_an_augmenter_trained_before_train_is_used_by_every_restart_and_the_fallback(monkeypatch):
    # restarts and the fit without consensus are fresh models: each trained its own augmenter on a Leiden
    # partition, and the kept fit dropped the one the user had trained on known types
    from scmixvae.model import NoConsensusWarning, _pruning

    adata = simulate(n_cells=300, n_genes=80, n_types=3, seed=0)
    CplMixVAE.setup_anndata(adata)
    scvi.settings.seed = 0
    model = CplMixVAE(adata, augmentation="learned", n_hidden=16)
    model.train_augmenter(max_epochs=2, labels=adata.obs["type"].to_numpy())
    encoder = {key: value.clone() for key, value in model.module.augmenter.encoder.state_dict().items()}
    calls = []
    monkeypatch.setattr(CplMixVAE, "train_augmenter", lambda self, *args, **kwargs: calls.append(args))
    # no consensus, whatever the random stream (scanpy 1.10's Leiden start led to a round at 1.0): the fallback fit
    monkeypatch.setattr(_pruning, "mean_consensus", lambda labels, mask: 0.5)
    rounds = {"max_rounds": 1, "epochs_per_round": 1}
    with pytest.warns(NoConsensusWarning):
        model.train(max_epochs=2, state_epochs=0, n_restarts=2, prune_kwargs=rounds, enable_progress_bar=False)
    assert calls == []
    assert model.pruning_history.attrs["fallback_n_categories"] >= 2
    assert all(torch.equal(value, encoder[key]) for key, value in model.module.augmenter.encoder.state_dict().items())
    assert len(model.augmenter_history_) == 2


def test_knn_neighbours_follow_cells_filtered_in_place_between_fits(sim_adata):
    """The table of 300 cells was kept after an in-place filter: training again failed with 'index out of range'."""
    import scanpy as sc

    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3, n_hidden=16, augmentation="knn")
    model.train(max_epochs=1, state_epochs=0, enable_progress_bar=False)
    assert model.neighbours_.shape[0] == 300
    sc.pp.filter_cells(sim_adata, min_counts=int(np.median(np.asarray(sim_adata.X.sum(1)).ravel())))
    n_kept = sim_adata.n_obs
    assert 50 < n_kept < 300
    model.train(max_epochs=1, state_epochs=0, enable_progress_bar=False)
    assert model.neighbours_.shape[0] == n_kept and model.neighbours_.max() < n_kept
