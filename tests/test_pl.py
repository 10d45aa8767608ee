import os
import warnings

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from scmixvae import pl, tl
from scmixvae.data._simulate import simulate
from scmixvae.model import CplMixVAE

KEY = "cplmixvae_state_genes"


@pytest.fixture(scope="module")
def annotated():
    """A model trained 2 epochs and its annotated data with state genes per consensus type."""
    scvi.settings.seed = 0
    adata = simulate(n_cells=300, n_genes=100, n_types=3, type_sizes="balanced", n_state_genes=15, seed=3)
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_categories=3, n_hidden=32)
    model.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    tl.annotate(adata, model)
    tl.rank_state_genes(adata, model, groupby="cplmixvae_type")
    return adata, model


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _save(fig: Figure, path) -> None:
    fig.savefig(path, dpi=40)
    assert path.exists() and path.stat().st_size > 0


def test_consensus_heatmap_from_model_and_matrix(annotated, tmp_path):
    _, model = annotated
    ax = pl.consensus_heatmap(model, show=False)
    assert isinstance(ax, Axes)
    k = model.n_categories
    assert [t.get_text() for t in ax.get_xticklabels()] == model.category_names
    assert ax.images[0].get_array().shape == (k, k)
    fig = pl.consensus_heatmap(model, 1, 0, return_fig=True)
    assert isinstance(fig, Figure)
    _save(fig, tmp_path / "consensus.png")
    matrix = pd.DataFrame(np.eye(3), index=list("abc"), columns=list("abc"))
    _, own_ax = plt.subplots()
    assert pl.consensus_heatmap(matrix, ax=own_ax, show=False) is own_ax
    with pytest.raises(ValueError, match=r"square, got shape \(2, 3\)"):
        pl.consensus_heatmap(np.ones((2, 3)), show=False)
    with pytest.raises(ValueError, match=r"square, got shape \(3,\)"):  # the array's own shape, not a column's
        pl.consensus_heatmap(np.ones(3), show=False)
    with pytest.raises(TypeError, match="CplMixVAE or a square matrix"):
        pl.consensus_heatmap([[1.0]], show=False)


@pytest.mark.parametrize(
    ("name", "wrong"),
    [("n_samples", 0), ("agent", 2), ("n_steps", 1), ("n_genes", 0), ("n_permutations", 0), ("heatmap n_genes", 0),
     ("dotplot n_genes", 0)],
)  # fmt: skip
def test_count_options_take_numpy_integers_and_refuse_other_types(annotated, name, wrong):
    """Hand-written checks refused ``np.int64(5)`` genes (``isinstance(n, int)``) and said ValueError for a string."""
    adata, model = annotated
    group = str(adata.uns[KEY]["traversal"]["groups"][0])
    call = {
        "n_samples": lambda n: model.get_normalized_expression(adata[:10].copy(), n_samples=n),
        "agent": lambda n: tl.state_traversal(model, 0, agent=n),
        "n_steps": lambda n: tl.state_traversal(model, 0, n_steps=n),
        "n_genes": lambda n: tl.get_state_genes(adata, n_genes=n),
        "n_permutations": lambda n: tl.gene_set_enrichment(
            adata, list(adata.var_names[:10]), method="permutation", n_permutations=n
        ),
        "heatmap n_genes": lambda n: pl.state_traversal_heatmap(adata, group, n_genes=n, show=False),
        "dotplot n_genes": lambda n: pl.state_genes_dotplot(adata, n_genes=n, show=False),
    }[name]
    option = name.split()[-1]
    call(np.int64(1 if option == "agent" else 2))
    with pytest.raises(TypeError, match=f"`{option}` must be an integer, got str"):
        call("2")
    with pytest.raises(ValueError, match=f"`{option}` must be"):
        call(wrong)


def test_heatmaps_draw_no_grid_under_a_grid_style(annotated):
    adata, model = annotated
    group = str(adata.uns[KEY]["traversal"]["groups"][0])
    with plt.rc_context({"axes.grid": True}):  # scanpy's set_figure_params style
        axes = [pl.consensus_heatmap(model, show=False), pl.state_traversal_heatmap(adata, group, show=False)]
    for ax in axes:
        assert not any(line.get_visible() for line in ax.get_xgridlines() + ax.get_ygridlines())


