import copy
import itertools
import json
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from lightning.pytorch.callbacks import Callback

from scmixvae import _scoring
from scmixvae._scoring import (
    categories_to_prune,
    category_agreement,
    check_collapse,
    co_assignment,
    mean_consensus,
    select_round,
)
from scmixvae.model import CplMixVAE, _fit, _pruning
from scmixvae.train import ConvergenceStopping

TRAIN = {"batch_size": 64, "enable_progress_bar": False}


def _small_model(n_categories=6, n_agents=2, epochs=2, input_dropout=0.5):
    from scmixvae.data._simulate import simulate

    scvi.settings.seed = 0
    adata = simulate(n_cells=400, n_genes=100, n_types=3, seed=0)
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_categories=n_categories, n_agents=n_agents, n_hidden=16, input_dropout=input_dropout)
    if epochs:
        model.train(max_epochs=epochs, **TRAIN)
    return model


@pytest.fixture(scope="module")
def pruned():
    """A model pruned from 6 categories, one epoch per round, with a snapshot of every round.

    Threshold 1: only perfect consensus stops the pruning before it reaches ``min_categories`` (2).
    """
    model = _small_model()
    snapshots = []
    evaluate = _pruning._evaluate

    def recording_evaluate(model, *args, **kwargs):
        out = evaluate(model, *args, **kwargs)
        snapshots.append(_pruning._snapshot(model.module))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_pruning, "_evaluate", recording_evaluate)
        history = _pruning.prune(model, threshold=1.0, epochs_per_round=1, **TRAIN)
    return model, history, snapshots


# ------------------------------------------------------------------------------------- scores


def test_co_assignment_counts_every_pair_of_labels():
    m = co_assignment(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 4)
    expected = np.zeros((4, 4), dtype=int)
    expected[0, 0] = expected[0, 1] = expected[1, 1] = expected[2, 2] = expected[2, 0] = 1
    np.testing.assert_array_equal(m, expected)


def test_category_agreement_divides_the_diagonal_by_the_larger_marginal():
    labels = np.array([[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]])
    mask = np.array([True, True, True, False, True])
    agreement = category_agreement(labels, mask)
    # M[0,0] = 2, row 3, col 2; M[1,1] = 2, row 2, col 4; category 2: row 1, no agreement; 4 unused
    np.testing.assert_allclose(agreement[[0, 1, 2, 4]], [2 / 3, 2 / 4, 0.0, 0.0])
    assert np.isnan(agreement[3])


def test_category_agreement_averages_over_agent_pairs():
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    agreement = category_agreement(labels, np.ones(2, dtype=bool))
    # pairs (0,1): [1, 1]; (0,2) and (1,2): [1/2, 2/3]
    np.testing.assert_allclose(agreement, [(1 + 0.5 + 0.5) / 3, (1 + 2 / 3 + 2 / 3) / 3])


def test_mean_consensus_averages_the_row_normalised_diagonal_over_used_rows_and_both_orders():
    labels = np.array([[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]])
    mask = np.ones(4, dtype=bool)
    # rows of agent 0: [2/3, 2/2, 0/1] (category 3 unused); rows of agent 1: [2/2, 2/4]
    expected = (np.mean([2 / 3, 1.0, 0.0]) + np.mean([1.0, 0.5])) / 2
    assert mean_consensus(labels, mask) == pytest.approx(expected)
    assert mean_consensus(labels[[0, 0]], mask) == 1.0


def test_scores_reject_labels_of_masked_categories_and_single_agents():
    with pytest.raises(ValueError, match="surviving"):
        category_agreement(np.array([[0, 1], [0, 1]]), np.array([True, False]))
    with pytest.raises(ValueError, match="n_agents >= 2"):
        mean_consensus(np.array([[0, 1]]), np.array([True, True]))


# ------------------------------------------------------------------------------------- selection


def _history(n_categories, consensus, rounds=None):
    rounds = list(range(len(n_categories))) if rounds is None else rounds
    return pd.DataFrame({"round": rounds, "n_categories": n_categories, "mean_consensus": consensus})


def test_select_round_takes_the_most_categories_among_rounds_above_threshold():
    history = _history([10, 8, 7, 5, 3], [0.80, 0.96, 0.97, 0.99, 0.93])
    assert select_round(history, 0.95) == 1
    assert select_round(history, 0.98) == 3
    assert select_round(history, 0.5) == 0


def test_select_round_returns_the_round_label_not_the_position():
    history = _history([10, 8, 7, 5], [0.80, 0.96, 0.97, 0.99], rounds=[3, 4, 5, 6])
    assert select_round(history, 0.95) == 4
    by_index = history.drop(columns="round").set_axis([20, 21, 22, 23])
    assert select_round(by_index, 0.95) == 21


def test_select_round_without_a_round_above_threshold_takes_the_best_consensus():
    history = _history([8, 6, 4, 3], [0.5, 0.7, 0.9, 0.9])
    assert select_round(history, 0.95) == 2  # tie at 0.9: the larger K
    history = _history([8, 6, 4], [np.nan, 0.2, 0.1])
    assert select_round(history, 0.95) == 1


def test_select_round_rejects_an_empty_history():
    with pytest.raises(ValueError, match="empty"):
        select_round(_history([], []), 0.95)


def test_categories_to_prune_always_removes_empties_and_one_populated():
    agreement = np.full(10, 0.97)
    agreement[7] = 0.96
    counts = np.array([50, 0, 40, 0, 30, 0, 20, 10, 0, 60])
    drop = categories_to_prune(agreement, np.ones(10, dtype=bool), counts, min_categories=2)
    np.testing.assert_array_equal(drop, [1, 3, 5, 7, 8])  # 4 empties beyond the 20% cap, plus the worst


def test_categories_to_prune_removes_several_clear_failures():
    agreement = np.array([0.95, 0.96, 0.97, 0.94, 0.98, 0.20, 0.30, 0.95, 0.96, 0.97])
    counts = np.full(10, 30)
    drop = categories_to_prune(agreement, np.ones(10, dtype=bool), counts, min_categories=2)
    np.testing.assert_array_equal(drop, [5, 6])
    agreement = np.array([0.97, 0.98, 0.97, 0.99, 0.98, 0.97, 0.80, 0.98, 0.97, 0.98])  # a low outlier
    drop = categories_to_prune(agreement, np.ones(10, dtype=bool), counts, min_categories=2)
    np.testing.assert_array_equal(drop, [6])


