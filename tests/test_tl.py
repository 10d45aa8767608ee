import logging

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scvi
from scipy import sparse, stats

from scmixvae import tl
from scmixvae.data._simulate import simulate
from scmixvae.model import CplMixVAE
from scmixvae.tl._state_genes import gene_std, observed_state_statistics

KEY = "cplmixvae_state_genes"


@pytest.fixture(scope="module")
def fitted():
    """300 cells x 100 genes, 3 types, 2 batches; a model trained 2 epochs (three consensus categories)."""
    scvi.settings.seed = 0
    adata = simulate(n_cells=300, n_genes=100, n_types=3, type_sizes="balanced", n_batches=2, n_state_genes=15, seed=3)
    CplMixVAE.setup_anndata(adata, batch_key="batch")
    model = CplMixVAE(adata, n_categories=3, n_hidden=32)
    model.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    return adata, model


@pytest.fixture(scope="module")
def ranked(fitted):
    """The training data (a copy) with the consensus state genes."""
    adata, model = fitted
    return tl.rank_state_genes(adata, model, copy=True)


# ------------------------------------------------------------------------------------------ rank_state_genes
def test_rank_state_genes_writes_the_rank_genes_groups_schema(fitted, ranked):
    adata, model = fitted
    result = ranked.uns[KEY]
    groups = result["names"].dtype.names
    labels = model.predict(ranked)
    assert set(groups) == set(labels.unique().astype(str))
    for column in ("names", "scores", "logfoldchanges", "pvals", "pvals_adj"):
        assert isinstance(result[column], np.recarray), column
        assert result[column].dtype.names == groups
        assert len(result[column]) == adata.n_vars
    for g in groups:
        assert sorted(result["names"][g]) == sorted(adata.var_names)
        scores = result["scores"][g]
        assert np.all(np.diff(scores) <= 0)
        for p in ("pvals", "pvals_adj"):
            assert np.all((result[p][g] >= 0) & (result[p][g] <= 1))
        assert np.all(result["pvals_adj"][g] >= result["pvals"][g] - 1e-12)
        assert np.isfinite(result["logfoldchanges"][g]).all()
    params = result["params"]
    assert params["groupby"] == f"{KEY}_group"
    assert params["reference"] == "rest"
    assert params["method"] == "cplmixvae_state_traversal"
    assert params["use_raw"] is False
    assert params["corr_method"] == "benjamini-hochberg"
    column = ranked.obs[params["groupby"]]
    assert isinstance(column.dtype, pd.CategoricalDtype)
    assert (column.astype(str).to_numpy() == labels.astype(str).to_numpy()).all()


def test_scores_are_the_change_along_state_traversal_over_the_gene_spread(fitted, ranked):
    adata, model = fitted
    group = ranked.uns[KEY]["names"].dtype.names[0]
    steps, decoded = tl.state_traversal(model, group, adata=ranked)
    assert steps.shape == (10,) and decoded.shape == (10, adata.n_vars)
    np.testing.assert_allclose(steps[[0, -1]], [-3.0, 3.0])
    std = gene_std(adata.X)
    assert (std == 0).any()  # genes without counts: no spread, score 0
    change = np.abs(decoded[-1] - decoded[0])  # the published score: endpoints over the gene's spread
    expected = pd.Series(np.divide(change, std, out=np.zeros_like(change), where=std > 0), index=adata.var_names)
    normalised = tl.rank_state_genes(adata, model, normalize=True, measure="endpoints", copy=True).uns[KEY]
    stored = pd.Series(normalised["scores"][group], index=normalised["names"][group])
    np.testing.assert_allclose(stored[adata.var_names], expected, rtol=1e-4, atol=1e-5)
    raw = ranked.uns[KEY]  # default: normalize=False, measure="range"
    assert raw["params"]["measure"] == "range" and raw["params"]["normalize"] is False
    raw_scores = pd.Series(raw["scores"][group], index=raw["names"][group])
    expected_range = decoded.max(0) - decoded.min(0)
    np.testing.assert_allclose(raw_scores[adata.var_names], expected_range, rtol=1e-4, atol=1e-6)


def test_range_measure_is_at_least_the_endpoint_change(fitted, ranked):
    adata, model = fitted
    ranged = ranked.uns[KEY]
    endpoints = tl.rank_state_genes(adata, model, measure="endpoints", copy=True).uns[KEY]
    for g in ranged["names"].dtype.names:
        end = pd.Series(endpoints["scores"][g], index=endpoints["names"][g])
        rng = pd.Series(ranged["scores"][g], index=ranged["names"][g])
        assert np.all(rng[end.index].to_numpy() >= end.to_numpy() - 1e-5)


