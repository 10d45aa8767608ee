"""The simulator, where the truth is known: the choice of the number of types; the state latent's regimes.

    python benchmarks/bench_simulated.py --seeds 0 1 2 3 4 --model-seeds 0 1 --state-epochs 0 --threads 1
    python benchmarks/bench_simulated.py --parts states --seeds 0 1 2 3 4 --threads 1
    python benchmarks/bench_simulated.py --parts subtle_k --seeds 0 1 2 3 4 --state-epochs 0 --threads 1
    python benchmarks/bench_simulated.py --seeds 0 --n-cells 600 --n-genes 200 --max-epochs 2 --state-epochs 0 \
        --restarts 1 --prune-kwargs '{"max_rounds": 1, "epochs_per_round": 1}' --out /tmp/x   # smoke test

Parts (``--parts``; their rows go to one result file ``{--out}/{--name}``, by default
``benchmarks/results/pruning``, or ``benchmarks/results/states`` for ``--parts states`` alone):

- ``k_choice``: ``scmixvae.data.simulate`` with ``--n-types`` (8) types of unequal sizes, one data set per
  ``--seeds`` value, each fitted as a user without a number of types fits it: ``CplMixVAE(adata).train()`` (the
  model starts from ``default_n_categories``, 50 on 3,000 cells, prunes and keeps the medoid of its default
  restarts; ``--restarts``, ``--max-epochs``, ``--state-epochs`` and ``--prune-kwargs`` are passed to ``train``
  when given). ``--k-max K`` instead creates ``CplMixVAE(adata, n_categories=K)`` and calls
  ``train(prune=True)``: a model given K takes the options of a known K (``--model-kwargs`` to change them).
  Per fit: chosen K, ARI and NMI of ``predict()``, the consensus of the round kept, the K of every round, seconds.
  The first data set is fitted again with every further ``--model-seeds`` value: ARI between the seeds' labels.
- ``states``: every regime of ``STATE_REGIMES`` (``--regimes``; 2,000 cells x 500 genes), one data set per
  ``--seeds`` value, fitted with the number of types given (``CplMixVAE(adata, n_categories=K).train()``). Per
  fit: ``state``, the mean over the true types of the best |Spearman| between a coordinate of
  ``get_latent_representation()`` and the true state; ``pca_per_type``, the same for a PCA of each true type's
  log-normalised cells with as many components as the state has (``pca_per_type_5``: 5 components;
  ``pca_per_model_type``: the PCA of each of the model's types instead, which separates the state from the types);
  ``state_depth``, the same against the log library size; the ARI of ``predict()``, of the Leiden partition the
  model started from (``start_labels``) and of scanpy's PCA + Leiden. Then per regime the mean ± SD over seeds.
- ``subtle_k``: the ``subtle_types`` regime of ``STATE_REGIMES`` fitted as in ``k_choice`` (K unknown; data and
  model seed both ``--seeds``): chosen K and ARI against scanpy's PCA + Leiden on the same data (``--parts
  subtle_k`` alone writes ``subtle_k``).
"""

from __future__ import annotations

# isort: off
import _threads  # noqa: F401  first: --threads sets the thread variables before numpy and torch start
# isort: on

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS_DIR  # noqa: E402


def fit(adata, *, seed: int, args) -> dict[str, Any]:
    """One fit that chooses K, constructor to the end of ``train()``; its K, labels and times."""
    import anndata as ad
    import scvi
    from _common import Timer

    from scmixvae.model import CplMixVAE, default_n_categories

    scvi.settings.seed = seed
    a = ad.AnnData(adata.X.copy(), obs=adata.obs[[]].copy(), var=adata.var[[]].copy())
    train = {"enable_progress_bar": False, "accelerator": args.accelerator}
    for key in ("max_epochs", "state_epochs", "prune_kwargs"):
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    if args.restarts is not None:
        train["n_restarts"] = args.restarts
    with Timer() as timer:
        CplMixVAE.setup_anndata(a)
        if args.k_max is None:
            model = CplMixVAE(a, **args.model_kwargs)
        else:
            model = CplMixVAE(a, n_categories=args.k_max, **args.model_kwargs)
            train["prune"] = True
        model.train(**train)
    history, restarts = model.pruning_history, model.restart_history
    return {
        "method": "CplMixVAE" if args.k_max is None else f"CplMixVAE K_max={args.k_max}", "model_seed": seed,
        "k_max": default_n_categories(a.n_obs) if args.k_max is None else args.k_max,
        "chosen_k": int(model.n_categories),
        "consensus": float(history.loc[history["selected"], "mean_consensus"].iloc[0]),
        "rounds": len(history) - 1, "k_path": ">".join(str(k) for k in history["n_categories"]),
        "restarts": len(restarts) or 1, "restart_kept": int(restarts["selected"].to_numpy().argmax())
        if restarts["selected"].any() else None, "epochs": len(model.history["train_loss"]), **timer.as_dict(),
        "labels": model.predict().astype(str).to_numpy(),
    }  # fmt: skip