def test_categories_to_prune_caps_a_round_at_max_fraction_worst_first():
    agreement = np.array([0.1, 0.4, 0.2, 0.3, 0.45, 0.9, 0.95, 0.9, 0.95, 0.9])
    counts = np.full(10, 30)
    drop = categories_to_prune(agreement, np.ones(10, dtype=bool), counts, min_categories=2, max_fraction=0.2)
    np.testing.assert_array_equal(drop, [0, 2])


def test_categories_to_prune_removes_the_least_agreeing_when_none_fails():
    agreement = np.array([0.99, 0.97, 0.99, 0.99, 0.99])
    drop = categories_to_prune(agreement, np.ones(5, dtype=bool), np.full(5, 30), min_categories=2)
    np.testing.assert_array_equal(drop, [1])
    tied = categories_to_prune(np.full(3, 0.99), np.ones(3, dtype=bool), np.array([30, 5, 30]), min_categories=2)
    np.testing.assert_array_equal(tied, [1])  # ties: the smaller category


def test_categories_to_prune_never_goes_below_min_categories_and_ignores_masked():
    mask = np.array([True, True, True, True, False, False])
    agreement = np.array([0.1, 0.2, 0.3, 0.4, 0.0, 0.0])
    counts = np.array([30, 30, 30, 30, 0, 0])
    np.testing.assert_array_equal(categories_to_prune(agreement, mask, counts, min_categories=3), [0])
    counts_empty = np.array([30, 0, 0, 30, 0, 0])
    np.testing.assert_array_equal(categories_to_prune(agreement, mask, counts_empty, min_categories=3), [1])
    assert categories_to_prune(agreement, mask, counts, min_categories=4).size == 0


# ------------------------------------------------------------------------------------- collapse


def test_check_collapse_warns_on_collapsed_posteriors():
    rng = np.random.default_rng(0)
    q = np.full((2, 200, 5), 0.2) + rng.uniform(0, 0.01, (2, 200, 5))
    q[..., 0] += 0.02  # every cell's argmax is category 0, the posteriors are near uniform
    q /= q.sum(-1, keepdims=True)
    with pytest.warns(UserWarning, match="collapsed") as record:
        problems = check_collapse(q)
    assert len(problems) == 2
    assert record[0].filename == __file__


def test_check_collapse_is_silent_on_healthy_posteriors():
    labels = np.repeat(np.arange(4), 50)
    q = np.full((200, 4), 0.01)
    q[np.arange(200), labels] = 0.97
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_collapse(np.stack([q, q])) == []
        full = np.concatenate([q, np.zeros((200, 2))], axis=1)
        assert check_collapse(full, np.array([True] * 4 + [False] * 2)) == []


# ------------------------------------------------------------------------------------- training


def test_convergence_stopping_stops_after_patience_without_relative_improvement():
    stopper = ConvergenceStopping(rel_tol=0.01, patience=2, min_epochs=3)
    trainer = SimpleNamespace(callback_metrics={}, should_stop=False)
    stopper.on_fit_start(trainer, None)
    seen = 0
    for loss in [100.0, 90.0, 89.5, 89.4, 80.0]:
        trainer.callback_metrics["train_loss"] = torch.tensor(loss)
        stopper.on_train_epoch_end(trainer, None)
        seen += 1
        if trainer.should_stop:
            break
    assert seen == 4 and stopper.stopped_epoch == 4


def test_training_with_masked_categories_keeps_gradients_finite():
    model = _small_model(n_categories=4, epochs=0)
    model.module.category_mask[1] = False
    model.train(max_epochs=1, **TRAIN)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    assert all(torch.isfinite(p).all() for p in model.module.parameters())


def test_prune_records_one_row_per_round_with_decreasing_k(pruned):
    _, history, snapshots = pruned
    assert list(history.columns) == _pruning.HISTORY_COLUMNS
    assert history["round"].tolist() == list(range(len(history))) == list(range(len(snapshots)))
    assert len(history) >= 2
    k = history["n_categories"].to_numpy()
    assert (np.diff(k) < 0).all() and k[0] <= 6
    # the last round is the first at min_categories or at the threshold; none before it reached either
    assert k[-1] == 2 or history["mean_consensus"].iloc[-1] >= 1.0
    assert (k[:-1] > 2).all() and (history["mean_consensus"].iloc[:-1] < 1.0).all()
    assert np.isfinite(history["train_loss"]).all()
    assert (history["epochs"].iloc[1:] == 1).all()
    for _, row in history.iterrows():
        names = json.loads(row["categories"])
        assert len(names) == row["n_categories"]
        assert list(json.loads(row["agreement"])) == names
    pruned_names = [json.loads(p) for p in history["pruned"]]
    assert all(pruned_names[:-1]) and pruned_names[-1] == []


def test_prune_restores_the_selected_round(pruned):
    model, history, snapshots = pruned
    selected = select_round(history, history.attrs["threshold"])
    assert history["selected"].sum() == 1
    assert history.loc[history["selected"], "round"].item() == selected == history.attrs["selected_round"]
    row = history.set_index("round").loc[selected]
    state = model.module.state_dict()
    assert state.keys() == snapshots[selected]["weights"].keys()
    for name, value in snapshots[selected]["weights"].items():
        assert torch.equal(state[name].cpu(), value), name
    assert model.n_categories == row["n_categories"]
    assert model.category_names == json.loads(row["categories"])
    labels, _ = _pruning._labels(model, 128)
    assert mean_consensus(labels, model.module.category_mask.numpy()) == pytest.approx(row["mean_consensus"])


def test_prune_restores_the_optimiser_state_of_the_round_it_keeps(monkeypatch):
    """Only the weights came back: the state phase trained on with the Adam moments of a later, discarded round."""
    model = _small_model()
    moments = []
    evaluate = _pruning._evaluate

    def recording_evaluate(model, *args, **kwargs):
        moments.append(copy.deepcopy(model.module.carried_optimizer_state[1]["state"]))
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(_pruning, "_evaluate", recording_evaluate)
    monkeypatch.setattr(_pruning, "_selection_key", lambda *args: 0)  # every round ties: the first is kept
    monkeypatch.setattr(_pruning, "select_round", lambda *args: 0)
    _pruning.prune(model, threshold=1.0, epochs_per_round=1, max_rounds=2, **TRAIN)
    kept = model.module.carried_optimizer_state[1]["state"]
    assert len(moments) == 3 and kept.keys() == moments[0].keys()
    assert all(torch.equal(kept[i]["exp_avg"], moments[0][i]["exp_avg"]) for i in kept)
    assert not all(torch.equal(kept[i]["exp_avg"], moments[-1][i]["exp_avg"]) for i in kept)


