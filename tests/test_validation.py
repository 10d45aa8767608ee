import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

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
    with pytest.warns(UserWarning, match="1 genes have no counts"):
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
    model = CplMixVAE(sim_adata, n_categories=2, n_hidden=8, category_init="random")
    model.train(max_epochs=1, enable_progress_bar=False)
    new = sim_adata[:20].copy()
    new.obs["batch"] = new.obs["batch"].cat.add_categories(["unseen"])
    new.obs.loc[new.obs_names[:5], "batch"] = "unseen"
    with pytest.raises(ValueError, match="unseen"):
        model.predict(new)


def test_csc_input_warns_about_speed():
    x = np.random.default_rng(0).poisson(2, (20, 6)).astype(np.float32) + 1
    adata = _adata(sp.csc_matrix(x))
    with pytest.warns(UserWarning, match="tocsr"):
        CplMixVAE.setup_anndata(adata)


def test_backed_anndata_is_checked_and_trained(tmp_path):
    x = np.random.default_rng(0).poisson(2, (60, 8)).astype(np.float32) + 1
    AnnData(sp.csr_matrix(x)).write_h5ad(tmp_path / "b.h5ad")
    import anndata

    backed = anndata.read_h5ad(tmp_path / "b.h5ad", backed="r")
    CplMixVAE.setup_anndata(backed)
    model = CplMixVAE(backed, n_categories=2, n_hidden=8)  # Leiden start reads the backed matrix in chunks
    model.train(max_epochs=1, batch_size=16, enable_progress_bar=False)
    assert model.predict().shape == (60,)


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
