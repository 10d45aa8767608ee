"""Issue 3 benchmark: model order without knowing K (category pruning and the consensus criterion).

    python benchmarks/bench_pruning.py --threads 1                           # everything (hours on one CPU thread)
    python benchmarks/bench_pruning.py --parts sim --threads 1               # simulator only
    python benchmarks/bench_pruning.py --parts real --datasets pbmc bladder  # a subset of the real sets
    python benchmarks/bench_pruning.py --parts sim real --seeds 0 --datasets pbmc --n-cells 300 --n-genes 100 \
        --max-epochs 1 --epochs-per-round 1 --max-rounds 1 --scvi-max-epochs 1 --name pruning_smoke   # smoke test

Every fit uses the options of a model that chooses K by itself (``CplMixVAE(adata)`` without
``n_categories``; its defaults: ``"knn"`` views, ``"gaussian"`` and the separate
state encoder; ``--augmentation`` and ``--model-kwargs`` override them). Results named before session 7 used
``"dropout"`` (then the default of a model given ``n_categories``, which these fits are: ``K_max``), those of
session 7 the Gaussian likelihood and the separate state encoder. Each fit is a single one (``n_restarts=1``) unless
``--restarts R`` is given; since session 12 a model that chooses K on up to 50,000 cells fits three times by default
and keeps the medoid (``train(n_restarts=...)``); ``bench_seeds.py --restarts 3`` measures that on the real sets.

Parts:
- ``sim``: simulator with 8 true types (``--n-cells`` x ``--n-genes``, unequal sizes), one data set per ``--seeds``
  value, each fitted from ``K_max = --k-max-sim`` (30) as ``train(prune=True)`` does (training, ``model.prune()``,
  then the state phase, each timed): chosen K, ARI and NMI of the consensus labels. Stability: the first data
  set (every data set with ``--stability-all-seeds``) fitted again
  with every further ``--model-seeds`` value, ARI between the runs' consensus labels (and their mean).
  Targets: chosen K within ±1 of 8 in every seed, ARI ≥ 0.9, stability ≥ 0.9.
- ``real``: the five files in ``../shared/data`` fitted from ``K_max = --k-max-real`` (50) without their K, once
  per ``--model-seeds`` value: chosen K vs the reference K, ARI, NMI, stability between the seeds; next to scVI +
  Leiden at resolution 1 (which also chooses K) and PCA + Leiden, run here. Wall time of the whole fit (training,
  pruning, selection) as a ratio to scVI's default ``train()`` on the same data, timed one after the other.
  Targets: higher mean ARI than scVI + Leiden, time ratio ≤ 2.

Writes ``benchmarks/results/{--name}.json`` and ``.md`` (default ``pruning``).
"""

from __future__ import annotations

# isort: off
import _threads  # noqa: F401  first: --threads sets the thread variables before numpy and torch start
# isort: on

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIM_TYPES = 8


def _label(args) -> str:
    """The method's name in the rows: ``CplMixVAE+prune``, with `` restarts=R`` for ``--restarts R``."""
    restarts = getattr(args, "restarts", 1)
    return "CplMixVAE+prune" + (f" restarts={restarts}" if restarts > 1 else "")