def test_mask_is_a_buffer_and_history_survives_save_load(pruned, tmp_path):
    model, history, _ = pruned
    module = model.module
    assert dict(module.named_buffers())["category_mask"] is module.category_mask
    model.save(tmp_path / "model", overwrite=True, save_anndata=False)
    loaded = CplMixVAE.load(tmp_path / "model", adata=model.adata)
    assert torch.equal(loaded.module.category_mask, module.category_mask)
    assert loaded.n_categories == model.n_categories
    pd.testing.assert_frame_equal(loaded.pruning_history, history)
    assert loaded.pruning_history.attrs == history.attrs
    pd.testing.assert_frame_equal(loaded.predict(soft=True), model.predict(soft=True))


@pytest.mark.gpu
def test_mask_moves_with_the_module(pruned):
    module = pruned[0].module.to("cpu")  # the fixture trains on whatever accelerator "auto" finds
    mask = module.category_mask.clone()
    assert not mask.all()  # a pruned category is masked
    module.to("cuda")
    try:
        assert module.category_mask.device.type == "cuda"
        assert torch.equal(module.category_mask.cpu(), mask)
    finally:
        module.to("cpu")


def test_model_prune_api_returns_and_stores_the_history():
    model = _small_model()
    assert model.pruning_history.empty
    assert list(model.pruning_history.columns) == _pruning.HISTORY_COLUMNS
    history = model.prune(max_rounds=1, epochs_per_round=1, **TRAIN)
    assert history is model.pruning_history
    assert len(history) <= 2 and history["selected"].sum() == 1
    assert model.n_categories == history.loc[history["selected"], "n_categories"].item()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_epochs": 3}, "epochs_per_round"),
        ({"min_categories": 7}, "min_categories"),
        ({"threshold": 1.5}, "threshold"),
    ],
)
def test_prune_rejects_bad_arguments_before_training(kwargs, match):
    model = _small_model(epochs=0)
    with pytest.raises(ValueError, match=match):
        model.prune(**kwargs)
    assert not model.is_trained_


def test_prune_warns_when_every_agent_reads_the_same_cell():
    model = _small_model(input_dropout=None)  # K given: input_dropout 0, augmentation "dropout"
    assert model.module.input_dropout == 0
    with pytest.warns(UserWarning, match="Every agent reads the same cell") as record:
        model.prune(max_rounds=1, epochs_per_round=1, **TRAIN)
    assert [w.filename for w in record if "same cell" in str(w.message)] == [__file__]  # the user's line
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Every agent reads the same cell")
        _small_model().prune(max_rounds=1, epochs_per_round=1, **TRAIN)  # own views: no warning


def test_prune_needs_two_agents():
    model = _small_model(n_agents=1, epochs=0)
    with pytest.raises(ValueError, match="two agents"):
        model.prune()


def test_prune_leaves_a_model_with_state_readouts():
    from scmixvae.data._simulate import simulate

    adata = simulate(n_cells=200, n_genes=60, n_types=3, seed=0)
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_categories=4, n_hidden=8)
    model.train(max_epochs=1, **TRAIN)
    history = model.prune(max_rounds=1, epochs_per_round=1, **TRAIN)
    assert history["selected"].sum() == 1
    assert model.n_categories == history.loc[history["selected"], "n_categories"].item()
    assert model.get_latent_representation().shape == (adata.n_obs, 2)


@pytest.mark.parametrize(("n_cells", "expected"), [(10, 2), (300, 6), (1000, 20), (2500, 50), (100_000, 50)])
def test_default_n_categories_covers_fifty_types_and_scales_down_on_small_data(n_cells, expected):
    from scmixvae.model._model import default_n_categories

    assert default_n_categories(n_cells) == expected


def _unknown_k_model(**kwargs):
    from scmixvae.data._simulate import simulate

    scvi.settings.seed = 0
    adata = simulate(n_cells=400, n_genes=80, n_types=3, seed=0)
    CplMixVAE.setup_anndata(adata)
    return CplMixVAE(adata, n_hidden=16, **kwargs)


def test_without_n_categories_the_first_train_prunes_and_later_ones_do_not():
    model = _unknown_k_model()
    assert model.n_categories == 8  # 400 cells // 50
    assert "n_categories: 8 (maximum; train() prunes)" in model._model_summary_string
    model.train(max_epochs=1, prune_kwargs={"max_rounds": 1, "epochs_per_round": 1}, n_restarts=1, **TRAIN)
    history = model.pruning_history
    assert 1 <= len(history) <= 2 and history["selected"].sum() == 1
    assert history.loc[0, "n_categories"] <= 8 and history.loc[0, "epochs"] == 1
    assert model.n_categories == history.loc[history["selected"], "n_categories"].item()
    model.train(max_epochs=1, **TRAIN)  # trains on at the chosen K
    pd.testing.assert_frame_equal(model.pruning_history, history)


def test_a_given_n_categories_is_kept_unless_prune_is_asked_for():
    model = _unknown_k_model(n_categories=5)
    model.train(max_epochs=1, **TRAIN)
    assert model.pruning_history.empty and model.n_categories == 5
    model.train(prune=True, prune_kwargs={"max_rounds": 1, "epochs_per_round": 1}, state_epochs=0, **TRAIN)
    history = model.pruning_history
    assert 1 <= len(history) <= 2 and history.loc[0, "n_categories"] <= 5
    assert model.n_categories == history.loc[history["selected"], "n_categories"].item()


def test_unknown_k_needs_two_agents_and_round_trips_as_a_fixed_k(tmp_path):
    with pytest.raises(ValueError, match="needs the consensus of at least two agents"):
        _unknown_k_model(n_agents=1)
    model = _unknown_k_model()
    # a threshold round 0 reaches: the 8 categories are chosen (no fit without consensus)
    model.train(max_epochs=1, prune_kwargs={"max_rounds": 0, "threshold": 0.05}, n_restarts=1, **TRAIN)
    model.save(tmp_path / "m", save_anndata=False)
    loaded = CplMixVAE.load(tmp_path / "m", adata=model.adata)
    assert loaded.init_params_["non_kwargs"]["n_categories"] == 8
    assert not loaded.choose_n_categories_
    pd.testing.assert_frame_equal(loaded.predict(soft=True), model.predict(soft=True))


