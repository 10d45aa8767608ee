"""Mean ARI over seeds of CplMixVAE (pruned) and scVI + Leiden on the real sets, from saved results.

    python benchmarks/summarise_seeds.py --cpl pruning_real_session9_stability pruning_real_session9_seed2 ... \
        --peers pruning_real_samerun peers_scvi_seed1 ... --name real_seeds

Reads ``benchmarks/results/{stem}.json`` written by ``bench_pruning.py`` (its ``real`` rows) or ``bench_peers.py``:
the CplMixVAE rows of the ``--cpl`` files and the scVI + Leiden rows of the ``--peers`` files (a peer row that
``bench_pruning.py --peers-from`` copied from another file is skipped: name that file instead).
A (method, data set, seed) found in several files keeps its first value; a repeat with another ARI (a rerun that
did not reproduce) is listed. Prints, per method, the ARI of every set and seed, the mean over the sets of
every seed, the mean over the seeds of every set and the mean over both, for the seeds where a method has all
five sets; writes ``benchmarks/results/{--name}.json`` and ``.md``. No fit is run: this only gathers numbers
the benchmarks measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = ["ifnb", "worm", "bladder", "pbmc", "kidney"]
METHODS = ["CplMixVAE+prune", "scVI+Leiden"]


def _rows(folder: Path, stem: str, method: str) -> list[dict]:
    data = json.loads((folder / f"{stem}.json").read_text())
    out = []
    for r in data["rows"]:
        if r.get("dataset") not in DATASETS or r.get("method") != method or r.get("ari") is None:
            continue
        if r.get("part", "real") != "real":
            continue
        if r["method"] != "CplMixVAE+prune" and r.get("source") not in (None, "this run"):
            continue  # a copy of another file's peer row
        seed = str(r["model_seed"] if "model_seed" in r else r["seed"])
        if r.get("tag"):  # fitted on another machine (bench_seeds.py): another run than this machine's seed
            seed += f"@{r['tag']}"
        out.append({"method": r["method"], "dataset": r["dataset"], "seed": seed, "ari": float(r["ari"]),
                    "file": stem})  # fmt: skip
    return out


def gather(files: dict[str, list[str]], folder: Path = RESULTS) -> tuple[dict, list[str]]:
    """ARI per ``(method, dataset, seed)`` from ``{method: stems}`` in ``folder``, and the repeats that disagree."""
    table: dict[tuple[str, str, str], tuple[float, str]] = {}
    conflicts = []
    for method, stem in ((m, s) for m, stems in files.items() for s in stems):
        for r in _rows(folder, stem, method):
            key = (r["method"], r["dataset"], r["seed"])
            if key in table and not np.isclose(table[key][0], r["ari"], rtol=0, atol=1e-9):
                conflicts.append(f"{key}: {table[key][0]:.4f} ({table[key][1]}) vs {r['ari']:.4f} ({r['file']})")
            table.setdefault(key, (r["ari"], r["file"]))
    return table, conflicts


def _seed_order(seed: str) -> tuple[str, int]:
    """This machine's seeds first, then by tag; by number within each."""
    number, _, tag = seed.partition("@")
    return tag, int(number)


def summarise(table: dict) -> list[dict]:
    rows = []
    for method in METHODS:
        seeds = sorted({s for (m, _, s) in table if m == method}, key=_seed_order)
        complete = [s for s in seeds if all((method, d, s) in table for d in DATASETS)]
        if not complete:
            continue
        ari = np.array([[table[(method, d, s)][0] for d in DATASETS] for s in complete])  # (seeds, sets)
        for s, values in zip(complete, ari, strict=True):
            rows.append({"method": method, "seed": str(s), **dict(zip(DATASETS, values.round(3), strict=True)),
                         "mean": round(float(values.mean()), 3)})  # fmt: skip
        spread = round(float(ari.mean(1).std(ddof=1)), 3) if len(complete) > 1 else None
        rows.append({"method": method, "seed": f"mean of {len(complete)}",
                     **dict(zip(DATASETS, ari.mean(0).round(3), strict=True)), "mean": round(float(ari.mean()), 3),
                     "sd_of_seed_means": spread})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpl", nargs="+", required=True, help="stems of bench_pruning.py results (CplMixVAE rows)")
    p.add_argument("--peers", nargs="+", required=True, help="stems of results holding scVI + Leiden rows")
    p.add_argument("--name", default="real_seeds", help="output file stem")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the result files (read and written)")
    args = p.parse_args(argv)
    table, conflicts = gather({"CplMixVAE+prune": args.cpl, "scVI+Leiden": args.peers}, args.results)
    rows = summarise(table)
    columns = ["method", "seed", *DATASETS, "mean", "sd_of_seed_means"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in columns) + " |" for r in rows]
    command = f"python benchmarks/summarise_seeds.py --cpl {' '.join(args.cpl)} --peers {' '.join(args.peers)}"
    command += f" --name {args.name}"
    text = "\n".join([
        f"# {args.name}", "", "ARI of the consensus labels (CplMixVAE, pruned from 50 categories) and of scVI + Leiden "
        "(resolution 1) per real set and seed, gathered from the files below; no fit was run for this table.", "",
        *lines, "", "CplMixVAE from: " + ", ".join(f"`{s}`" for s in args.cpl) + "; scVI + Leiden from: "
        + ", ".join(f"`{s}`" for s in args.peers), "",
        "Reruns that did not reproduce: " + ("; ".join(conflicts) if conflicts else "none"), "",
        f"Command: `{command}`", "",
    ])  # fmt: skip
    print(text)
    (args.results / f"{args.name}.md").write_text(text)
    payload = {"name": args.name, "command": command, "cpl": args.cpl, "peers": args.peers, "conflicts": conflicts,
               "rows": rows}  # fmt: skip
    (args.results / f"{args.name}.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
