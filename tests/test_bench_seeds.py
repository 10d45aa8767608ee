"""benchmarks/bench_seeds.py: gathering per-fit files and the medoid-of-r analysis (no fits)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_seeds.py"


@pytest.fixture(scope="module")
def seeds():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_seeds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fit(folder: Path, method: str, seed: int, labels: list[str], ari: float, dataset: str = "pbmc") -> None:
    fit = {"method": method, "dataset": dataset, "seed": seed, "chosen_k": len(set(labels)), "ari": ari,
           "nmi": ari, "labels": labels}  # fmt: skip
    folder.mkdir(exist_ok=True)
    (folder / f"{method}__{dataset}__{seed}.json").write_text(json.dumps(fit))


def test_medoid_picks_the_run_that_agrees_with_the_others(seeds):
    a, b = np.array(list("aabbcc")), np.array(list("abcabc"))
    labels = {0: a, 1: a.copy(), 2: b}
    ari = {0: 0.8, 1: 0.6, 2: 0.1}
    # seeds 0 and 1 agree perfectly; the tie between them goes to the lower seed
    assert seeds.medoid_ari(labels, ari, 3) == pytest.approx(0.8)
    # every pair: {0,1} -> 0, {0,2} -> tie -> 0, {1,2} -> tie -> 1
    assert seeds.medoid_ari(labels, ari, 2) == pytest.approx((0.8 + 0.8 + 0.6) / 3)


def test_gather_keeps_machines_apart(seeds, tmp_path):
    labels = list("aabbcc")
    for s in range(3):
        _fit(tmp_path / "here", "cpl", s, labels, 0.5 + s / 10)
        _fit(tmp_path / "gpu", "cpl", s, labels, 0.2)
    _fit(tmp_path / "here", "scvi", 0, list("aaabbb"), 0.4)
    rows = seeds.gather(seeds.load_fits([f"{tmp_path / 'here'}=", f"{tmp_path / 'gpu'}=h200"]))
    real = [r for r in rows if r["part"] == "real"]
    assert len(real) == 7
    assert {r["method"] for r in real} == {"CplMixVAE+prune", "scVI+Leiden"}
    summary = {(r["method"], r["tag"]): r for r in rows if r["part"] == "seeds"}
    mine = summary[("CplMixVAE+prune", "")]
    assert mine["n_seeds"] == 3 and mine["ari"] == pytest.approx(0.6)
    assert (mine["ari_min"], mine["ari_max"]) == (pytest.approx(0.5), pytest.approx(0.7))
    assert mine["ari_between_seeds"] == pytest.approx(1.0)
    assert mine["medoid_of_3"] == pytest.approx(0.5) and mine["medoid_of_5"] is None
    assert summary[("CplMixVAE+prune", "h200")]["ari"] == pytest.approx(0.2)
    assert summary[("scVI+Leiden", "")]["ari_between_seeds"] is None
    assert "medoid_of_3" not in summary[("scVI+Leiden", "")]


def test_a_fit_already_saved_is_not_run_again(seeds, tmp_path, monkeypatch):
    _fit(tmp_path, "cpl", 0, list("ab"), 0.5, dataset="ifnb")
    started = []
    monkeypatch.setattr(seeds.subprocess, "Popen", lambda cmd, env: started.append(cmd) or _Done())
    monkeypatch.setattr(seeds.time, "sleep", lambda s: None)
    args = argparse.Namespace(
        methods=["cpl"], datasets=["ifnb", "worm"], seeds=[0], jobs=2, threads=1, accelerator="cpu",
        scvi_accelerator="cpu", model_kwargs={}, fits=tmp_path, restarts=3,
    )  # fmt: skip
    seeds.run_grid(args)
    assert [cmd[-3:] for cmd in started] == [["cpl", "worm", "0"]]
    assert started[0][-6:-4] == ["--restarts", "3"]


class _Done:
    returncode = 0
    args = ("cpl", "worm", "0")

    def poll(self):
        return 0


def test_gene_selection_needs_scikit_misc_and_falls_back_only_on_a_failed_fit(seeds, monkeypatch):
    import _common
    import anndata as ad
    import scanpy as sc

    counts = ad.AnnData(np.random.default_rng(0).poisson(1.0, (60, 30)).astype(np.float32))
    calls = []

    def hvg(adata, *, flavor="seurat", n_top_genes, error=None):
        calls.append(flavor)
        if flavor == "seurat_v3":
            raise error
        adata.var["highly_variable"] = np.arange(adata.n_vars) < n_top_genes

    monkeypatch.setattr(sc.pp, "highly_variable_genes", lambda a, **kw: hvg(a, **kw, error=ImportError("skmisc")))
    with pytest.raises(ImportError, match=r"seurat_v3 flavor, which needs scikit-misc: pip install -e '\.\[bench\]'"):
        _common._top_genes(counts, 10)
    assert calls == ["seurat_v3"]
    monkeypatch.setattr(sc.pp, "highly_variable_genes", lambda a, **kw: hvg(a, **kw, error=ValueError("loess")))
    assert _common._top_genes(counts, 10).sum() == 10
    assert calls[1:] == ["seurat_v3", "seurat"]
    assert counts.n_vars == 30 and "highly_variable" not in counts.var  # the caller's object is untouched


def test_fits_with_restarts_are_another_method_without_a_medoid_row(seeds, tmp_path):
    for s in range(3):
        _fit(tmp_path, "cpl", s, list("aabb"), 0.5)
    folder = tmp_path / "r3"
    _fit(folder, "cpl", 0, list("aabb"), 0.7)
    fit = json.loads((folder / "cpl__pbmc__0.json").read_text())
    restarts = [{"restart": r, "seed": r, "n_categories": 2, "mean_consensus": 1.0, "mean_ari": 1.0} for r in range(3)]
    (folder / "cpl__pbmc__0.json").write_text(json.dumps(fit | {"restarts": restarts, "restart_kept": 1}))
    rows = seeds.gather(seeds.load_fits([f"{tmp_path}=", f"{folder}="]))
    real = {r["method"]: r for r in rows if r["part"] == "real"}
    assert real["CplMixVAE+prune restarts=3"]["ari"] == 0.7
    assert real["CplMixVAE+prune restarts=3"]["restart_kept"] == 1
    assert real["CplMixVAE+prune"]["restart_kept"] is None and not real["CplMixVAE+prune"]["composed"]
    summary = {r["method"]: r for r in rows if r["part"] == "seeds"}
    assert summary["CplMixVAE+prune"]["n_seeds"] == 3 and summary["CplMixVAE+prune"]["medoid_of_3"] == 0.5
    assert summary["CplMixVAE+prune restarts=3"]["n_seeds"] == 1
    assert "medoid_of_3" not in summary["CplMixVAE+prune restarts=3"]


def test_compose_keeps_the_medoid_of_consecutive_seeds(seeds, tmp_path):
    single = tmp_path / "single"
    _fit(single, "cpl", 5, list("aabbcc"), 0.3)
    _fit(single, "cpl", 6, list("aabbcc"), 0.6)  # 5 and 6 agree: 5 is the first of the two medoids
    _fit(single, "cpl", 7, list("abcabc"), 0.9)
    _fit(single, "cpl", 8, list("aabbcc"), 0.5)  # 9 and 10 missing: base 8 is skipped
    for s in (5, 6, 7):
        fit = json.loads((single / f"cpl__pbmc__{s}.json").read_text())
        (single / f"cpl__pbmc__{s}.json").write_text(json.dumps(fit | {"seconds": 10.0 * s, "consensus": 0.96}))
    written = seeds.compose(single, tmp_path / "r3", [5, 8], 3, ["pbmc", "ifnb"])
    assert [p.name for p in written] == ["cpl__pbmc__5.json"]
    fit = json.loads(written[0].read_text())
    assert (fit["seed"], fit["restart_kept"], fit["ari"], fit["seconds"]) == (5, 0, 0.3, 180.0)
    assert [r["seed"] for r in fit["restarts"]] == [5, 6, 7] and fit["restarts"][0]["mean_consensus"] == 0.96
    from sklearn.metrics import adjusted_rand_score

    apart = adjusted_rand_score(list("aabbcc"), list("abcabc"))
    assert fit["restarts"][0]["mean_ari"] == pytest.approx((1 + apart) / 2)
    assert fit["restarts"][2]["mean_ari"] == pytest.approx(apart)
    assert fit["restarts"][1]["mean_ari"] == fit["restarts"][0]["mean_ari"] > fit["restarts"][2]["mean_ari"]
    assert len(fit["composed_from"]) == 3
    [row] = [r for r in seeds.gather(seeds.load_fits([f"{tmp_path / 'r3'}="])) if r["part"] == "real"]
    assert row["method"] == "CplMixVAE+prune restarts=3" and row["restart_kept"] == 0 and row["composed"]
    with pytest.raises(ValueError, match="compose from single fits"):
        seeds.compose(tmp_path / "r3", tmp_path / "again", [5], 1, ["pbmc"])
