"""Training on two devices with Lightning's DDP (two CPU processes, gloo), as scvi-tools exposes it."""

import sys

import numpy as np
import pytest
import scvi
from lightning.pytorch.callbacks import Callback

from scmixvae.model import CplMixVAE

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork-based DDP (ddp_notebook) needs Linux")


class _BatchesPerRank(Callback):
    """Each process appends its rank and number of training minibatches to a file."""

    def __init__(self, path):
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module):
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_rank} {trainer.num_training_batches}\n")


def test_two_process_ddp_trains_and_reads_out(sim_adata, tmp_path):
    CplMixVAE.setup_anndata(sim_adata)
    scvi.settings.seed = 0
    model = CplMixVAE(sim_adata, n_categories=3, category_init="random")
    before = model.module.px_head.weight.detach().clone()
    log = tmp_path / "batches.txt"
    model.train(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_notebook",  # fork: no re-import of the test session (scripts use "ddp")
        batch_size=45,
        enable_progress_bar=False,
        callbacks=[_BatchesPerRank(log)],
    )
    # 270 training cells split between the two processes: 135 each, 3 minibatches of 45 (6 on one device)
    lines = sorted(log.read_text().split("\n")[:-1])
    assert lines == ["0 3", "0 3", "1 3", "1 3"]
    assert model.is_trained_
    assert not np.allclose(model.module.px_head.weight.detach().numpy(), before.numpy())  # rank 0's weights
    assert len(model.history["train_loss"]) == 2 and "agreement_train" in model.history
    labels = model.predict()
    assert labels.shape == (sim_adata.n_obs,) and set(labels.cat.categories) == set(model.category_names)
    assert model.get_latent_representation().shape == (sim_adata.n_obs, 2)