def test_default_augmentation_is_knn_when_the_model_chooses_k_and_dropout_otherwise(tmp_path):
    chooser = _unknown_k_model()
    assert chooser.module.augmentation == "knn"
    assert chooser.module.augmentation_strength == 0.3  # the strength measured best with pruning
    assert chooser.init_params_["non_kwargs"]["augmentation"] == "knn"  # saved resolved: load rebuilds it
    assert _unknown_k_model(n_categories=4).module.augmentation == "dropout"
    assert _unknown_k_model(augmentation="thinning").module.augmentation == "thinning"


def test_a_model_choosing_k_couples_weakly_then_warms_the_coupling_up_smoothly_in_the_first_round(monkeypatch):
    from lightning.pytorch.callbacks import Callback

    monkeypatch.setattr(_pruning, "fit_without_consensus", lambda model, schedule, augmenter: None)  # the rounds alone

    model = _unknown_k_model(coupling_weight=2.0)
    steps, runs = [], []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.append((len(runs) - 1, pl_module._coupling_factor(batch_idx) * pl_module.module.coupling_weight))

        def on_train_start(self, trainer, pl_module):
            state = trainer.optimizers[0].state_dict()["state"]
            runs.append({"start": {i: s["exp_avg"].clone() for i, s in state.items()}})

        def on_train_end(self, trainer, pl_module):
            state = trainer.optimizers[0].state_dict()["state"]
            runs[-1]["end"] = {i: s["exp_avg"].clone() for i, s in state.items()}

    prune_kwargs = {"max_rounds": 2, "epochs_per_round": 4, "threshold": 0.9999}
    model.train(max_epochs=2, state_epochs=0, prune_kwargs=prune_kwargs, callbacks=[Record()], n_restarts=1, **TRAIN)
    weights = {run: np.array([w for r, w in steps if r == run]) for run in range(len(runs))}
    assert len(runs) == 3  # the categories, two pruning rounds
    assert len(weights[0]) == 14  # two epochs of seven steps
    np.testing.assert_allclose(weights[0], 0.002)  # weakly coupled: 0.001 * coupling_weight
    ramp = weights[1]
    n_warm = len(ramp) // 2  # two of the round's four epochs
    assert ramp[0] == pytest.approx(0.002)  # continues from where the categories trained: no jump
    ratios = ramp[1:n_warm] / ramp[: n_warm - 1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-6)  # geometric: the same factor every step
    assert ratios[0] < 2.0  # 1000x in 14 steps, no jump
    np.testing.assert_allclose(ramp[n_warm:], 2.0)
    np.testing.assert_allclose(weights[2], 2.0)
    assert "coupling_weight" in model.history  # logged
    assert model.history["coupling_weight"].to_numpy(float).max() == pytest.approx(2.0)
    # each run's optimiser starts where the previous one ended (Adam's moments carried over)
    for before, after in itertools.pairwise(runs):
        assert before["end"] and sorted(after["start"]) == sorted(before["end"])
        for i, exp_avg in before["end"].items():
            torch.testing.assert_close(after["start"][i], exp_avg, rtol=0, atol=0)
    assert not model.module.coupling_weights.any()  # pruning keeps the published normalisation: nothing capped


@pytest.mark.parametrize("plan_kwargs", [{}, {"coupling_weight_cap": None}])
def test_with_k_given_the_coupling_caps_each_category_weight_unless_told_not_to(plan_kwargs):
    from scmixvae.model import _fit

    model = _unknown_k_model(n_categories=3)
    caps = []
    loss = model.module.loss

    def recording_loss(*args, coupling_weight_cap=None, **kwargs):
        caps.append(coupling_weight_cap)
        return loss(*args, coupling_weight_cap=coupling_weight_cap, **kwargs)

    model.module.loss = recording_loss
    model.train(max_epochs=1, state_epochs=0, plan_kwargs=plan_kwargs, **TRAIN)
    capped = "coupling_weight_cap" not in plan_kwargs
    assert caps and set(caps) == {_fit.COUPLING_WEIGHT_CAP if capped else None}
    assert bool(model.module.coupling_weights.gt(0).all()) is capped  # the running mean of the weights


def test_prune_on_an_untrained_model_of_unknown_k_prunes_once(monkeypatch):
    model = _unknown_k_model()
    calls = {"n": 0}
    prune = _pruning.prune

    def counting(*args, **kwargs):
        calls["n"] += 1
        return prune(*args, **kwargs)

    monkeypatch.setattr(_pruning, "prune", counting)
    monkeypatch.setattr(_fit, "default_max_epochs", lambda n_cells: 2)  # a short first training
    # prune() trains the untrained model first; that training must not start a pruning of its own
    history = model.prune(max_rounds=1, epochs_per_round=1, batch_size=64, enable_progress_bar=False)
    assert calls["n"] == 1
    assert history is not None and 1 <= len(history) <= 2 and history["selected"].sum() == 1


# ------------------------------------------------------------------------------------- restarts


def test_medoid_picks_the_labelling_that_agrees_best_with_the_others():
    a = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    b = np.array([5, 5, 5, 7, 7, 7, 7, 7, 7])  # a with types 1 and 2 merged
    c = np.array([1, 1, 1, 2, 2, 2, 0, 0, 0])  # a, renamed
    d = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])  # unrelated
    best, ari = _scoring.medoid([b, d, a, c])
    assert best == 2  # a and c agree fully; a is first of the two
    assert ari.shape == (4, 4) and np.allclose(np.diag(ari), 1) and np.allclose(ari, ari.T)
    assert ari[2, 3] == pytest.approx(1.0) and ari[0, 2] < 1
    assert _scoring.medoid([d, a, c])[0] == 1


def test_medoid_takes_the_first_on_a_tie_and_rejects_bad_input():
    a, b = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    assert _scoring.medoid([a, b])[0] == 0 and _scoring.medoid([b, a])[0] == 0
    with pytest.raises(ValueError, match="at least two labellings; got 1"):
        _scoring.medoid([a])
    with pytest.raises(ValueError, match=r"same cells; got lengths \[3, 4\]"):
        _scoring.medoid([a, a[:3]])


RESTART_PRUNE = {"max_rounds": 1, "epochs_per_round": 1}