def fit_pruned(adata, *, seed: int, k_max: int, args) -> dict[str, Any]:
    """Fit a CplMixVAE from ``k_max`` categories and prune it; scores are added by the caller."""
    import anndata as ad
    import scvi
    from _common import Timer

    from scmixvae.model import CplMixVAE, default_state_epochs
    from scmixvae.model._model import _default_options

    scvi.settings.seed = seed
    a = ad.AnnData(adata.X.copy(), obs=adata.obs[[]].copy(), var=adata.var[[]].copy())
    CplMixVAE.setup_anndata(a)
    train = {"batch_size": args.batch_size, "accelerator": args.accelerator, "enable_progress_bar": False}
    with Timer() as total:
        # the options of CplMixVAE(adata) without n_categories (which starts from 50 categories by itself)
        options = _default_options(choose_n_categories=True)
        if args.augmentation is not None:
            options["augmentation"] = args.augmentation
        model = CplMixVAE(a, n_categories=k_max, **{**options, **args.model_kwargs})
        prune_kwargs = {
            "threshold": args.threshold, "max_rounds": args.max_rounds, "epochs_per_round": args.epochs_per_round,
        }  # fmt: skip
        n_restarts = getattr(args, "restarts", 1)
        if n_restarts > 1:  # every restart trains and prunes: the two phases are not timed apart
            with Timer() as trained:
                model.train(
                    max_epochs=args.max_epochs, state_epochs=0, prune=True, n_restarts=n_restarts,
                    prune_kwargs=prune_kwargs, **train,
                )  # fmt: skip
            history = model.pruning_history
            pruned = argparse.Namespace(seconds=0.0)
        else:
            # what train(prune=True) does, phase by phase: train, prune, then the state phase of the chosen model
            with Timer() as trained:
                model.train(max_epochs=args.max_epochs, state_epochs=0, **train)
            with Timer() as pruned:
                history = model.prune(**prune_kwargs, **train)
        state_epochs = args.state_epochs
        if state_epochs is None:
            state_epochs = default_state_epochs(a.n_obs, args.max_epochs)
        if state_epochs:
            model.train(max_epochs=0, state_epochs=state_epochs, **train)
    selected = history.loc[history["selected"]].iloc[0]
    labels = model.predict().astype(str).to_numpy()
    return {
        "method": _label(args),
        "model_seed": seed,
        "k_max": k_max,
        "chosen_k": model.n_categories,
        "n_clusters": int(np.unique(labels).size),
        "consensus": float(selected["mean_consensus"]),
        "rounds": len(history) - 1,
        "k_path": ">".join(str(k) for k in history["n_categories"]),
        "epochs": len(model.history["train_loss"]),
        "train_seconds": trained.seconds,
        "prune_seconds": pruned.seconds,
        "state_seconds": total.seconds - trained.seconds - pruned.seconds,
        "seconds": total.seconds,
        "peak_mb": total.peak_growth_mb,
        "labels": labels,
        "restarts": model.restart_history.drop(columns="selected").to_dict("records") if n_restarts > 1 else None,
        "restart_kept": int(model.restart_history["selected"].to_numpy().argmax()) if n_restarts > 1 else None,
    }


