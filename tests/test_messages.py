"""What a user sees while a fit runs: the package's messages at scvi-tools' verbosity, no warnings or notices
caused by the package, and silence when asked for."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scvi

from scmixvae._logging import _LIGHTNING_NOTICES, log_interval, quiet_fit
from scmixvae.data._simulate import simulate
from scmixvae.model import CplMixVAE

ROOT = Path(__file__).resolve().parents[1]
FIT_KWARGS = {
    "max_epochs": 1,
    "state_epochs": 1,
    "n_restarts": 1,
    "batch_size": 64,
    "prune_kwargs": {"max_rounds": 1, "epochs_per_round": 1},
}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def scvi_handler(monkeypatch):
    """A handler on scvi-tools' ``scvi`` logger (next to its console handler); verbosity restored afterwards."""
    handler = _Records()
    scvi_logger = logging.getLogger("scvi")
    verbosity = scvi.settings.verbosity
    scvi_logger.addHandler(handler)
    yield handler
    scvi_logger.removeHandler(handler)
    scvi.settings.verbosity = verbosity


def _default_fit(**kwargs):
    scvi.settings.seed = 0
    adata = simulate(n_cells=300, n_genes=120, n_types=3, n_batches=2, seed=0)
    adata = adata[:, np.asarray(adata.X.sum(0)).ravel() > 0].copy()
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_hidden=16)  # K unknown: Leiden start, pruning rounds, the chosen K, the states
    model.train(**FIT_KWARGS, enable_progress_bar=False, **kwargs)
    return model


def test_fit_logs_its_stages_through_scvi_tools_handler(scvi_handler):
    scvi.settings.verbosity = logging.INFO
    _default_fit()
    ours = [r for r in scvi_handler.records if r.name.startswith("scmixvae.")]
    messages = [r.getMessage() for r in ours]
    assert {r.levelno for r in ours} == {logging.INFO}
    for stage in ("Leiden initialisation: ", "Pruning round 0: ", "Pruning round 1: ", "Selected round "):
        assert any(m.startswith(stage) for m in messages), (stage, messages)
    assert logging.getLogger("scmixvae.model._pruning").getEffectiveLevel() == logging.INFO


def test_scvi_verbosity_warning_silences_the_messages(scvi_handler):
    scvi.settings.verbosity = logging.WARNING
    _default_fit()
    assert [r.getMessage() for r in scvi_handler.records if r.name.startswith("scmixvae.")] == []
    assert not logging.getLogger("scmixvae.model._pruning").isEnabledFor(logging.INFO)


def test_a_level_set_on_the_package_logger_takes_precedence(scvi_handler):
    scvi.settings.verbosity = logging.WARNING
    package = logging.getLogger("scmixvae")
    package.setLevel(logging.INFO)
    try:
        logging.getLogger("scmixvae.model._pruning").info("a stage")
    finally:
        package.setLevel(logging.NOTSET)
    assert [r.getMessage() for r in scvi_handler.records] == ["a stage"]


@pytest.mark.parametrize(
    ("n_cells", "batch_size", "train_size", "expected"),
    [(300, 64, None, 4), (300, 128, 0.5, 1), (20, 128, None, 1), (100_000, 128, None, 10)],
)
def test_log_interval_never_exceeds_the_training_minibatches(n_cells, batch_size, train_size, expected):
    assert log_interval(n_cells, batch_size, train_size) == expected


@pytest.fixture
def lightning_at_info():
    """Lightning's loggers at their own level, INFO (the test suite's conftest raises them to ERROR)."""
    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


@pytest.mark.parametrize("verbosity", [logging.INFO, logging.DEBUG])
def test_quiet_fit_hides_lightning_notices_unless_debugging(lightning_at_info, scvi_handler, verbosity):
    scvi.settings.verbosity = verbosity
    notices = [logging.getLogger(name) for name in _LIGHTNING_NOTICES]
    assert all(lg.isEnabledFor(logging.INFO) for lg in notices)
    with quiet_fit():
        assert [lg.isEnabledFor(logging.INFO) for lg in notices] == [verbosity == logging.DEBUG] * len(notices)
    assert all(lg.isEnabledFor(logging.INFO) for lg in notices)


def test_quiet_fit_restores_lightning_loggers_and_warning_filters(lightning_at_info):
    import torch

    notices = [logging.getLogger(name) for name in _LIGHTNING_NOTICES]
    assert "lightning.pytorch.accelerators.cuda" in _LIGHTNING_NOTICES  # "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES"
    before_levels, before_filters = [lg.level for lg in notices], list(warnings.filters)
    before_checks = torch.sparse.check_sparse_tensor_invariants.is_enabled()
    with quiet_fit():
        assert not any(lg.isEnabledFor(logging.INFO) for lg in notices)
    assert [lg.level for lg in notices] == before_levels
    assert warnings.filters == before_filters
    assert torch.sparse.check_sparse_tensor_invariants.is_enabled() == before_checks
    with warnings.catch_warnings(record=True) as seen:  # a user's warning of the same text still shows outside
        warnings.simplefilter("always")
        warnings.warn("Sparse CSR tensor support is in beta state.", UserWarning, stacklevel=1)
    assert len(seen) == 1


