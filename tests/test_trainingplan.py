"""Training plan: epoch-level per-agent metrics and the fused optimiser."""

import numpy as np
import pytest
import scvi
import torch
from lightning.pytorch import Callback
from scvi import REGISTRY_KEYS
from scvi.train import TrainingPlan

from scmixvae.model import CplMixVAE
from scmixvae.module._module import eval_mode
from scmixvae.train import CplMixVAETrainingPlan


def _history(adata, **plan_kwargs):
    scvi.settings.seed = 0
    model = CplMixVAE(adata, n_categories=3)
    # 64 cells per step with a last, smaller minibatch: the epoch means are weighted by minibatch size
    model.train(
        max_epochs=2,
        state_epochs=0,
        batch_size=64,
        enable_progress_bar=False,
        check_val_every_n_epoch=1,
        plan_kwargs=plan_kwargs,
    )
    return model


def test_deferred_logging_equals_per_step_logging(sim_adata, monkeypatch):
    CplMixVAE.setup_anndata(sim_adata)
    calls = {"n": 0}
    log = TrainingPlan.log

    def counting_log(self, *args, **kwargs):
        calls["n"] += 1
        return log(self, *args, **kwargs)

    monkeypatch.setattr(TrainingPlan, "log", counting_log)
    fast = _history(sim_adata).history
    fast_calls, calls["n"] = calls["n"], 0
    slow = _history(sim_adata, defer_logging=False).history
    assert sorted(fast) == sorted(slow)
    assert {
        "train_loss", "elbo_train", "reconstruction_loss_train", "elbo_validation", "validation_loss",
        "coupling_train", "agreement_validation", "reconstruction_agent1_train", "kl_weight",
    } <= set(fast)  # fmt: skip
    for key in set(fast) - {"kl_weight"}:  # kl_weight: per epoch when deferred (see the test below)
        np.testing.assert_allclose(fast[key].to_numpy(float), slow[key].to_numpy(float), rtol=1e-5, atol=1e-6)
    assert set(np.unique(fast["kl_weight"].to_numpy(float))) == set(np.unique(slow["kl_weight"].to_numpy(float)))
    # Lightning's bookkeeping runs once per value and epoch instead of once per value and step
    assert fast_calls < calls["n"] / 2  # 5 training steps per epoch here; the gap grows with the steps


def test_adam_is_fused_on_the_cpu(sim_adata):
    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3)
    plan = CplMixVAETrainingPlan(model.module)
    optimizer = plan.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["fused"]
    plain = CplMixVAETrainingPlan(model.module, fused_optimizer=False).configure_optimizers()["optimizer"]
    assert not plain.defaults["fused"]


def test_mixed_precision_training_runs_on_the_cpu(sim_adata):
    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3)
    model.train(max_epochs=2, state_epochs=1, precision="bf16-mixed", accelerator="cpu", enable_progress_bar=False)
    loss = model.history["train_loss"].iloc[:, 0].to_numpy(float)
    assert np.isfinite(loss).all() and len(loss) == 3  # the state phase included
    assert model.module.trunk_norm.running_mean.dtype == torch.float32
    assert model.predict().shape == (sim_adata.n_obs,)


def test_per_agent_metrics_reach_callbacks_at_the_end_of_each_epoch(sim_adata):
    from lightning.pytorch.callbacks import Callback

    class Probe(Callback):
        def __init__(self):
            self.values = []

        def on_train_epoch_end(self, trainer, pl_module):
            self.values.append(float(trainer.callback_metrics["agreement_train"]))

    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3)
    probe = Probe()
    model.train(max_epochs=2, batch_size=64, enable_progress_bar=False, callbacks=[probe])
    np.testing.assert_allclose(probe.values, model.history["agreement_train"].iloc[:, 0].to_numpy(float), rtol=1e-6)


