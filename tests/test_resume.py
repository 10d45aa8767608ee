"""A checkpointed fit resumes from its Lightning checkpoint: weights, optimiser and epoch counter."""

import scvi
import torch
from lightning.pytorch.callbacks import Callback

from scmixvae.model import CplMixVAE
from scmixvae.train import TrainingCheckpoint


class _FirstWeights(Callback):
    """Record the module's state when training starts and the first epoch index."""

    def on_train_epoch_start(self, trainer, pl_module):
        if not hasattr(self, "state"):
            self.state = {k: v.detach().clone() for k, v in pl_module.module.state_dict().items()}
            self.epoch = trainer.current_epoch
            self.optimizer_steps = [int(s["step"]) for s in trainer.optimizers[0].state.values()]


def test_checkpointed_fit_resumes_at_the_saved_epoch_with_the_saved_weights(sim_adata, tmp_path):
    CplMixVAE.setup_anndata(sim_adata)
    kwargs = {"batch_size": 90, "enable_progress_bar": False}  # 270 training cells: 3 steps per epoch
    scvi.settings.seed = 0
    first = CplMixVAE(sim_adata, n_categories=3)
    first.train(max_epochs=2, state_epochs=0, callbacks=[TrainingCheckpoint(tmp_path)], **kwargs)
    ckpt = tmp_path / "last.ckpt"
    assert ckpt.exists()
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 1 and saved["global_step"] == 2 * 3  # 2 epochs of 3 steps

    scvi.settings.seed = 1
    resumed = CplMixVAE(sim_adata, n_categories=3)  # fresh weights, no Leiden initialisation
    probe = _FirstWeights()
    resumed.train(max_epochs=4, state_epochs=0, ckpt_path=str(ckpt), callbacks=[probe], **kwargs)
    assert probe.epoch == 2
    assert not getattr(resumed, "category_init_done_", False)
    # training started from the checkpoint's weights: the first fit's, with the batch-norm statistics of training
    # (the fit recomputed them from the real cells after its last epoch; a resumed fit does so at its own end)
    for key, value in first.module.state_dict().items():
        expected = saved["state_dict"][f"module.{key}"] if "running_" in key else value
        torch.testing.assert_close(probe.state[key], expected, msg=key)
    assert probe.optimizer_steps and all(s == 6 for s in probe.optimizer_steps)  # Adam state restored
    assert resumed.trainer.current_epoch == 4 and resumed.trainer.global_step == 4 * 3
    assert list(resumed.history["train_loss"].index) == [2, 3]  # only the resumed epochs
    assert resumed.predict().shape == (sim_adata.n_obs,)


def test_a_fit_resumed_in_the_state_phase_stays_in_it(sim_adata, tmp_path):
    CplMixVAE.setup_anndata(sim_adata)
    kwargs = {"batch_size": 90, "enable_progress_bar": False}
    scvi.settings.seed = 0
    first = CplMixVAE(sim_adata, n_categories=3)
    # two epochs of every part, then the state phase: the checkpoint of epoch 3 (0-based) falls inside it
    first.train(max_epochs=2, state_epochs=2, callbacks=[TrainingCheckpoint(tmp_path)], **kwargs)
    assert torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 3

    scvi.settings.seed = 1
    resumed = CplMixVAE(sim_adata, n_categories=3)
    probe = _FirstWeights()
    resumed.train(max_epochs=2, state_epochs=4, ckpt_path=str(tmp_path / "last.ckpt"), callbacks=[probe], **kwargs)
    assert probe.epoch == 4 and resumed.trainer.current_epoch == 6
    # frozen since epoch 2: the resumed epochs trained the states only, so the types are the first fit's
    for name in ("category_head.weight", "encoder.layers.0.weight", "trunk_norm.running_mean"):
        torch.testing.assert_close(resumed.module.state_dict()[name], first.module.state_dict()[name], msg=name)
    assert not torch.equal(resumed.module.px_head.weight, first.module.px_head.weight)
    assert resumed.predict().equals(first.predict())


class _Runs(Callback):
    """Record, for each Lightning run of a fit, the epochs it trained."""

    def __init__(self):
        self.runs = []

    def on_fit_start(self, trainer, pl_module):
        self.runs.append([])

    def on_train_epoch_end(self, trainer, pl_module):
        self.runs[-1].append(trainer.current_epoch)


def test_only_the_first_run_of_a_resumed_fit_loads_the_checkpoint(sim_adata, tmp_path):
    # every later run got the checkpoint too: with early stopping the state phase reloaded it and trained nothing,
    # and each pruning round reloaded it (epochs past max_epochs: no round trained, and without max_rounds the
    # rounds never ended)
    CplMixVAE.setup_anndata(sim_adata)
    kwargs = {"batch_size": 90, "enable_progress_bar": False}
    scvi.settings.seed = 0
    CplMixVAE(sim_adata, n_categories=3).train(
        max_epochs=2, state_epochs=0, callbacks=[TrainingCheckpoint(tmp_path)], **kwargs
    )
    ckpt = str(tmp_path / "last.ckpt")
    runs = _Runs()
    early = CplMixVAE(sim_adata, n_categories=3)
    early.train(max_epochs=3, state_epochs=2, early_stopping=True, ckpt_path=ckpt, callbacks=[runs], **kwargs)
    assert runs.runs == [[2], [0, 1]]  # the resumed epoch, then the state phase's two
    scvi.settings.seed = 0
    options = {"n_categories": 6, "input_dropout": 0.5}
    six = tmp_path / "six"
    CplMixVAE(sim_adata, **options).train(max_epochs=2, state_epochs=0, callbacks=[TrainingCheckpoint(six)], **kwargs)
    runs = _Runs()
    rounds = {"max_rounds": 2, "epochs_per_round": 1, "threshold": 1.0}
    pruned = CplMixVAE(sim_adata, **options)
    ckpt = str(six / "last.ckpt")
    pruned.train(
        max_epochs=3, state_epochs=0, prune=True, prune_kwargs=rounds, ckpt_path=ckpt, callbacks=[runs], **kwargs
    )
    assert runs.runs[0] == [2] and len(runs.runs) > 1 and all(run == [0] for run in runs.runs[1:])


def test_a_checkpoint_path_to_another_kind_of_file_is_refused_before_any_work(sim_adata, tmp_path):
    # Lightning: "Exception raised during training. <class 'NameError'> 101", then "KeyError: 101"
    import pytest

    CplMixVAE.setup_anndata(sim_adata)
    text = tmp_path / "text.ckpt"
    text.write_text("hello")
    model = CplMixVAE(sim_adata, n_categories=3)
    with pytest.raises(ValueError, match=r"ckpt_path='.*text.ckpt' is not a checkpoint written by TrainingCheckpoint"):
        model.train(max_epochs=2, ckpt_path=str(text), enable_progress_bar=False)
    assert not model.is_trained_
