import anndata
import numpy as np
import pandas as pd
import pytest

from scmixvae._cli import main
from scmixvae.model import CplMixVAE


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


def test_fit_writes_output_and_figures(tmp_path, sim_adata):
    sim_adata.obs["treatment"] = pd.Categorical(np.where(sim_adata.obs["state"] > 0.5, "stim", "ctrl"))
    src = tmp_path / "in.h5ad"
    sim_adata.write_h5ad(src)
    rc = main(
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


def test_fit_with_pruning_records_history(tmp_path, sim_adata):
    src = tmp_path / "in.h5ad"
    sim_adata.write_h5ad(src)
    rc = main(["fit", str(src), "-o", str(tmp_path / "out.h5ad"), "--n-categories", "5", "--max-epochs", "1",
               "--prune", "--quiet"])  # fmt: skip
    assert rc == 0
    adata = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert adata.uns["cplmixvae"]["n_categories"] <= 5


def test_fit_without_n_categories_chooses_them_by_pruning(tmp_path, sim_adata):
    src = tmp_path / "in.h5ad"
    sim_adata.write_h5ad(src)
    rc = main(["fit", str(src), "-o", str(tmp_path / "out.h5ad"), "--max-epochs", "1", "--restarts", "2", "--quiet"])
    assert rc == 0
    adata = anndata.read_h5ad(tmp_path / "out.h5ad")
    # 300 cells: the model starts from 300 // 50 = 6 categories and keeps the pruning round it selects
    assert 2 <= adata.uns["cplmixvae"]["n_categories"] <= 6
    assert adata.obs["cplmixvae_type"].nunique() <= adata.uns["cplmixvae"]["n_categories"]


def test_fit_reports_bad_path_and_bad_key(tmp_path, sim_adata, capsys):
    assert main(["fit", str(tmp_path / "missing.h5ad"), "-o", str(tmp_path / "o.h5ad")]) == 2
    assert "does not exist" in capsys.readouterr().err
    src = tmp_path / "in.h5ad"
    sim_adata.write_h5ad(src)
    assert main(["fit", str(src), "-o", str(tmp_path / "o.h5ad"), "--batch-key", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["fit", str(src), "-o", str(tmp_path / "o.h5ad"), "--condition-key", "nope"]) == 2
    assert "`condition_key`" in capsys.readouterr().err
    assert main(["fit", str(src), "-o", str(tmp_path / "o.txt")]) == 2


def test_unknown_command_exits():
    with pytest.raises(SystemExit):
        main(["bogus"])
