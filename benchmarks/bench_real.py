"""Accuracy and choice of K on the five real sets over seeds: CplMixVAE against scVI + Leiden and PCA + Leiden.

    python benchmarks/bench_real.py --methods cpl scvi pca --seeds 0 1 2 3 4 --state-epochs 0 --jobs 2 \
        --threads 1 --fits /tmp/scmixvae_fits                     # the comparison of the README (many hours)
    python benchmarks/bench_real.py --methods cpl-k --variants '{"likelihood": "nb"}' '{"likelihood": "gaussian"}' \
        --seeds 0 --fits /tmp/scmixvae_fits_k --threads 1          # K given: the reference number of types
    python benchmarks/bench_real.py --methods cpl scvi --datasets pbmc --seeds 0 1 --max-epochs 2 --scvi-epochs 2 \
        --state-epochs 0 --restarts 1 --prune-kwargs '{"max_rounds": 1, "epochs_per_round": 1}' \
        --fits /tmp/x_fits --out /tmp/x                            # smoke test, minutes
    python benchmarks/bench_real.py --methods cpl scvi pca --datasets ifnb --condition none registered \
        --seeds 0 1 2 3 4 --state-epochs 0 --jobs 2 --threads 1 --fits /tmp/scmixvae_fits --name real_condition
                                                                   # ifnb with and without its condition

Methods, each fitted once per data set and seed in a fresh process (``--jobs`` at a time, ``--threads`` threads
each):

- ``cpl``: the default fit, ``CplMixVAE(adata).train()`` (the number of types unknown: the model starts from
  ``default_n_categories``, prunes and keeps the medoid of its default restarts); ``--restarts``,
  ``--max-epochs`` and ``--state-epochs`` are passed to ``train`` when given (``--state-epochs 0``: no state
  phase; the types are the same, the time is not).
- ``cpl-k``: ``CplMixVAE(adata, n_categories=K)`` with K the number of reference types, then ``train()``.
- ``scvi``: scVI's default model and ``train()`` (``--scvi-epochs`` to shorten it), Leiden at resolution 1 on
  its latent; ``pca``: normalise, log1p, PCA, Leiden at resolution 1 (``_common.py``).

``--condition registered`` registers the set's experimental condition where it has one (ifnb's ``condition``,
control or interferon-β-stimulated; ``REAL_CONDITIONS`` in ``_common.py``), as a user of each method would:
CplMixVAE's ``condition_key``, scVI's ``batch_key``; PCA + Leiden has no counterpart and is fitted as without.
Such methods are named with `` +condition``; ``--condition none registered`` fits both.

``--variants`` runs each CplMixVAE method once per JSON of constructor options (``--variants '{}'
'{"augmentation": "thinning"}'``); a variant's options are part of the method's name. Every fit writes a JSON
(scores, K, seconds, the labels of every cell) into ``--fits``; a fit found there is not run again, so a grid can
be stopped and resumed. The result file ``{--out}/{--name}`` (default ``benchmarks/results/real``) has one
``fit`` row per fit; per method and set a ``seeds`` row (mean, least and largest ARI over the seeds, mean ARI
between the labels of two seeds); per method a ``mean`` row (the mean ARI of each set over the seeds that have
every set, and their overall mean); and per method a ``difference`` row: its mean ARI minus scVI + Leiden's,
with the standard error and a 90% bootstrap interval (seeds resampled within each method).
"""

from __future__ import annotations

# isort: off
import _threads  # noqa: F401  first: --threads sets the thread variables before numpy and torch start
# isort: on

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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import DATASETS, REAL_CONDITIONS, RESULTS_DIR  # noqa: E402

PEERS = {"scvi": "scVI+Leiden", "pca": "PCA+Leiden"}
#: Suffix of the methods that registered the set's condition (``--condition registered``).
WITH_CONDITION = " +condition"


def method_name(method: str, variant: dict, condition: str = "none") -> str:
    """``CplMixVAE``, ``CplMixVAE K=ref``, with the variant's options: ``CplMixVAE[likelihood=nb]``; then
    :data:`WITH_CONDITION` where the condition is registered (not for PCA + Leiden, which cannot use it)."""
    suffix = WITH_CONDITION if condition == "registered" and method != "pca" else ""
    if method in PEERS:
        return PEERS[method] + suffix
    name = "CplMixVAE" + (" K=ref" if method == "cpl-k" else "")
    return name + (f"[{','.join(f'{k}={v}' for k, v in variant.items())}]" if variant else "") + suffix