def _stability(dataset: str, fits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from _common import clustering_scores

    rows = []
    for other in fits[1:]:
        rows.append({
            "part": "stability", "dataset": dataset, "method": fits[0]["method"],
            "model_seed": f"{fits[0]['model_seed']} vs {other['model_seed']}",
            "ari_between_seeds": clustering_scores(fits[0]["labels"], other["labels"])["ari"],
            "chosen_k": f"{fits[0]['chosen_k']} vs {other['chosen_k']}",
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def part_sim(args) -> list[dict]:
    from _common import clustering_scores

    from scmixvae.data import simulate

    rows, stability_fits = [], {}
    for i, data_seed in enumerate(args.seeds):
        adata = simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_types=SIM_TYPES, seed=data_seed)
        truth = adata.obs["type"].astype(str).to_numpy()
        model_seeds = args.model_seeds if (i == 0 or args.stability_all_seeds) else args.model_seeds[:1]
        for model_seed in model_seeds:
            fit = fit_pruned(adata, seed=model_seed, k_max=args.k_max_sim, args=args)
            rows.append({
                "part": "sim", "dataset": f"sim_{args.n_cells}x{args.n_genes}_{SIM_TYPES}types", "data_seed": data_seed,
                "k_ref": SIM_TYPES, **fit, **clustering_scores(truth, fit["labels"]),
                "k_within_1": abs(fit["chosen_k"] - SIM_TYPES) <= 1,
            })  # fmt: skip
            print({k: v for k, v in rows[-1].items() if k != "labels"}, flush=True)
            if len(model_seeds) > 1:
                stability_fits.setdefault(data_seed, []).append(fit)
    sim_rows = [r for r in rows if r["model_seed"] == args.model_seeds[0]]
    rows.append({
        "part": "sim", "dataset": "SUMMARY", "method": _label(args),
        "k_within_1": f"{sum(r['k_within_1'] for r in sim_rows)}/{len(sim_rows)}",
        "ari": float(np.mean([r["ari"] for r in sim_rows])), "ari_min": float(np.min([r["ari"] for r in sim_rows])),
    })  # fmt: skip
    stability = [row for seed, fits in stability_fits.items() for row in _stability(f"sim seed {seed}", fits)]
    if len(stability) > 1:
        values = [r["ari_between_seeds"] for r in stability]
        stability.append({
            "part": "stability", "dataset": "SUMMARY", "method": _label(args),
            "ari_between_seeds": float(np.mean(values)), "ari_min": float(np.min(values)),
        })  # fmt: skip
    return rows + stability


def part_real(args) -> list[dict]:
    from _common import clustering_scores, load_real, run_pca_leiden, run_scvi_leiden

    rows = []
    for name in args.datasets:
        adata, labels = load_real(name)
        k_ref = int(np.unique(labels).size)
        if args.peers_from:  # scVI + Leiden and PCA + Leiden from an earlier bench_peers.py run, named in the table
            saved = json.loads(Path(args.peers_from).read_text())["rows"]
            peers = {r["method"]: r for r in saved if r["dataset"] == name}
            scvi_res = peers["scVI+Leiden"] | {"source": Path(args.peers_from).name}
        else:
            scvi_res = run_scvi_leiden(
                adata, labels, seed=args.model_seeds[0], max_epochs=args.scvi_max_epochs, batch_size=args.batch_size,
                accelerator=args.accelerator,
            ) | {"source": "this run"}  # fmt: skip
        fits = []
        for model_seed in args.model_seeds:
            fit = fit_pruned(adata, seed=model_seed, k_max=args.k_max_real, args=args)
            fits.append(fit)
            rows.append({
                "part": "real", "dataset": name, "k_ref": k_ref, **fit, **clustering_scores(labels, fit["labels"]),
                "ratio_to_scvi_train": fit["seconds"] / scvi_res["train_seconds"],
            })  # fmt: skip
            print({k: v for k, v in rows[-1].items() if k != "labels"}, flush=True)
        rows.append({
            "part": "real", "dataset": name, "method": scvi_res["method"], "model_seed": args.model_seeds[0],
            "k_ref": k_ref, "chosen_k": scvi_res["n_clusters"], "n_clusters": scvi_res["n_clusters"],
            "ari": scvi_res["ari"], "nmi": scvi_res["nmi"], "epochs": scvi_res["epochs"],
            "train_seconds": scvi_res["train_seconds"], "seconds": scvi_res["seconds"], "ratio_to_scvi_train": 1.0,
            "source": scvi_res["source"],
        })  # fmt: skip
        if args.pca:
            pca = peers["PCA+Leiden"] if args.peers_from else run_pca_leiden(adata, labels, seed=args.model_seeds[0])
            rows.append({
                "part": "real", "dataset": name, "method": pca["method"], "model_seed": args.model_seeds[0],
                "k_ref": k_ref, "chosen_k": pca["n_clusters"], "n_clusters": pca["n_clusters"], "ari": pca["ari"],
                "nmi": pca["nmi"], "seconds": pca["seconds"],
            })  # fmt: skip
        rows += _stability(name, fits)
    real = [r for r in rows if r["part"] == "real" and r.get("model_seed") == args.model_seeds[0]]
    for method in dict.fromkeys(r["method"] for r in real):
        mine = [r for r in real if r["method"] == method]
        rows.append({
            "part": "real", "dataset": "MEAN", "method": method,
            "ari": float(np.mean([r["ari"] for r in mine])), "nmi": float(np.mean([r["nmi"] for r in mine])),
            "abs_k_error": float(np.mean([abs(r["chosen_k"] - r["k_ref"]) for r in mine])),
            "ratio_to_scvi_train": float(np.mean([r.get("ratio_to_scvi_train", np.nan) for r in mine])),
        })  # fmt: skip
    return rows


def _warm_up(args) -> None:
    """One tiny fit, so that numba compilation and torch start-up are not timed."""
    from scmixvae.data import simulate
    from scmixvae.model import CplMixVAE

    adata = simulate(n_cells=300, n_genes=100, n_types=3, seed=0)
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_categories=4, n_hidden=16)
    model.train(max_epochs=1, batch_size=args.batch_size, accelerator=args.accelerator, enable_progress_bar=False)
    model.prune(max_rounds=1, epochs_per_round=1, accelerator=args.accelerator, enable_progress_bar=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["sim", "real"], choices=["sim", "real"])
    p.add_argument("--datasets", nargs="+", default=["ifnb", "worm", "bladder", "pbmc", "kidney"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="simulator data seeds")
    p.add_argument("--model-seeds", nargs="+", type=int, default=[0, 1], help="model seeds (stability)")
    p.add_argument(
        "--stability-all-seeds", action="store_true",
        help="simulator: fit every model seed on every data seed (stability on each), not on the first only",
    )  # fmt: skip
    p.add_argument("--n-cells", type=int, default=3000)
    p.add_argument("--n-genes", type=int, default=1000)
    p.add_argument("--k-max-sim", type=int, default=30)
    p.add_argument("--k-max-real", type=int, default=50)
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--max-epochs", type=int, default=None, help="initial training; None: the model's default")
    p.add_argument(
        "--state-epochs", type=int, default=None,
        help="state phase after pruning; None: the model's default (0 skips it: the types are the same, the time not)",
    )  # fmt: skip
    p.add_argument("--epochs-per-round", type=int, default=None, help="None: convergence-driven")
    p.add_argument("--max-rounds", type=int, default=None)
    p.add_argument(
        "--restarts", type=int, default=1,
        help="train(n_restarts=...): fits per model seed, the medoid kept (the default of a model choosing K is 3)",
    )  # fmt: skip
    p.add_argument("--scvi-max-epochs", type=int, default=None, help="None: scVI's default")
    p.add_argument("--no-pca", dest="pca", action="store_false", help="skip PCA + Leiden")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="pruning")
    p.add_argument(
        "--augmentation",
        default=None,
        help="None: that of a model choosing K (CplMixVAE(adata) without n_categories); 'dropout' before session 7",
    )
    p.add_argument("--model-kwargs", type=json.loads, default={}, help='JSON, e.g. \'{"augmentation": "knn"}\'')
    p.add_argument("--peers-from", default=None, help="read scVI/PCA + Leiden from a bench_peers.py JSON")
    args = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numba, numpy and torch start their thread pools
    from _common import set_threads, write_results

    set_threads(args.threads)
    from _common import quiet

    quiet()
    _warm_up(args)
    rows = []
    for part in args.parts:
        rows += {"sim": part_sim, "real": part_real}[part](args)
    command = f"python benchmarks/bench_pruning.py {' '.join(argv or sys.argv[1:])}"
    notes = (
        f"Command: `{command}`\n\n"
        f"Threshold {args.threshold}; K_max {args.k_max_sim} (simulator) and {args.k_max_real} (real sets); initial "
        f"training {args.max_epochs or 'default'} epochs; epochs per round "
        f"{args.epochs_per_round or 'convergence-driven'}. `k_path`: K of every round; `ratio_to_scvi_train`: "
        "seconds of the whole fit (training + pruning + selection) / seconds of scVI's default `train()` on the same "
        "data, timed one after the other in this process."
    )
    write_results(args.name, rows, extra_md=notes)


if __name__ == "__main__":
    main()