def part_k_choice(args) -> list[dict]:
    """Chosen K, ARI and NMI per data seed; ARI between model seeds on the first data set."""
    from _common import clustering_scores

    from scmixvae.data import simulate

    rows, first = [], []
    dataset = f"sim_{args.n_cells}x{args.n_genes}_{args.n_types}types"
    for i, data_seed in enumerate(args.seeds):
        adata = simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_types=args.n_types, seed=data_seed)
        truth = adata.obs["type"].astype(str).to_numpy()
        for model_seed in args.model_seeds if i == 0 else args.model_seeds[:1]:
            out = fit(adata, seed=model_seed, args=args)
            rows.append({"part": "k_choice", "dataset": dataset, "data_seed": data_seed, "k_ref": args.n_types, **out,
                         **clustering_scores(truth, out["labels"]),
                         "k_within_1": abs(out["chosen_k"] - args.n_types) <= 1})  # fmt: skip
            print({k: v for k, v in rows[-1].items() if k != "labels"}, flush=True)
            if i == 0:
                first.append(out)
    main_rows = [r for r in rows if r["model_seed"] == args.model_seeds[0]]
    rows.append({"part": "k_choice", "dataset": "SUMMARY", "method": main_rows[0]["method"],
                 "k_within_1": f"{sum(r['k_within_1'] for r in main_rows)}/{len(main_rows)}",
                 "ari": float(np.mean([r["ari"] for r in main_rows])),
                 "ari_min": float(np.min([r["ari"] for r in main_rows]))})  # fmt: skip
    for other in first[1:]:
        rows.append({"part": "stability", "dataset": f"sim seed {args.seeds[0]}", "method": other["method"],
                     "model_seed": f"{first[0]['model_seed']} vs {other['model_seed']}",
                     "chosen_k": f"{first[0]['chosen_k']} vs {other['chosen_k']}",
                     "ari_between_seeds": clustering_scores(first[0]["labels"], other["labels"])["ari"]})  # fmt: skip
    return rows


#: Within-type state regimes of ``states``, on ``STATE_DATA``: each type differs in 8% of the genes (40 markers)
#: unless said; the state program's share of genes (2-10%) and effect (``state_strength`` x Uniform(0.5, 1.5) log
#: units) vary; type-specific programs, or one program shared by all types; 2 to 10 types, of equal sizes but in
#: ``unbalanced`` (8 types of 567 down to 71 cells, the simulator's default sizes).
STATE_REGIMES = {
    "strong": {"n_types": 6, "n_state_genes": 50, "state_strength": 1.5},
    "moderate": {"n_types": 6, "n_state_genes": 25, "state_strength": 0.8},
    "weak": {"n_types": 6, "n_state_genes": 10, "state_strength": 0.7},
    "two_types": {"n_types": 2, "n_state_genes": 25, "state_strength": 0.8},
    "subtle_types": {"n_types": 10, "n_marker_genes": 10, "type_separation": 0.5, "n_state_genes": 25,
                     "state_strength": 0.8},
    "shared": {"n_types": 6, "n_state_genes": 0, "shared_state": True, "n_shared_genes": 40, "state_strength": 0.8},
    "unbalanced": {"n_types": 8, "type_sizes": "unbalanced", "n_state_genes": 25, "state_strength": 0.8},
}  # fmt: skip
STATE_DATA = {"n_cells": 2000, "n_genes": 500, "n_marker_genes": 40, "library_size_mean": 3000.0,
              "dispersion": 0.3, "type_sizes": "balanced"}  # fmt: skip


def best_state_correlation(latent: np.ndarray, truth: np.ndarray, types: np.ndarray) -> float:
    """Mean over the true types of the best |Spearman| between a latent coordinate and the true state."""
    from scipy.stats import spearmanr

    per_type = []
    for t in np.unique(types):
        cells = types == t
        per_type.append(max(abs(spearmanr(latent[cells, j], truth[cells]).statistic) for j in range(latent.shape[1])))
    return float(np.mean(per_type))