def test_state_traversal_heatmap_shows_the_top_genes(annotated, tmp_path):
    adata, _ = annotated
    group = adata.uns[KEY]["names"].dtype.names[0]
    ax = pl.state_traversal_heatmap(adata, group, n_genes=7, show=False)
    assert isinstance(ax, Axes)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(adata.uns[KEY]["names"][group][:7])
    values = ax.images[0].get_array()
    assert values.shape == (7, adata.uns[KEY]["params"]["n_steps"])
    assert np.nanmin(values) >= 0 and np.nanmax(values) <= 1
    fig = pl.state_traversal_heatmap(adata, group, n_genes=5, standard_scale=None, return_fig=True)
    _save(fig, tmp_path / "traversal.png")
    with pytest.raises(ValueError, match="not a group"):
        pl.state_traversal_heatmap(adata, "nope", show=False)
    # an integer names the group, as in tl.get_state_genes (it was refused: "`category`=1 is not a group")
    by_number = pl.state_traversal_heatmap(adata, int(group), n_genes=7, show=False)
    assert [t.get_text() for t in by_number.get_yticklabels()] == list(adata.uns[KEY]["names"][group][:7])


def test_state_traversal_heatmap_draws_the_decoded_ranking_path(annotated, tmp_path):
    adata, model = annotated
    group = adata.uns[KEY]["names"].dtype.names[0]
    ax = pl.state_traversal_heatmap(adata, group, n_genes=3, standard_scale=None, show=False)
    steps, decoded = tl.state_traversal(model, group, adata=adata)
    genes = adata.var_names.get_indexer(adata.uns[KEY]["names"][group][:3])
    np.testing.assert_allclose(ax.images[0].get_array(), decoded[:, genes].T, rtol=1e-5, atol=1e-5)
    assert ax.get_xticklabels()[0].get_text() == f"{steps[0]:+.1f}"
    # the stored path survives a round trip through h5ad; no model is needed to draw it
    path = tmp_path / "ranked.h5ad"
    adata.write_h5ad(path)
    ax = pl.state_traversal_heatmap(ad.read_h5ad(path), group, n_genes=3, standard_scale=None, show=False)
    np.testing.assert_allclose(ax.images[0].get_array(), decoded[:, genes].T, rtol=1e-5, atol=1e-5)


def test_state_traversal_heatmap_rejects_what_it_cannot_draw(annotated):
    adata, _ = annotated
    group = adata.uns[KEY]["names"].dtype.names[0]
    stored = adata.uns[KEY]["traversal"]["expression"].shape[2]
    assert stored == min(50, adata.n_vars)
    with pytest.raises(ValueError, match=rf"`n_genes` must be in \[1, {stored}\], got {stored + 1}"):
        pl.state_traversal_heatmap(adata, group, n_genes=stored + 1, show=False)
    old = adata.copy()
    del old.uns[KEY]["traversal"]["expression"]
    with pytest.raises(ValueError, match="no decoded traversal"):
        pl.state_traversal_heatmap(old, group, show=False)


def test_state_genes_dotplot_wraps_scanpy(annotated, tmp_path):
    adata, _ = annotated
    axes = pl.state_genes_dotplot(adata, n_genes=2, show=False)
    assert isinstance(axes, dict) and isinstance(axes["mainplot_ax"], Axes)
    assert "dendrogram_cplmixvae_type" not in adata.uns  # nothing computed on the data by default
    fig = pl.state_genes_dotplot(adata, n_genes=2, return_fig=True)
    assert isinstance(fig, Figure)
    _save(fig, tmp_path / "dotplot.png")
    # a category without cells (scanpy's own dot plot fails on it) is left out
    data = adata.copy()
    data.obs["cplmixvae_type"] = data.obs["cplmixvae_type"].cat.add_categories(["empty"])
    axes = pl.state_genes_dotplot(data, n_genes=2, show=False)
    assert "empty" not in [t.get_text() for t in axes["mainplot_ax"].get_yticklabels()]
    with pytest.raises(ValueError, match="rank_state_genes first"):
        pl.state_genes_dotplot(adata, key="missing", show=False)


def test_state_genes_dotplot_draws_raw_also_when_it_leaves_an_empty_category_out(annotated):
    # scanpy draws .raw when there is one (here log counts); leaving an empty category out drew the counts of X
    adata, _ = annotated
    data = adata.copy()
    log_counts = sp.csr_matrix(data.X, dtype=np.float32)
    log_counts.data = np.log1p(log_counts.data)
    data.raw = ad.AnnData(X=log_counts, var=data.var)
    ranges = []  # of the mean expression, on the colour bar
    for extra in ([], ["empty"]):
        data.obs["cplmixvae_type"] = data.obs["cplmixvae_type"].cat.add_categories(extra)
        axes = pl.state_genes_dotplot(data, n_genes=2, show=False)
        ranges.append(axes["color_legend_ax"].get_xlim())
    assert ranges[0][1] <= np.log1p(data.X.max())  # the raw log counts, not the counts
    np.testing.assert_allclose(ranges[1], ranges[0], rtol=1e-6)


