"""The user's AnnData is never changed beyond what setup_anndata registers and what an explicit tl call writes."""

import hashlib

import numpy as np
import pandas as pd
import scipy.sparse as sp

import scmixvae
from scmixvae._constants import RAW_SCALING_KEY, REGISTERED_OBS_COLUMNS
from scmixvae.model import CplMixVAE

REGISTERED_OBS = set(REGISTERED_OBS_COLUMNS)
REGISTERED_UNS = {"_scvi_uuid", "_scvi_manager_uuid"}


def _digest(adata) -> dict:
    def h(x):
        if sp.issparse(x):
            x = x.tocsr()
            parts = [x.data, x.indices, x.indptr]
        else:
            parts = [np.asarray(x)]
        m = hashlib.sha256()
        for p in parts:
            m.update(np.ascontiguousarray(p).tobytes())
        return m.hexdigest()

    obs = adata.obs.drop(columns=[c for c in adata.obs if c in REGISTERED_OBS])
    return {
        "X": h(adata.X),
        "layers": {k: h(v) for k, v in adata.layers.items()},
        "obs": pd.util.hash_pandas_object(obs, index=True).sum(),
        "obs_columns": list(obs.columns),
        "var": pd.util.hash_pandas_object(adata.var, index=True).sum(),
        "obsm": sorted(adata.obsm.keys()),
        "uns": sorted(k for k in adata.uns.keys() if k not in REGISTERED_UNS),
    }


def test_public_calls_do_not_modify_the_users_data(sim_adata):
    sim_adata.layers["counts"] = sim_adata.X.copy()
    before = _digest(sim_adata)
    CplMixVAE.setup_anndata(sim_adata, layer="counts", batch_key="batch")
    model = CplMixVAE(sim_adata, n_categories=3, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    model.predict()
    model.predict(soft=True)
    model.get_latent_representation()
    model.get_category_probabilities(agent=1)
    model.get_agent_agreement()
    model.get_consensus_matrix()
    assert _digest(sim_adata) == before
    copy = scmixvae.tl.annotate(sim_adata, model, copy=True)
    assert "cplmixvae_type" in copy.obs
    assert _digest(sim_adata) == before
    scmixvae.tl.annotate(sim_adata, model)
    after = _digest(sim_adata)
    assert after["X"] == before["X"] and after["layers"] == before["layers"] and after["var"] == before["var"]
    assert set(after["obs_columns"]) - set(before["obs_columns"]) == {
        "cplmixvae_type", "cplmixvae_confidence", "cplmixvae_agree", "cplmixvae_agent0_type", "cplmixvae_agent1_type"
    }  # fmt: skip


def test_augmentations_and_pruning_do_not_modify_the_users_data(sim_adata):
    before = _digest(sim_adata)
    CplMixVAE.setup_anndata(sim_adata)
    for augmentation in ("thinning", "knn", "learned"):
        model = CplMixVAE(sim_adata, n_categories=4, n_hidden=16, augmentation=augmentation)
        model.train(max_epochs=1, batch_size=100, enable_progress_bar=False)
        assert _digest(sim_adata) == before, augmentation
    model.prune(max_rounds=1, epochs_per_round=1, batch_size=100, enable_progress_bar=False)
    assert _digest(sim_adata) == before


def test_setup_adds_exactly_the_documented_registration_keys(sim_adata):
    sim_adata.obs["stim"] = pd.Categorical(np.where(np.arange(sim_adata.n_obs) % 2, "stim", "ctrl"))
    obs, uns = list(sim_adata.obs.columns), set(sim_adata.uns)
    before = _digest(sim_adata)
    CplMixVAE.setup_anndata(sim_adata, batch_key="batch")
    assert _digest(sim_adata) == before
    assert list(sim_adata.obs.columns) == [*obs, "_scvi_batch", "_scvi_labels"]
    assert set(sim_adata.uns) - uns == REGISTERED_UNS
    codes = pd.Categorical(sim_adata.obs["batch"]).codes
    np.testing.assert_array_equal(sim_adata.obs["_scvi_batch"].to_numpy(), codes)
    np.testing.assert_array_equal(sim_adata.obs["_scvi_labels"].to_numpy(), 0)  # no labels_key: all zeros
    again = sim_adata.copy()
    del again.obs["_scvi_batch"], again.obs["_scvi_labels"]
    CplMixVAE.setup_anndata(again, batch_key="batch", condition_key="stim")
    assert list(again.obs.columns) == [*obs, "_scvi_batch", "_scvi_labels", "_scvi_condition"]
    assert set(REGISTERED_OBS_COLUMNS) == {"_scvi_batch", "_scvi_labels", "_scvi_condition"}


def test_differential_expression_leaves_obs_alone(sim_adata):
    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    columns = list(sim_adata.obs.columns)
    before = _digest(sim_adata)
    result = model.differential_expression(groupby="type", batch_size=64)
    assert len(result) >= sim_adata.n_vars and "bayes_factor" in result
    model.differential_expression(idx1=np.arange(50), idx2=np.arange(50, 100), batch_size=64)
    assert list(sim_adata.obs.columns) == columns and RAW_SCALING_KEY not in sim_adata.obs
    assert _digest(sim_adata) == before