# A fresh interpreter: torch raises its sparse CSR warnings once per process, and the test suite's conftest quiets
# Lightning. Everything printed after MARK comes from the fit and the read-outs.
SCRIPT = """
import json, logging, sys, warnings
import numpy as np
import scvi
from scmixvae.data import simulate
from scmixvae.model import CplMixVAE

quiet = sys.argv[1] == "quiet"
fit_kwargs = json.loads(sys.argv[2])
if quiet:
    scvi.settings.verbosity = logging.WARNING
scvi.settings.seed = 0
adata = simulate(n_cells=300, n_genes=120, n_types=3, n_batches=2, seed=0)
adata = adata[:, np.asarray(adata.X.sum(0)).ravel() > 0].copy()
CplMixVAE.setup_anndata(adata)
model = CplMixVAE(adata, n_hidden=16)
print("MARK", flush=True)
print("MARK", file=sys.stderr, flush=True)
with warnings.catch_warnings(record=not quiet) as seen:
    warnings.simplefilter("always")
    model.train(**fit_kwargs, enable_progress_bar=not quiet)
    model.predict()
    model.get_latent_representation()
if not quiet:
    print("WARNINGS", json.dumps([f"{w.category.__name__}: {w.message}" for w in seen]))
"""


def _run(mode: str, fit_kwargs: dict) -> tuple[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, json.dumps(fit_kwargs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out, err = (re.sub(r"\x1b\[[0-9;]*m", "", text.split("MARK\n", 1)[1]) for text in (result.stdout, result.stderr))
    return out, err  # without the terminal colours of scvi-tools' console


@pytest.mark.slow
def test_default_fit_raises_no_warning_or_notice_of_its_own():
    out, err = _run("loud", {**FIT_KWARGS, "n_restarts": 2})
    warned = json.loads(out.rsplit("WARNINGS ", 1)[1])
    for pattern in ("Sparse", "log_every_n_steps", "LeafSpec", "litlogger", "invariant"):
        assert not [w for w in warned if re.search(pattern, w)], (pattern, warned)
    for notice in ("GPU available", "TPU available", "Tip:", "litlogger", "Seed set", "Trainer.fit` stopped"):
        assert notice not in out + err, notice
    assert "Pruning round 1" in out  # the package's messages: scvi-tools' console handler, on stdout
    assert "Kept restart" in out
    # one progress display for the whole fit, naming the stage, instead of a progress bar per training run
    for stage in ("restart 1/2 · categories", "restart 1/2 · K: pruning round 1", "restart 2/2 · categories",
                  "states: 100%"):  # fmt: skip
        assert stage in err and stage not in out, stage  # on stderr, as tqdm's bars
    assert "Epoch 1/" not in out + err
    assert "restart 2/2 · states" not in err  # the state phase trains the restart kept, whichever it is


@pytest.mark.slow
def test_no_progress_bar_and_verbosity_warning_leave_a_fit_silent():
    out, err = _run("quiet", FIT_KWARGS)
    assert (out, err) == ("", "")


def test_the_fit_display_names_each_stage():
    from scmixvae.train._progress import FitProgress

    progress = FitProgress()
    names = []
    progress.start_restart(0, 2)
    names.append(progress.run(max_epochs=5, state_epochs=0, trained=False).name)
    for r in (1, 2):  # the fit names its pruning rounds
        names.append(progress.run(max_epochs=5, state_epochs=0, trained=True, stage=f"K: pruning round {r}").name)
    names.append(progress.run(max_epochs=5, state_epochs=0, trained=True).name)  # a trained model trained on
    names.append(progress.run(max_epochs=0, state_epochs=5, trained=True).name)
    assert names == ["categories", "K: pruning round 1", "K: pruning round 2", "training", "states"]
    assert progress.restart == ""  # the state phase trains the restart kept
    assert progress.run(max_epochs=5, state_epochs=5, trained=False).state_phase_start == 5


def test_a_progress_bar_callback_of_the_user_replaces_the_fit_display(sim_adata, capsys):
    from lightning.pytorch.callbacks import TQDMProgressBar

    CplMixVAE.setup_anndata(sim_adata)
    model = CplMixVAE(sim_adata, n_categories=3, n_hidden=16)
    # as with scvi-tools, a progress bar of one's own comes with simple_progress_bar=False
    model.train(max_epochs=1, state_epochs=1, batch_size=128, callbacks=[TQDMProgressBar()], simple_progress_bar=False)
    assert model.is_trained_
    assert "Epoch 1:" in capsys.readouterr().out  # Lightning's own bar, not the fit's
