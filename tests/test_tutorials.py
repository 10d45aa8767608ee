"""The tutorials in ``tutorials/``: committed with their outputs, and executed here on reduced settings.

Each notebook is run top to bottom in a fresh kernel of this interpreter with ``SCMIXVAE_TUTORIAL_FAST=1`` (few
cells and epochs), then a cell of checks is run in the same kernel: the objects the tutorial promises exist and
hold what it says (keys written by ``tl``, rankings, tables). A failing cell or check fails the test.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the tutorial tests need nbformat (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="the tutorial tests need nbclient (pip install -e '.[test]')")
pytest.importorskip("ipykernel", reason="the tutorial tests need ipykernel (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
SHARED_DATA = ROOT.parent / "shared" / "data"
# Checks run in the notebook's kernel after its last cell. Each first checks that the notebook took its reduced
# branch (FAST, from SCMIXVAE_TUTORIAL_FAST): a notebook that ignored it would run its full-length fits here.
CHECKS = {
    "01_quickstart.ipynb": """
import pandas as pd
assert FAST is True
assert len(model.history["train_loss"]) == 5 + 2, "FAST trains 5 category epochs and 2 state epochs"
assert isinstance(adata.obs["cplmixvae_type"].dtype, pd.CategoricalDtype)
assert adata.obs["cplmixvae_type"].notna().all()
assert adata.obsm["X_cplmixvae_state"].shape == (adata.n_obs, model.module.n_state)
assert adata.obsm["X_cplmixvae_probs"].shape == (adata.n_obs, model.n_categories)
assert adata.obsm["X_umap"].shape == (adata.n_obs, 2)
assert set(adata.obs["cplmixvae_type"].cat.categories) <= set(model.category_names)
assert adata.uns["cplmixvae"]["n_categories"] == model.n_categories
assert model.n_categories == 10 and model.pruning_history.empty  # K given: trained, not pruned
agreement = model.get_agent_agreement()
assert agreement.shape == (2, 2) and 0 <= agreement.iloc[0, 1] <= 1
""",
    "02_ifnb_states.ipynb": """
import numpy as np
import pandas as pd
assert FAST is True
assert adata.n_obs == 600
assert set(adata.obs["condition"]) == {"CTRL", "STIM"}
assert isinstance(adata.obs["cplmixvae_type"].dtype, pd.CategoricalDtype)
assert adata.uns["cplmixvae_state_genes"]["params"]["method"] == "cplmixvae_state_traversal"
genes = scmixvae.tl.get_state_genes(adata, n_genes=5)
assert set(genes.columns) >= {"group", "names", "scores", "logfoldchanges"}
assert genes["names"].isin(adata.var_names).all()
assert separation["AUROC CTRL vs STIM"].dropna().between(0.5, 1).all()
assert set(enrichment["group"].astype(str)) == set(adata.obs["cplmixvae_state_genes_group"].cat.categories)
assert enrichment["pvalue_adj"].between(0, 1).all()
assert leiden.obs["leiden"].nunique() > 1
assert adata.var_names.isin(isgs).sum() > 10
""",
    "03_model_order_and_diagnostics.ipynb": """
import pandas as pd
assert FAST is True and EPOCHS == 3
assert adata.n_obs == 400 and len(history) <= 2
assert len(history) >= 1 and history["selected"].sum() == 1
assert model.n_categories == history.loc[history["selected"], "n_categories"].iloc[0]
assert isinstance(adata.obs["cplmixvae_type"].dtype, pd.CategoricalDtype)
assert problems, "the deliberately broken model must be reported as collapsed"
assert list(likelihoods.index) == ["nb", "zinb", "gaussian"]
assert list(augmentations.index) == ["dropout", "thinning", "knn", "learned"]
for table in (likelihoods, augmentations):
    assert table["ARI vs truth"].between(-1, 1).all() and table["agent agreement"].between(0, 1).all()
""",
    "04_reference_mapping.ipynb": """
import pandas as pd
from sklearn.metrics import adjusted_rand_score
assert FAST is True
assert reference.n_obs + query.n_obs == 450 and set(query.obs["batch"]) == {"batch_2"}
assert list(query.var_names) == list(reference.var_names)
assert query_model.category_names == model.category_names == from_folder.category_names
assert query_model.module.n_batch == 3 and model.module.n_batch == 2
assert set(query.obs["cplmixvae_type"].cat.categories) <= set(model.category_names)
assert adjusted_rand_score(query.obs["type"], query.obs["cplmixvae_type"]) >= 0.9
assert same_category.mean() >= 0.9
assert all("weight_cov" in n for n, p in query_model.module.named_parameters() if p.requires_grad)
""",
}
NEEDS_SHARED_DATA = {"02_ifnb_states.ipynb"}
MIN_FIGURES = {
    "01_quickstart.ipynb": 5,
    "02_ifnb_states.ipynb": 7,
    "03_model_order_and_diagnostics.ipynb": 5,
    "04_reference_mapping.ipynb": 1,
}


def _figures(nb) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def _errors(nb) -> list[str]:
    return [
        f"cell {i}: {output.get('ename')}: {output.get('evalue')}"
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A kernel spec that runs this interpreter, with the tutorials' reduced settings in its environment."""
    spec = tmp_path / "kernels" / "scmixvae-tests"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec_json = {"argv": argv, "display_name": "scmixvae tests", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(spec_json))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("SCMIXVAE_TUTORIAL_FAST", "1")
    monkeypatch.setenv("SCMIXVAE_DATA_DIR", str(SHARED_DATA))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # figures as outputs
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return "scmixvae-tests"


def test_every_tutorial_has_checks():
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == sorted(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_tutorial_is_committed_with_outputs(name):
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "run top to bottom, once"
    assert not _errors(nb)
    assert _figures(nb) >= MIN_FIGURES[name]
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.data) if n in NEEDS_SHARED_DATA else n for n in sorted(CHECKS)]
)
def test_tutorial_runs_on_reduced_settings(name, kernel, tmp_path):
    if name in NEEDS_SHARED_DATA and not SHARED_DATA.is_dir():
        pytest.skip(f"{name} reads the shared data folder {SHARED_DATA}, which is absent")
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[name]))
    client = nbclient.NotebookClient(
        nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell or check
    assert not _errors(nb)
    assert _figures(nb) >= MIN_FIGURES[name]
    assert not any(tmp_path.glob("*.h5ad")), "tutorials must not leave data files behind"
