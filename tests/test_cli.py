import argparse
import errno
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scvi

import scmixvae
from scmixvae import _cli as cli
from scmixvae import _io
from scmixvae._cli import _parser, main
from scmixvae.model import CplMixVAE

REPO = Path(__file__).resolve().parents[1]


def test_demo_writes_annotated_h5ad_figure_and_model(tmp_path):
    out = tmp_path / "demo"
    rc = main(
        [
            "demo",
            "--output",
            str(out),
            "--n-cells",
            "300",
            "--n-genes",
            "80",
            "--n-types",
            "3",
            "--max-epochs",
            "1",
            "--state-epochs",
            "2",
            "--quiet",
            "--accelerator",
            "cpu",
        ]
    )
    assert rc == 0
    adata = anndata.read_h5ad(out / "demo.h5ad")
    # one epoch of every part and two of the state phase
    assert len(CplMixVAE.load(out / "model", adata=adata).history["train_loss"]) == 3
    assert "cplmixvae_type" in adata.obs and "X_cplmixvae_state" in adata.obsm
    assert (out / "demo.png").stat().st_size > 0
    assert (out / "model" / "model.pt").exists()


def test_fit_writes_output_and_figures(tmp_path, sim_adata, monkeypatch):
    import matplotlib.pyplot as plt

    sim_adata.obs["treatment"] = pd.Categorical(np.where(sim_adata.obs["state"] > 0.5, "stim", "ctrl"))
    src = tmp_path / "in.h5ad"
    sim_adata.write_h5ad(src)
    backend = plt.get_backend()
    plt.switch_backend("pdf")  # a caller's backend (e.g. a notebook's), which the command used to leave as Agg
    monkeypatch.setattr(scvi.settings, "verbosity", logging.INFO)
    try:
        rc = _fit_with_figures(src, tmp_path)
        assert plt.get_backend() == "pdf"
    finally:
        plt.switch_backend(backend)
    assert scvi.settings.verbosity == logging.INFO  # --quiet was the command's, not the caller's
    assert rc == 0
    adata = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert "mix_type" in adata.obs
    assert adata.uns["mix"]["setup_args"]["condition_key"] == "treatment"
    assert adata.uns["mix"]["setup_args"]["batch_key"] == "batch"
    assert adata.uns["mix_state_genes"]["names"].dtype.names  # rank_genes_groups schema
    table = pd.read_csv(tmp_path / "out.state_genes.csv")
    assert {"group", "names", "scores"} <= set(table.columns)
    for name in ["types_and_states", "consensus", "training_history", "state_genes_dotplot"]:
        assert (tmp_path / "figs" / f"{name}.png").stat().st_size > 0


def _fit_with_figures(src, tmp_path) -> int:
    return main(
        [
            "fit",
            str(src),
            "-o",
            str(tmp_path / "out.h5ad"),
            "--n-categories",
            "3",
            "--max-epochs",
            "1",
            "--batch-key",
            "batch",
            "--condition-key",
            "treatment",
            "--figures",
            str(tmp_path / "figs"),
            "--quiet",
            "--key-added",
            "mix",
        ]
    )


def test_a_failed_command_gives_the_caller_its_seed_back(tmp_path, sim_adata):
    sim_adata.write_h5ad(tmp_path / "in.h5ad")
    import torch

    seed = scvi.settings.seed
    try:
        scvi.settings.seed = None
        torch.backends.cudnn.deterministic = False
        assert main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "o.h5ad"), "--batch-key", "nope"]) == 2
        assert scvi.settings.seed is None  # the command's --seed (default 0) was left set
        assert not torch.backends.cudnn.deterministic  # and so was the flag scvi-tools' seed setter turns on
    finally:
        scvi.settings.seed = seed


def test_fit_with_pruning_records_history(tmp_path, sim_adata):
    src = tmp_path / "in.h5ad"
    sim_adata.write_h5ad(src)
    with warnings.catch_warnings():  # the agents get their own views: no warning that they read the same cell
        warnings.filterwarnings("error", message="Every agent reads the same cell")
        rc = main(["fit", str(src), "-o", str(tmp_path / "out.h5ad"), "--n-categories", "5", "--max-epochs", "1",
                   "--prune", "--quiet"])  # fmt: skip
    assert rc == 0
    adata = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert adata.uns["cplmixvae"]["n_categories"] <= 5