def test_constant_kl_weight_is_logged_once_per_epoch(sim_adata):
    CplMixVAE.setup_anndata(sim_adata)
    constant = _history(sim_adata).history["kl_weight"]
    # no warm-up (the default): one value per epoch, and it is the constant weight
    assert constant.index.tolist() == [0, 1]
    np.testing.assert_array_equal(constant.iloc[:, 0].to_numpy(float), [1.0, 1.0])
    # with a warm-up the weight changes every step, and scvi-tools' per-step logging is kept: the logger
    # records every log_every_n_steps-th step, 4 here (270 training cells, 4 full minibatches an epoch), so the
    # 4th and 8th steps of the warm-up's 10, weights 3 / 10 and 7 / 10
    warm = _history(sim_adata, n_steps_kl_warmup=10).history["kl_weight"]
    np.testing.assert_allclose(warm.iloc[:, 0].to_numpy(float), [0.3, 0.7])


@pytest.mark.parametrize("state_kl_weight", [None, 1.0, 0.25])
def test_the_state_phase_weighs_the_state_kl_by_state_kl_weight(sim_adata, state_kl_weight):
    CplMixVAE.setup_anndata(sim_adata)
    scvi.settings.seed = 0
    model = CplMixVAE(sim_adata, n_categories=3)
    plan_kwargs = {} if state_kl_weight is None else {"state_kl_weight": state_kl_weight}
    model.train(max_epochs=2, state_epochs=2, batch_size=64, enable_progress_bar=False, plan_kwargs=plan_kwargs)
    weights = model.history["kl_weight"].iloc[:, 0].to_numpy(float)
    expected = 0.1 if state_kl_weight is None else state_kl_weight  # the default: 0.1
    np.testing.assert_allclose(weights, [1.0, 1.0, expected, expected])  # the categories train at the full weight


def test_state_kl_weight_must_be_a_weight(sim_adata):
    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3)
    with pytest.raises(ValueError, match=r"`state_kl_weight` must be >= 0\.0, got -1\.0"):
        model.train(max_epochs=1, state_epochs=1, plan_kwargs={"state_kl_weight": -1.0})


def _trained_cells(model, **train_kwargs) -> set[int]:
    """The cells that the training steps of one ``train()`` call see (their minibatches carry their indices)."""
    cells, loss = set(), model.module.loss

    def spy(tensors, *args, **kwargs):
        if model.module.training:
            cells.update(tensors[REGISTRY_KEYS.INDICES_KEY].reshape(-1).tolist())
        return loss(tensors, *args, **kwargs)

    model.module.loss = spy
    try:
        model.train(batch_size=64, enable_progress_bar=False, **train_kwargs)
    finally:
        model.module.loss = loss
    return cells


def test_every_cell_trains_unless_validation_is_asked_for(sim_adata):
    CplMixVAE.setup_anndata(sim_adata)
    n = sim_adata.n_obs
    model = CplMixVAE(sim_adata, n_categories=3, n_hidden=16)
    assert _trained_cells(model, max_epochs=2, state_epochs=1) == set(range(n))
    assert "elbo_validation" not in model.history and len(model.validation_indices_) == 0
    # validation asked for: scvi-tools' split, whose validation cells do not train
    for ask in ({"early_stopping": True}, {"check_val_every_n_epoch": 1}):
        model = CplMixVAE(sim_adata, n_categories=3, n_hidden=16)
        cells = _trained_cells(model, max_epochs=2, state_epochs=0, **ask)
        assert cells == set(model.train_indices_.tolist()) and len(cells) < n, ask
        assert "elbo_validation" in model.history and not cells & set(model.validation_indices_.tolist()), ask
    # the state phase alone (as after the choice of K) trains every cell too: it held out a tenth of them
    cells = _trained_cells(model, max_epochs=0, state_epochs=1)
    assert cells == set(range(n)) and len(model.validation_indices_) == 0


def test_early_stopping_ends_the_category_fit_and_the_state_phase_still_runs(sim_adata):
    # categories and states trained in one run, which an early stop in the category epochs ended: no state phase
    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3, n_hidden=16)
    phases = []
    model.train(
        max_epochs=10, state_epochs=10, batch_size=64, enable_progress_bar=False, early_stopping=True,
        early_stopping_patience=1, early_stopping_min_delta=1e9, callbacks=[_PhaseRecorder(phases)],
    )  # fmt: skip
    assert phases == [False, False, True, True]  # each run stops after its second epoch: no improvement of 1e9
    assert len(model.history["train_loss"]) == 4


