"""Many seeds of the real-set comparison: one fit per process, several processes at a time.

    python benchmarks/bench_seeds.py --methods cpl scvi --seeds 0 1 2 --jobs 2 --fits /tmp/fits --name real_seeds_x
    python benchmarks/bench_seeds.py --gather /tmp/fits= /tmp/device_fits=h200host --name real_seeds_x
    python benchmarks/bench_seeds.py --methods cpl --restarts 3 --seeds 11 14 --fits /tmp/fits_r3 --name real_r3
    python benchmarks/bench_seeds.py --compose /tmp/fits --restarts 3 --seeds 5 8 --fits /tmp/fits_r3c --name x

Each fit (method × data set × seed) runs in its own process with ``--threads`` torch threads, ``--jobs`` at a time
(on 2 cores: ``--jobs 2 --threads 1``), and saves one JSON (scores, the chosen K, seconds, the labels of every
cell, the machine) in ``--fits``; a fit whose file is there already is not run again (use one folder per set of
``--model-kwargs``). ``cpl`` is CplMixVAE as ``bench_pruning.py`` fits it (``fit_pruned``: the defaults of a model
that chooses K, from 50 categories, no state phase); ``scvi`` is scVI + Leiden at resolution 1
(``_common.run_scvi_leiden``). ``--restarts R`` fits CplMixVAE with ``train(n_restarts=R)`` (the default of a model
that chooses K is 3; restart ``r`` of seed ``s`` is the single fit of seed ``s + r``), ``--compose FOLDER`` writes
those fits from single fits saved in ``FOLDER`` instead of running them (:func:`compose`).

The gathering step reads every fit in the given folders (``FOLDER=TAG``: the tag names the machine, so that one
seed fitted on two machines counts as two runs; an empty tag is this machine, like ``bench_pruning.py``'s rows)
and writes ``benchmarks/results/{--name}.{md,json}``: one row per fit in ``bench_pruning.py``'s format (``part``
``real``, which ``summarise_seeds.py`` reads), and per data set, method and tag the mean ARI over seeds and the
mean ARI between the labels of two seeds. For CplMixVAE it also reports what picking one of ``r`` runs would give
(every ``r``-subset of a tag's seeds: the run whose labels agree best with the others, i.e. restarts with a medoid
choice); that is an analysis of saved labels, no fit. Fits with restarts are a method of their own
(``CplMixVAE+prune restarts=3``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

DATASETS = ["ifnb", "worm", "bladder", "pbmc", "kidney"]
METHODS = {"cpl": "CplMixVAE+prune", "scvi": "scVI+Leiden"}
K_MAX = 50


def fit_file(folder: Path, method: str, dataset: str, seed: int) -> Path:
    return folder / f"{method}__{dataset}__{seed}.json"


def worker(method: str, dataset: str, seed: int, args) -> dict[str, Any]:
    """Fit one (method, data set, seed) in this process and write its JSON into ``args.fits``."""
    from _common import clustering_scores, load_real, machine_info, quiet, run_scvi_leiden, set_threads

    set_threads(args.threads)
    quiet()
    adata, labels = load_real(dataset)
    start = time.perf_counter()
    if method == "scvi":
        res = run_scvi_leiden(adata, labels, seed=seed, accelerator=args.scvi_accelerator)
        out = {k: res[k] for k in ("ari", "nmi", "n_clusters", "train_seconds")}
        out["chosen_k"], pred = res["n_clusters"], res["labels"]
    else:
        from bench_pruning import fit_pruned

        options = argparse.Namespace(
            batch_size=128, accelerator=args.accelerator, augmentation=None, model_kwargs=args.model_kwargs,
            max_epochs=None, threshold=0.95, max_rounds=None, epochs_per_round=None, state_epochs=0,
            restarts=args.restarts,
        )  # fmt: skip
        fit = fit_pruned(adata, seed=seed, k_max=K_MAX, args=options)
        out = {k: fit[k] for k in ("chosen_k", "consensus", "k_path", "epochs", "seconds", "restarts", "restart_kept")}
        out |= clustering_scores(labels, fit["labels"])
        pred = fit["labels"]
    out |= {
        "method": method, "dataset": dataset, "seed": seed, "k_ref": int(np.unique(labels).size),
        "n_genes": int(adata.n_vars),
        "wall": time.perf_counter() - start, "accelerator": args.scvi_accelerator if method == "scvi" else
        args.accelerator, "model_kwargs": args.model_kwargs, "machine": machine_info(),
        "labels": [str(x) for x in pred],
    }  # fmt: skip
    args.fits.mkdir(parents=True, exist_ok=True)
    fit_file(args.fits, method, dataset, seed).write_text(json.dumps(out))
    print(method, dataset, seed, f"ARI {out['ari']:.3f}", f"K {out['chosen_k']}", f"{out['wall']:.0f} s", flush=True)
    return out


def run_grid(args) -> None:
    """Run every missing fit of the grid, ``args.jobs`` processes at a time."""
    todo = [
        (m, d, s) for s in args.seeds for m in args.methods for d in args.datasets
        if not fit_file(args.fits, m, d, s).exists()
    ]  # fmt: skip
    base = [sys.executable, str(Path(__file__).resolve()), "--fits", str(args.fits), "--threads", str(args.threads),
            "--accelerator", args.accelerator, "--scvi-accelerator", args.scvi_accelerator,
            "--model-kwargs", json.dumps(args.model_kwargs), "--restarts", str(args.restarts)]  # fmt: skip
    env = os.environ | {v: str(args.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    running: list[subprocess.Popen] = []
    failed = []
    while todo or running:
        while todo and len(running) < args.jobs:
            m, d, s = todo.pop(0)
            running.append(subprocess.Popen([*base, "--worker", m, d, str(s)], env=env))
        time.sleep(1)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            if proc.returncode:
                failed.append(" ".join(proc.args[-3:]))
    if failed:
        print("failed:", "; ".join(failed), file=sys.stderr)


def compose(source: Path, folder: Path, bases: list[int], restarts: int, datasets: list[str]) -> list[Path]:
    """Write the fits of ``train(n_restarts=restarts)`` with seed ``base`` from saved single fits.

    Restart ``r`` of a model with seed ``s`` is the single fit with seed ``s + r`` (``CplMixVAE.train``
    rebuilds it so), hence the fit with restarts is the single fit that :func:`scmixvae.train.medoid` picks
    among seeds ``base, ..., base + restarts - 1`` of ``source``: what ``--restarts`` would run, read from
    fits already made. The files say so (``composed_from``); a (data set, base) lacking one of its seeds is
    skipped.
    """
    from scmixvae.train import medoid

    written = []
    for dataset, base in itertools.product(datasets, bases):
        files = [fit_file(source, "cpl", dataset, base + r) for r in range(restarts)]
        if not all(f.exists() for f in files):
            continue
        fits = [json.loads(f.read_text()) for f in files]
        if any(f.get("restarts") for f in fits):
            raise ValueError(f"{source} holds fits with restarts; compose from single fits.")
        kept, ari = medoid([np.asarray(f["labels"]) for f in fits])
        out = dict(fits[kept], seed=base, restart_kept=kept, composed_from=[str(f) for f in files])
        out["restarts"] = [
            {"restart": r, "seed": base + r, "n_categories": f["chosen_k"], "mean_consensus": f.get("consensus"),
             "mean_ari": float((ari[r].sum() - 1) / (restarts - 1))}
            for r, f in enumerate(fits)
        ]  # fmt: skip
        out["seconds"] = sum(f["seconds"] for f in fits)  # the restarts' training and pruning, one after another
        folder.mkdir(parents=True, exist_ok=True)
        written.append(fit_file(folder, "cpl", dataset, base))
        written[-1].write_text(json.dumps(out))
    return written


def load_fits(sources: list[str]) -> list[dict[str, Any]]:
    """Every fit JSON of ``FOLDER=TAG`` sources, with ``tag`` added."""
    fits = []
    for source in sources:
        folder, _, tag = source.partition("=")
        for file in sorted(Path(folder).glob("*__*__*.json")):
            fits.append(json.loads(file.read_text()) | {"tag": tag})
    return fits


def medoid_ari(labels: dict[int, np.ndarray], ari: dict[int, float], r: int) -> float:
    """Mean ARI (to the reference) of the run that agrees best with the others, over every ``r``-subset of runs."""
    from sklearn.metrics import adjusted_rand_score

    seeds = sorted(labels)
    pair = {(i, j): adjusted_rand_score(labels[i], labels[j]) for i, j in itertools.combinations(seeds, 2)}
    picked = []
    for subset in itertools.combinations(seeds, r):
        agreement = {i: np.mean([pair[min(i, j), max(i, j)] for j in subset if j != i]) for i in subset}
        picked.append(ari[max(subset, key=lambda i: (agreement[i], -i))])
    return float(np.mean(picked))


def method_label(fit: dict[str, Any]) -> str:
    """The method's name in the results: ``CplMixVAE+prune restarts=3`` for a fit with restarts."""
    restarts = len(fit.get("restarts") or []) or 1
    return METHODS[fit["method"]] + (f" restarts={restarts}" if restarts > 1 else "")


