import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import scmixvae
from scmixvae.model import CplMixVAE


def _adata(x):
    return AnnData(x)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda x: x.__setitem__((0, 0), np.nan), "NaN or infinite"),
        (lambda x: x.__setitem__((0, 0), np.inf), "NaN or infinite"),
        (lambda x: x.__setitem__((0, 0), -1), "negative"),
        (lambda x: x.__setitem__((0, 0), 0.5), "non-integer"),
        (lambda x: x.__setitem__(1, 0), "no counts"),
    ],
)
def test_bad_counts_raise_before_registration(mutate, match):
    x = np.random.default_rng(0).poisson(2, (20, 10)).astype(np.float32) + 1
    mutate(x)
    adata = _adata(sp.csr_matrix(x))
    with pytest.raises(ValueError, match=match):
        CplMixVAE.setup_anndata(adata)
    assert "_scvi_uuid" not in adata.uns


def test_sparse_counts_stored_as_several_entries_are_refused_before_registration():
    """The CPU minibatch read each stored entry as a count of its own: a 5 stored as 2 + 3 entered the NB likelihood
    as two counts (a first-epoch reconstruction loss of 456 against 479 for the same counts summed)."""
    x = np.random.default_rng(0).poisson(2, (20, 10)).astype(np.float32) + 2
    adata = _adata(_split_first_count(x))
    with pytest.raises(ValueError, match=r"adata.X stores some counts as several entries at the same position .*"
                       r"Sum them once: `adata.X.sum_duplicates\(\)`"):  # fmt: skip
        CplMixVAE.setup_anndata(adata)
    assert "_scvi_uuid" not in adata.uns and adata.X.nnz == x.size + 1  # nothing registered, nothing summed
    adata.X.sum_duplicates()
    CplMixVAE.setup_anndata(adata)


def test_setup_on_a_view_says_why_it_is_refused():
    # scvi-tools' "Please run `adata = adata.copy()`" did not say that the AnnData is a view
    adata = _adata(np.random.default_rng(0).poisson(2, (20, 10)).astype(np.float32) + 1)
    view = adata[:10]
    with pytest.raises(ValueError, match=r"`adata` is a view of another AnnData .*`adata = adata\[mask\].copy\(\)`"):
        CplMixVAE.setup_anndata(view)
    assert view.is_view and "_scvi_uuid" not in adata.uns


@pytest.mark.parametrize(
    "readout",
    [
        lambda model, size: model.predict(batch_size=size),
        lambda model, size: model.get_latent_representation(batch_size=size),
        lambda model, size: model.get_normalized_expression(batch_size=size),
        lambda model, size: model.get_latent_library_size(batch_size=size),
        lambda model, size: model.get_elbo(batch_size=size),
    ],
    ids=["predict", "latent", "expression", "library", "elbo"],
)
@pytest.mark.parametrize(("size", "error", "match"), [(0, ValueError, ">= 1, got 0"), (2.5, TypeError, "integer")])
def test_readouts_refuse_a_bad_batch_size(trained_model, readout, size, error, match):
    # torch's sampler: "batch_size should be a positive integer value"
    with pytest.raises(error, match=rf"`batch_size` must .*{match}"):
        readout(trained_model, size)


def test_one_gene_is_refused_before_registration():
    """It passed setup and failed in the Leiden start, in scikit-learn's TruncatedSVD."""
    adata = _adata(sp.csr_matrix(np.random.default_rng(0).poisson(2, (20, 1)).astype(np.float32) + 1))
    with pytest.raises(ValueError, match=r"adata\.X has 1 gene; the model needs at least two"):
        CplMixVAE.setup_anndata(adata)
    assert "_scvi_uuid" not in adata.uns


@pytest.mark.parametrize(
    ("dtype", "match"),
    [
        (np.float16, r"adata.X has dtype float16, .* exactly only up to 2,048.*adata.X = adata.X.astype\('float32'\)"),
        (np.complex64, r"adata.X has dtype complex64; raw counts are real numbers"),
    ],
)
def test_counts_in_a_dtype_that_cannot_hold_them_are_refused_before_registration(dtype, match):
    """float16 counts passed the checks and failed in the Leiden start with scipy's "does not support dtype"."""
    adata = _adata((np.random.default_rng(0).poisson(2, (20, 10)) + 1).astype(dtype))
    with pytest.raises(TypeError, match=match):
        CplMixVAE.setup_anndata(adata)
    assert "_scvi_uuid" not in adata.uns and list(adata.obs.columns) == []


