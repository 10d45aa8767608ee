"""Reference mapping (scArches surgery) and read-outs on new cells that need only what inference reads."""

import os
import shlex

import anndata
import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from sklearn.metrics import adjusted_rand_score

from scmixvae.data import simulate
from scmixvae.model import CplMixVAE
from scmixvae.module._losses import category_condition_discrepancy, condition_category_means

FIT = {"batch_size": 64, "enable_progress_bar": False}


def _split_last_batch(adata):
    """The cells of every batch but the last (reference) and of the last one (a query with an unseen batch)."""
    last = adata.obs["batch"].cat.categories[-1]
    in_query = (adata.obs["batch"] == last).to_numpy()
    reference, query = adata[~in_query].copy(), adata[in_query].copy()
    reference.obs["batch"] = reference.obs["batch"].cat.remove_unused_categories()
    query.obs["batch"] = query.obs["batch"].cat.remove_unused_categories()
    return reference, query


def _fresh(adata, drop=()):
    """A copy of ``adata`` as a user would bring it: no scvi-tools registration, without the ``drop`` columns."""
    new = adata.copy()
    new.obs = new.obs.drop(columns=[c for c in new.obs if c.startswith("_scvi") or c in drop])
    for key in ("_scvi_uuid", "_scvi_manager_uuid"):
        new.uns.pop(key, None)
    return new


@pytest.fixture(scope="module")
def mapped():
    """A reference trained on two batches of 3 simulated types and a query model trained on a third batch."""
    scvi.settings.seed = 0
    adata = simulate(n_cells=450, n_genes=100, n_types=3, n_batches=3, type_sizes="balanced", seed=0)
    reference, query = _split_last_batch(adata)
    CplMixVAE.setup_anndata(reference, batch_key="batch")
    model = CplMixVAE(reference, n_categories=3, n_hidden=32)
    model.train(max_epochs=10, state_epochs=0, **FIT)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    query_model = CplMixVAE.load_query_data(query, model)
    start = {k: v.clone() for k, v in query_model.module.state_dict().items()}
    query_model.train(max_epochs=10, state_epochs=0, **FIT)
    return model, reference, query, query_model, before, start


def test_query_of_a_new_batch_maps_to_the_reference_types(mapped):
    model, reference, query, query_model, _, _ = mapped
    counts = pd.crosstab(reference.obs["type"].astype(str), model.predict().astype(str))
    reference_types = dict(zip(counts.index, counts.idxmax(axis=1).astype(str), strict=True))  # type -> category
    predicted = query_model.predict()
    assert query_model.category_names == model.category_names
    assert list(predicted.index) == list(query.obs_names)
    assert adjusted_rand_score(query.obs["type"], predicted) >= 0.9
    # the same categories as the reference's for the same types, not just the same partition
    assert (predicted.astype(str) == query.obs["type"].astype(str).map(reference_types)).mean() >= 0.95


def test_query_training_changes_only_the_new_batch_weights(mapped):
    model, _, _, query_model, before, start = mapped
    after = query_model.module.state_dict()
    assert set(after) == set(before)
    extended = set()
    for key, old in before.items():
        new = after[key]
        if new.shape == old.shape:
            assert torch.equal(new, old), f"{key} changed in query training"
            continue
        extended.add(key)
        n_old = old.shape[1]
        assert new.shape[1] == n_old + 1  # one new batch
        assert torch.equal(new[:, :n_old], old), f"the reference's rows of {key} changed"
        assert torch.allclose(start[key][:, n_old:], old.mean(1, keepdim=True))  # started from the mean
        assert not torch.equal(new[:, n_old:], start[key][:, n_old:]), f"the new rows of {key} did not train"
    assert extended == {
        "encoder.layers.0.weight_cov",
        "state_encoder.layers.0.weight_cov",
        "decoder.layers.0.weight_cov",
        "decoder.layers.1.weight_cov",
    }
    # the reference model itself is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.module.state_dict().items())
    assert query_model.module.n_batch == 3 and model.module.n_batch == 2


def test_query_model_reads_out_reference_cells_like_the_reference(mapped):
    model, reference, _, query_model, _, _ = mapped
    probs = query_model.get_category_probabilities(reference)
    np.testing.assert_allclose(probs.to_numpy(), model.get_category_probabilities(reference).to_numpy(), atol=1e-5)