def test_integer_axis_moves_along_one_state_dimension(fitted):
    adata, model = fitted
    out = tl.rank_state_genes(adata, model, axis=1, copy=True).uns[KEY]
    directions = out["traversal"]["direction"]
    np.testing.assert_array_equal(directions, np.tile([0.0, 1.0], (len(directions), 1)))
    assert out["params"]["axis"] == "1"
    pc1 = tl.rank_state_genes(adata, model, copy=True).uns[KEY]["traversal"]["direction"]
    np.testing.assert_allclose(np.linalg.norm(pc1, axis=1), 1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"axis": 2}, "out of range"),
        ({"axis": "pc2"}, "axis"),
        ({"axis": True}, "axis"),
        ({"n_steps": 1}, "n_steps"),
        ({"n_sigma": 0}, "n_sigma"),
        ({"agent": 2}, "agent"),
        ({"measure": "max"}, "measure"),
        ({"groupby": "missing"}, "not a column"),
        ({"groupby": "state"}, "categorical"),
    ],
)
def test_bad_arguments_raise_before_any_work(fitted, kwargs, match):
    adata, model = fitted
    before = (set(adata.uns), list(adata.obs.columns))
    with pytest.raises(ValueError, match=match):
        tl.rank_state_genes(adata, model, **kwargs)
    assert (set(adata.uns), list(adata.obs.columns)) == before


def test_model_and_key_types_are_checked(fitted):
    adata, model = fitted
    with pytest.raises(TypeError, match="CplMixVAE"):
        tl.rank_state_genes(adata, object())
    with pytest.raises(TypeError, match="key_added"):
        tl.rank_state_genes(adata, model, key_added="")


def test_groupby_uses_the_majority_category_and_skips_tiny_groups(fitted, caplog):
    adata, model = fitted
    data = adata.copy()
    labels = model.predict(data).astype(str).to_numpy()
    data.obs["ref"] = data.obs["type"].astype(str)
    data.obs.iloc[:2, data.obs.columns.get_loc("ref")] = "tiny"
    data.obs["ref"] = data.obs["ref"].astype("category")
    with caplog.at_level(logging.WARNING, logger="scmixvae.tl._state_genes"):
        tl.rank_state_genes(data, model, groupby="ref")
    assert "tiny" in caplog.text
    traversal = data.uns[KEY]["traversal"]
    assert "tiny" not in data.uns[KEY]["names"].dtype.names
    for group, category in zip(traversal["groups"], traversal["category"], strict=True):
        majority = pd.Series(labels[(data.obs["ref"] == group).to_numpy()]).mode()[0]
        assert category == majority
    assert data.uns[KEY]["params"]["groupby"] == "ref"


def test_nothing_to_rank_raises_and_leaves_the_data_alone(fitted):
    adata, model = fitted
    data = adata.copy()
    data.obs["single"] = pd.Categorical(data.obs_names.astype(str))
    before = set(data.uns)
    with pytest.raises(ValueError, match="nothing to rank"):
        tl.rank_state_genes(data, model, groupby="single")
    assert KEY not in data.uns and set(data.uns) <= before | {"_scvi_uuid", "_scvi_manager_uuid"}


def test_state_traversal_takes_a_category_name_or_index_and_checks_it(fitted):
    _, model = fitted
    name = model.predict().value_counts().idxmax()
    steps, by_name = tl.state_traversal(model, name, n_steps=4, n_sigma=2.0)
    _, by_index = tl.state_traversal(model, int(name), n_steps=4, n_sigma=2.0)
    np.testing.assert_allclose(steps, [-2.0, -2.0 / 3, 2.0 / 3, 2.0])
    np.testing.assert_allclose(by_name, by_index)
    with pytest.raises(ValueError, match="surviving categories"):
        tl.state_traversal(model, "99")


def test_copy_returns_a_new_object_and_leaves_the_original_alone(fitted, ranked):
    adata, _ = fitted
    assert ranked is not adata
    assert KEY not in adata.uns
    assert f"{KEY}_group" not in adata.obs


def test_copy_false_writes_in_place_and_returns_none(fitted):
    adata, model = fitted
    data = adata.copy()
    assert tl.rank_state_genes(data, model, key_added="sg") is None
    assert "sg" in data.uns and "sg_group" in data.obs
    # a ranking by another groupby under the same key removes the groups of the earlier one, which it does not use
    data.obs["ref"] = data.obs["sg_group"].astype(str).astype("category")
    tl.rank_state_genes(data, model, key_added="sg", groupby="ref")
    assert "sg_group" not in data.obs and data.uns["sg"]["params"]["groupby"] == "ref"