def test_fit_without_n_categories_chooses_them_by_pruning(tmp_path, sim_adata):
    src = tmp_path / "in.h5ad"
    sim_adata.write_h5ad(src)
    rc = main(["fit", str(src), "-o", str(tmp_path / "out.h5ad"), "--max-epochs", "1", "--n-restarts", "2", "--quiet"])
    assert rc == 0
    adata = anndata.read_h5ad(tmp_path / "out.h5ad")
    # 300 cells: the model starts from 300 // 50 = 6 categories and keeps the pruning round it selects
    assert 2 <= adata.uns["cplmixvae"]["n_categories"] <= 6
    assert adata.obs["cplmixvae_type"].nunique() <= adata.uns["cplmixvae"]["n_categories"]


def test_fit_reports_bad_path_and_bad_key(tmp_path, sim_adata, capsys):
    assert main(["fit", str(tmp_path / "missing.h5ad"), "-o", str(tmp_path / "o.h5ad")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "folder.h5ad").mkdir()  # e.g. a .zarr store: it was said not to exist
    assert main(["fit", str(tmp_path / "folder.h5ad"), "-o", str(tmp_path / "o.h5ad")]) == 2
    assert "folder.h5ad is a folder; give an .h5ad file" in capsys.readouterr().err
    src = tmp_path / "in.h5ad"
    sim_adata.write_h5ad(src)
    assert main(["fit", str(src), "-o", str(tmp_path / "o.h5ad"), "--batch-key", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["fit", str(src), "-o", str(tmp_path / "o.h5ad"), "--condition-key", "nope"]) == 2
    assert "error: --condition-key: column(s) ['nope'] not found" in capsys.readouterr().err  # not `condition_key`
    assert main(["fit", str(src), "-o", str(tmp_path / "o.h5ad"), "--layer", "counts"]) == 2
    assert "raw counts, or no --layer for adata.X." in capsys.readouterr().err  # not layer=None
    assert main(["fit", str(src), "-o", str(tmp_path / "o.h5ad"), "--n-categories", "400"]) == 2
    assert "error: --n-categories 400 is larger than the number of cells" in capsys.readouterr().err
    assert main(["fit", str(src), "-o", str(tmp_path / "o.txt")]) == 2


def test_unknown_command_exits():
    with pytest.raises(SystemExit):
        main(["bogus"])


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the command starts training."""

    def train(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(CplMixVAE, "train", train)


@pytest.mark.parametrize("names", ["var", "obs"])
def test_duplicate_names_in_the_input_are_the_commands_error_alone(tmp_path, sim_adata, capsys, names):
    """anndata's warning about them came first, as 'scmixvae: warning: Variable names are not unique...'."""
    index = getattr(sim_adata, f"{names}_names").to_numpy().copy()
    index[1] = index[0]
    setattr(sim_adata, f"{names}_names", index)
    src = tmp_path / "in.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim_adata.write_h5ad(src)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", str(src), "-o", str(tmp_path / "out.h5ad")]) == 2
    assert not [str(w.message) for w in caught if "not unique" in str(w.message)]
    assert "make_unique()" in capsys.readouterr().err