def _restart_data():
    from scmixvae.data._simulate import simulate

    adata = simulate(n_cells=300, n_genes=60, n_types=3, seed=1)
    CplMixVAE.setup_anndata(adata)
    return adata


def _single_fit(adata, seed):
    scvi.settings.seed = seed
    model = CplMixVAE(adata, n_hidden=16)
    with pytest.MonkeyPatch.context() as patch:  # the restarts' pruned fits, not the fit without consensus
        patch.setattr(_pruning, "fit_without_consensus", lambda model, schedule, augmenter: None)
        model.train(max_epochs=2, state_epochs=0, prune_kwargs=RESTART_PRUNE, n_restarts=1, **TRAIN)
    return model


@pytest.fixture(scope="module")
def restarted():
    adata = _restart_data()
    scvi.settings.seed = 4
    model = CplMixVAE(adata, n_hidden=16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_pruning, "fit_without_consensus", lambda model, schedule, augmenter: None)
        model.train(max_epochs=2, state_epochs=1, prune_kwargs=RESTART_PRUNE, n_restarts=3, **TRAIN)
    return model, scvi.settings.seed


def test_restarts_keep_the_medoid_and_record_every_restart(restarted):
    model, seed_after = restarted
    history = model.restart_history
    assert list(history.columns) == _pruning.RESTART_COLUMNS
    seeds = [4, _pruning.restart_seed(4, 1), _pruning.restart_seed(4, 2)]
    assert history["restart"].tolist() == [0, 1, 2] and history["seed"].tolist() == seeds
    assert history["selected"].sum() == 1
    ari = np.array(history.attrs["ari"])
    assert ari.shape == (3, 3) and np.allclose(np.diag(ari), 1) and np.allclose(ari, ari.T)
    np.testing.assert_allclose(history["mean_ari"], (ari.sum(1) - 1) / 2)
    kept = int(history["selected"].to_numpy().argmax())
    assert kept == int(np.argmax(history["mean_ari"].to_numpy()))
    assert model.n_categories == history.loc[kept, "n_categories"]
    selected = model.pruning_history.loc[model.pruning_history["selected"]].iloc[0]
    assert selected["mean_consensus"] == pytest.approx(history.loc[kept, "mean_consensus"])
    assert seed_after == 4  # the user's seed setting is restored
    # one training, its pruning round(s) and the one state epoch of the kept fit
    assert len(model.history["train_loss"]) == 2 + model.pruning_history["epochs"].iloc[1:].sum() + 1


def test_restart_seeds_of_two_seeds_are_disjoint():
    assert _pruning.restart_seed(7, 0) == 7
    for seed in range(5):
        mine = {_pruning.restart_seed(seed, r) for r in range(5)}
        other = {_pruning.restart_seed(seed + 1, r) for r in range(5)}
        assert len(mine) == 5 and not mine & other
    assert _pruning.restart_seed(3, 2) == _pruning.restart_seed(3, 2)  # reproducible
    assert 0 <= _pruning.restart_seed(2**40, 1) < 2**32


def test_restart_r_is_the_fit_of_a_new_model_with_its_restart_seed(restarted):
    model, _ = restarted
    history = model.restart_history
    kept = int(history["selected"].to_numpy().argmax())
    adata = _restart_data()
    for restart in range(3):
        single = _single_fit(adata, _pruning.restart_seed(4, restart))
        chosen = single.pruning_history.loc[single.pruning_history["selected"]].iloc[0]
        assert chosen["n_categories"] == history.loc[restart, "n_categories"]
        assert chosen["mean_consensus"] == pytest.approx(history.loc[restart, "mean_consensus"], abs=1e-12)
        if restart == kept:  # the state epoch changes no type
            pd.testing.assert_series_equal(single.predict(), model.predict())


def test_restarts_leave_the_random_generators_where_the_fit_left_them():
    """Restoring the caller's seed re-seeded them: the caller's next draws repeated those after its own seeding."""
    import random

    adata = _restart_data()
    scvi.settings.seed = 0
    after_seeding = np.random.rand(3), random.random(), torch.rand(3)  # noqa: NPY002 (the global generators)
    pl_seed = os.environ.pop("PL_GLOBAL_SEED", None)
    try:
        scvi.settings.seed = 0
        model = CplMixVAE(adata, n_hidden=16)
        rounds = {"max_rounds": 1, "epochs_per_round": 1, "threshold": 0.05}  # no fit without consensus, which
        model.train(max_epochs=1, state_epochs=0, n_restarts=2, prune_kwargs=rounds, **TRAIN)  # seeds it anew
        assert model.restart_history["selected"].any()
        after_fit = np.random.rand(3), random.random(), torch.rand(3)  # noqa: NPY002
        assert scvi.settings.seed == 0
        assert not np.allclose(after_fit[0], after_seeding[0]) and after_fit[1] != after_seeding[1]
        assert not torch.equal(after_fit[2], after_seeding[2])
        os.environ.pop("PL_GLOBAL_SEED", None)
        scvi.settings.seed = None
        model = CplMixVAE(adata, n_hidden=16)
        model.train(max_epochs=1, state_epochs=0, n_restarts=2, prune_kwargs=rounds, **TRAIN)
        assert "PL_GLOBAL_SEED" not in os.environ  # the restarts' seeds, which a seed_everything() would reuse
    finally:
        scvi.settings.seed = 0
        if pl_seed is not None:
            os.environ["PL_GLOBAL_SEED"] = pl_seed


def test_unseeded_fits_share_no_restart(tmp_path):
    # without a seed, restart 0 was recorded as seed 0 and every unseeded fit's restart 1 was seed 0's restart 1
    adata = _restart_data()
    seeds = []
    xla_flags = os.environ.get("XLA_FLAGS")
    try:
        scvi.settings.seed = None
        torch.backends.cudnn.deterministic = False
        os.environ["XLA_FLAGS"] = "--caller"
        for _ in range(2):
            model = CplMixVAE(adata, n_hidden=16)
            rounds = {"max_rounds": 1, "epochs_per_round": 1}
            model.train(max_epochs=1, state_epochs=0, n_restarts=2, prune_kwargs=rounds, **TRAIN)
            seeds.append(list(model.restart_history["seed"]))
        # what the restarts' seeds set is given back, not only the seed (the flags grew by one option a restart)
        assert scvi.settings.seed is None and not torch.backends.cudnn.deterministic
        assert os.environ["XLA_FLAGS"] == "--caller"
    finally:
        os.environ.pop("XLA_FLAGS") if xla_flags is None else os.environ.update(XLA_FLAGS=xla_flags)
        scvi.settings.seed = 0
    assert seeds[0][0] is pd.NA and seeds[1][0] is pd.NA
    assert seeds[0][1] != seeds[1][1] and _pruning.restart_seed(0, 1) not in (seeds[0][1], seeds[1][1])
    model.save(tmp_path / "m", save_anndata=False)
    loaded = CplMixVAE.load(tmp_path / "m", adata=adata)
    pd.testing.assert_frame_equal(loaded.restart_history, model.restart_history)