def gather(fits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``real`` row per fit, then one ``seeds`` row per (tag, method, data set)."""
    from sklearn.metrics import adjusted_rand_score

    order = sorted(fits, key=lambda f: (f["tag"], f["method"], DATASETS.index(f["dataset"]), f["seed"]))
    rows = [{
        "part": "real", "dataset": f["dataset"], "method": method_label(f), "model_seed": f["seed"],
        "tag": f["tag"], "k_ref": f.get("k_ref"), "chosen_k": f["chosen_k"], "n_genes": f.get("n_genes"),
        "ari": f["ari"], "nmi": f["nmi"],
        "consensus": f.get("consensus"), "k_path": f.get("k_path"), "seconds": f.get("seconds", f.get("train_seconds")),
        "accelerator": f.get("accelerator"), "restart_kept": f.get("restart_kept"),
        "composed": bool(f.get("composed_from")),
    } for f in order]  # fmt: skip
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for f in fits:
        groups.setdefault((f["tag"], method_label(f), f["dataset"]), []).append(f)
    for (tag, method, dataset), group in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], DATASETS.index(kv[0][2]))
    ):
        labels = {f["seed"]: np.asarray(f["labels"]) for f in group}
        ari = {f["seed"]: f["ari"] for f in group}
        pairs = [adjusted_rand_score(labels[i], labels[j]) for i, j in itertools.combinations(sorted(labels), 2)]
        row = {
            "part": "seeds", "dataset": dataset, "method": method, "tag": tag, "n_seeds": len(group),
            "ari": float(np.mean(list(ari.values()))), "ari_min": min(ari.values()), "ari_max": max(ari.values()),
            "ari_between_seeds": float(np.mean(pairs)) if pairs else None,
        }  # fmt: skip
        if method == METHODS["cpl"]:  # one fit each: what restarts would choose among them
            for r in (3, 5):
                row[f"medoid_of_{r}"] = medoid_ari(labels, ari, r) if len(group) >= r else None
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["cpl", "scvi"], choices=sorted(METHODS))
    p.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--jobs", type=int, default=2, help="fits at a time, one process each")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each fit")
    p.add_argument("--accelerator", default="cpu", help="CplMixVAE's")
    p.add_argument("--scvi-accelerator", default="cpu")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="CplMixVAE options (JSON)")
    p.add_argument(
        "--restarts", type=int, default=1,
        help="CplMixVAE's train(n_restarts=...): restart r of seed s is a fit with seed s + r, the medoid is kept",
    )  # fmt: skip
    p.add_argument(
        "--fits", type=Path, default=None,
        help="folder of the per-fit JSON files (one folder per set of options: a fit found there is not run again)",
    )  # fmt: skip
    p.add_argument(
        "--gather", nargs="+", default=None, metavar="FOLDER=TAG",
        help="gather these folders only (no fit); TAG empty: this machine; default: --fits after fitting",
    )  # fmt: skip
    p.add_argument(
        "--compose", type=Path, default=None, metavar="FOLDER",
        help="no fit: write the --restarts fits of seeds --seeds into --fits from FOLDER's single fits (see compose)",
    )  # fmt: skip
    p.add_argument("--name", default="real_seeds_fits")
    p.add_argument("--note", default="", help="markdown added to the results file (e.g. what a tag's machine was)")
    p.add_argument("--worker", nargs=3, default=None, metavar=("METHOD", "DATASET", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        method, dataset, seed = args.worker
        worker(method, dataset, int(seed), args)
        return
    if args.gather is None:
        if args.fits is None:
            p.error("name the folder of the per-fit files (--fits) to fit, or folders to --gather")
        if args.compose is not None:
            if args.restarts < 2:
                p.error("--compose needs --restarts 2 or more")
            compose(args.compose, args.fits, args.seeds, args.restarts, args.datasets)
        else:
            run_grid(args)
        args.gather = [f"{args.fits}="]
    from _common import write_results

    rows = gather(load_fits(args.gather))
    write_results(
        args.name,
        rows,
        "Rows `real`: one fit each (CplMixVAE pruned from 50 categories with the defaults of a model that chooses K, "
        "no state phase; scVI + Leiden at resolution 1), `tag` the machine it ran on. Rows `seeds`: per set, method "
        "and tag, the mean, least and largest ARI over the seeds, the mean ARI between the labels of two seeds, and "
        "(`medoid_of_r`) the mean ARI of the run that agrees best with the others in every r-subset of the seeds. "
        "`CplMixVAE+prune restarts=R`: `train(n_restarts=R)` (restart r of seed s is the single fit of seed s + r), "
        "`restart_kept` the restart kept, `composed` when read from saved single fits (`--compose`) rather than run. "
        "The machine named above is where the fits were gathered; each fit ran where its tag says (empty: here).\n\n"
        + args.note,
    )


if __name__ == "__main__":
    main()
