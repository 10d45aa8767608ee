"""benchmarks/summarise_seeds.py: gathering saved real-set results over seeds (no fits)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "summarise_seeds.py"
DATASETS = ["ifnb", "worm", "bladder", "pbmc", "kidney"]


@pytest.fixture(scope="module")
def summarise():
    spec = importlib.util.spec_from_file_location("summarise_seeds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(folder: Path, stem: str, rows: list[dict]) -> None:
    (folder / f"{stem}.json").write_text(json.dumps({"name": stem, "rows": rows}))


def _pruning_rows(seed: int, ari: float, *, peer_ari: float, peer_source: str = "this run") -> list[dict]:
    rows = []
    for i, d in enumerate(DATASETS):
        rows.append(
            {"part": "real", "dataset": d, "method": "CplMixVAE+prune", "model_seed": seed, "ari": ari + i / 100}
        )
        rows.append({"part": "real", "dataset": d, "method": "scVI+Leiden", "model_seed": seed, "ari": peer_ari,
                     "source": peer_source})  # fmt: skip
    rows.append({"part": "real", "dataset": "MEAN", "method": "CplMixVAE+prune", "ari": 0.99})  # ignored
    rows.append({"part": "stability", "dataset": "ifnb", "method": "CplMixVAE+prune", "ari": None})
    return rows


def test_means_over_seeds_and_sets(summarise, tmp_path):
    _write(tmp_path, "a", _pruning_rows(0, 0.5, peer_ari=0.6))
    _write(tmp_path, "b", _pruning_rows(1, 0.7, peer_ari=0.0, peer_source="a.json"))  # a copied peer row: skipped
    peers = [{"dataset": d, "method": "scVI+Leiden", "seed": 1, "ari": 0.4} for d in DATASETS]
    peers += [{"dataset": d, "method": "PCA+Leiden", "seed": 1, "ari": 0.1} for d in DATASETS]
    _write(tmp_path, "p", peers)
    table, conflicts = summarise.gather({"CplMixVAE+prune": ["a", "b"], "scVI+Leiden": ["a", "b", "p"]}, tmp_path)
    assert conflicts == []
    rows = {(r["method"], r["seed"]): r for r in summarise.summarise(table)}
    assert rows[("CplMixVAE+prune", "0")]["mean"] == pytest.approx(0.52)
    assert rows[("CplMixVAE+prune", "1")]["mean"] == pytest.approx(0.72)
    both = rows[("CplMixVAE+prune", "mean of 2")]
    assert both["mean"] == pytest.approx(0.62) and both["ifnb"] == pytest.approx(0.6)
    assert both["sd_of_seed_means"] == pytest.approx(0.141, abs=1e-3)
    assert rows[("scVI+Leiden", "mean of 2")]["mean"] == pytest.approx(0.5)


def test_difference_of_the_means_with_its_uncertainty(summarise, tmp_path):
    for seed, ari in enumerate([0.5, 0.6, 0.7]):
        _write(tmp_path, f"c{seed}", _pruning_rows(seed, ari, peer_ari=0.5 + seed / 100))
    stems = [f"c{seed}" for seed in range(3)]
    table, _ = summarise.gather({"CplMixVAE+prune": stems, "scVI+Leiden": stems}, tmp_path)
    diff = summarise.difference(table)
    # seed means: CplMixVAE 0.52, 0.62, 0.72; scVI 0.50, 0.51, 0.52
    assert diff["difference"] == pytest.approx(0.62 - 0.51)
    assert diff["standard_error"] == pytest.approx(np.sqrt(0.01 / 3 + 0.0001 / 3), abs=1e-4)
    low, high = diff["interval_90"]
    assert low < diff["difference"] < high and low > 0
    assert (diff["n_cpl"], diff["n_peer"]) == (3, 3)
    one, _ = summarise.gather({"CplMixVAE+prune": ["c0"], "scVI+Leiden": stems}, tmp_path)
    assert summarise.difference(one) is None


def test_a_rerun_that_does_not_reproduce_is_listed(summarise, tmp_path):
    _write(tmp_path, "a", _pruning_rows(0, 0.5, peer_ari=0.6))
    _write(tmp_path, "b", _pruning_rows(0, 0.6, peer_ari=0.6))
    table, conflicts = summarise.gather({"CplMixVAE+prune": ["a", "b"], "scVI+Leiden": ["a"]}, tmp_path)
    assert len(conflicts) == 5 and "0.5000 (a) vs 0.6000 (b)" in conflicts[0]
    assert table[("CplMixVAE+prune", "ifnb", "0")] == (0.5, "a")  # the first value is kept


def test_a_seed_fitted_on_another_machine_is_another_run(summarise, tmp_path):
    rows = _pruning_rows(0, 0.5, peer_ari=0.6)
    other = [r | {"tag": "gpuhost", "ari": 0.7} for r in _pruning_rows(0, 0.5, peer_ari=0.6)]
    _write(tmp_path, "a", rows)
    _write(tmp_path, "b", other)
    table, conflicts = summarise.gather({"CplMixVAE+prune": ["b", "a"], "scVI+Leiden": ["a"]}, tmp_path)
    assert conflicts == []
    seeds = [r["seed"] for r in summarise.summarise(table) if r["method"] == "CplMixVAE+prune"]
    assert seeds == ["0", "0@gpuhost", "mean of 2"]  # this machine's seeds first
    assert table[("CplMixVAE+prune", "ifnb", "0@gpuhost")] == (0.7, "b")


def test_a_seed_missing_a_set_is_left_out(summarise, tmp_path):
    rows = _pruning_rows(0, 0.5, peer_ari=0.6)
    _write(tmp_path, "a", [r for r in rows if not (r["dataset"] == "kidney" and r["method"] == "scVI+Leiden")])
    table, _ = summarise.gather({"CplMixVAE+prune": ["a"], "scVI+Leiden": ["a"]}, tmp_path)
    methods = {r["method"] for r in summarise.summarise(table)}
    assert methods == {"CplMixVAE+prune"}


def test_command_line_writes_the_table(summarise, tmp_path, capsys):
    _write(tmp_path, "a", _pruning_rows(0, 0.5, peer_ari=0.6))
    summarise.main(["--cpl", "a", "--peers", "a", "--name", "out", "--results", str(tmp_path)])
    text = (tmp_path / "out.md").read_text()
    assert "| CplMixVAE+prune | mean of 1 | 0.5 | 0.51 | 0.52 | 0.53 | 0.54 | 0.52 |" in text
    assert json.loads((tmp_path / "out.json").read_text())["cpl"] == ["a"]
    out = capsys.readouterr().out
    assert "Reruns that did not reproduce: none" in out
    assert "Difference of the means: needs two complete seeds of each method." in out


def test_another_cplmixvae_method_is_compared_when_named(summarise, tmp_path, capsys):
    rows = []
    for seed in (0, 1):
        rows += _pruning_rows(seed, 0.5 + seed / 10, peer_ari=0.4 + seed / 10)
        rows += [{"part": "real", "dataset": d, "method": "CplMixVAE+prune restarts=3", "model_seed": seed,
                  "ari": 0.7} for d in DATASETS]  # fmt: skip
    _write(tmp_path, "a", rows)
    summarise.main(["--cpl", "a", "--peers", "a", "--name", "plain", "--results", str(tmp_path)])
    assert "Mean over seeds of CplMixVAE minus scVI + Leiden (2 and 2 seeds): +0.1200" in capsys.readouterr().out
    summarise.main(["--cpl", "a", "--peers", "a", "--cpl-method", "CplMixVAE+prune restarts=3", "--name", "r3",
                    "--results", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert "Mean over seeds of CplMixVAE+prune restarts=3 minus scVI + Leiden (2 and 2 seeds): +0.2500" in out
    assert "| CplMixVAE+prune restarts=3 | mean of 2 | 0.7 | 0.7 | 0.7 | 0.7 | 0.7 | 0.7 |" in out
    assert "--cpl-method 'CplMixVAE+prune restarts=3' --name r3" in out