def test_restart_history_survives_save_load(restarted, tmp_path):
    model, _ = restarted
    model.save(tmp_path / "m", save_anndata=False)
    loaded = CplMixVAE.load(tmp_path / "m", adata=model.adata)
    pd.testing.assert_frame_equal(loaded.restart_history, model.restart_history)
    assert _unknown_k_model().restart_history.empty


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_restarts": 0}, "n_restarts"),
        ({"n_restarts": 2, "prune": False}, "n_restarts=2 restarts the choice of the number of categories"),
    ],
)
def test_restarts_reject_bad_arguments_before_training(kwargs, match):
    model = _unknown_k_model()
    with pytest.raises(ValueError, match=match):
        model.train(max_epochs=1, **kwargs, **TRAIN)
    assert not model.is_trained_


@pytest.mark.parametrize(
    ("n_categories", "prune_kwargs", "error", "match"),
    [
        (None, {"treshold": 0.9}, ValueError, r"prune_kwargs holds \['treshold'\], which train\(\) does not pass"),
        (None, {"batch_size": 32}, ValueError, r"prune_kwargs holds \['batch_size'\]"),
        (None, {"plan_kwargs": {"lr": 1e-4}}, ValueError, r"prune_kwargs holds \['plan_kwargs'\]"),
        (None, {"threshold": 1.5}, ValueError, "`threshold` must be"),
        (None, {"min_categories": 9}, ValueError, "min_categories=9 is larger than the model's 8 categories"),
        (None, [("threshold", 0.9)], TypeError, "`prune_kwargs` must be a dict, got list"),
        (5, {"threshold": 0.9}, ValueError, r"this train\(\) call does not prune"),
    ],
)
def test_train_checks_prune_kwargs_before_any_work(n_categories, prune_kwargs, error, match):
    """A typo, a training option or a bad value in prune_kwargs failed after the start and the category fit (or was
    ignored); now every such call fails at once and leaves the model as it was."""
    model = _unknown_k_model(n_categories=n_categories)
    chooses = model.choose_n_categories_
    with pytest.raises(error, match=match):
        model.train(max_epochs=1, state_epochs=0, prune_kwargs=prune_kwargs, **TRAIN)
    assert not model.is_trained_ and model.start_labels is None
    assert model.choose_n_categories_ == chooses  # a later train() still chooses K


def test_prune_refuses_a_misspelt_training_option_before_training():
    model = _unknown_k_model()
    with pytest.raises(TypeError, match=r"prune\(\) has no option 'enable_progess_bar'"):
        model.prune(max_rounds=1, epochs_per_round=1, batch_size=64, enable_progess_bar=False)
    assert not model.is_trained_ and model.start_labels is None
    with pytest.raises(ValueError, match="accelerator='nope' with devices='auto' cannot be used"):
        model.prune(max_rounds=1, epochs_per_round=1, batch_size=64, accelerator="nope")
    assert not model.is_trained_ and model.start_labels is None