def fit_cpl(adata, labels, *, method: str, seed: int, variant: dict, args, condition_key=None) -> dict[str, Any]:
    """One CplMixVAE fit, constructor to the end of ``train()``; its scores, K and times."""
    import scvi
    from _common import Timer, clustering_scores

    from scmixvae.model import CplMixVAE

    scvi.settings.seed = seed
    train = {"enable_progress_bar": False, "accelerator": args.accelerator}
    train |= {k: v for k, v in (("max_epochs", args.max_epochs), ("state_epochs", args.state_epochs)) if v is not None}
    if method == "cpl" and args.restarts is not None:
        train["n_restarts"] = args.restarts
    if method == "cpl" and args.prune_kwargs:
        train["prune_kwargs"] = args.prune_kwargs
    k_ref = int(np.unique(labels).size)
    with Timer() as timer:  # to the labels, as the peers' times include their Leiden clustering
        CplMixVAE.setup_anndata(adata, condition_key=condition_key)
        model = CplMixVAE(adata, **({"n_categories": k_ref} if method == "cpl-k" else {}), **variant)
        model.train(**train)
        pred = model.predict().astype(str).to_numpy()
    history, restarts = model.pruning_history, model.restart_history
    return {
        **clustering_scores(labels, pred), "chosen_k": int(model.n_categories), "n_clusters": int(np.unique(pred).size),
        "consensus": float(history.loc[history["selected"], "mean_consensus"].iloc[0]) if len(history) else None,
        "k_path": ">".join(str(k) for k in history["n_categories"]) if len(history) else None,
        "restarts": len(restarts) or 1,
        "restart_kept": int(restarts["selected"].to_numpy().argmax()) if restarts["selected"].any() else None,
        "agreement": float(model.get_agent_agreement().iloc[0, 1]), "epochs": len(model.history["train_loss"]),
        "labels": [str(x) for x in pred], **timer.as_dict(),
    }  # fmt: skip


def worker(method: str, dataset: str, seed: int, variant: dict, condition: str, args) -> None:
    """Fit one (method, variant, data set, seed, condition) in this process and write its JSON into ``args.fits``."""
    from _common import load_real, quiet, run_pca_leiden, run_scvi_leiden, set_threads, warm_up

    set_threads(args.threads)
    quiet()
    warm_up(args.accelerator)
    adata, labels = load_real(dataset)
    key = REAL_CONDITIONS.get(dataset) if condition == "registered" else None
    if method == "scvi":
        out = run_scvi_leiden(adata, labels, seed=seed, max_epochs=args.scvi_epochs, accelerator=args.accelerator,
                              batch_key=key)  # fmt: skip
    elif method == "pca":
        out = run_pca_leiden(adata, labels, seed=seed)
    else:
        out = fit_cpl(adata, labels, method=method, seed=seed, variant=variant, args=args, condition_key=key)
    out.pop("method", None)
    out = {"method": method_name(method, variant, condition), "dataset": dataset, "seed": seed,
           "condition_key": key, "k_ref": int(np.unique(labels).size),
           "chosen_k": out.get("chosen_k", out["n_clusters"]), **out,
           "labels": [str(x) for x in out["labels"]]}  # fmt: skip
    out["settings"] = fit_settings(args, method)
    fit_file(args.fits, method, variant, dataset, seed, condition).write_text(json.dumps(out))
    print(out["method"], dataset, seed, f"ARI {out['ari']:.3f} K {out['chosen_k']} {out['seconds']:.0f} s", flush=True)


def fit_file(folder: Path, method: str, variant: dict, dataset: str, seed: int, condition: str = "none") -> Path:
    tag = json.dumps(variant, sort_keys=True, separators=(",", ":")) if variant and method not in PEERS else ""
    tag += "+condition" if method_name(method, variant, condition).endswith(WITH_CONDITION) else ""
    return folder / f"{method}{tag}__{dataset}__{seed}.json"