def log_normalised(adata) -> np.ndarray:
    """Dense log1p of the cells normalised to 10,000 counts (the input of the PCA peers)."""
    import scanpy as sc

    x = adata.copy()
    sc.pp.normalize_total(x, target_sum=1e4)
    sc.pp.log1p(x)
    return x.X.toarray()


def per_type_pca(logged: np.ndarray, types: np.ndarray, n_comps: int) -> np.ndarray:
    """PCA of the log-normalised cells of each type of ``types``, ``n_comps`` components per type, as one array.

    A type with too few cells for ``n_comps`` components keeps zeros (no axis can be found in it).
    """
    import scanpy as sc

    out = np.zeros((logged.shape[0], n_comps))
    for t in np.unique(types):
        cells = types == t
        if cells.sum() > n_comps:
            out[cells] = sc.pp.pca(logged[cells], n_comps=n_comps, random_state=0)
    return out


def part_states(args) -> list[dict]:
    """Types and states with K given, per regime and seed, against per-type PCA and PCA + Leiden (same data)."""
    import scvi
    from _common import clustering_scores, run_pca_leiden

    from scmixvae.data import simulate
    from scmixvae.model import CplMixVAE

    rows = []
    for regime in args.regimes:
        spec = {**STATE_DATA, **STATE_REGIMES[regime]}
        truth_key = "shared_state" if spec.get("shared_state") else "state"
        for seed in args.seeds:
            adata = simulate(**spec, seed=seed)
            types = adata.obs["type"].astype(str).to_numpy()
            truth = adata.obs[truth_key].to_numpy()
            scvi.settings.seed = seed
            CplMixVAE.setup_anndata(adata)
            model = CplMixVAE(adata, n_categories=spec["n_types"], **args.model_kwargs)
            lengths = ("max_epochs", "state_epochs")
            train = {key: getattr(args, key) for key in lengths if getattr(args, key) is not None}
            model.train(enable_progress_bar=False, accelerator=args.accelerator, **train)
            latent = model.get_latent_representation()
            labels = model.predict().to_numpy()
            log_library = np.log(np.asarray(adata.X.sum(axis=1)).ravel())
            logged = log_normalised(adata)
            row = {"part": "states", "regime": regime, "seed": seed, "n_types": spec["n_types"],
                   "state": best_state_correlation(latent, truth, types),
                   "pca_per_type": best_state_correlation(per_type_pca(logged, types, latent.shape[1]), truth, types),
                   "pca_per_type_5": best_state_correlation(per_type_pca(logged, types, 5), truth, types),
                   "pca_per_model_type": best_state_correlation(
                       per_type_pca(logged, labels, latent.shape[1]), truth, types),
                   "state_depth": best_state_correlation(latent, log_library, types),
                   "ari": clustering_scores(types, labels)["ari"],
                   "start_ari": clustering_scores(types, model.start_labels)["ari"],
                   "filled_types": int(np.unique(labels).size),
                   "pca_leiden_ari": run_pca_leiden(adata, types, seed=seed)["ari"]}  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    return rows + state_summary(rows)


def part_subtle_k(args) -> list[dict]:
    """The choice of K on the subtle types of ``STATE_REGIMES`` (K unknown) against PCA + Leiden, per data seed."""
    from _common import clustering_scores, run_pca_leiden

    from scmixvae.data import simulate

    rows = []
    spec = {**STATE_DATA, **STATE_REGIMES["subtle_types"]}
    for seed in args.seeds:
        adata = simulate(**spec, seed=seed)
        types = adata.obs["type"].astype(str).to_numpy()
        out = fit(adata, seed=seed, args=args)
        peer = run_pca_leiden(adata, types, seed=seed)
        rows.append({"part": "subtle_k", "dataset": "subtle_types", "data_seed": seed, "k_ref": spec["n_types"],
                     **{k: v for k, v in out.items() if k != "labels"}, **clustering_scores(types, out["labels"]),
                     "pca_leiden_k": peer["n_clusters"], "pca_leiden_ari": peer["ari"]})  # fmt: skip
        rows[-1]["ari_at_least_pca_leiden"] = rows[-1]["ari"] >= peer["ari"]
        print(rows[-1], flush=True)
    ari, peer_ari = np.array([r["ari"] for r in rows]), np.array([r["pca_leiden_ari"] for r in rows])
    rows.append({"part": "subtle_k", "dataset": "SUMMARY", "method": rows[0]["method"], "ari": mean_sd(ari),
                 "pca_leiden_ari": mean_sd(peer_ari),
                 "ari_at_least_pca_leiden": f"{int((ari >= peer_ari).sum())}/{len(ari)}"})  # fmt: skip
    return rows


