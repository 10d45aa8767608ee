"""Training on two devices with Lightning's DDP (two CPU processes, gloo), as scvi-tools exposes it.

The training runs in a fresh Python process started by the test: Lightning's fork-based launcher
(``strategy="ddp_notebook"``) must not fork the test session itself, whose earlier tests leave threads and locks
behind that a forked child can deadlock on.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork-based DDP (ddp_notebook) needs Linux")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    import numpy as np, scvi, torch
    from lightning.pytorch.callbacks import Callback
    from scmixvae.data import simulate
    from scmixvae.model import CplMixVAE

    torch.set_num_threads(1)
    log = sys.argv[1]

    class BatchesPerRank(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            with open(log, "a") as f:
                f.write(f"{trainer.global_rank} {trainer.num_training_batches}\\n")

    class StatePhase(Callback):  # the categorical head must not move in the state phase (epoch 2)
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                self.head = pl_module.module.category_head.weight.detach().clone()
                self.decoder = pl_module.module.px_head.weight.detach().clone()

        def on_train_end(self, trainer, pl_module):
            module = pl_module.module
            head = float((module.category_head.weight.detach() - self.head).abs().max())
            decoder = float((module.px_head.weight.detach() - self.decoder).abs().max())
            with open(log + ".state", "a") as f:
                f.write(f"{trainer.global_rank} {head} {decoder}\\n")

    if __name__ == "__main__":
        adata = simulate(n_cells=300, n_genes=120, n_types=3, n_batches=2, seed=0)
        CplMixVAE.setup_anndata(adata)
        scvi.settings.seed = 0
        model = CplMixVAE(adata, n_categories=3)
        before = model.module.px_head.weight.detach().clone()
        model.train(max_epochs=2, state_epochs=1, accelerator="cpu", devices=2, strategy="ddp_notebook",
                    batch_size=45, enable_progress_bar=False, callbacks=[BatchesPerRank(), StatePhase()])
        labels = model.predict()
        print("RESULT " + json.dumps({
            "trained": bool(model.is_trained_),
            "changed": float((model.module.px_head.weight.detach() - before).abs().max()),
            "epochs": len(model.history["train_loss"]),
            "has_agreement": "agreement_train" in model.history,
            "n_labels": int(labels.shape[0]),
            "labels_are_categories": set(labels.cat.categories) == set(model.category_names),
            "latent_shape": list(model.get_latent_representation().shape),
        }))
    """
)


@pytest.mark.slow
def test_two_process_ddp_trains_and_reads_out(tmp_path):
    script, log = tmp_path / "ddp_fit.py", tmp_path / "batches.txt"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run([sys.executable, str(script), str(log)], env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    # every cell trains (no validation asked for): 300 cells split between the two processes, 150 each,
    # 4 minibatches of up to 45 (7 on one device)
    assert sorted(log.read_text().split("\n")[:-1]) == ["0 4"] * 3 + ["1 4"] * 3
    assert result["trained"] and result["changed"] > 0  # the session's model holds rank 0's trained weights
    assert result["epochs"] == 3 and result["has_agreement"]
    # the state phase (epoch 2) on both ranks: the categorical head frozen, the decoder learning
    state = sorted(line.split() for line in Path(f"{log}.state").read_text().splitlines())
    assert [rank for rank, _, _ in state] == ["0", "1"]
    assert all(float(head) == 0.0 and float(decoder) > 0 for _, head, decoder in state)
    assert result["n_labels"] == 300 and result["labels_are_categories"]
    assert result["latent_shape"] == [300, 2]