class _PhaseRecorder(Callback):
    """Record, at the end of every training epoch, whether the categories were frozen (the state phase)."""

    def __init__(self, phases: list[bool]):
        self.phases = phases

    def on_train_epoch_end(self, trainer, pl_module):
        self.phases.append(bool(pl_module.module.categories_frozen))


@pytest.mark.parametrize("state_epochs", [0, 1])
def test_trunk_norm_statistics_are_those_of_the_real_cells_after_training(sim_adata, state_epochs):
    # training normalises the agents' dropped-out views; read-outs encode the real cells with the running statistics
    CplMixVAE.setup_anndata(sim_adata)
    scvi.settings.seed = 0
    model = CplMixVAE(sim_adata, n_categories=3, input_dropout=0.5)
    model.category_init_done_ = True  # random weights: no Leiden start
    model.train(max_epochs=2, state_epochs=state_epochs, batch_size=64, enable_progress_bar=False)
    module = model.module
    with torch.no_grad(), eval_mode(module):
        x = torch.as_tensor(sim_adata.X.toarray(), dtype=torch.float32)
        real = module.trunk_out(module.encoder(module.normalise(x, x.sum(-1, keepdim=True)), None))
    norm = module.trunk_norm
    assert norm.momentum == 0.1 and module.training is False  # restored
    # the cell-weighted mean of the minibatch means is the mean over every cell (all train: no validation set)
    torch.testing.assert_close(norm.running_mean, real.mean(1, keepdim=True), rtol=0, atol=1e-5)
    ratio = norm.running_var / real.var(1, keepdim=True)  # the mean of the minibatch variances
    assert 0.9 < float(ratio.min()) and float(ratio.max()) < 1.1


def test_recompute_norm_statistics_keeps_statistics_without_a_minibatch_of_two():
    from scmixvae.module._components import StackedBatchNorm, recompute_norm_statistics

    norm = StackedBatchNorm(2, 3)
    norm.running_mean.fill_(5.0)
    recompute_norm_statistics(norm, [torch.ones(2, 1, 3)], norm)  # one cell per minibatch: nothing to average
    assert float(norm.running_mean.min()) == 5.0 and norm.momentum == 0.1
    batches = [torch.randn(2, 10, 3), torch.randn(2, 30, 3) + 1.0]
    recompute_norm_statistics(norm, batches, norm)
    torch.testing.assert_close(norm.running_mean, torch.cat(batches, 1).mean(1, keepdim=True))
    assert norm.training


def test_optimiser_state_carries_over_between_runs_of_one_model_not_to_a_new_model(sim_adata):
    from lightning.pytorch.callbacks import Callback

    starts, ends = [], []

    def moments(trainer):
        state = trainer.optimizers[0].state_dict()["state"]
        return {i: s["exp_avg"].clone() for i, s in state.items()}

    class Record(Callback):
        def on_train_start(self, trainer, pl_module):
            starts.append(moments(trainer))

        def on_train_end(self, trainer, pl_module):
            ends.append(moments(trainer))

    CplMixVAE.setup_anndata(sim_adata)
    kwargs = {"state_epochs": 0, "batch_size": 64, "enable_progress_bar": False, "callbacks": [Record()]}
    model, fresh = CplMixVAE(sim_adata, n_categories=3), CplMixVAE(sim_adata, n_categories=3)
    model.category_init_done_ = fresh.category_init_done_ = True  # random weights: no Leiden start
    model.train(max_epochs=1, **kwargs)
    model.train(max_epochs=1, plan_kwargs={"lr": 5e-4}, **kwargs)
    fresh.train(max_epochs=1, **kwargs)
    assert starts[0] == {} and starts[2] == {}  # fresh models start fresh
    assert ends[0] and sorted(starts[1]) == sorted(ends[0])
    for i, exp_avg in ends[0].items():  # the second run starts where the first ended
        torch.testing.assert_close(starts[1][i], exp_avg, rtol=0, atol=0)
    assert not torch.equal(ends[1][0], ends[0][0])
    assert model.module.carried_optimizer_state[1]["param_groups"][0]["lr"] == 5e-4  # the plan's own settings
