"""The fit leaves the user's thread settings alone: scanpy's neighbour search (numba) must not change torch's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scmixvae._threads import keep_thread_settings

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter each time: numba resets the OpenMP runtime once per process, when its threading layer starts.
FIT = """
import json, sys
import torch
if sys.argv[1] == "set":
    torch.set_num_threads(1)
from lightning.pytorch.callbacks import Callback
from scmixvae.data import simulate
from scmixvae.model import CplMixVAE

class Threads(Callback):
    seen = []
    def on_train_batch_start(self, *args):
        self.seen.append(torch.get_num_threads())

before = torch.get_num_threads()
adata = simulate(n_cells=300, n_genes=100, n_types=3, seed=0)
CplMixVAE.setup_anndata(adata)
model = CplMixVAE(adata, n_categories=3, n_hidden=16)  # K given: the fit starts from a Leiden partition
model.train(max_epochs=1, state_epochs=1, batch_size=128, enable_progress_bar=False, callbacks=[Threads()])
print(json.dumps({"before": before, "training": sorted(set(Threads.seen)), "after": torch.get_num_threads()}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["OMP_NUM_THREADS", "set"])
def test_training_runs_at_the_users_thread_count(how):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: no thread count to lose")
    env = {key: value for key, value in os.environ.items() if not key.endswith("NUM_THREADS")}
    if how == "OMP_NUM_THREADS":
        env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", FIT, how], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"before": 1, "training": [1], "after": 1}


def test_keep_thread_settings_restores_torch_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"), keep_thread_settings():
        torch.set_num_threads(before + 1)
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_neighbours_and_leiden_keep_torch_threads():
    import anndata
    import numpy as np

    from scmixvae._neighbors import leiden, neighbors

    before = torch.get_num_threads()
    graph = anndata.AnnData(np.zeros((200, 1), dtype=np.float32))
    graph.obsm["X_rep"] = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
    torch.set_num_threads(1)
    try:
        neighbors(graph, use_rep="X_rep")
        assert torch.get_num_threads() == 1
        leiden(graph)
        assert torch.get_num_threads() == 1
        assert graph.obs["leiden"].nunique() > 1
    finally:
        torch.set_num_threads(before)