def test_results_survive_h5ad_and_scanpy_readers(fitted, tmp_path):
    adata, model = fitted
    data = tl.annotate(adata, model, copy=True)
    tl.rank_state_genes(data, model, groupby="cplmixvae_type")
    path = tmp_path / "ranked.h5ad"
    data.write_h5ad(path)
    back = sc.read_h5ad(path)
    for column in ("names", "scores", "logfoldchanges", "pvals", "pvals_adj"):
        for g in data.uns[KEY]["names"].dtype.names:
            np.testing.assert_array_equal(back.uns[KEY][column][g], data.uns[KEY][column][g])
    assert back.uns[KEY]["params"] == data.uns[KEY]["params"]
    df = sc.get.rank_genes_groups_df(back, group=None, key=KEY)
    n_groups = len(data.uns[KEY]["names"].dtype.names)
    assert len(df) == n_groups * data.n_vars
    assert {"group", "names", "scores", "logfoldchanges", "pvals", "pvals_adj"} <= set(df.columns)


def test_scanpy_dotplot_reads_the_ranking(ranked):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = sc.pl.rank_genes_groups_dotplot(ranked, key=KEY, n_genes=3, show=False, dendrogram=False)
    assert "mainplot_ax" in axes
    n_groups = len(ranked.uns[KEY]["names"].dtype.names)
    labels = [t.get_text() for t in axes["mainplot_ax"].get_xticklabels()]
    assert len(labels) == 3 * n_groups
    plt.close("all")


def test_get_state_genes_is_tidy(ranked):
    groups = ranked.uns[KEY]["names"].dtype.names
    df = tl.get_state_genes(ranked, n_genes=4)
    assert list(df.columns) == ["group", "names", "scores", "logfoldchanges", "pvals", "pvals_adj"]
    assert len(df) == 4 * len(groups)
    one = tl.get_state_genes(ranked, group=groups[0])
    assert len(one) == ranked.n_vars
    assert one["names"].tolist() == list(ranked.uns[KEY]["names"][groups[0]])
    with pytest.raises(ValueError, match="not in uns"):
        tl.get_state_genes(ranked, group="nope")
    # a category's number is read as its name ("TypeError: 'int' object is not iterable"); a repeat counts once
    number = int(groups[0])
    pd.testing.assert_frame_equal(tl.get_state_genes(ranked, group=number), one)
    pd.testing.assert_frame_equal(tl.get_state_genes(ranked, group=[number, groups[0]]), one)
    with pytest.raises(ValueError, match="rank_state_genes first"):
        tl.get_state_genes(ranked, key="missing")