def test_prepare_query_anndata_pads_and_orders_the_genes(mapped):
    model, _, query, _, _, _ = mapped
    genes = list(model.adata.var_names)
    other = _fresh(query[:, genes[10:][::-1]])  # 10 genes missing, the rest reversed
    with pytest.raises(ValueError, match=r"has 90 genes; the reference was trained on 100 \(10 missing.*"
                       r"prepare_query_anndata"):  # fmt: skip
        CplMixVAE.load_query_data(other, model)
    assert list(CplMixVAE.prepare_query_anndata(other, model, return_reference_var_names=True)) == genes
    padded = CplMixVAE.prepare_query_anndata(other, model, inplace=False)
    assert other.n_vars == 90  # inplace=False leaves the query as it was
    assert list(padded.var_names) == genes
    assert padded.X[:, :10].nnz == 0
    np.testing.assert_array_equal(padded.X[:, 10:].toarray(), query.X[:, 10:].toarray())
    assert CplMixVAE.prepare_query_anndata(other, model) is None  # scvi-tools' default: in place
    assert list(other.var_names) == genes


def test_prepare_query_anndata_of_a_backed_query_says_to_read_it_into_memory(mapped, tmp_path):
    """anndata's own error ("pass a filename: .copy(filename=...)") came after the advice to call this function."""
    model, _, query, _, _, _ = mapped
    genes = list(model.adata.var_names)
    _fresh(query[:, genes[::-1]]).write_h5ad(tmp_path / "reversed.h5ad")
    _fresh(query).write_h5ad(tmp_path / "ordered.h5ad")
    reversed_ = anndata.read_h5ad(tmp_path / "reversed.h5ad", backed="r")
    ordered = anndata.read_h5ad(tmp_path / "ordered.h5ad", backed="r")
    for backed, inplace in ((reversed_, True), (reversed_, False), (ordered, False)):
        with pytest.raises(ValueError, match=r"`adata` is backed .* `adata = adata.to_memory\(\)`"):
            CplMixVAE.prepare_query_anndata(backed, model, inplace=inplace)
    assert CplMixVAE.prepare_query_anndata(ordered, model) is None  # nothing to change
    assert list(reversed_.var_names) == genes[::-1] and reversed_.isbacked


def test_prepare_query_anndata_keeps_var_columns_writable(mapped, tmp_path):
    # scanpy's bool highly_variable became an object column with NaN for the padded genes: write_h5ad failed
    model, _, query, _, _, _ = mapped
    genes = list(model.adata.var_names)
    other = _fresh(query[:, genes[10:]])
    other.var["highly_variable"] = np.arange(90) % 2 == 0
    other.var["n_cells"] = np.arange(90)
    other.var["mean"] = np.linspace(0, 1, 90)
    padded = CplMixVAE.prepare_query_anndata(other, model, inplace=False)
    assert padded.var["highly_variable"].isna().sum() == 10 and padded.var["n_cells"].isna().sum() == 10
    padded.write_h5ad(tmp_path / "query.h5ad")
    back = anndata.read_h5ad(tmp_path / "query.h5ad")
    pd.testing.assert_frame_equal(back.var, padded.var)
    pd.testing.assert_frame_equal(back.var.loc[genes[10:]], other.var.loc[genes[10:]], check_dtype=False)
    renamed = _fresh(query)
    renamed.var_names = [f"other_{g}" for g in query.var_names]
    with pytest.raises(ValueError, match="none of the reference's genes"):
        CplMixVAE.prepare_query_anndata(renamed, model, inplace=False)
    twice = _fresh(query)
    twice.var_names = [genes[0], *genes[:-1]]  # pandas failed on the reindexing ("uniquely valued Index objects")
    with pytest.raises(
        ValueError, match=r"adata.var_names has duplicates \(e.g. \['gene_0'\]\); call `adata.var_names"
    ):
        CplMixVAE.prepare_query_anndata(twice, model, inplace=False)


def test_a_reference_folder_saved_with_a_prefix_is_named(mapped, tmp_path):
    # "pref/model.pt is not a saved scmixvae model: the file does not exist. Pass the folder written by
    # CplMixVAE.save", about the folder that save had written
    model, _, query, _, _, _ = mapped
    model.save(tmp_path / "pref", prefix="ref_")
    match = r"holds \['ref_model.pt'\] \(saved with a `prefix`\), not model.pt.*CplMixVAE.load\(.*prefix='ref_'"
    for call in (CplMixVAE.prepare_query_anndata, CplMixVAE.load_query_data):
        with pytest.raises(ValueError, match=match):
            call(_fresh(query), str(tmp_path / "pref"))
    reference = CplMixVAE.load(tmp_path / "pref", prefix="ref_", adata=model.adata)
    assert CplMixVAE.load_query_data(_fresh(query), reference).n_categories == model.n_categories


