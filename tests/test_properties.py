"""Property-based tests: small random AnnData objects through setup, read-outs and tl verbs."""

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scmixvae
from scmixvae.model import CplMixVAE

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def count_matrices(draw):
    n_cells = draw(st.integers(4, 24))
    n_genes = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.poisson(draw(st.floats(0.2, 5.0)), (n_cells, n_genes)).astype(np.float32)
    x[:, 0] += 1  # no empty cell
    sparse = draw(st.booleans())
    return sp.csr_matrix(x) if sparse else x


@SETTINGS
@given(x=count_matrices(), k=st.integers(1, 4), n_agents=st.integers(1, 3))
def test_random_counts_train_and_read_out_with_documented_shapes(x, k, n_agents):
    adata = AnnData(x)
    k = min(k, adata.n_obs)
    with np.errstate(all="ignore"):
        CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_categories=k, n_agents=n_agents, n_hidden=8)
    model.train(max_epochs=1, batch_size=8, enable_progress_bar=False, train_size=1.0)
    labels = model.predict()
    assert labels.shape == (adata.n_obs,) and set(labels.cat.categories) == set(model.category_names)
    soft = model.predict(soft=True)
    assert soft.shape == (adata.n_obs, k) and np.allclose(soft.sum(1), 1, atol=1e-4)
    assert model.get_latent_representation().shape == (adata.n_obs, 2)
    assert model.get_agent_agreement().shape == (n_agents, n_agents)
    scmixvae.tl.annotate(adata, model)
    assert adata.obs["cplmixvae_type"].shape == (adata.n_obs,)
    assert adata.obsm["X_cplmixvae_state"].shape == (adata.n_obs, 2)


@SETTINGS
@given(x=count_matrices(), bad=st.sampled_from(["nan", "negative", "fraction", "empty_cell"]))
def test_random_bad_counts_raise_the_documented_error(x, bad):
    x = x.toarray() if sp.issparse(x) else x.copy()
    row = 0
    if bad == "nan":
        x[row, 0] = np.nan
    elif bad == "negative":
        x[row, 0] = -1
    elif bad == "fraction":
        x[row, 0] = 0.25
    else:
        x[row] = 0
    adata = AnnData(x)
    match = {"nan": "NaN", "negative": "negative", "fraction": "non-integer", "empty_cell": "no counts"}[bad]
    with pytest.raises(ValueError, match=match):
        CplMixVAE.setup_anndata(adata)
