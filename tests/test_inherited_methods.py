"""Every public method and property of CplMixVAE, on a small trained model: a sensible result or a clear error."""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import pytest
import sparse
import torch

from scmixvae.data import simulate
from scmixvae.model import CplMixVAE

N_CELLS, N_GENES = 300, 120  # the shape of conftest's trained_model


def _public(kind) -> set[str]:
    names = set()
    for name in dir(CplMixVAE):
        if name.startswith("_"):
            continue
        owner = next(c for c in CplMixVAE.__mro__ if name in c.__dict__)
        if isinstance(inspect.getattr_static(owner, name), kind):
            names.add(name)
    return names


def _is_cell_gene_frame(frame) -> bool:
    return isinstance(frame, pd.DataFrame) and frame.shape == (N_CELLS, N_GENES)


# name -> (call on the shared trained model, check of (model, result)); each check asserts the meaning, not only "ran"
READ_OUTS = {
    "predict": (lambda m: m.predict(), lambda m, r: len(r) == N_CELLS and set(r.unique()) <= set(r.cat.categories)),
    "get_category_probabilities": (
        lambda m: m.get_category_probabilities(),
        lambda m, r: r.shape == (N_CELLS, 4) and np.allclose(r.sum(1), 1, atol=1e-4),
    ),
    "get_latent_representation": (lambda m: m.get_latent_representation(), lambda m, r: r.shape[0] == N_CELLS),
    "get_agent_agreement": (
        lambda m: m.get_agent_agreement(),
        lambda m, r: r.shape == (2, 2) and (np.diag(r) == 1).all(),
    ),
    "get_consensus_matrix": (
        lambda m: m.get_consensus_matrix(),
        lambda m, r: r.shape == (4, 4) and (r.to_numpy() >= 0).all(),
    ),
    "get_normalized_expression": (
        lambda m: m.get_normalized_expression(),
        lambda m, r: _is_cell_gene_frame(r) and (r.to_numpy() >= 0).all(),
    ),
    "differential_expression": (
        lambda m: m.differential_expression(groupby="type", group1="type_0", batch_size=128),
        lambda m, r: len(r) == N_GENES and set(r["group1"]) == {"type_0"} and r["bayes_factor"].notna().all(),
    ),
    "get_elbo": (lambda m: m.get_elbo(), lambda m, r: isinstance(r, float) and np.isfinite(r) and r < 0),
    "get_reconstruction_error": (
        lambda m: m.get_reconstruction_error(),
        lambda m, r: set(r) == {"reconstruction_loss"} and np.isfinite(r["reconstruction_loss"]),
    ),
    "get_marginal_ll": (
        lambda m: m.get_marginal_ll(n_mc_samples=5),
        lambda m, r: isinstance(r, float) and np.isfinite(r),
    ),
    "posterior_predictive_sample": (
        lambda m: m.posterior_predictive_sample(),
        lambda m, r: isinstance(r, sparse.GCXS) and r.shape == (N_CELLS, N_GENES),
    ),
    "get_feature_correlation_matrix": (
        lambda m: m.get_feature_correlation_matrix(n_samples=2),
        lambda m, r: r.shape == (N_GENES, N_GENES) and np.allclose(np.diag(r.fillna(1.0)), 1.0),
    ),
    "get_likelihood_parameters": (
        lambda m: m.get_likelihood_parameters(),
        lambda m, r: set(r) == {"mean", "dispersions"} and all(v.shape == (N_CELLS, N_GENES) for v in r.values()),
    ),
    "get_latent_library_size": (
        lambda m: m.get_latent_library_size(),
        lambda m, r: r.shape == (N_CELLS, 1) and np.allclose(r[:, 0], np.asarray(m.adata.X.sum(1)).ravel()),
    ),
    "get_anndata_manager": (lambda m: m.get_anndata_manager(m.adata), lambda m, r: r is m.adata_manager),
    "get_from_registry": (lambda m: m.get_from_registry(m.adata, "X"), lambda m, r: r.shape == (N_CELLS, N_GENES)),
    "data_registry": (lambda m: m.data_registry("X"), lambda m, r: r.shape == (N_CELLS, N_GENES)),
    "get_setup_arg": (lambda m: m.get_setup_arg("layer"), lambda m, r: r is None),
    "get_state_registry": (lambda m: m.get_state_registry("X"), lambda m, r: len(r["column_names"]) == N_GENES),
    "get_var_names": (lambda m: m.get_var_names(), lambda m, r: list(r) == list(m.adata.var_names)),
    "iter_inference": (
        lambda m: [(inputs["x"].shape, out["q"]) for inputs, out in m.iter_inference(batch_size=128)],
        lambda m, r: (
            [shape[0] for shape, _ in r] == [128, 128, 44]
            and not m.module.training
            and (torch.cat([q for _, q in r], 1).mean(0).argmax(-1).numpy() == m.predict().cat.codes.to_numpy()).all()
        ),
    ),
}