def test_query_with_no_new_batch_or_no_batch_column_is_refused(mapped):
    model, reference, query, _, _, _ = mapped
    known = _fresh(reference[:50])
    with pytest.raises(ValueError, match=r"no new batch to learn.*reference\.predict"):
        CplMixVAE.load_query_data(known, model)
    lacking = _fresh(query, drop=["batch"])
    with pytest.raises(ValueError, match=r"lacks adata.obs\['batch'\], the reference's `batch_key`"):
        CplMixVAE.load_query_data(lacking, model)
    with pytest.raises(TypeError, match="`reference_model` must be a CplMixVAE"):
        CplMixVAE.load_query_data(_fresh(query), object())


def test_readouts_on_an_unseen_batch_point_to_load_query_data(mapped):
    model, _, query, _, _, _ = mapped
    new = _fresh(query)
    with pytest.raises(ValueError, match=r"adata.obs\['batch'\] holds 1 value\(s\) the model was not trained on.*"
                       "load_query_data"):  # fmt: skip
        model.predict(new)


def test_load_onto_an_unseen_batch_points_to_load_query_data(mapped, tmp_path):
    # scvi-tools' own error asked for `extend_categories=True`, which load() does not take
    model, _, query, _, _, _ = mapped
    model.save(tmp_path / "model")
    with pytest.raises(ValueError, match=r"adata.obs\['batch'\] holds 1 value\(s\) the model was not trained on.*"
                       "load_query_data"):  # fmt: skip
        CplMixVAE.load(tmp_path / "model", adata=_fresh(query))


@pytest.mark.parametrize("fresh", [True, False], ids=["new AnnData", "copy of the training data"])
def test_a_batch_column_of_another_type_is_named_as_such(sim_adata, fresh):
    # batches trained as integers 0 and 1 and read out as strings "0" and "1" were called new batches; as bools,
    # scvi-tools' "Making .obs["run"] categorical failed"; a copy (which carries the registration) skipped the check
    sim_adata.obs["run"] = sim_adata.obs["batch"].cat.codes.astype(int)
    CplMixVAE.setup_anndata(sim_adata, batch_key="run")
    model = CplMixVAE(sim_adata, n_categories=3, n_hidden=16)
    model.train(max_epochs=1, state_epochs=0, enable_progress_bar=False)
    text = _fresh(sim_adata) if fresh else sim_adata.copy()
    text.obs["run"] = text.obs["run"].astype(str)
    with pytest.raises(ValueError, match=r"holds \['[01]', '[01]'\] as str; the model was trained on the same names as "
                       r"int64 \(\[0, 1\]\)\. Convert .*astype\('int64'\)"):  # fmt: skip
        model.predict(text)
    text.obs["run"] = text.obs["run"].astype(int).astype(bool)
    with pytest.raises(ValueError, match=r"holds \[(True|False), (True|False)\] as bool; the model was trained on the "
                       r"same names as int64 \(\[0, 1\]\)\. Convert .*astype\('int64'\)"):  # fmt: skip
        model.predict(text)
    text.obs["run"] = text.obs["run"].astype("int64")
    pd.testing.assert_series_equal(model.predict(text), model.predict())


def test_readouts_on_a_copy_with_an_unseen_batch_point_to_load_query_data(mapped):
    # a copy carries the training data's registration: scvi-tools' "Cannot transfer setup without
    # `extend_categories = True`" came instead of the package's message
    model, reference, _, _, _, _ = mapped
    new = reference[:30].copy()
    new.obs["batch"] = new.obs["batch"].cat.add_categories(["unseen"])
    new.obs.loc[new.obs_names[:5], "batch"] = "unseen"
    with pytest.raises(ValueError, match=r"adata.obs\['batch'\] holds 1 value\(s\) the model was not trained on.*"
                       "load_query_data"):  # fmt: skip
        model.predict(new)