def test_training_history_panels(annotated, tmp_path, monkeypatch):
    _, model = annotated
    axes = pl.training_history(model, show=False)
    assert isinstance(axes, list) and len(axes) == 2
    labels = {line.get_label() for line in axes[0].get_lines()}
    assert {"reconstruction_agent0", "reconstruction_agent1", "kl_agent0", "kl_agent1"} <= labels
    assert [line.get_label() for line in axes[1].get_lines()] == ["coupling"]
    assert [t.get_text() for t in axes[1].get_legend().get_texts()] == ["agreement", "coupling"]
    twin = [a for a in axes[1].figure.axes if a is not axes[1] and a.bbox.bounds == axes[1].bbox.bounds]
    assert len(twin) == 1 and twin[0].get_ylim() == (0, 1.02)  # the agreement on an axis of its own
    assert [line.get_label() for line in twin[0].get_lines()] == ["agreement"]
    ax = pl.training_history(model, keys=["train_loss"], show=False)
    assert isinstance(ax, Axes) and len(ax.get_lines()) == 1
    pruning = pd.DataFrame({"round": [0, 1, 2], "n_categories": [3, 3, 2]})
    monkeypatch.setattr(type(model), "pruning_history", property(lambda self: pruning), raising=False)
    fig = pl.training_history(model, return_fig=True)
    titled = [a for a in fig.axes if a.get_title()]
    assert isinstance(fig, Figure) and len(titled) == 3
    np.testing.assert_array_equal(titled[-1].get_lines()[0].get_ydata(), [3, 3, 2])
    _save(fig, tmp_path / "history.png")
    for ticks in (titled[-1].get_xticks(), titled[-1].get_yticks()):  # rounds 0.5 and K = 2.5 were labelled
        assert np.array_equal(ticks, np.round(ticks))
    assert titled[-1].get_legend() is None
    pruning.attrs["fallback_n_categories"] = 4  # no round reached consensus: the K fitted instead is drawn
    last = [a for a in pl.training_history(model, return_fig=True).axes if a.get_title()][-1]
    assert list(last.get_lines()[1].get_ydata()) == [4, 4]
    assert [t.get_text() for t in last.get_legend().get_texts()] == ["fitted without consensus: 4"]
    with pytest.raises(ValueError, match=r"not in model\.history"):
        pl.training_history(model, keys=["nope"], show=False)


def test_embedding_colours_types_states_and_genes(annotated, tmp_path):
    adata, _ = annotated
    ax = pl.embedding(adata, show=False)
    assert isinstance(ax, Axes)
    assert len(ax.collections) == adata.obs["cplmixvae_type"].nunique()  # one per category with cells
    assert ax.get_legend() is not None
    fig = pl.embedding(adata, color="state", return_fig=True)
    assert len(fig.axes) == 2  # the scatter and its colour bar
    _save(fig, tmp_path / "embedding_state.png")
    fig, own_ax = plt.subplots()
    assert pl.embedding(adata, color=adata.var_names[0], ax=own_ax, show=False) is own_ax
    assert pl.embedding(adata, color=None, show=False).collections[0].get_offsets().shape == (adata.n_obs, 2)
    with pytest.raises(ValueError, match="No embedding"):
        pl.embedding(adata, basis="umap", show=False)
    with pytest.raises(ValueError, match="neither a column"):
        pl.embedding(adata, color="nope", show=False)
    with pytest.raises(ValueError, match=r"`components` \(0, 0\) must be two different dimensions"):
        pl.embedding(adata, components=(0, 0), show=False)  # drew the state against itself
    one = adata.copy()
    one.obsm["X_cplmixvae_state"] = one.obsm["X_cplmixvae_state"][:, :1]  # a model with n_state=1
    with pytest.raises(ValueError, match=r"has 1 dimension \(a model with n_state=1\); draw it on another embedding"):
        pl.embedding(one, show=False)


def test_embedding_draws_cells_without_a_value_grey(annotated):
    # cells whose colour value is missing were left out of the plot
    adata, _ = annotated
    data = adata.copy()
    half = np.arange(data.n_obs) < data.n_obs // 2
    data.obs["label"] = pd.Categorical(np.where(half, None, "x"))
    data.obs["score"] = np.where(half, np.nan, 1.0)
    for color in ("label", "score"):
        ax = pl.embedding(data, color=color, show=False)
        offsets = np.concatenate([c.get_offsets() for c in ax.collections])
        assert len(offsets) == data.n_obs, color
        grey = [c for c in ax.collections if c.get_label() == "NA"]
        assert len(grey) == 1 and len(grey[0].get_offsets()) == half.sum(), color
    ax = pl.embedding(data, color="label", show=False)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["x", "NA"]