# methods that change the model or need another object: a test of their own below
SEPARATE = {
    "train", "prune", "train_augmenter", "save", "load", "load_registry", "view_setup_args", "convert_legacy_save",
    "setup_anndata", "register_manager", "deregister_manager", "transfer_fields", "update_setup_method_args",
    "to_device", "get_importance_weights", "differential_abundance", "view_setup_method_args", "view_registry",
    "view_anndata_setup", "prepare_query_anndata", "load_query_data",  # reference mapping: tests/test_query.py
}  # fmt: skip
PROPERTIES = {
    "adata", "adata_manager", "category_names", "device", "get_normalized_function_name", "history", "is_trained",
    "n_categories", "pruning_history", "restart_history", "registry", "run_id", "run_name", "start_labels",
    "summary_string", "test_indices", "train_indices", "validation_indices",
}  # fmt: skip


def test_every_public_name_is_covered():
    methods = _public((staticmethod, classmethod)) | {
        n for n in dir(CplMixVAE) if not n.startswith("_") and inspect.isfunction(inspect.getattr_static(CplMixVAE, n))
    }
    assert methods == set(READ_OUTS) | SEPARATE
    assert _public(property) == PROPERTIES


@pytest.mark.parametrize("name", sorted(READ_OUTS))
def test_read_out(trained_model, name):
    call, check = READ_OUTS[name]
    assert check(trained_model, call(trained_model))


def test_properties(trained_model):
    m = trained_model
    assert m.adata.n_obs == N_CELLS and m.adata_manager.adata is m.adata
    assert m.category_names == ["0", "1", "2", "3"] and m.n_categories == 4
    assert m.device == torch.device("cpu") and m.is_trained
    assert m.get_normalized_function_name == "get_normalized_expression"
    assert "train_loss" in m.history and len(m.history["train_loss"]) >= 3
    assert m.pruning_history.empty and m.restart_history.empty
    assert m.start_labels.shape == (N_CELLS,) and set(np.unique(m.start_labels)) <= {0, 1, 2, 3}
    assert m.registry["model_name"] == "CplMixVAE"
    assert m.run_id is None or isinstance(m.run_id, str)
    assert m.run_name is None or isinstance(m.run_name, str)
    assert "CplMixVAE" in m.summary_string
    assert len(m.train_indices) + len(m.validation_indices) + len(m.test_indices) == N_CELLS


def test_views_print_the_registry(trained_model, capsys):
    trained_model.view_setup_method_args()
    assert "CplMixVAE.setup_anndata" in capsys.readouterr().out
    trained_model.view_registry(hide_state_registries=True)
    trained_model.view_anndata_setup(hide_state_registries=True)
    out = capsys.readouterr().out
    assert out.count("CplMixVAE.setup_anndata") == 2 and "adata.X" in out


def test_marginal_ll_bounds_elbo_and_per_agent(trained_model):
    torch.manual_seed(0)
    elbo = trained_model.get_elbo(return_mean=False)
    assert elbo.shape == (N_CELLS,)
    assert trained_model.get_marginal_ll(n_mc_samples=50) > float(elbo.mean())
    per_agent = [trained_model.get_reconstruction_error(agent=a)["reconstruction_loss"] for a in (0, 1)]
    assert trained_model.get_reconstruction_error()["reconstruction_loss"] == pytest.approx(
        np.mean(per_agent), rel=0.05
    )


