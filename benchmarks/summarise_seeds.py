"""Mean ARI over seeds of CplMixVAE (pruned) and scVI + Leiden on the real sets, from saved results.

    python benchmarks/summarise_seeds.py --cpl real_seeds_fits --peers real_seeds_fits \
        --cpl-method "CplMixVAE+prune restarts=3"   # after bench_seeds.py --methods cpl scvi --restarts 3

Reads ``benchmarks/results/{stem}.json`` written by ``bench_pruning.py`` (its ``real`` rows), ``bench_peers.py`` or
``bench_seeds.py`` (whose rows fitted on another machine carry its ``tag``: seed ``3@tag`` is another run than 3):
the CplMixVAE rows of the ``--cpl`` files and the scVI + Leiden rows of the ``--peers`` files (a peer row that
``bench_pruning.py --peers-from`` copied from another file is skipped: name that file instead).
A (method, data set, seed) found in several files keeps its first value; a repeat with another ARI (a rerun that
did not reproduce) is listed. Prints, per method, the ARI of every set and seed, the mean over the sets of
every seed, the mean over the seeds of every set and the mean over both, for the seeds where a method has all
five sets, and the difference of the two methods' means with its standard error and a 90% bootstrap interval;
writes ``benchmarks/results/{--name}.json`` and ``.md``. No fit is run: this only gathers numbers
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
        if not r["method"].startswith("CplMixVAE") and r.get("source") not in (None, "this run"):
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


def _ari_by_seed(table: dict, method: str) -> tuple[list[str], np.ndarray]:
    """The seeds of ``method`` that have all five sets (in :func:`_seed_order`) and their ARI, ``(seeds, sets)``."""
    seeds = sorted({s for (m, _, s) in table if m == method}, key=_seed_order)
    complete = [s for s in seeds if all((method, d, s) in table for d in DATASETS)]
    ari = np.array([[table[(method, d, s)][0] for d in DATASETS] for s in complete])
    return complete, ari.reshape(-1, len(DATASETS))


def summarise(table: dict, methods: list[str] = METHODS) -> list[dict]:
    rows = []
    for method in methods:
        complete, ari = _ari_by_seed(table, method)
        if not complete:
            continue
        for s, values in zip(complete, ari, strict=True):
            rows.append({"method": method, "seed": str(s), **dict(zip(DATASETS, values.round(3), strict=True)),
                         "mean": round(float(values.mean()), 3)})  # fmt: skip
        spread = round(float(ari.mean(1).std(ddof=1)), 3) if len(complete) > 1 else None
        rows.append({"method": method, "seed": f"mean of {len(complete)}",
                     **dict(zip(DATASETS, ari.mean(0).round(3), strict=True)), "mean": round(float(ari.mean()), 3),
                     "sd_of_seed_means": spread})  # fmt: skip
    return rows


def difference(table: dict, methods: list[str] = METHODS, *, n_boot: int = 10_000, seed: int = 0) -> dict | None:
    """Mean over seeds of CplMixVAE minus that of scVI + Leiden (each seed: its mean over the five sets).

    With its standard error (Welch: each method's seeds are independent draws) and a 90% bootstrap interval
    (each method's complete seeds resampled with replacement, ``n_boot`` times). ``None`` unless both methods
    have at least two complete seeds.
    """
    cpl, peer = (_ari_by_seed(table, method)[1].mean(1) for method in methods)
    if cpl.size < 2 or peer.size < 2:
        return None
    rng = np.random.default_rng(seed)
    boot = rng.choice(cpl, (n_boot, cpl.size)).mean(1) - rng.choice(peer, (n_boot, peer.size)).mean(1)
    low, high = np.quantile(boot, [0.05, 0.95])
    se = float(np.sqrt(cpl.var(ddof=1) / cpl.size + peer.var(ddof=1) / peer.size))
    return {"difference": round(float(cpl.mean() - peer.mean()), 4), "standard_error": round(se, 4),
            "interval_90": [round(float(low), 4), round(float(high), 4)], "n_cpl": int(cpl.size),
            "n_peer": int(peer.size)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpl", nargs="+", required=True, help="stems of bench_pruning.py results (CplMixVAE rows)")
    p.add_argument("--peers", nargs="+", required=True, help="stems of results holding scVI + Leiden rows")
    p.add_argument(
        "--cpl-method", default=METHODS[0],
        help="the CplMixVAE rows' method, e.g. 'CplMixVAE+prune restarts=3' (bench_seeds.py --restarts 3)",
    )  # fmt: skip
    p.add_argument("--name", default="real_seeds", help="output file stem")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the result files (read and written)")
    args = p.parse_args(argv)
    methods = [args.cpl_method, METHODS[1]]
    table, conflicts = gather(dict(zip(methods, [args.cpl, args.peers], strict=True)), args.results)
    rows = summarise(table, methods)
    diff = difference(table, methods)
    cpl_name = "CplMixVAE" if args.cpl_method == METHODS[0] else args.cpl_method
    if diff is None:
        diff_text = "Difference of the means: needs two complete seeds of each method."
    else:
        diff_text = (
            f"Mean over seeds of {cpl_name} minus scVI + Leiden ({diff['n_cpl']} and {diff['n_peer']} seeds): "
            f"{diff['difference']:+.4f}, standard error {diff['standard_error']:.4f}, 90% bootstrap interval "
            f"[{diff['interval_90'][0]:+.4f}, {diff['interval_90'][1]:+.4f}] (seeds resampled within each method)."
        )
    columns = ["method", "seed", *DATASETS, "mean", "sd_of_seed_means"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in columns) + " |" for r in rows]
    command = f"python benchmarks/summarise_seeds.py --cpl {' '.join(args.cpl)} --peers {' '.join(args.peers)}"
    if args.cpl_method != METHODS[0]:
        command += f" --cpl-method '{args.cpl_method}'"
    command += f" --name {args.name}"
    text = "\n".join([
        f"# {args.name}", "", "ARI of the consensus labels (CplMixVAE, pruned from 50 categories) and of scVI + Leiden "
        "(resolution 1) per real set and seed, gathered from the files below; no fit was run for this table.", "",
        *lines, "", diff_text, "", "CplMixVAE from: " + ", ".join(f"`{s}`" for s in args.cpl) + "; scVI + Leiden from: "
        + ", ".join(f"`{s}`" for s in args.peers), "",
        "Reruns that did not reproduce: " + ("; ".join(conflicts) if conflicts else "none"), "",
        f"Command: `{command}`", "",
    ])  # fmt: skip
    print(text)
    (args.results / f"{args.name}.md").write_text(text)
    payload = {"name": args.name, "command": command, "cpl": args.cpl, "peers": args.peers, "conflicts": conflicts,
               "difference": diff, "rows": rows}  # fmt: skip
    (args.results / f"{args.name}.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