class _Payload:
    """Unpickling this object runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_query_from_a_saved_folder_and_a_crafted_file_is_refused(mapped, tmp_path):
    model, _, query, _, before, _ = mapped
    model.save(tmp_path / "reference")
    from_folder = CplMixVAE.load_query_data(_fresh(query), str(tmp_path / "reference"))
    loaded = from_folder.module.state_dict()
    assert all(torch.equal(loaded[k][:, : v.shape[1]] if v.shape != loaded[k].shape else loaded[k], v)
               for k, v in before.items())  # fmt: skip
    assert list(CplMixVAE.prepare_query_anndata(query, tmp_path / "reference", return_reference_var_names=True)) == (
        list(model.adata.var_names)
    )
    marker = tmp_path / "payload_ran"
    path = tmp_path / "reference" / "model.pt"
    content = torch.load(path, map_location="cpu", weights_only=False)  # our own, trusted file
    content["attr_dict"]["evil_"] = _Payload(marker)
    torch.save(content, path)
    with pytest.raises(ValueError, match="holds Python objects other than tensors"):
        CplMixVAE.load_query_data(_fresh(query), tmp_path / "reference")
    with pytest.raises(ValueError, match="holds Python objects other than tensors"):
        CplMixVAE.prepare_query_anndata(_fresh(query), tmp_path / "reference", inplace=False)
    assert not marker.exists()
    with pytest.raises(ValueError, match="is not a folder"):
        CplMixVAE.load_query_data(_fresh(query), tmp_path / "absent")


def test_reference_of_one_batch_gains_zero_rows_and_gene_batch_dispersions():
    scvi.settings.seed = 0
    adata = simulate(n_cells=200, n_genes=60, n_types=2, n_batches=2, seed=3)
    reference, query = _split_last_batch(adata)  # the reference holds a single batch: no batch rows
    CplMixVAE.setup_anndata(reference, batch_key="batch")
    model = CplMixVAE(reference, n_categories=2, n_hidden=16, likelihood="nb", dispersion="gene-batch")
    model.train(max_epochs=2, state_epochs=0, **FIT)
    assert model.module.encoder.layers[0].weight_cov is None
    query_model = CplMixVAE.load_query_data(query, model)
    module = query_model.module
    assert module.n_batch == 2 and module.encoder.layers[0].weight_cov.shape[1] == 2
    assert torch.equal(
        module.encoder.layers[0].weight_cov[:, 0], torch.zeros_like(module.encoder.layers[0].weight_cov[:, 0])
    )
    assert torch.equal(module.px_r[:, :1], model.module.px_r)
    query_model.is_trained_ = True  # not trained on the query: the reference's cells read out as before
    np.testing.assert_allclose(
        query_model.get_category_probabilities(reference).to_numpy(),
        model.get_category_probabilities(reference).to_numpy(),
        atol=1e-5,
    )


@pytest.fixture(scope="module")
def conditioned():
    """A model trained with labels and a condition registered (neither is read by inference)."""
    scvi.settings.seed = 0
    adata = simulate(n_cells=240, n_genes=60, n_types=2, n_batches=2, seed=4)
    adata.obs["condition"] = pd.Categorical(np.tile(["ctrl", "stim"], adata.n_obs // 2))
    CplMixVAE.setup_anndata(adata, batch_key="batch", labels_key="type", condition_key="condition")
    model = CplMixVAE(adata, n_categories=2, n_hidden=16)
    model.train(max_epochs=2, state_epochs=0, **FIT)
    return model, adata


@pytest.mark.parametrize("column", ["condition", "type"])
def test_readouts_need_no_condition_or_labels(conditioned, column):
    model, adata = conditioned
    expected = model.get_category_probabilities(adata)
    missing = _fresh(adata, drop=[column])
    obs_before = missing.obs.copy()
    np.testing.assert_allclose(model.get_category_probabilities(missing).to_numpy(), expected.to_numpy(), atol=1e-6)
    assert model.get_latent_representation(missing).shape == (adata.n_obs, model.module.n_state)
    pd.testing.assert_frame_equal(missing.obs[obs_before.columns], obs_before)  # only the registration was added
    unseen = _fresh(adata)
    unseen.obs[column] = pd.Categorical(["never_seen"] * adata.n_obs)
    np.testing.assert_allclose(model.get_category_probabilities(unseen).to_numpy(), expected.to_numpy(), atol=1e-6)
    assert (unseen.obs["_scvi_condition" if column == "condition" else "_scvi_labels"] == -1).all()


def test_query_without_condition_trains(conditioned):
    model, adata = conditioned
    query = _fresh(adata[:80], drop=["condition", "type"])
    query.obs["batch"] = pd.Categorical(["new"] * query.n_obs)
    query_model = CplMixVAE.load_query_data(query, model)
    query_model.train(max_epochs=1, state_epochs=0, **FIT)
    assert query_model.predict().isin(model.category_names).all()


def test_condition_penalty_leaves_out_cells_of_unknown_condition():
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(2, 12, 3), -1)
    condition = torch.tensor([0, 1] * 4 + [-1] * 4)
    known = condition >= 0
    means, n = condition_category_means(q, condition, 2)
    expected, n_known = condition_category_means(q[:, known], condition[known], 2)
    torch.testing.assert_close(means, expected)
    torch.testing.assert_close(n, n_known)
    expected = category_condition_discrepancy(q[:, known], condition[known], 2)
    torch.testing.assert_close(category_condition_discrepancy(q, condition, 2), expected)
