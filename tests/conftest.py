from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

# Two cores are shared by everything on the test machine: one torch thread per test process.
torch.set_num_threads(int(os.environ.get("SCMIXVAE_TEST_THREADS", "1")))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture(autouse=True)
def _package_records_reach_caplog(monkeypatch):
    """Let caplog (a root handler) see the package's log records.

    The ``scmixvae`` logger hands its records to scvi-tools' ``scvi`` logger, which keeps them from the root logger
    (``propagate = False``, as scvi-tools sets it up for its own); tests let them through to the root as well.
    """
    import scvi  # noqa: F401  (scvi-tools sets its logger up on import)

    monkeypatch.setattr(logging.getLogger("scvi"), "propagate", True)


def pytest_collection_modifyitems(config, items):
    # the long end-to-end tests first: parallel workers (pytest-xdist) then end with short tests, and together
    items.sort(key=lambda item: "slow" not in item.keywords)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def sim_adata():
    """Small simulated data: 3 types, 2 batches, 300 cells x 120 genes (fresh copy per test)."""
    from scmixvae.data._simulate import simulate

    return simulate(n_cells=300, n_genes=120, n_types=3, n_batches=2, seed=0)


@pytest.fixture(scope="session")
def trained_model():
    """A small model trained for a few epochs, shared by read-out tests (do not modify it)."""
    import scvi

    from scmixvae.data._simulate import simulate
    from scmixvae.model import CplMixVAE

    scvi.settings.seed = 0
    adata = simulate(n_cells=300, n_genes=120, n_types=3, seed=1)
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_categories=4, n_hidden=32)
    model.train(max_epochs=3, batch_size=64, enable_progress_bar=False)
    return model