def test_show_true_returns_none(annotated):
    _, model = annotated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Agg cannot show
        assert pl.consensus_heatmap(model, show=True) is None


# ------------------------------------------------------------------------------------------ colours, save, layout
def _facecolors(ax: Axes) -> list[tuple]:
    return [tuple(np.round(c.get_facecolor()[0][:3], 3)) for c in ax.collections]


def _rgb(colours) -> list[tuple]:
    from matplotlib.colors import to_rgb

    return [tuple(np.round(to_rgb(c), 3)) for c in colours]


@pytest.mark.parametrize("n_categories", [3, 12, 25])
def test_embedding_colours_match_scanpy(annotated, n_categories):
    import scanpy as sc

    adata, _ = annotated
    data = adata.copy()
    data.obsm["X_umap"] = data.obsm["X_cplmixvae_state"][:, :2]
    data.obs["group"] = pd.Categorical([f"g{i % n_categories:02d}" for i in range(data.n_obs)])
    ours = pl.embedding(data, basis="umap", color="group", show=False)
    assert "group_colors" not in data.uns  # nothing written to the user's data
    sc.pl.umap(data, color="group", show=False)  # scanpy assigns and stores its default colours
    assert _facecolors(ours) == _rgb(data.uns["group_colors"])
    data.uns["group_colors"] = ["#000000"] * (n_categories - 1) + ["#ff0000"]  # the user's own colours
    assert _facecolors(pl.embedding(data, basis="umap", color="group", show=False))[-1] == (1.0, 0.0, 0.0)


def _inside(fig: Figure, artist) -> bool:
    fig.draw_without_rendering()
    box, frame = artist.get_window_extent(), fig.bbox
    return box.x0 >= frame.x0 - 1 and box.x1 <= frame.x1 + 1 and box.y0 >= frame.y0 - 1 and box.y1 <= frame.y1 + 1


def test_returned_figures_keep_legends_and_gene_labels_inside(annotated):
    adata, _ = annotated
    fig = pl.embedding(adata, return_fig=True)
    assert _inside(fig, fig.axes[0].get_legend())
    group = adata.uns[KEY]["names"].dtype.names[0]
    fig = pl.state_traversal_heatmap(adata, group, return_fig=True)
    labels = fig.axes[0].get_yticklabels()
    assert labels and all(_inside(fig, label) for label in labels)


def test_every_plot_saves_atomically(annotated, tmp_path):
    adata, model = annotated
    group = adata.uns[KEY]["names"].dtype.names[0]
    plots = {
        "embedding.png": lambda save: pl.embedding(adata, show=False, save=save),
        "consensus.pdf": lambda save: pl.consensus_heatmap(model, show=False, save=save),
        "traversal.svg": lambda save: pl.state_traversal_heatmap(adata, group, show=False, save=save),
        "dotplot.png": lambda save: pl.state_genes_dotplot(adata, show=False, save=save),
        "history.png": lambda save: pl.training_history(model, show=False, save=save),
    }
    assert set(pl.__all__) == {"embedding", "consensus_heatmap", "state_traversal_heatmap", "state_genes_dotplot",
                               "training_history"}  # fmt: skip
    for name, plot in plots.items():
        assert plot(tmp_path / name) is not None
        assert (tmp_path / name).stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(plots)  # no temporary files left
    umask = os.umask(0o022)
    os.umask(umask)
    assert all((tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask for name in plots)  # not a temp file's
    header = (tmp_path / "embedding.png").read_bytes()[:8]
    assert header == b"\x89PNG\r\n\x1a\n"


def test_save_checks_the_path_first_and_never_leaves_a_broken_file(annotated, tmp_path, monkeypatch):
    adata, _ = annotated
    plt.close("all")
    with pytest.raises(ValueError, match="file extension"):
        pl.embedding(adata, show=False, save=tmp_path / "types.nope")
    with pytest.raises(ValueError, match="does not exist"):
        pl.embedding(adata, show=False, save=tmp_path / "missing" / "types.png")
    with pytest.raises(TypeError, match="file path"):
        pl.embedding(adata, show=False, save=True)
    assert plt.get_fignums() == []  # refused before drawing
    target = tmp_path / "types.png"
    target.write_bytes(b"the user's earlier figure")

    def broken(self, fname, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        pl.embedding(adata, show=False, save=target)
    assert target.read_bytes() == b"the user's earlier figure"
    assert [p.name for p in tmp_path.iterdir()] == ["types.png"]