def test_read_outs_refuse_what_they_do_not_support(trained_model):
    with pytest.raises(ValueError, match="dataloader"):
        trained_model.get_elbo(dataloader=[{}])
    with pytest.raises(ValueError, match="transform_batch"):
        trained_model.posterior_predictive_sample(transform_batch="batch0")
    with pytest.raises(ValueError, match="gene_list"):
        trained_model.posterior_predictive_sample(gene_list=["no such gene"])
    with pytest.raises(NotImplementedError, match="no importance weights"):
        trained_model.get_importance_weights(None, None, None, None, None)
    with pytest.raises(NotImplementedError, match="differential_abundance is not implemented for CplMixVAE"):
        trained_model.differential_abundance()


def test_posterior_predictive_samples_and_likelihood_of_counts(sim_adata):
    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3, n_hidden=16, likelihood="zinb")
    model.train(max_epochs=1, state_epochs=0, batch_size=128, enable_progress_bar=False)
    draws = model.posterior_predictive_sample(n_samples=2, gene_list=sim_adata.var_names[:5]).todense()
    assert draws.shape == (sim_adata.n_obs, 5, 2) and (draws >= 0).all() and np.allclose(draws, np.round(draws))
    params = model.get_likelihood_parameters(agent=0)
    assert set(params) == {"mean", "dispersions", "dropout"}
    assert all(v.shape == (sim_adata.n_obs, sim_adata.n_vars) for v in params.values())
    assert ((params["dropout"] >= 0) & (params["dropout"] <= 1)).all()
    library = model.get_latent_library_size()
    # the NB means sum to the observed library size: the frequencies sum to one
    np.testing.assert_allclose(params["mean"].sum(1), library[:, 0], rtol=1e-4)


def test_methods_that_change_the_model(sim_adata, tmp_path):
    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3, n_hidden=16, input_dropout=0.5)  # own views, for prune()
    model.train(max_epochs=1, state_epochs=0, batch_size=128, enable_progress_bar=False)
    assert model.is_trained
    with pytest.raises(ValueError, match="only augmentation='learned' has an augmenter"):
        model.train_augmenter(max_epochs=1)
    rounds = model.prune(max_rounds=1, epochs_per_round=1, enable_progress_bar=False)
    assert rounds["selected"].sum() == 1 and model.n_categories <= 3
    model.to_device("cpu")
    assert model.device == torch.device("cpu")
    model.update_setup_method_args({"layer": None})
    assert model.get_setup_arg("layer") is None

    model.save(tmp_path / "model", save_anndata=False)
    assert CplMixVAE.load_registry(tmp_path / "model")["model_name"] == "CplMixVAE"
    assert CplMixVAE.view_setup_args(tmp_path / "model") is None
    loaded = CplMixVAE.load(tmp_path / "model", adata=sim_adata)
    np.testing.assert_array_equal(loaded.predict().to_numpy(), model.predict().to_numpy())
    with pytest.raises(NotImplementedError, match="no legacy save format"):
        CplMixVAE.convert_legacy_save(tmp_path / "model", tmp_path / "converted")

    transferred = model.transfer_fields(sim_adata.copy())
    assert transferred.adata.n_obs == sim_adata.n_obs and "_scvi_batch" in transferred.adata.obs
    other = simulate(n_cells=300, n_genes=120, n_types=3, n_batches=2, seed=0)  # not a copy: its own uuid
    CplMixVAE.setup_anndata(other)
    model.get_latent_representation(other)  # registers it with the model
    assert model.get_anndata_manager(other, required=True).adata is other
    model.deregister_manager(other)
    assert model.get_anndata_manager(other) is None
    CplMixVAE.register_manager(transferred)
    assert CplMixVAE._setup_adata_manager_store[transferred.adata_uuid] is transferred


GENE_READOUTS = {
    "expression": lambda model, genes: model.get_normalized_expression(gene_list=genes),
    "samples": lambda model, genes: model.posterior_predictive_sample(gene_list=genes),
}