@pytest.mark.parametrize("arg", ["categorical_covariate_keys", "continuous_covariate_keys"])
def test_covariate_keys_take_a_list_or_tuple_and_refuse_a_string_before_registration(arg):
    """A string was read letter by letter (`KeyError: 'c'`) or failed in scvi-tools' obsm field after the batch and
    label codes were written into adata.obs; a tuple failed with `KeyError: ('col',)`."""
    adata = _with_obs(np.arange(20.0))
    with pytest.raises(TypeError, match=rf"`{arg}` takes a list of obs columns, got the string 'col'; pass \['col'\]"):
        CplMixVAE.setup_anndata(adata, **{arg: "col"})
    assert "_scvi_uuid" not in adata.uns and list(adata.obs.columns) == ["col"]
    with pytest.raises(TypeError, match=rf"`{arg}` must be a list of obs column names \(str\), got \[1\]"):
        CplMixVAE.setup_anndata(adata, **{arg: [1]})
    CplMixVAE.setup_anndata(adata, **{arg: ("col",)})
    model = CplMixVAE(adata, n_categories=2)
    assert model.adata_manager.registry["setup_args"][arg] == ["col"]
    assert model.module.n_cov == (20 if arg == "categorical_covariate_keys" else 1)


def test_missing_layer_and_key_are_named():
    adata = _adata(np.ones((5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="Layer 'counts' not found"):
        CplMixVAE.setup_anndata(adata, layer="counts")
    with pytest.raises(ValueError, match="batch_key"):
        CplMixVAE.setup_anndata(adata, batch_key="sample")


def test_duplicated_names_are_refused():
    adata = _adata(np.ones((4, 3), dtype=np.float32))
    adata.var_names = ["a", "a", "b"]
    with pytest.raises(ValueError, match="var_names_make_unique"):
        CplMixVAE.setup_anndata(adata)


def test_empty_genes_warn_but_are_kept():
    x = np.ones((6, 3), dtype=np.float32)
    x[:, 2] = 0
    adata = _adata(x)
    with pytest.warns(UserWarning, match="1 gene has no counts"):
        CplMixVAE.setup_anndata(adata)
    assert adata.n_vars == 3


def test_integer_dtype_and_dense_input_are_accepted():
    adata = _adata(np.random.default_rng(0).poisson(3, (30, 8)).astype(np.int64) + 1)
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_categories=2, n_hidden=8)
    model.train(max_epochs=1, enable_progress_bar=False)
    assert model.predict().shape == (30,)


def test_readout_on_a_view_leaves_the_view_alone(trained_model):
    view = trained_model.adata[:40]
    assert view.is_view
    labels = trained_model.predict(view)
    assert view.is_view
    assert labels.index.equals(view.obs_names)


def test_readout_with_other_genes_is_refused(trained_model):
    adata = trained_model.adata
    with pytest.raises(ValueError, match="missing"):
        trained_model.predict(adata[:, adata.var_names[:-1]].copy())
    with pytest.raises(ValueError, match="another order"):
        trained_model.predict(adata[:, adata.var_names[::-1]].copy())
    with pytest.raises(TypeError, match="AnnData"):
        trained_model.predict(adata.X)


def test_readout_with_an_unseen_batch_is_refused(sim_adata):
    CplMixVAE.setup_anndata(sim_adata, batch_key="batch")
    model = CplMixVAE(sim_adata, n_categories=2, n_hidden=8)
    model.train(max_epochs=1, enable_progress_bar=False)
    new = sim_adata[:20].copy()
    new.obs["batch"] = new.obs["batch"].cat.add_categories(["unseen"])
    new.obs.loc[new.obs_names[:5], "batch"] = "unseen"
    with pytest.raises(ValueError, match="unseen"):
        model.predict(new)


def test_csc_input_warns_about_speed_once():
    x = np.random.default_rng(0).poisson(2, (20, 6)).astype(np.float32) + 1
    adata = _adata(sp.csc_matrix(x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CplMixVAE.setup_anndata(adata)
    said = [str(w.message) for w in caught if "CSC" in str(w.message) or "CSR" in str(w.message)]
    assert len(said) == 1 and "adata.X = adata.X.tocsr()" in said[0], said  # not scvi-tools' as well
    model = CplMixVAE(adata, n_categories=2, n_hidden=8)
    with warnings.catch_warnings():  # train() and the read-outs check the counts again, without the warning
        warnings.filterwarnings("error", message=".*CSC matrix")
        model.train(max_epochs=1, batch_size=10, enable_progress_bar=False)
        model.predict()


def test_backed_anndata_is_checked_and_trained(tmp_path):
    x = np.random.default_rng(0).poisson(2, (60, 8)).astype(np.float32) + 1
    AnnData(sp.csr_matrix(x)).write_h5ad(tmp_path / "b.h5ad")
    import anndata

    backed = anndata.read_h5ad(tmp_path / "b.h5ad", backed="r")
    CplMixVAE.setup_anndata(backed)
    model = CplMixVAE(backed, n_categories=2, n_hidden=8)  # Leiden start reads the backed matrix in chunks
    model.train(max_epochs=1, batch_size=16, enable_progress_bar=False)
    assert model.predict().shape == (60,)


def test_a_view_of_backed_data_and_copies_of_backed_data_get_clear_errors(trained_model, tmp_path):
    # anndata's "To copy an AnnData object in backed mode, pass a filename", from a copy the user never asked for
    path = tmp_path / "backed.h5ad"
    trained_model.adata.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match=r"`adata` is a view of a backed AnnData .*`indices=`.*to_memory\(\)"):
        trained_model.predict(backed[:50])
    with pytest.raises(ValueError, match=r"`adata` is a view of a backed AnnData"):
        scmixvae.tl.annotate(backed[:50], trained_model)
    for verb in (scmixvae.tl.annotate, scmixvae.tl.rank_state_genes):
        with pytest.raises(ValueError, match=r"copy=True cannot copy a backed AnnData .*adata.to_memory\(\)"):
            verb(backed, trained_model, copy=True)
    pd.testing.assert_series_equal(  # what the message offers
        trained_model.predict(backed, indices=np.arange(50)), trained_model.predict(backed[:50].to_memory())
    )
    backed.file.close()


def test_sparse_array_counts_get_a_clear_error_or_train():
    x = np.random.default_rng(0).poisson(2, (40, 8)).astype(np.float32) + 1
    adata = _adata(sp.csr_array(x))
    try:
        CplMixVAE.setup_anndata(adata)
    except TypeError as err:  # scvi-tools that cannot read sparse arrays (1.4): our message, nothing registered
        assert "scipy sparse array (csr_array)" in str(err) and "csr_matrix(adata.X)" in str(err)
        assert "_scvi_uuid" not in adata.uns and isinstance(adata.X, sp.csr_array)
        return
    model = CplMixVAE(adata, n_categories=2, n_hidden=8)  # a scvi-tools that reads them: training works
    model.train(max_epochs=1, batch_size=16, enable_progress_bar=False)
    assert model.predict().shape == (40,)


@pytest.mark.parametrize("readout", ["predict", "latent", "annotate"])
def test_readouts_on_sparse_array_counts_get_the_setup_message_or_work(trained_model, readout):
    # setup_anndata named the fix; read-outs on new data failed in scvi-tools with "data type not understood"
    new = trained_model.adata[:40].copy()
    new.X = sp.csr_array(new.X)
    try:
        READOUTS[readout](trained_model, new)
    except TypeError as err:
        assert "adata.X is a scipy sparse array (csr_array)" in str(err) and "csr_matrix(adata.X)" in str(err)
        assert "cplmixvae_type" not in new.obs


def test_absurd_counts_are_refused():
    x = np.random.default_rng(0).poisson(2, (20, 10)).astype(np.float64) + 1
    x[0, 0] = 1e300  # an integer value in float64, but no count: float32 makes it infinite
    adata = _adata(sp.csr_matrix(x))
    with pytest.raises(ValueError, match=r"values up to 1e\+300, far above any count"):
        CplMixVAE.setup_anndata(adata)
    assert "_scvi_uuid" not in adata.uns


@pytest.mark.parametrize("thing", [np.ones((5, 3)), "adata.h5ad", None])
def test_setup_anndata_needs_an_anndata(thing):
    with pytest.raises(TypeError, match=r"must be an AnnData object, got .*anndata.AnnData\(X=counts\)"):
        CplMixVAE.setup_anndata(thing)


def _with_obs(column):
    adata = _adata(np.random.default_rng(0).poisson(2, (20, 6)).astype(np.float32) + 1)
    adata.obs["col"] = column
    return adata


@pytest.mark.parametrize(
    ("column", "match"),
    [
        (["a", "b"] * 10, r"adata.obs\['col'\] \(`continuous_covariate_keys`\) has dtype object; .* numeric"),
        ([1.0] * 19 + [np.nan], r"adata.obs\['col'\] \(`continuous_covariate_keys`\) has 1 NaN or infinite"),
        ([1.0] * 19 + [np.inf], r"has 1 NaN or infinite value\(s\) \(e.g. cells \['19'\]\)"),
    ],
)
def test_bad_continuous_covariates_are_refused_before_registration(column, match):
    adata = _with_obs(column)
    with pytest.raises(ValueError, match=match):
        CplMixVAE.setup_anndata(adata, continuous_covariate_keys=["col"])
    assert "_scvi_uuid" not in adata.uns and list(adata.obs.columns) == ["col"]


@pytest.mark.parametrize("as_category", [True, False])
@pytest.mark.parametrize("arg", ["batch_key", "labels_key", "categorical_covariate_keys"])
def test_missing_categories_are_refused_before_registration(arg, as_category):
    values = ["x", "y"] * 9 + ["x", np.nan]
    adata = _with_obs(pd.Categorical(values) if as_category else values)
    key = ["col"] if arg == "categorical_covariate_keys" else "col"
    match = rf"adata.obs\['col'\] \(`{arg}`\) has 1 missing value\(s\) .* every cell needs a category.*astype\(str\)"
    with pytest.raises(ValueError, match=match):
        CplMixVAE.setup_anndata(adata, **{arg: key})
    assert "_scvi_uuid" not in adata.uns and list(adata.obs.columns) == ["col"]


def _split_first_count(x: np.ndarray) -> sp.csr_matrix:
    """CSR counts equal to ``x`` (``toarray``), the first cell's first count stored as two entries, ``1 + (v - 1)``."""
    c = sp.csr_matrix(x)
    assert c.data[0] >= 2
    indptr = c.indptr + 1
    indptr[0] = 0
    data = np.r_[1.0, c.data[0] - 1, c.data[1:]].astype(x.dtype)
    split = sp.csr_matrix((data, np.r_[c.indices[0], c.indices], indptr))
    assert not split.has_canonical_format and np.array_equal(split.toarray(), x)
    return split


def _corrupt_x(adata, how):
    x = adata.X.toarray().astype(np.float32)
    if how == "duplicate entries":
        x[0, adata.X[0].indices[0]] = 3
        adata.X = _split_first_count(x)
        return adata
    if how == "nan":
        x[0, 0] = np.nan
    elif how == "negative":
        x[0, 0] = -3
    elif how == "log-normalised":
        x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    elif how == "empty cell":
        x[1] = 0
    adata.X = sp.csr_matrix(x)
    return adata


READOUTS = {
    "predict": lambda model, adata: model.predict(adata),
    "probabilities": lambda model, adata: model.get_category_probabilities(adata),
    "latent": lambda model, adata: model.get_latent_representation(adata),
    "agreement": lambda model, adata: model.get_agent_agreement(adata),
    "expression": lambda model, adata: model.get_normalized_expression(adata),
    "annotate": lambda model, adata: scmixvae.tl.annotate(adata, model),
    "rank_state_genes": lambda model, adata: scmixvae.tl.rank_state_genes(adata, model),
}


@pytest.mark.parametrize("readout", list(READOUTS))
@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("nan", "NaN or infinite"),
        ("negative", "negative values"),
        ("log-normalised", "non-integer values"),
        ("empty cell", r"1 cells have no counts in adata.X \(e.g. cell1\)"),
        ("duplicate entries", r"adata.X stores some counts as several entries .*`adata.X.sum_duplicates\(\)`"),
    ],
)
def test_readouts_on_new_data_check_the_counts(trained_model, readout, how, match):
    new = trained_model.adata[:50].copy()  # a copy carries the registration of the training data: checked anyway
    new.obs_names = [f"cell{i}" for i in range(new.n_obs)]
    _corrupt_x(new, how)
    with pytest.raises(ValueError, match=match):
        READOUTS[readout](trained_model, new)
    assert "cplmixvae_type" not in new.obs