def fit_settings(args, method: str) -> dict[str, Any]:
    """The options of this run that change a fit of ``method`` (stored with each fit, checked when it is reused)."""
    if method == "pca":
        return {}
    if method == "scvi":
        return {"scvi_epochs": args.scvi_epochs, "accelerator": args.accelerator}
    settings = {"max_epochs": args.max_epochs, "state_epochs": args.state_epochs, "accelerator": args.accelerator}
    return settings | ({"restarts": args.restarts, "prune_kwargs": args.prune_kwargs} if method == "cpl" else {})


def check_reused_fits(args, grid: list[tuple], files: list[Path]) -> None:
    """Refuse fits in ``args.fits`` made with other settings than this run's: the result would misstate them."""
    stale = [f.name for g, f in zip(grid, files, strict=True)
             if f.exists() and json.loads(f.read_text()).get("settings") != fit_settings(args, g[0])]  # fmt: skip
    if stale:
        raise SystemExit(
            f"{len(stale)} fit(s) in {args.fits} were made with other settings than this run's (or by an older "
            f"script), e.g. {stale[0]}; use another --fits folder, or remove them to fit them again."
        )


def run_grid(args) -> list[Path]:
    """Run every missing fit of the grid, ``args.jobs`` processes at a time; return every fit's file."""
    grid = [(m, v, d, s, c) for s in args.seeds for m in args.methods
            for v in (args.variants if m not in PEERS else [{}]) for d in args.datasets for c in args.condition
            if c == "none" or (m != "pca" and d in REAL_CONDITIONS)]  # fmt: skip
    files = [fit_file(args.fits, *g) for g in grid]
    check_reused_fits(args, grid, files)
    todo = [g for g, f in zip(grid, files, strict=True) if not f.exists()]
    args.fits.mkdir(parents=True, exist_ok=True)
    own = sys.argv[1:]
    env = os.environ | {v: str(args.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    running: list[subprocess.Popen] = []
    failed = []
    while todo or running:
        while todo and len(running) < args.jobs:
            m, v, d, s, c = todo.pop(0)
            cmd = [sys.executable, __file__, *own, "--worker", m, d, str(s), json.dumps(v), c]
            running.append(subprocess.Popen(cmd, env=env))
        time.sleep(1)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            if proc.returncode:
                failed.append(" ".join(proc.args[-5:]))
    if failed:
        print("failed:", "; ".join(failed), file=sys.stderr)
    return [f for f in files if f.exists()]


def seed_rows(fits: list[dict]) -> list[dict]:
    """Per method and set: the ARI over seeds and the mean ARI between the labels of two seeds."""
    from _common import mean_pairwise_ari

    rows = []
    for (method, dataset), group in itertools.groupby(fits, key=lambda f: (f["method"], f["dataset"])):
        group = list(group)
        ari = [f["ari"] for f in group]
        rows.append({"part": "seeds", "dataset": dataset, "method": method, "n_seeds": len(group),
                     "ari": float(np.mean(ari)), "ari_min": min(ari), "ari_max": max(ari),
                     "ari_between_seeds": mean_pairwise_ari([f["labels"] for f in group])})  # fmt: skip
    return rows


def per_seed_means(fits: list[dict], method: str, datasets: list[str]) -> np.ndarray:
    """ARI ``(seeds, sets)`` of ``method`` over the seeds that have every set. A method that registered the
    condition takes, on a set without one, the same method's fit without it (the fit a user would get)."""
    base = method.removesuffix(WITH_CONDITION)
    table = {(f["seed"], f["dataset"]): f["ari"] for f in fits if f["method"] == base}
    table |= {(f["seed"], f["dataset"]): f["ari"] for f in fits if f["method"] == method}
    seeds = sorted({s for s, _ in table})
    complete = [s for s in seeds if all((s, d) in table for d in datasets)]
    return np.array([[table[(s, d)] for d in datasets] for s in complete]).reshape(-1, len(datasets))


def summary_rows(fits: list[dict], datasets: list[str], *, n_boot: int = 10_000) -> list[dict]:
    """A ``mean`` row per method, then a ``difference`` row per method against scVI + Leiden (the fit that used
    the condition as the method did, where there is one)."""
    rows = []
    methods = list(dict.fromkeys(f["method"] for f in fits))
    for method in methods:
        ari = per_seed_means(fits, method, datasets)
        if len(ari):
            sd = float(ari.mean(1).std(ddof=1)) if len(ari) > 1 else None
            rows.append({"part": "mean", "method": method, "n_seeds": len(ari),
                         **dict(zip(datasets, ari.mean(0), strict=True)), "ari": float(ari.mean()),
                         "sd_of_seed_means": sd})  # fmt: skip
    rng = np.random.default_rng(0)
    scvi_fitted = [m for m in methods if m.startswith(PEERS["scvi"])]
    for method in (m for m in methods if m not in scvi_fitted):
        # the scVI fit with the same use of the condition, else the first scVI fit (PCA + Leiden uses none)
        same = PEERS["scvi"] + (WITH_CONDITION if method.endswith(WITH_CONDITION) else "")
        versus = same if same in scvi_fitted else next(iter(scvi_fitted), None)
        mine = per_seed_means(fits, method, datasets).mean(1)
        peer = per_seed_means(fits, versus, datasets).mean(1) if versus else np.zeros(0)
        if mine.size < 2 or peer.size < 2:
            continue
        boot = rng.choice(mine, (n_boot, mine.size)).mean(1) - rng.choice(peer, (n_boot, peer.size)).mean(1)
        low, high = np.quantile(boot, [0.05, 0.95])
        rows.append({"part": "difference", "method": method, "versus": versus,
                     "difference": float(mine.mean() - peer.mean()),
                     "standard_error": float(np.sqrt(mine.var(ddof=1) / mine.size + peer.var(ddof=1) / peer.size)),
                     "interval_90_low": float(low), "interval_90_high": float(high), "n_seeds": int(mine.size),
                     "n_seeds_versus": int(peer.size)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["cpl", "scvi", "pca"], choices=["cpl", "cpl-k", *PEERS])
    p.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--variants", nargs="+", type=json.loads, default=[{}], help="CplMixVAE options, one JSON each")
    p.add_argument("--restarts", type=int, default=None, help="cpl: train(n_restarts=...); default: the model's")
    p.add_argument("--prune-kwargs", type=json.loads, default=None, help="cpl: train(prune_kwargs=...), JSON")
    p.add_argument("--max-epochs", type=int, default=None, help="CplMixVAE: train(max_epochs=...)")
    p.add_argument("--state-epochs", type=int, default=None, help="CplMixVAE: train(state_epochs=...)")
    p.add_argument("--scvi-epochs", type=int, default=None, help="scVI's max_epochs; default: scVI's heuristic")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="fits at a time, one process each")
    p.add_argument("--threads", type=int, default=1, help="threads of each fit")
    p.add_argument("--fits", type=Path, required=True, help="folder of the per-fit JSON files (resumable)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the result files")
    p.add_argument("--name", default="real")
    p.add_argument(
        "--condition",
        nargs="+",
        default=["none"],
        choices=["none", "registered"],
        help="registered: each method registers the set's condition where it has one (ifnb)",
    )
    p.add_argument("--worker", nargs=5, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        method, dataset, seed, variant, condition = args.worker
        worker(method, dataset, int(seed), json.loads(variant), condition, args)
        return
    from _common import write_results

    fits = [json.loads(f.read_text()) for f in run_grid(args)]
    order = {m: i for i, m in enumerate(dict.fromkeys(f["method"] for f in fits))}
    fits.sort(key=lambda f: (order[f["method"]], DATASETS.index(f["dataset"]), f["seed"]))
    rows = [{"part": "fit", **{k: v for k, v in f.items() if k != "labels"}} for f in fits]
    rows += seed_rows(fits) + summary_rows(fits, args.datasets)
    note = (
        "`fit`: one fit per method, set and seed (`seconds`: the whole fit, constructor to the end of `train()`, or "
        "the whole peer pipeline; `chosen_k`: CplMixVAE's categories, the peers' Leiden clusters). `seeds`: per "
        "method and set over the seeds. `mean`: per method, the mean ARI of each set over the seeds that have every "
        "set. `difference`: the mean ARI minus scVI + Leiden's, 90% bootstrap interval."
    )
    write_results(args.name, rows, extra_md=note, out=args.out)


if __name__ == "__main__":
    main()