def test_fit_refuses_to_overwrite_its_input(tmp_path, sim_adata, capsys, no_training):
    src = tmp_path / "x.h5ad"
    sim_adata.write_h5ad(src)
    before = src.read_bytes()
    assert main(["fit", str(src), "-o", str(src), "--quiet"]) == 2
    assert "is the input file" in capsys.readouterr().err
    out = tmp_path / "out.h5ad"
    out.write_bytes(b"a file of the user")
    assert main(["fit", str(src), "-o", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert src.read_bytes() == before and out.read_bytes() == b"a file of the user"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_fit_refuses_its_input_as_the_model_folder(tmp_path, sim_adata, capsys, no_training, overwrite):
    """The message said "output ... pass --overwrite to replace the input", which a folder cannot do."""
    src = tmp_path / "x.h5ad"
    sim_adata.write_h5ad(src)
    before = src.read_bytes()
    args = ["fit", str(src), "-o", str(tmp_path / "out.h5ad"), "--save-model", str(src), "--quiet", *overwrite]
    assert main(args) == 2
    assert f"model folder {src} is the input file; choose a folder for the model" in capsys.readouterr().err
    assert src.read_bytes() == before and not (tmp_path / "out.h5ad").exists()


@pytest.mark.parametrize(
    ("output", "model", "figures"),
    [("res/out.h5ad", "res", None), ("out.h5ad", "out.h5ad", None), ("out.h5ad", "figs", "figs")],
)
def test_fit_refuses_a_model_folder_that_would_hold_an_output(
    tmp_path, sim_adata, capsys, no_training, output, model, figures
):
    """The outputs, written first, created the folder; the model was then refused after the whole fit."""
    src = tmp_path / "x.h5ad"
    sim_adata.write_h5ad(src)
    args = ["fit", str(src), "-o", str(tmp_path / output), "--save-model", str(tmp_path / model), "--quiet"]
    assert main([*args, *(["--figures", str(tmp_path / figures)] if figures else [])]) == 2
    assert f"the model folder {tmp_path / model} would hold the output" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5ad"]


@pytest.mark.parametrize(
    ("output", "figures", "model"),
    [("a.h5ad", "a.h5ad", None), ("b.h5ad", None, "b.h5ad/model"), ("c.h5ad", "c.h5ad/figs", None),
     ("d.h5ad", "d.state_genes.csv", None)],
)  # fmt: skip
def test_fit_refuses_outputs_that_collide_before_training(
    tmp_path, sim_adata, capsys, no_training, output, figures, model
):
    """They passed the check one by one and failed after the whole fit, with the .h5ad and its table written."""
    src = tmp_path / "x.h5ad"
    sim_adata.write_h5ad(src)
    args = ["fit", str(src), "-o", str(tmp_path / output), "--quiet"]
    args += ["--figures", str(tmp_path / figures)] if figures else ["--save-model", str(tmp_path / model)]
    assert main(args) == 2
    assert "collide (one is, or lies in, the other); give each its own path" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5ad"]


def test_a_model_saved_beside_its_input_keeps_the_input(tmp_path, sim_adata):
    """`fit DIR/adata.h5ad --save-model DIR --overwrite` deleted the input: save() removed the folder's adata.h5ad."""
    folder = tmp_path / "model"
    folder.mkdir()
    sim_adata.write_h5ad(folder / "adata.h5ad")
    before = (folder / "adata.h5ad").read_bytes()
    args = ["fit", str(folder / "adata.h5ad"), "-o", str(tmp_path / "out.h5ad"), "--n-categories", "3"]
    assert main([*args, "--max-epochs", "1", "--state-epochs", "1", "--save-model", str(folder), "--overwrite"]) == 0
    assert (folder / "adata.h5ad").read_bytes() == before
    with pytest.raises(ValueError, match="holds no saved AnnData of this model"):  # not paired with the new model
        CplMixVAE.load(folder)


def test_fit_says_why_a_tiny_input_has_no_state_genes(tmp_path, sim_adata, capsys):
    """A traceback after the fit ("No group ... has at least 3 cells"); now the command's error, exit 2."""
    sim_adata[:5].copy().write_h5ad(tmp_path / "x.h5ad")
    args = ["fit", str(tmp_path / "x.h5ad"), "-o", str(tmp_path / "o.h5ad"), "--n-categories", "3"]
    assert main([*args, "--max-epochs", "1", "--state-epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "scmixvae: error: the fit ran, but its state genes could not be ranked, so nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5ad"]


def test_fit_with_overwrite_replaces_the_input_by_the_annotated_file_and_saves_the_model(tmp_path, sim_adata):
    src = tmp_path / "x.h5ad"
    sim_adata.write_h5ad(src)
    args = ["fit", str(src), "-o", str(src), "--n-categories", "3", "--max-epochs", "1", "--state-epochs", "1"]
    assert main([*args, "--overwrite", "--save-model", str(tmp_path / "model"), "--quiet"]) == 0
    adata = anndata.read_h5ad(src)
    assert "cplmixvae_type" in adata.obs and adata.n_obs == sim_adata.n_obs
    model = CplMixVAE.load(tmp_path / "model", adata=adata)
    assert model.n_categories == 3 and len(model.history["train_loss"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "x.h5ad", "x.state_genes.csv"]  # no temp file


def test_fit_output_that_cannot_be_written_fails_before_training(tmp_path, sim_adata, capsys, no_training):
    src = tmp_path / "x.h5ad"
    sim_adata.write_h5ad(src)
    (tmp_path / "afile").write_text("")
    assert main(["fit", str(src), "-o", str(tmp_path / "afile" / "out.h5ad")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["fit", str(src), "-o", str(tmp_path / "out.h5ad"), "--figures", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["fit", str(src), "-o", str(tmp_path / "out.h5ad"), "--save-model", str(tmp_path / "afile")]) == 2
    assert "afile already exists" in capsys.readouterr().err
    assert main(["fit", str(src), "-o", str(tmp_path / "out.csv")]) == 2
    assert "must end in .h5ad" in capsys.readouterr().err


@pytest.mark.parametrize("existing", [True, False])
def test_fit_output_where_no_file_can_be_created_fails_before_training(
    tmp_path, sim_adata, capsys, monkeypatch, no_training, existing
):
    """Permission bits said yes where no file could be created (root on a read-only or virtual file system, e.g.
    `--figures /proc/x`): the fit ran, wrote the .h5ad and then failed with a traceback. Now creation is tried."""
    src = tmp_path / "x.h5ad"
    sim_adata.write_h5ad(src)
    (tmp_path / "figs").mkdir()
    figures = tmp_path / "figs" if existing else tmp_path / "figs" / "new"

    mkdir, mkstemp = Path.mkdir, _io.tempfile.mkstemp

    def read_only(path):  # figs/ is read-only; the rest of tmp_path is not
        if Path(path).is_relative_to(tmp_path / "figs"):
            raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: read_only(self) or mkdir(self, *a, **k))
    monkeypatch.setattr(_io.tempfile, "mkstemp", lambda *a, dir, **k: read_only(dir) or mkstemp(*a, dir=dir, **k))
    assert main(["fit", str(src), "-o", str(tmp_path / "out.h5ad"), "--figures", str(figures)]) == 2
    assert f"no file can be created in {tmp_path / 'figs'} (Read-only file system)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["figs", "x.h5ad"]


def test_the_write_check_leaves_nothing_behind(tmp_path):
    (tmp_path / "kept").write_text("")
    assert _io.unwritable_reason(tmp_path / "out.h5ad") is None
    assert _io.unwritable_reason(tmp_path / "new" / "deeper" / "out.h5ad") is None
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]
    assert _io.unwritable_reason(tmp_path / "kept" / "out.h5ad") == f"{tmp_path / 'kept'} is a file, not a folder"
    assert _io.unwritable_reason(tmp_path) == f"{tmp_path} is a folder"


def test_fit_refuses_an_accelerator_lightning_cannot_use_before_reading_the_input(
    tmp_path, sim_adata, capsys, monkeypatch, no_training
):
    """`--accelerator gpu` on a machine without one failed with Lightning's traceback, after reading the input."""
    src = tmp_path / "x.h5ad"
    sim_adata.write_h5ad(src)
    monkeypatch.setattr(cli, "_read_input", lambda path: pytest.fail("the input was read"))
    assert main(["fit", str(src), "-o", str(tmp_path / "out.h5ad"), "--accelerator", "nope"]) == 2
    assert "error: --accelerator nope with devices='auto' cannot be used on this machine" in capsys.readouterr().err
    assert main(["demo", "-o", str(tmp_path / "demo"), "--accelerator", "nope"]) == 2
    assert "cannot be used on this machine" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5ad"]


@pytest.mark.parametrize("option", [["--consensus-threshold", "0.9"], ["--n-restarts", "3"]])
def test_fit_refuses_options_of_the_choice_of_k_when_k_is_kept(tmp_path, sim_adata, capsys, no_training, option):
    src = tmp_path / "x.h5ad"
    sim_adata.write_h5ad(src)
    args = ["fit", str(src), "-o", str(tmp_path / "out.h5ad"), "--n-categories", "3", *option]
    assert main(args) == 2
    assert f"{option[0]} applies when the number of types is chosen" in capsys.readouterr().err
    assert not (tmp_path / "out.h5ad").exists()


@pytest.mark.parametrize("kind", ["csv", "text"])
def test_fit_on_a_file_that_is_not_h5ad_is_a_clear_error(tmp_path, sim_adata, capsys, kind, no_training):
    src = tmp_path / ("x.csv" if kind == "csv" else "x.h5ad")
    if kind == "csv":
        sim_adata.to_df().to_csv(src)
    else:
        src.write_text("not an AnnData\n")
    assert main(["fit", str(src), "-o", str(tmp_path / "out.h5ad")]) == 2
    err = capsys.readouterr().err
    assert "is not an .h5ad (HDF5) file" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "option",
    [["--max-epochs", "-1"], ["--max-epochs", "0"], ["--state-epochs", "-1"], ["--n-restarts", "0"],
     ["--n-categories", "0"], ["--batch-size", "1"], ["--consensus-threshold", "1.5"], ["--seed", "-1"],
     ["--seed", "4294967296"], ["--n-state-genes", "0"], ["--max-epochs", "two"], ["--key-added", "run/1"],
     ["--key-added", ""]],
)  # fmt: skip
def test_fit_options_out_of_range_are_usage_errors(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(tmp_path / "x.h5ad"), "-o", str(tmp_path / "o.h5ad"), *option])
    assert exit_info.value.code == 2
    assert f"argument {option[0]}" in capsys.readouterr().err


def test_version_and_help_on_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and scmixvae.__version__ in capsys.readouterr().out
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    fit_help = commands["fit"].format_help()
    assert "--n-restarts" in fit_help and "--save-model" in fit_help and "--restarts " not in fit_help


def test_restarts_is_a_hidden_alias_of_n_restarts(capsys):
    args = _parser().parse_args(["fit", "x.h5ad", "-o", "o.h5ad", "--restarts", "2"])
    assert args.n_restarts == 2
    assert "deprecated; use --n-restarts" in capsys.readouterr().err
    assert _parser().parse_args(["fit", "x.h5ad", "-o", "o.h5ad", "--n-restarts", "4"]).n_restarts == 4


_HEAVY = ("torch", "scvi", "scanpy", "anndata", "lightning")


@pytest.mark.parametrize(
    "code",
    [
        "import scmixvae._cli as cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass",
        "import runpy, sys\nsys.argv = ['scmixvae', 'fit', '--help']\ntry:\n"
        "    runpy.run_module('scmixvae', run_name='__main__')\nexcept SystemExit:\n    pass",
        "import scmixvae",
    ],
    ids=["entry point", "python -m scmixvae", "import scmixvae"],
)
def test_help_and_package_import_load_no_heavy_library(code):
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {_HEAVY!r} if m in sys.modules]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_subpackages_load_on_first_use():
    from scmixvae import tl

    assert tl is scmixvae.tl and scmixvae.model.CplMixVAE is CplMixVAE
    assert {"data", "model", "module", "pl", "tl", "train"} <= set(dir(scmixvae))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = scmixvae.nope


def test_demo_refuses_to_replace_existing_results(tmp_path, capsys, no_training):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.h5ad").write_bytes(b"earlier results")
    assert main(["demo", "--output", str(out), "--quiet"]) == 2
    assert "demo.h5ad already exists" in capsys.readouterr().err
    assert (out / "demo.h5ad").read_bytes() == b"earlier results"


def test_fit_interrupted_by_ctrl_c_writes_nothing_and_exits_130(tmp_path, sim_adata, monkeypatch, capsys):
    from lightning.pytorch.callbacks import Callback

    class Interrupt(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            raise KeyboardInterrupt

    train = CplMixVAE.train
    monkeypatch.setattr(CplMixVAE, "train", lambda self, **kw: train(self, callbacks=[Interrupt()], **kw))
    src = tmp_path / "in.h5ad"
    sim_adata.write_h5ad(src)
    out = tmp_path / "out.h5ad"
    with warnings.catch_warnings(record=True) as caught:  # the model's advice (call train() again) is not the command's
        warnings.simplefilter("always")
        rc = main(["fit", str(src), "-o", str(out), "--n-categories", "3", "--max-epochs", "2", "--quiet"])
    assert rc == 130
    assert not [w for w in caught if "interrupted" in str(w.message)]
    captured = capsys.readouterr()
    said = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert said == ["scmixvae: interrupted; no output file was replaced by a partial one."]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


def test_a_fit_whose_loss_diverges_is_the_commands_error(tmp_path, sim_adata, monkeypatch, capsys):
    """The training plan's error ended the command in a traceback (exit 1), after scvi-tools' stray print of it."""
    train = CplMixVAE.train
    monkeypatch.setattr(CplMixVAE, "train", lambda self, **kw: train(self, plan_kwargs={"lr": 1e6}, **kw))
    src = tmp_path / "in.h5ad"
    sim_adata.write_h5ad(src)
    rc = main(["fit", str(src), "-o", str(tmp_path / "out.h5ad"), "--n-categories", "3", "--max-epochs", "2",
               "--quiet"])  # fmt: skip
    assert rc == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("scmixvae: error: Training stopped: the loss became NaN or infinite in epoch 0")
    assert "Exception raised during training" not in captured.out + captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


def test_quiet_demo_prints_only_its_results(tmp_path, capfd):
    verbosity = scvi.settings.verbosity
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc = main(["demo", "--output", str(tmp_path / "demo"), "--n-cells", "300", "--n-genes", "80", "--n-types",
                       "3", "--max-epochs", "1", "--state-epochs", "1", "--quiet", "--accelerator", "cpu"])  # fmt: skip
        assert scvi.settings.verbosity == verbosity  # the command's WARNING is not left to the caller
    finally:
        scvi.settings.verbosity = verbosity
    assert rc == 0
    captured = capfd.readouterr()
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("ARI of the consensus types") and lines[1].startswith("wrote ")
    assert "Seed set" not in captured.err and "Leiden" not in captured.err + captured.out
    assert not [str(w.message) for w in caught if "no counts" in str(w.message)]  # the demo leaves such genes out


@pytest.mark.slow
def test_messages_and_progress_go_to_stderr_as_plain_lines_and_stdout_holds_the_results(tmp_path, sim_adata):
    """Redirected, stdout held the log lines in terminal colours, wrapped at 80 columns, and the progress bar."""
    src = tmp_path / "in.h5ad"
    sim_adata.write_h5ad(src)
    args = ["fit", str(src), "-o", str(tmp_path / "out.h5ad"), "--n-categories", "3", "--max-epochs", "1",
            "--state-epochs", "1", "--accelerator", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.update({"MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"})
    result = subprocess.run([sys.executable, "-m", "scmixvae", *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"wrote {tmp_path / 'out.h5ad'}, {tmp_path / 'out.state_genes.csv'}"]
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert "\x1b[" not in result.stderr
    assert any(line.startswith("scmixvae: categorical heads fitted to the initial partition: ") for line in lines)
    assert any(line.startswith("states: 100%") for line in lines)


@pytest.mark.slow
def test_warnings_read_as_the_commands_messages_even_when_quiet(tmp_path, sim_adata):
    """Python's warning display named an internal file and printed a line of the package's code."""
    import warnings as python_warnings

    adata = sim_adata.copy()
    adata.X[:, 0] = 0  # a gene without counts: setup_anndata warns
    src = tmp_path / "in.h5ad"
    adata.write_h5ad(src)
    args = ["fit", str(src), "-o", str(tmp_path / "out.h5ad"), "--n-categories", "3", "--max-epochs", "1",
            "--state-epochs", "0", "--quiet", "--accelerator", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.update({"MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"})
    result = subprocess.run([sys.executable, "-m", "scmixvae", *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "scmixvae: warning: " in result.stderr and "3 genes have no counts in adata.X" in result.stderr
    assert "UserWarning" not in result.stderr and "_cli.py" not in result.stderr
    formatwarning = python_warnings.formatwarning
    with python_warnings.catch_warnings(record=True) as caught:  # in-process: warnings reach the caller as warnings
        python_warnings.simplefilter("always")
        assert main([*args[:3], str(tmp_path / "again.h5ad"), *args[4:]]) == 0
    assert any("genes have no counts" in str(w.message) for w in caught)
    assert python_warnings.formatwarning is formatwarning  # and the caller's display is given back