def test_readouts_on_new_data_check_the_covariates(sim_adata):
    sim_adata.obs["depth"] = np.log(np.asarray(sim_adata.X.sum(1)).ravel())
    CplMixVAE.setup_anndata(sim_adata, batch_key="batch", continuous_covariate_keys=["depth"])
    model = CplMixVAE(sim_adata, n_categories=2, n_hidden=8)
    model.train(max_epochs=1, enable_progress_bar=False)
    new = sim_adata[:30].copy()
    del new.uns["_scvi_uuid"], new.uns["_scvi_manager_uuid"]
    new.obs.loc[new.obs_names[3], "depth"] = np.nan
    with pytest.raises(ValueError, match=r"adata.obs\['depth'\] \(`continuous_covariate_keys`\) has 1 NaN"):
        model.predict(new)
    new.obs["depth"] = 1.0
    new.obs["batch"] = new.obs["batch"].astype(object)
    new.obs.loc[new.obs_names[0], "batch"] = np.nan
    with pytest.raises(ValueError, match=r"adata.obs\['batch'\] \(`batch_key`\) has 1 missing value"):
        model.predict(new)
    del new.obs["batch"]
    with pytest.raises(ValueError, match=r"`batch_key`: column\(s\) \['batch'\] not found"):
        model.predict(new)