# ------------------------------------------------------------------------------------------ streamed statistics
def test_gene_std_streamed_over_chunks_equals_the_dense_std():
    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(2, 0.6, size=(53, 17)).astype(np.float32)
    counts[5] = 0  # an empty cell
    counts[:, 3] = 0  # a gene never seen
    dense = np.log1p(counts.astype(np.float64) / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
    expected = dense.std(0)
    np.testing.assert_allclose(gene_std(sparse.csr_matrix(counts), chunk_size=7), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gene_std(counts, chunk_size=10), expected, rtol=1e-10, atol=1e-12)
    assert gene_std(sparse.csr_matrix(counts))[3] == 0


def test_rank_state_genes_never_densifies_the_whole_matrix(fitted, monkeypatch):
    adata, model = fitted
    original = sparse.csr_matrix.toarray

    def guarded(self, *args, **kwargs):
        if self.shape[0] > 128:
            raise AssertionError(f"densified {self.shape}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sparse.csr_matrix, "toarray", guarded)
    monkeypatch.setattr(sparse.csr_matrix, "todense", guarded)
    assert sparse.issparse(adata.X)
    out = tl.rank_state_genes(adata, model, batch_size=64, copy=True)
    assert KEY in out.uns


def _positions(model, ranked, group):
    """Each cell of ``group`` on its state axis, from the model's latent and the stored axis."""
    traversal = ranked.uns[KEY]["traversal"]
    j = list(traversal["groups"]).index(group)
    idx = np.flatnonzero(ranked.obs[f"{KEY}_group"].astype(str) == group)
    latent = model.get_latent_representation(ranked)[idx]  # agent 0 given the consensus category, as ranked
    return idx, (latent - traversal["center"][j]) @ traversal["direction"][j]


def test_fold_changes_and_pvalues_are_observed_over_the_cells(fitted, ranked):
    adata, model = fitted
    result = ranked.uns[KEY]
    group = result["names"].dtype.names[0]
    idx, position = _positions(model, ranked, group)
    counts = adata.X[idx].toarray().astype(np.float64)
    normalised = counts / counts.sum(1, keepdims=True) * 1e4
    high, low = position >= np.quantile(position, 0.75), position <= np.quantile(position, 0.25)
    table = sc.get.rank_genes_groups_df(ranked, group, key=KEY).set_index("names")
    for gene in table.index[:3]:
        g = adata.var_names.get_loc(gene)
        lfc = np.log2((normalised[high, g].mean() + 1e-9) / (normalised[low, g].mean() + 1e-9))
        assert table.loc[gene, "logfoldchanges"] == pytest.approx(lfc, rel=1e-4, abs=1e-4)
        test = stats.spearmanr(np.log1p(normalised[:, g]), position)
        assert table.loc[gene, "pvals"] == pytest.approx(test.pvalue, rel=1e-6)
    for g in result["names"].dtype.names:
        np.testing.assert_allclose(result["pvals_adj"][g], stats.false_discovery_control(result["pvals"][g]))
    assert ranked.uns[KEY]["params"]["test"] == "spearman"


def test_pvalue_and_fold_change_filters_select_genes(fitted, ranked):
    adata, _ = fitted
    for group in ranked.uns[KEY]["names"].dtype.names:
        table = sc.get.rank_genes_groups_df(ranked, group, key=KEY)
        kept = sc.get.rank_genes_groups_df(ranked, group, key=KEY, pval_cutoff=0.05, log2fc_min=0.5)
        assert len(kept) < adata.n_vars / 2
        expected = table[(table["pvals_adj"] < 0.05) & (table["logfoldchanges"] > 0.5)]
        assert list(kept["names"]) == list(expected["names"])
    assert (table["pvals_adj"] > 0.05).sum() > adata.n_vars / 2  # most genes are not significant


def test_observed_statistics_find_the_simulated_state_program():
    adata = simulate(
        n_cells=600, n_genes=300, n_types=2, type_sizes="balanced", n_state_genes=10, state_strength=1.5,
        library_size_mean=5000.0, seed=3,
    )  # fmt: skip
    programs = adata.uns["simulation"]["state_genes"]
    for cell_type in ("type_0", "type_1"):
        idx = np.flatnonzero(adata.obs["type"] == cell_type)
        lfc, rho, pvals = observed_state_statistics(adata.X[idx], adata.obs["state"].to_numpy()[idx], max_entries=1000)
        significant = stats.false_discovery_control(pvals) < 0.05
        program = adata.var_names.isin(programs[cell_type])
        assert significant[program].mean() >= 0.8
        assert significant[~program].mean() <= 0.05
        up = program & (adata.uns["simulation"]["state_programs"][int(cell_type[-1])] > 0) & significant
        assert (lfc[up] > 0).all() and (rho[up] > 0).all()


@pytest.mark.parametrize("layout", ["dense", "csr", "csc"])
def test_observed_statistics_are_spearman_of_the_log_normalised_counts_and_leave_the_counts_alone(layout):
    rng = np.random.default_rng(0)
    dense = rng.poisson(rng.gamma(0.5, 2.0, size=(120, 9))).astype(np.float64)
    dense[:, 0] = 0.0  # a gene without counts: rho 0, p 1
    position = rng.normal(size=120)
    counts = {"dense": dense.copy(), "csr": sparse.csr_matrix(dense), "csc": sparse.csc_matrix(dense)}[layout]
    before = counts.copy()
    lfc, rho, pvals = observed_state_statistics(counts, position, max_entries=250)  # blocks of 2 genes
    log_normalised = np.log1p(dense / np.maximum(dense.sum(1, keepdims=True), 1.0) * 1e4)  # empty cells stay 0
    for g in range(1, dense.shape[1]):
        expected = stats.spearmanr(log_normalised[:, g], position)
        assert rho[g] == pytest.approx(expected.statistic, rel=1e-9)
        assert pvals[g] == pytest.approx(expected.pvalue, rel=1e-9)
    assert (rho[0], pvals[0]) == (0.0, 1.0)
    assert lfc.shape == rho.shape == (9,)
    after = counts.toarray() if sparse.issparse(counts) else counts
    np.testing.assert_array_equal(after, before.toarray() if sparse.issparse(before) else before)


# ------------------------------------------------------------------------------------------ gene sets
def test_gene_sets_have_human_and_mouse_symbols():
    ieg_human = tl.gene_sets("immediate_early", "human")
    ieg_mouse = tl.gene_sets("immediate_early", "mouse")
    assert {"FOS", "JUNB", "EGR1", "NR4A1", "ARC", "NPAS4", "DUSP1", "IER2"} <= set(ieg_human)
    assert {"Fos", "Junb", "Egr1", "Nr4a1", "Arc", "Npas4", "Dusp1", "Ier2"} <= set(ieg_mouse)
    isg_human = tl.gene_sets("interferon", "human")
    isg_mouse = tl.gene_sets("interferon", "mouse")
    assert {"ISG15", "IFIT1", "IFIT3", "IFI6", "MX1", "ISG20", "IFITM3", "OAS1", "RSAD2", "LY6E"} <= set(isg_human)
    assert {"Isg15", "Ifit1", "Mx1", "Oas1a", "Rsad2"} <= set(isg_mouse)
    assert "Ifi6" not in isg_mouse
    for genes in (ieg_human, ieg_mouse, isg_human, isg_mouse):
        assert len(genes) == len(set(genes))
    with pytest.raises(ValueError, match="Unknown gene set"):
        tl.gene_sets("neuropeptides", "human")
    with pytest.raises(ValueError, match="species"):
        tl.gene_sets("interferon", "rat")


@pytest.mark.parametrize("method", ["rank", "permutation"])
def test_enrichment_finds_a_top_ranked_set_and_not_a_random_one(ranked, method):
    group = ranked.uns[KEY]["names"].dtype.names[0]
    top = list(ranked.uns[KEY]["names"][group][:10])
    result = tl.gene_set_enrichment(ranked, top, method=method, n_permutations=200)
    assert list(result.columns) == [
        "group", "n_genes_in_set", "statistic", "mean_rank", "pvalue", "pvalue_adj", "n_in_top20",
    ]  # fmt: skip
    assert set(result["group"]) == set(ranked.uns[KEY]["names"].dtype.names)
    assert result[["pvalue", "pvalue_adj"]].apply(lambda c: c.between(0, 1)).all().all()
    row = result.set_index("group").loc[group]
    assert row["pvalue"] < 0.01
    assert row["n_in_top20"] == 10 and row["n_genes_in_set"] == 10
    assert row["mean_rank"] == pytest.approx(5.5)
    # random sets are not enriched: their p-values are calibrated (about uniform), whatever the ranking
    rng = np.random.default_rng(1)
    random_p = np.concatenate(
        [
            tl.gene_set_enrichment(
                ranked, list(rng.choice(ranked.var_names, 10, replace=False)), method=method, n_permutations=100
            )["pvalue"].to_numpy()
            for _ in range(60)
        ]
    )
    assert np.mean(random_p < 0.05) < 0.12
    assert np.median(random_p) > 0.3


def test_enrichment_ignores_absent_genes_and_checks_its_input(ranked, caplog):
    genes = [*list(ranked.var_names[:5]), "NOT_A_GENE"]
    with caplog.at_level(logging.INFO, logger="scmixvae.tl._gene_sets"):
        result = tl.gene_set_enrichment(ranked, genes)
    assert "1 of 6 genes" in caplog.text
    assert (result["n_genes_in_set"] == 5).all()
    with pytest.raises(ValueError, match="None of the genes"):
        tl.gene_set_enrichment(ranked, ["FOS", "JUNB"])
    with pytest.raises(ValueError, match="rank_state_genes first"):
        tl.gene_set_enrichment(ranked, genes, key="missing")
    with pytest.raises(TypeError, match="sequence of gene names"):
        tl.gene_set_enrichment(ranked, "FOS")
    with pytest.raises(ValueError, match="method"):
        tl.gene_set_enrichment(ranked, genes, method="gsea")


def test_enrichment_takes_any_mapping_of_gene_sets(ranked, caplog):
    group = ranked.uns[KEY]["names"].dtype.names[0]
    names = list(ranked.uns[KEY]["names"][group])
    sets = {"top": names[:10], "bottom": names[-10:], "absent": ["NOT_A_GENE"]}
    with caplog.at_level(logging.INFO, logger="scmixvae.tl._gene_sets"):
        result = tl.gene_set_enrichment(ranked, sets)
    assert "set 'absent' is in adata.var_names; it is skipped" in caplog.text
    assert list(result.columns[:2]) == ["gene_set", "group"]
    assert set(result["gene_set"]) == {"top", "bottom"}
    rows = result.set_index(["gene_set", "group"])
    assert rows.loc[("top", group), "pvalue"] < 0.01 and rows.loc[("bottom", group), "pvalue"] > 0.9
    np.testing.assert_allclose(result["pvalue_adj"], stats.false_discovery_control(result["pvalue"]))
    # one set as a sequence gives the same numbers as in a mapping, without the gene_set column
    single = tl.gene_set_enrichment(ranked, names[:10])
    np.testing.assert_allclose(single["pvalue"], rows.loc["top", "pvalue"].to_numpy())
    with pytest.raises(ValueError, match="None of the genes"):  # the built-in human sets: absent from simulated genes
        tl.gene_set_enrichment(ranked)
    with pytest.raises(TypeError, match="Gene set 'x' must be a sequence"):
        tl.gene_set_enrichment(ranked, {"x": "FOS"})
    with pytest.raises(ValueError, match="empty mapping"):
        tl.gene_set_enrichment(ranked, {})


def test_enrichment_refuses_a_ranking_cut_to_each_groups_top_genes(ranked):
    # among a group's top genes alone, a set that ranks high overall looked like chance (p = 1) without a word
    data = ranked.copy()
    data.obs["group"] = data.obs["type"].astype(str).astype("category")
    sc.tl.rank_genes_groups(data, "group", method="t-test", n_genes=20, key_added="top20")
    group = data.uns["top20"]["names"].dtype.names[0]
    genes = list(data.uns["top20"]["names"][group][:5])
    with pytest.raises(ValueError, match=r"ranks only each group's top 20 of the 100 genes; .* n_genes=None"):
        tl.gene_set_enrichment(data, genes, key="top20")
    # the same genes ranked in every group (scanpy's mask_var) are a universe of their own
    mask = np.zeros(data.n_vars, dtype=bool)
    mask[:60] = True
    sc.tl.rank_genes_groups(data, "group", method="t-test", mask_var=mask, key_added="masked")
    result = tl.gene_set_enrichment(data, list(data.var_names[:5]), key="masked")
    assert (result["n_genes_in_set"] == 5).all()


def test_enrichment_defaults_to_the_built_in_sets(ranked):
    data = ranked.copy()
    data.var_names = [*tl.gene_sets("interferon")[:10], *tl.gene_sets("immediate_early")[:5], *data.var_names[15:]]
    ranking = data.uns[KEY]
    mapping = dict(zip(ranked.var_names, data.var_names, strict=True))
    for g in ranking["names"].dtype.names:
        ranking["names"][g] = [mapping[n] for n in ranking["names"][g]]
    result = tl.gene_set_enrichment(data)
    assert set(result["gene_set"]) == {"interferon", "immediate_early"}
    assert set(result.loc[result["gene_set"] == "interferon", "n_genes_in_set"]) == {10}


# ------------------------------------------------------------------------------------------ differential expression
@pytest.fixture(scope="module")
def converged():
    """A model trained long enough (50 epochs, lr 5e-3: a few seconds) for its decoder to carry the markers."""
    scvi.settings.seed = 0
    adata = simulate(n_cells=400, n_genes=150, n_types=3, type_sizes="balanced", n_state_genes=20, seed=0)
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_categories=3, n_hidden=32, likelihood="nb")  # count scales: sum to one
    model.train(max_epochs=50, state_epochs=0, batch_size=64, enable_progress_bar=False, plan_kwargs={"lr": 5e-3})
    tl.annotate(adata, model)
    return adata, model


def test_differential_expression_between_types_ranks_the_markers(converged):
    from sklearn.metrics import roc_auc_score

    adata, model = converged
    de = model.differential_expression(groupby="cplmixvae_type", mode="change", silent=True)
    expected = {"lfc_mean", "lfc_std", "bayes_factor", "proba_de", "scale1", "scale2", "group1", "group2"}
    assert expected <= set(de.columns)
    types = list(adata.obs["type"].cat.categories)
    programs = adata.uns["simulation"]["type_programs"]
    top_hits = []
    for group in adata.obs["cplmixvae_type"].cat.categories:
        rows = de[de["group1"] == group]
        assert len(rows) == adata.n_vars
        true_type = adata.obs.loc[adata.obs["cplmixvae_type"] == group, "type"].mode()[0]
        up_markers = adata.var_names[programs[types.index(true_type)] > 0]
        # the type's up-regulated markers have the largest decoded log fold changes
        assert roc_auc_score(rows.index.isin(up_markers), rows["lfc_mean"]) > 0.8, (group, true_type)
        top = rows[rows["lfc_mean"] > 0].sort_values("bayes_factor", ascending=False).index[:10]
        top_hits.append(int(np.isin(top, up_markers).sum()))
    assert max(top_hits) >= 8, top_hits


def test_normalized_expression_shapes_and_scales(converged):
    adata, model = converged
    expr = model.get_normalized_expression(indices=[0, 3, 5])
    assert isinstance(expr, pd.DataFrame)
    assert expr.index.tolist() == adata.obs_names[[0, 3, 5]].tolist()
    np.testing.assert_allclose(expr.sum(1), 1.0, rtol=1e-4)
    latent = model.get_normalized_expression(indices=[0, 3, 5], library_size="latent", return_numpy=True)
    np.testing.assert_allclose(latent.sum(1), np.asarray(adata.X[[0, 3, 5]].sum(1)).ravel(), rtol=1e-4)
    samples = model.get_normalized_expression(indices=[0, 1], n_samples=3, return_mean=False)
    assert samples.shape == (3, 2, adata.n_vars)
    overall = model.get_normalized_expression(indices=np.arange(10), n_samples_overall=25)
    assert overall.shape == (25, adata.n_vars)
    subset = model.get_normalized_expression(indices=[0], gene_list=list(adata.var_names[:4]))
    assert subset.columns.tolist() == list(adata.var_names[:4])
    with pytest.raises(ValueError, match="not a batch"):
        model.get_normalized_expression(transform_batch="batch_9")
    with pytest.raises(ValueError, match="uniform"):
        model.get_normalized_expression(weights="importance")


def test_gaussian_normalized_expression_is_a_positive_scale():
    scvi.settings.seed = 0
    adata = simulate(n_cells=120, n_genes=40, n_types=2, n_marker_genes=10, n_state_genes=10, n_batches=2, seed=2)
    CplMixVAE.setup_anndata(adata, batch_key="batch")
    model = CplMixVAE(adata, n_categories=2, n_hidden=16, likelihood="gaussian")
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    expr = model.get_normalized_expression(transform_batch=["batch_0", "batch_1"], return_numpy=True)
    assert expr.shape == (adata.n_obs, adata.n_vars)
    assert np.isfinite(expr).all() and (expr >= 0).all()


# ------------------------------------------------------------------------------------------ condition axis
@pytest.fixture(scope="module")
def with_condition():
    """300 cells, 3 types; half the cells 'stim' with an extra program on 10 genes; the condition registered."""
    scvi.settings.seed = 0
    adata = simulate(n_cells=300, n_genes=100, n_types=3, type_sizes="balanced", seed=4)
    rng = np.random.default_rng(0)
    stim = rng.random(adata.n_obs) < 0.5
    x = adata.X.toarray()
    x[np.ix_(stim, np.arange(10))] += rng.poisson(20, size=(stim.sum(), 10))
    adata.X = sparse.csr_matrix(x)
    adata.obs["treatment"] = pd.Categorical(np.where(stim, "stim", "ctrl"), categories=["ctrl", "stim"])
    CplMixVAE.setup_anndata(adata, condition_key="treatment")
    model = CplMixVAE(adata, n_categories=3, n_hidden=32)
    model.train(max_epochs=3, batch_size=64, enable_progress_bar=False)
    return adata, model


def test_condition_axis_is_the_default_with_a_condition_and_joins_the_conditions_mean_states(with_condition):
    adata, model = with_condition
    out = tl.rank_state_genes(adata, model, copy=True)
    result = out.uns[KEY]
    assert result["params"]["axis"] == "condition"
    traversal = result["traversal"]
    # agent 0's state given the consensus category, in float64 like the traversal's means
    state = model.get_latent_representation(adata).astype(np.float64)
    stim = (adata.obs["treatment"] == "stim").to_numpy()
    for i, group in enumerate(np.asarray(traversal["groups"], dtype=str)):
        cells = (out.obs[f"{KEY}_group"] == group).to_numpy()
        assert traversal["axis"][i] == "condition"
        expected = state[cells & stim].mean(0) - state[cells & ~stim].mean(0)  # from "ctrl" (first) to "stim"
        np.testing.assert_allclose(traversal["direction"][i], expected / np.linalg.norm(expected), rtol=1e-4, atol=1e-5)
        projection = (state[cells] - traversal["center"][i]) @ traversal["direction"][i]
        assert traversal["sigma"][i] == pytest.approx(projection.std(ddof=1), rel=1e-4)


def test_condition_axis_follows_the_models_order_of_conditions(with_condition):
    # a column with its categories in another order (new cells, a reloaded file) turned the axis round
    adata, model = with_condition
    expected = tl.rank_state_genes(adata, model, copy=True).uns[KEY]
    for column in (
        adata.obs["treatment"].cat.reorder_categories(["stim", "ctrl"]),
        adata.obs["treatment"].astype(str),
    ):
        data = adata.copy()
        data.obs["treatment"] = column
        result = tl.rank_state_genes(data, model, copy=True).uns[KEY]
        np.testing.assert_allclose(result["traversal"]["direction"], expected["traversal"]["direction"], rtol=1e-6)
        for g in expected["names"].dtype.names:
            np.testing.assert_array_equal(result["names"][g], expected["names"][g])


def test_condition_axis_falls_back_to_pc1_for_a_group_with_one_condition(with_condition, caplog):
    adata, model = with_condition
    data = adata.copy()
    data.obs["part"] = pd.Categorical(np.where(data.obs["treatment"] == "stim", "only_stim", "mixed"))
    data.obs.loc[data.obs_names[:40], "part"] = "mixed"
    data.obs["part"] = data.obs["part"].astype(str).astype("category")
    with caplog.at_level("WARNING", logger="scmixvae"):
        tl.rank_state_genes(data, model, groupby="part")
    traversal = data.uns[KEY]["traversal"]
    axes = dict(zip(np.asarray(traversal["groups"], dtype=str), traversal["axis"], strict=True))
    assert axes == {"mixed": "condition", "only_stim": "pc1"}
    assert "one condition only" in caplog.text


def test_groups_without_a_condition_axis_are_named_in_one_line(with_condition, caplog):
    """A line per group: 20 lines for 20 types of a data set with one condition."""
    adata, model = with_condition
    data = adata[adata.obs["treatment"] == "stim"].copy()
    data.obs["part"] = pd.Categorical((np.arange(data.n_obs) % 3).astype(str))
    with caplog.at_level("WARNING", logger="scmixvae"):
        tl.rank_state_genes(data, model, groupby="part", axis="condition")
    said = [r.getMessage() for r in caplog.records if "No condition axis" in r.getMessage()]
    assert said == ["No condition axis for group '0', group '1', group '2' (one condition only, or equal mean "
                    "states): axis pc1 instead."]  # fmt: skip
    assert set(data.uns[KEY]["traversal"]["axis"]) == {"pc1"}


def test_condition_axis_needs_a_registered_condition_present_in_the_data(fitted, with_condition):
    adata, model = fitted
    with pytest.raises(ValueError, match="needs a condition registered"):
        tl.rank_state_genes(adata, model, axis="condition", copy=True)
    assert tl.rank_state_genes(adata, model, copy=True).uns[KEY]["params"]["axis"] == "pc1"
    cond_adata, cond_model = with_condition
    missing = cond_adata.copy()
    del missing.obs["treatment"]
    # read-outs need no condition; the condition axis does, and says so before any work (it came after the
    # encoding pass, blaming an axis the user had not given)
    del missing.uns["_scvi_uuid"], missing.uns["_scvi_manager_uuid"]
    with pytest.raises(ValueError, match=r"`axis=\"condition\"`: adata.obs has no column 'treatment'"):
        tl.rank_state_genes(missing, cond_model, axis="condition")
    default = r"`axis=\"condition\"` \(the default axis of a model set up with a condition; pass axis=\"pc1\" .*\)"
    for verb in (
        lambda: tl.rank_state_genes(missing, cond_model),
        lambda: tl.state_traversal(cond_model, cond_model.category_names[0], adata=missing),
    ):
        with pytest.raises(ValueError, match=default + ": adata.obs has no column 'treatment'"):
            verb()
    assert "_scvi_uuid" not in missing.uns and "cplmixvae_state_genes" not in missing.uns  # nothing done


@pytest.mark.parametrize("not_a_model", ["a string", None, 3])
def test_every_verb_taking_a_model_names_what_it_needs(fitted, not_a_model):
    from scmixvae import pl

    adata, _ = fitted
    match = r"`model` must be a trained scmixvae.model.CplMixVAE, got"
    for call in (
        lambda: tl.annotate(adata, not_a_model),
        lambda: tl.rank_state_genes(adata, not_a_model),
        lambda: tl.state_traversal(not_a_model, 0),
    ):
        with pytest.raises(TypeError, match=match):
            call()
    with pytest.raises(TypeError, match="must be a CplMixVAE"):
        pl.training_history(not_a_model, show=False)
    with pytest.raises(TypeError, match="`model_or_matrix` must be a CplMixVAE or a square matrix"):
        pl.consensus_heatmap(not_a_model, show=False)


def test_annotate_writes_the_read_outs_in_one_pass_over_the_cells(fitted, monkeypatch):
    """annotate encoded every cell twice (its posteriors, then get_latent_representation)."""
    adata, model = fitted
    expected_state = model.get_latent_representation(adata, batch_size=100)
    expected_types = model.predict(adata, batch_size=100)
    calls = []
    inference = model.module.inference
    monkeypatch.setattr(model.module, "inference", lambda *a, **k: calls.append(1) or inference(*a, **k))
    data = tl.annotate(adata, model, batch_size=100, copy=True)
    assert len(calls) == 3  # 300 cells in minibatches of 100
    np.testing.assert_allclose(data.obsm["X_cplmixvae_state"], expected_state, rtol=1e-5, atol=1e-6)
    assert data.obs["cplmixvae_type"].astype(str).tolist() == expected_types.astype(str).tolist()


def test_annotate_needs_an_anndata(fitted):
    adata, model = fitted
    with pytest.raises(TypeError, match="`adata` must be an AnnData object, got ndarray"):
        tl.annotate(adata.X.toarray(), model)


def test_annotate_drops_empty_categories_from_every_type_column(fitted):
    # the agents' columns kept categories without cells: scanpy's dotplot failed on them with "['5'] not in index"
    adata, model = fitted
    labels = model.predict()
    subset = adata[(labels == labels.iloc[0]).to_numpy()].copy()  # the cells of one consensus category
    tl.annotate(subset, model)
    columns = ["cplmixvae_type", "cplmixvae_agent0_type", "cplmixvae_agent1_type"]
    assert all((subset.obs[column].value_counts() > 0).all() for column in columns)
    assert len(subset.obs["cplmixvae_type"].cat.categories) == 1


def test_annotate_removes_the_columns_of_agents_the_model_lacks(fitted):
    # a model with three agents wrote cplmixvae_agent2_type; annotating again with two agents left it beside the
    # new columns, contradicting cplmixvae_agree
    adata, model = fitted
    data = adata.copy()
    tl.annotate(data, model)
    data.obs["cplmixvae_agent2_type"] = data.obs["cplmixvae_agent0_type"]
    data.obs["cplmixvae_agent3_type"] = data.obs["cplmixvae_agent0_type"]
    data.obs["other_agent2_type"] = data.obs["cplmixvae_agent0_type"]  # another key's column stays
    tl.annotate(data, model)
    agent_columns = [c for c in data.obs if "_agent" in c]
    assert agent_columns == ["cplmixvae_agent0_type", "cplmixvae_agent1_type", "other_agent2_type"]