def test_a_choice_of_k_that_fails_is_made_again_by_the_next_train():
    """A train() that failed while choosing K (here: a callback that raises in the category fit) left the model
    marked as having chosen: the next train() then kept every initial category, silently, without pruning."""

    class Fails(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            raise RuntimeError("failed in the category fit")

    model = _unknown_k_model()
    with pytest.raises(RuntimeError, match="failed in the category fit"):
        model.train(max_epochs=1, state_epochs=0, n_restarts=1, callbacks=[Fails()], **TRAIN)
    assert model.start_labels is not None  # it failed after the start, inside the choice of K
    assert model.choose_n_categories_ and not model.is_trained_
    model.train(
        max_epochs=1, state_epochs=0, n_restarts=1, prune_kwargs={"max_rounds": 1, "epochs_per_round": 1}, **TRAIN
    )
    assert len(model.pruning_history) >= 1 and not model.choose_n_categories_


def test_restarts_need_an_untrained_model():
    model = _unknown_k_model(n_categories=4)
    model.train(max_epochs=1, **TRAIN)
    with pytest.raises(ValueError, match="this model is already trained"):
        model.train(prune=True, n_restarts=2, **TRAIN)
    # pruning a trained model retrains it round by round: a max_epochs would be silently unused
    with pytest.raises(ValueError, match=r"max_epochs=20 trains a model before its first pruning; this model is"):
        model.train(max_epochs=20, prune=True, **TRAIN)


def test_three_restarts_by_default_only_when_the_model_chooses_k(monkeypatch):
    from scmixvae.model import default_n_restarts

    assert [default_n_restarts(True, n) for n in (400, 50_000, 50_001)] == [3, 3, 1]
    assert default_n_restarts(False, 400) == 1
    seen = []
    monkeypatch.setattr(_pruning, "fit_restarts", lambda model, schedule, augmenter: seen.append(schedule.n_restarts))
    monkeypatch.setattr(_pruning, "fit_without_consensus", lambda model, schedule, augmenter: None)
    single = _pruning.prune

    def pruning(model, **kwargs):
        seen.append("single")
        return single(model, **kwargs)

    monkeypatch.setattr(_pruning, "prune", pruning)
    _unknown_k_model().train(max_epochs=1, state_epochs=0, **TRAIN)  # chooses K: restarts
    assert seen == [3]
    given = _unknown_k_model(n_categories=4)
    given.train(max_epochs=1, state_epochs=0, prune=True, prune_kwargs={"max_rounds": 0}, **TRAIN)
    assert seen == [3, "single"]  # K given, pruned on request: one fit unless restarts are asked for
    given.train(state_epochs=0, prune=True, prune_kwargs={"max_rounds": 0}, **TRAIN)
    assert seen == [3, "single", "single"]  # trained: prunes on, no restarts


class _AtRun(Callback):
    """Count the Lightning runs of a fit; in run ``at`` (counted from 0), call ``action`` once.

    ``when="start"``: before its first step; ``"end"``: at the end of its last epoch (Lightning logs no epoch
    that is interrupted).
    """

    def __init__(self, at, action, when="start"):
        self.at, self.action, self.when, self.runs, self.done = at, action, when, 0, False

    def on_fit_start(self, trainer, pl_module):
        self.runs += 1

    def _maybe_act(self, pl_module, when):
        if self.runs - 1 == self.at and self.when == when and not self.done:
            self.done = True
            self.action(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._maybe_act(pl_module, "start")

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == trainer.max_epochs - 1:
            self._maybe_act(pl_module, "end")


DEFAULT_FIT = {"max_epochs": 2, "state_epochs": 1, "prune_kwargs": {"max_rounds": 1, "epochs_per_round": 1}, **TRAIN}


def _interrupt(pl_module):
    raise KeyboardInterrupt


@pytest.mark.parametrize("at", [0, 1, 2], ids=["first-training", "first-pruning-round", "second-restart"])
def test_one_ctrl_c_stops_the_whole_default_fit(at):
    model = _unknown_k_model()
    stopper = _AtRun(at, _interrupt, when="end")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert model.train(callbacks=[stopper], **DEFAULT_FIT) is None
    assert stopper.runs == at + 1  # no later training, pruning round, restart or state phase ran
    said = [str(w.message) for w in caught if "interrupted" in str(w.message)]
    assert len(said) == 1 and "interrupted (KeyboardInterrupt): the fit stopped there" in said[0]
    assert model.is_trained_ and model.interrupted_
    assert model.restart_history.empty  # the restarts did not finish
    labels = model.predict()
    assert labels.shape == (model.adata.n_obs,) and set(labels.cat.categories) == set(model.category_names)
    model.train(max_epochs=1, state_epochs=0, **TRAIN)  # and it trains on
    assert np.isfinite(model.history["train_loss"].iloc[-1, 0])


def _poison(pl_module):
    with torch.no_grad():
        next(iter(pl_module.module.parameters())).view(-1)[0] = float("nan")


@pytest.mark.parametrize("at", [0, 1], ids=["first-training", "first-pruning-round"])
def test_non_finite_loss_stops_the_whole_default_fit(at):
    model = _unknown_k_model()
    poisoner = _AtRun(at, _poison)
    with pytest.raises(RuntimeError, match=r"loss became NaN or infinite .* learning rate too high"):
        model.train(callbacks=[poisoner], **DEFAULT_FIT)
    assert poisoner.runs == at + 1  # not absorbed by the pruning, the restarts or the state phase


def test_a_huge_learning_rate_stops_the_default_fit_with_the_cause():
    model = _unknown_k_model()
    with pytest.raises(RuntimeError, match=r"\(lr=1000000.0\)\. Likely causes: a learning rate too high"):
        model.train(plan_kwargs={"lr": 1e6}, **DEFAULT_FIT)
    with pytest.raises(ValueError, match="has not been trained"):
        model.predict()


def test_prune_warns_when_no_round_reaches_the_threshold():
    model = _small_model()
    with pytest.warns(UserWarning, match="No pruning round reached the consensus threshold 0.99999") as caught:
        history = model.prune(threshold=0.99999, max_rounds=1, epochs_per_round=1, **TRAIN)
    assert (history["mean_consensus"] < 0.99999).all()
    kept = history.loc[history["selected"]].iloc[0]
    assert f"({kept['n_categories']} categories, mean consensus {kept['mean_consensus']:.3f})" in str(
        next(w.message for w in caught if "No pruning round" in str(w.message))
    )
    assert all(w.filename == __file__ for w in caught if "No pruning round" in str(w.message))  # the user's line


def test_prune_does_not_warn_when_a_round_reaches_the_threshold():
    model = _small_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.prune(threshold=0.05, max_rounds=1, epochs_per_round=1, **TRAIN)
    assert history.loc[history["selected"], "mean_consensus"].iloc[0] >= 0.05
    assert not [w for w in caught if "No pruning round" in str(w.message)]


def test_the_threshold_warning_of_train_names_the_users_line():
    model = _small_model(epochs=0)
    prune_kwargs = {"threshold": 0.99999, "max_rounds": 1, "epochs_per_round": 1}
    with pytest.warns(UserWarning, match="No pruning round reached") as caught:
        model.train(max_epochs=1, state_epochs=0, prune=True, prune_kwargs=prune_kwargs, **TRAIN)
    assert [w.filename for w in caught if "No pruning round" in str(w.message)] == [__file__]


def test_the_collapse_warning_of_prune_names_the_users_line(monkeypatch):
    import inspect

    model = _small_model()
    collapsed = np.zeros((2, 400, 6))
    collapsed[..., 0] = 1.0  # every cell in one category
    real_check = _pruning.check_collapse
    # the stand-in adds a frame of its own, which stacklevel + 1 skips
    monkeypatch.setattr(
        _pruning, "check_collapse", lambda q, stacklevel: real_check(collapsed, stacklevel=stacklevel + 1)
    )
    with pytest.warns(UserWarning, match="collapsed") as caught:
        line = inspect.currentframe().f_lineno + 1
        model.prune(threshold=0.05, max_rounds=1, epochs_per_round=1, **TRAIN)
    assert [(w.filename, w.lineno) for w in caught if "collapsed" in str(w.message)] == [(__file__, line)]


# ------------------------------------------------------------------------------- no consensus: K given by Leiden


NO_CONSENSUS = {"threshold": 0.99999, "max_rounds": 1, "epochs_per_round": 1}


@pytest.mark.parametrize(("n_restarts", "seed"), [(1, 3), (3, 0)])  # seed 0: restart 1 is kept
def test_a_fit_without_consensus_becomes_the_fit_with_leidens_k_given(n_restarts, seed, tmp_path):
    from scmixvae.model import _start

    adata = _restart_data()
    scvi.settings.seed = seed
    model = CplMixVAE(adata, n_hidden=16)
    with pytest.warns(_pruning.NoConsensusWarning) as caught:
        model.train(max_epochs=2, state_epochs=1, prune_kwargs=NO_CONSENSUS, n_restarts=n_restarts, **TRAIN)
    ours = [w for w in caught if issubclass(w.category, _pruning.NoConsensusWarning)]
    assert len(ours) == 1 and ours[0].filename == __file__  # one warning for the whole choice, at the user's line
    scvi.settings.seed = seed
    found = _start.default_resolution_clusters(CplMixVAE(adata, n_hidden=16))
    k = min(found, 6)  # at most the model's 6 categories (on 300 cells)
    bound = "" if k == found else f" ({found}, bounded by the model's 2 to 6)"
    assert f"fitted instead with {k} categories, the number of Leiden clusters at resolution 1{bound}." in str(
        ours[0].message
    )
    assert model.pruning_history.attrs["fallback_n_categories"] == k
    assert (model.pruning_history["mean_consensus"] < 0.99999).all()
    assert len(model.restart_history) == (n_restarts if n_restarts > 1 else 0)
    assert n_restarts == 1 or not model.restart_history["selected"].any()  # none of them is the fit kept
    assert model.n_categories == k and not model.choose_n_categories_
    # print(model) described the model as created: "n_categories: 6 (maximum; train() prunes) ... knn"
    assert (
        f"n_categories: {k}, " in model._model_summary_string and "augmentation: dropout" in model._model_summary_string
    )
    assert model.module.augmentation == "dropout" and model.module.input_dropout == 0  # the defaults of K given
    # the types of the model the user would get by giving that K at the same seed; then the state phase
    scvi.settings.seed = seed
    given = CplMixVAE(adata, n_hidden=16, n_categories=k)
    given.train(max_epochs=2, state_epochs=0, **TRAIN)
    pd.testing.assert_frame_equal(model.predict(soft=True), given.predict(soft=True))
    assert len(model.history["train_loss"]) == 2 + 1
    model.save(tmp_path / "m", save_anndata=False)  # saved as the model it became, with how it got there
    loaded = CplMixVAE.load(tmp_path / "m", adata=adata)
    pd.testing.assert_frame_equal(loaded.predict(soft=True), model.predict(soft=True))
    assert loaded.pruning_history.attrs["fallback_n_categories"] == k


def test_pruning_a_model_fitted_with_restarts_clears_its_restart_history():
    # the restarts' rows still said which fit was kept, with its K, after train(prune=True) chose another K
    scvi.settings.seed = 0
    model = CplMixVAE(_restart_data(), n_hidden=16)
    model.train(max_epochs=2, state_epochs=0, prune_kwargs={"max_rounds": 1, "epochs_per_round": 1}, **TRAIN)
    assert len(model.restart_history) == 3
    model.train(prune=True, state_epochs=0, prune_kwargs={"max_rounds": 1, "epochs_per_round": 1}, **TRAIN)
    assert model.restart_history.empty and list(model.restart_history.columns) == _pruning.RESTART_COLUMNS


def test_adopting_a_restart_keeps_the_options_the_user_gave():
    from scmixvae.model import _fit

    model = CplMixVAE(_restart_data(), n_hidden=16, input_dropout=0.2)
    restart = _fit.fresh_model(model)
    assert restart.given_options_ == {"augmentation": "knn", "input_dropout": 0.2}  # built with every option
    _fit.adopt_fit(model, restart)
    assert model.given_options_ == {"input_dropout": 0.2} and model.module is restart.module


def test_a_fit_without_consensus_keeps_the_options_the_user_chose():
    adata = _restart_data()
    scvi.settings.seed = 3
    model = CplMixVAE(adata, n_hidden=16, augmentation="knn", input_dropout=0.2)
    with pytest.warns(_pruning.NoConsensusWarning):
        model.train(max_epochs=1, state_epochs=0, prune_kwargs=NO_CONSENSUS, n_restarts=1, **TRAIN)
    assert (model.module.augmentation, model.module.input_dropout) == ("knn", 0.2)


def test_a_trained_model_pruned_without_consensus_keeps_its_round_of_highest_consensus():
    model = _small_model()  # K given, trained
    with pytest.warns(_pruning.NoConsensusWarning, match="the round with the highest consensus was kept"):
        model.train(state_epochs=0, prune=True, prune_kwargs=NO_CONSENSUS, **TRAIN)
    history = model.pruning_history
    assert "fallback_n_categories" not in history.attrs
    assert model.n_categories == history.loc[history["selected"], "n_categories"].item()
    assert history.loc[history["selected"], "mean_consensus"].item() == history["mean_consensus"].max()


def test_a_fit_that_reaches_consensus_keeps_its_pruned_round():
    adata = _restart_data()
    scvi.settings.seed = 3
    model = CplMixVAE(adata, n_hidden=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", _pruning.NoConsensusWarning)
        model.train(max_epochs=1, state_epochs=0, prune_kwargs={"threshold": 0.05}, n_restarts=1, **TRAIN)
    assert "fallback_n_categories" not in model.pruning_history.attrs
    assert model.n_categories == model.pruning_history.loc[model.pruning_history["selected"], "n_categories"].item()


def test_leiden_at_a_resolution_gives_more_clusters_above_it():
    from scmixvae.model import _start

    adata = _restart_data()
    counts = [_start.leiden_labels(adata.X, None, resolution=r, seed=0).max() + 1 for r in (0.2, 1.0, 3.0)]
    assert counts[0] <= counts[1] < counts[2]


def test_leiden_start_reaches_128_clusters_and_more():
    """pandas codes fewer than 128 clusters as int8: K = 130 overflowed ("130 out of bounds for int8")."""
    from scmixvae.data._simulate import simulate
    from scmixvae.model import _start

    adata = simulate(n_cells=600, n_genes=60, n_types=3, seed=0)
    labels = _start.leiden_labels(adata.X, 130, seed=0)
    assert labels.dtype == np.int64 and labels.max() + 1 <= 130


def test_the_restart_kept_is_the_medoid_of_those_that_reached_consensus():
    a, b = np.repeat([0, 1, 2], 20), np.repeat([0, 1], 30)
    near_a = a.copy()
    near_a[:3] = 1
    labels = [b, near_a, a, a.copy()]  # mean ARI with the others: b lowest, then near_a, then the two a's
    best, ari = _pruning.kept_restart(labels, [True] * 4)
    assert best == 2 and ari.shape == (4, 4)  # the medoid (a tie of the two a's: the earlier)
    assert _pruning.kept_restart(labels, [False] * 4)[0] == 2  # none reached: the medoid of all
    assert _pruning.kept_restart(labels, [True, False, True, False])[0] == 2  # the medoid reached: kept
    assert _pruning.kept_restart(labels, [True, True, False, False])[0] == 1  # the best of those that reached
    assert _pruning.kept_restart(labels, [True, False, False, False])[0] == 0  # the only one that reached