def test_a_categorical_covariate_is_read_by_value_whatever_the_order_of_its_categories(sim_adata):
    # pandas keeps an unordered categorical's codes when cast to the same categories in another order: new data
    # with the donor's categories reordered was read with d0 and d1 swapped, and every state changed
    donors = np.random.default_rng(0).choice(["d0", "d1"], sim_adata.n_obs)
    sim_adata.obs["donor"] = pd.Categorical(donors, categories=["d0", "d1"])
    CplMixVAE.setup_anndata(sim_adata, categorical_covariate_keys=["donor"])
    model = CplMixVAE(sim_adata, n_categories=3, n_hidden=16)
    model.train(max_epochs=2, state_epochs=0, enable_progress_bar=False)
    new = sim_adata.copy()
    new.obs["donor"] = new.obs["donor"].cat.reorder_categories(["d1", "d0"])
    swapped = sim_adata.copy()
    swapped.obs["donor"] = pd.Categorical(np.where(donors == "d0", "d1", "d0"), categories=["d0", "d1"])
    latent = model.get_latent_representation()
    assert not np.allclose(model.get_latent_representation(swapped), latent)  # the covariate matters
    np.testing.assert_array_equal(model.get_latent_representation(new), latent)
    assert list(new.obs["donor"].cat.categories) == ["d1", "d0"]  # the user's column as it was