@pytest.mark.parametrize("readout", list(GENE_READOUTS))
@pytest.mark.parametrize(
    ("genes", "error", "match"),
    [
        (
            ["no such gene"],
            ValueError,
            r"`gene_list` holds 1 gene\(s\) that are not the model's, e.g. \['no such",
        ),
        ("gene0", TypeError, r"must be a list of gene names, got the string 'gene0': pass \['gene0'\]"),
        ([], ValueError, r"`gene_list` is empty; pass None for every gene"),
    ],
)
def test_bad_gene_lists_are_refused(trained_model, readout, genes, error, match):
    with pytest.raises(error, match=match):
        GENE_READOUTS[readout](trained_model, genes)


def test_a_gene_list_with_one_known_and_one_unknown_gene_is_refused(trained_model):
    known = trained_model.adata.var_names[0]
    with pytest.raises(ValueError, match=r"1 gene\(s\) that are not the model's, e.g. \['nope'\]"):
        trained_model.get_normalized_expression(gene_list=[known, "nope"])
    assert trained_model.get_normalized_expression(gene_list=[known]).columns.tolist() == [known]


@pytest.mark.parametrize("size", [0, -3.0, float("nan")])
def test_normalized_expression_needs_a_positive_library_size(trained_model, size):
    with pytest.raises(ValueError, match='`library_size` must be a positive number or "latent"'):
        trained_model.get_normalized_expression(library_size=size)


def test_normalized_expression_needs_a_positive_number_of_samples_overall(trained_model):
    with pytest.raises(ValueError, match="`n_samples_overall` must be >= 1, got 0"):
        trained_model.get_normalized_expression(n_samples_overall=0)


def test_differential_expression_refuses_unknown_groups_before_any_work(trained_model, monkeypatch):
    def no_pass(*args, **kwargs):
        raise AssertionError("the cells were read before the groups were checked")

    monkeypatch.setattr(trained_model, "_make_data_loader", no_pass)
    with pytest.raises(ValueError, match=r"`groupby`: column\(s\) \['nope'\] not found in adata.obs"):
        trained_model.differential_expression(groupby="nope")
    with pytest.raises(ValueError, match=r"`groupby`: column\(s\) \['nope'\] not found in adata.obs"):
        trained_model.differential_expression(None, "nope")
    with pytest.raises(ValueError, match=r"`group1`: \['zzz'\] not among the values of adata.obs\['type'\]"):
        trained_model.differential_expression(groupby="type", group1=["type_0", "zzz"])
    # unknown group2: was "`indices` selects no cell"; no groups at all: was scvi-tools' "KeyError: None"
    with pytest.raises(ValueError, match=r"`group2`: \['zzz'\] not among the values"):
        trained_model.differential_expression(groupby="type", group1="type_0", group2="zzz")
    with pytest.raises(ValueError, match=r"needs the cells to compare: `groupby` .* or `idx1`"):
        trained_model.differential_expression()
    assert "_scvi_raw_norm_scaling" not in trained_model.adata.obs


def test_differential_expression_takes_a_group_that_is_a_number(trained_model):
    # scvi-tools wraps a single group1 that is not a string in a list; the check here iterated over it
    data = trained_model.adata.copy()
    data.obs["code"] = data.obs["type"].cat.codes.astype(int)
    table = trained_model.differential_expression(data, groupby="code", group1=0, batch_size=128)
    assert set(table["group1"]) == {0} and len(table) == data.n_vars


def test_differential_expression_on_backed_data_needs_all_stats_off(trained_model, tmp_path, monkeypatch):
    """scvi-tools' raw-count statistics failed on backed data with "'_CSRDataset' object has no attribute 'sum'",
    after all the sampling."""
    import anndata

    trained_model.adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = anndata.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    loader = trained_model._make_data_loader

    def no_pass(*args, **kwargs):
        raise AssertionError("the cells were read before all_stats was checked")

    monkeypatch.setattr(trained_model, "_make_data_loader", no_pass)
    with pytest.raises(ValueError, match=r"all_stats=True\) need the counts in memory; .* Pass all_stats=False"):
        trained_model.differential_expression(backed, groupby="type")
    monkeypatch.setattr(trained_model, "_make_data_loader", loader)
    table = trained_model.differential_expression(backed, groupby="type", group1="type_0", all_stats=False)
    assert table.shape[0] == trained_model.adata.n_vars and "bayes_factor" in table
    assert "raw_mean1" not in table