def mean_sd(values: np.ndarray) -> str:
    """``"mean ± SD"`` of the values over seeds (SD 0 for one value), three decimals."""
    return f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f}"


def state_summary(rows: list[dict]) -> list[dict]:
    """Per regime: mean and standard deviation over seeds; how many seeds the model matches its peers."""
    out = []
    for regime in dict.fromkeys(r["regime"] for r in rows):
        fits = [r for r in rows if r["regime"] == regime]
        summary = {"part": "states", "regime": regime, "seed": "MEAN ± SD", "n_types": fits[0]["n_types"]}
        keys = ("state", "pca_per_type", "pca_per_type_5", "pca_per_model_type", "state_depth", "ari", "start_ari")
        for key in (*keys, "filled_types", "pca_leiden_ari"):
            summary[key] = mean_sd(np.array([r[key] for r in fits]))
        summary["state_at_least_pca"] = f"{sum(r['state'] >= r['pca_per_type'] for r in fits)}/{len(fits)}"
        summary["state_at_least_model_type_pca"] = (
            f"{sum(r['state'] >= r['pca_per_model_type'] for r in fits)}/{len(fits)}"
        )
        summary["ari_at_least_start_and_leiden"] = (
            f"{sum(r['ari'] >= max(r['start_ari'], r['pca_leiden_ari']) - 1e-9 for r in fits)}/{len(fits)}"
        )
        out.append(summary)
    return out


#: Parts of the benchmark, in the order they run; each adds its rows to the one result file.
PARTS = {"k_choice": part_k_choice, "states": part_states, "subtle_k": part_subtle_k}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["k_choice"], choices=list(PARTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="simulator data seeds")
    p.add_argument("--regimes", nargs="+", default=list(STATE_REGIMES), choices=list(STATE_REGIMES),
                   help="state regimes of the states part")  # fmt: skip
    p.add_argument("--model-seeds", nargs="+", type=int, default=[0, 1], help="model seeds on the first data set")
    p.add_argument("--n-cells", type=int, default=3000)
    p.add_argument("--n-genes", type=int, default=1000)
    p.add_argument("--n-types", type=int, default=8)
    p.add_argument("--k-max", type=int, default=None, help="n_categories to prune from; default: the model's own")
    p.add_argument("--restarts", type=int, default=None, help="train(n_restarts=...); default: the model's")
    p.add_argument("--max-epochs", type=int, default=None, help="train(max_epochs=...)")
    p.add_argument("--state-epochs", type=int, default=None, help="train(state_epochs=...); 0: no state phase")
    p.add_argument("--prune-kwargs", type=json.loads, default=None, help="train(prune_kwargs=...), JSON")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="CplMixVAE options, JSON")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the result files")
    p.add_argument("--name", default=None, help="result file; default: pruning, or the one part's name")
    args = p.parse_args(argv)
    if args.name is None:
        args.name = args.parts[0] if len(args.parts) == 1 and args.parts[0] != "k_choice" else "pruning"
    from _common import quiet, set_threads, warm_up, write_results

    set_threads(args.threads)
    quiet()
    warm_up(args.accelerator)
    rows = [row for part in args.parts for row in PARTS[part](args)]
    notes = {
        "k_choice": "`seconds`: the whole fit, constructor to the end of `train()`; `k_path`: K of every pruning round "
        "of the fit kept; `k_within_1`: chosen K within one of the true number of types.",
        "states": "`state`, `pca_per_type` (`_5`: five components; `pca_per_model_type`: the PCA within each of the "
        "model's types), `state_depth`: mean over the true types of the best |Spearman| of a coordinate with the true "
        "state (or the log library size); `ari`, `start_ari`, "
        "`pca_leiden_ari`: the types of `predict()`, of the Leiden start and of PCA + Leiden; `filled_types`: the "
        "model's categories holding at least one cell (of `n_types` given); per regime the mean "
        "± SD over seeds, `state_at_least_pca`, `state_at_least_model_type_pca` and `ari_at_least_start_and_leiden` "
        "count the seeds.",
        "subtle_k": "`subtle_k`: the default fit (K unknown) on the `subtle_types` regime of `states` (10 types "
        "differing in 2% of the genes), one data and model seed per row; `pca_leiden_ari`: PCA + Leiden on the same "
        "data; `ari_at_least_pca_leiden` counts the seeds.",
    }
    note = " ".join(notes[part] for part in args.parts)
    write_results(args.name, rows, extra_md=note, out=args.out)


if __name__ == "__main__":
    main()