def test_readouts_on_clean_new_data_still_work(trained_model):
    new = trained_model.adata[:50].copy()
    del new.uns["_scvi_uuid"], new.uns["_scvi_manager_uuid"]
    assert (np.asarray(new.X.sum(0)).ravel() == 0).any()  # genes without counts in these cells: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        labels = trained_model.predict(new)
        two = trained_model.predict(new[:2].copy())  # scvi-tools: "Category 0 ... has fewer than 3 cells. Models may
    pd.testing.assert_series_equal(labels, trained_model.predict(indices=np.arange(50)))  # not train properly."
    pd.testing.assert_series_equal(two, labels[:2])


INDEXED_READOUTS = {
    "predict": lambda model, idx: model.predict(indices=idx),
    "latent": lambda model, idx: model.get_latent_representation(indices=idx),
    "expression": lambda model, idx: model.get_normalized_expression(indices=idx),
    "library": lambda model, idx: model.get_latent_library_size(indices=idx),
    "elbo": lambda model, idx: model.get_elbo(indices=idx),
    "traversal": lambda model, idx: scmixvae.tl.state_traversal(model, 0, cells=idx),
}


@pytest.mark.parametrize("readout", list(INDEXED_READOUTS))
@pytest.mark.parametrize(
    ("indices", "error", "match"),
    [
        ([0, 300], IndexError, r"`(indices|cells)` holds 1 position\(s\) outside the AnnData's 300 cells \(e.g. 300\)"),
        ([-301], IndexError, r"outside the AnnData's 300 cells \(e.g. -301\)"),
        ([0.0, 1.0], TypeError, r"must hold integer positions or be a boolean mask, got dtype float64"),
        ([], ValueError, r"`(indices|cells)` selects no cell"),
        (np.zeros(300, dtype=bool), ValueError, r"selects no cell"),
        (np.ones(299, dtype=bool), ValueError, r"boolean mask `(indices|cells)` has 299 values; the AnnData has 300"),
        (np.zeros((2, 2), dtype=int), ValueError, r"must be one-dimensional"),
    ],
)
def test_readouts_refuse_bad_indices_before_any_work(trained_model, readout, indices, error, match, monkeypatch):
    def no_pass(*args, **kwargs):
        raise AssertionError("the cells were read before the indices were checked")

    monkeypatch.setattr(trained_model, "_make_data_loader", no_pass)
    with pytest.raises(error, match=match):
        INDEXED_READOUTS[readout](trained_model, indices)


BACKED_READOUTS = {
    "predict": lambda model, adata, idx: model.predict(adata, indices=idx, batch_size=3),
    "probabilities": lambda model, adata, idx: model.get_category_probabilities(adata, indices=idx, batch_size=3),
    "latent": lambda model, adata, idx: model.get_latent_representation(adata, indices=idx, batch_size=3),
    "expression": lambda model, adata, idx: model.get_normalized_expression(adata, indices=idx, batch_size=3),
    "library": lambda model, adata, idx: model.get_latent_library_size(adata, indices=idx, batch_size=3),
}


@pytest.mark.parametrize("indices", [[5, 2, 200, 0, 7], [3, 3, 1], [0, -1, 1]])
def test_readouts_of_backed_data_follow_the_order_of_indices(trained_model, tmp_path, indices):
    # scvi-tools loads the rows of a backed minibatch in sorted order; they were labelled in the order asked for
    trained_model.adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = anndata.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    for name, readout in BACKED_READOUTS.items():
        expected = readout(trained_model, trained_model.adata, indices)
        result = readout(trained_model, backed, indices)
        if isinstance(expected, pd.Series):
            pd.testing.assert_series_equal(result, expected, obj=name)
        elif isinstance(expected, pd.DataFrame):
            pd.testing.assert_frame_equal(result, expected, rtol=1e-5, obj=name)
        else:
            np.testing.assert_allclose(result, expected, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("option", ["shuffle", "drop_last"])
def test_readouts_refuse_loader_options_that_reorder_or_drop_cells(trained_model, option):
    with pytest.raises(ValueError, match=rf"data_loader_kwargs may not set \['{option}'\]: a read-out returns one row"):
        trained_model.get_normalized_expression(data_loader_kwargs={option: True})
    with pytest.raises(ValueError, match=rf"may not set \['{option}'\]"):
        trained_model.get_latent_library_size(**{option: True})


def test_readouts_take_negative_positions_and_masks_as_numpy_does(trained_model):
    n = trained_model.adata.n_obs
    mask = np.zeros(n, dtype=bool)
    mask[[3, 7, n - 1]] = True
    expected = trained_model.get_latent_representation(indices=[3, 7, n - 1])
    np.testing.assert_allclose(trained_model.get_latent_representation(indices=mask), expected)
    np.testing.assert_allclose(trained_model.get_latent_representation(indices=[3, 7, -1]), expected)
    names = trained_model.predict(indices=[3, 7, -1]).index
    assert names.tolist() == trained_model.adata.obs_names[[3, 7, n - 1]].tolist()


def test_counts_kept_in_raw_are_pointed_to():
    counts = np.random.default_rng(0).poisson(2, (20, 6)).astype(np.float32) + 1
    adata = _adata(counts)
    adata.raw = adata.copy()
    adata.X = np.log1p(counts)
    hint = r"If adata.raw holds the counts, copy them into a layer first: `adata.layers\['counts'\] = adata.raw"
    with pytest.raises(ValueError, match=r"adata.X contains non-integer values.*" + hint):
        CplMixVAE.setup_anndata(adata)
    with pytest.raises(ValueError, match=r"Layer 'raw' not found in adata.layers.*" + hint):
        CplMixVAE.setup_anndata(adata, layer="raw")
    adata.layers["counts"] = adata.raw[:, adata.var_names].X  # as the message says
    CplMixVAE.setup_anndata(adata, layer="counts")
    del adata.raw
    with pytest.raises(ValueError, match=r"adata.layers\['counts'\]\)\.$"):  # no hint without a raw
        CplMixVAE.setup_anndata(adata)


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_a_check_of_the_first_cells_reads_only_those(kind):
    """first_cells=1000 of 1,500 cells read all 1,500 into 1,000 slots (a read-out of every model on > 1,000 cells)."""
    from scmixvae._validation import check_counts

    x = np.random.default_rng(0).poisson(2, (1500, 6)).astype(np.float32) + 1
    adata = _adata(x if kind == "dense" else sp.csr_matrix(x))
    check_counts(adata, first_cells=1000)
    adata.X[1200, 0] = 0.5  # past the cells checked
    check_counts(adata, first_cells=1000)
    with pytest.raises(ValueError, match="non-integer values"):
        check_counts(adata)
