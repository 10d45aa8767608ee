"""States on interferon-beta-stimulated PBMCs: interferon-stimulated genes among each type's state genes; memory.

    python benchmarks/bench_state_genes.py --parts ifnb --seeds 0 1 2 --axes default --likelihood gaussian --threads 1
    python benchmarks/bench_state_genes.py --parts memory --threads 1
    python benchmarks/bench_state_genes.py --seeds 0 --max-epochs 2 --scvi-epochs 2 --memory-cells 2000 \
        --out /tmp/x --threads 1                                    # smoke test

Parts:
- ``ifnb``: fit on ``ifnb_2800`` (all 14,053 genes are reduced to the 2,000 most variable, with the ISGs below kept
  in), ``n_categories`` = 13 reference types, the CTRL/STIM column registered as the condition
  (``setup_anndata(condition_key="condition")``; ``--condition-key none`` to leave it out), one fit per
  ``--seeds``; map each reference type to its majority consensus type; count the
  ISGs (ISG15, IFIT1, IFIT3, IFI6, MX1, ISG20, IFITM3, OAS1, RSAD2, LY6E) among that type's top 20 state genes
  for each ranking axis of ``--axes`` (the default axis of ``rank_state_genes`` and the first principal one);
  AUROC of the state projection (the traversal axis of the reference type's consensus type) separating CTRL from
  STIM within each reference type; the same with each cell placed on its own model type's path, in that type's
  standard deviations (``auroc_own_frame``: a cell's state is read in the frame of the type it is assigned to);
  per model type along its own axis (``mean_auroc_by_type``); the
  cell-type ARI (the model given the 13 types) next to scVI + Leiden (Leiden at resolution 1) fitted here at each
  seed on the same cells and genes, with the condition as scVI's batch (``--no-scvi`` to skip it);
  the ARI of each fit's types to its own Leiden start (``ari_to_start``), the number of types holding at least one
  cell (``filled_types``, of 13 given) and the fraction of cells in types of which
  90% or more are of one condition (``cells_in_one_condition_types``: types split by condition); a ``SEEDS`` row
  with the mean and spread of the ARI and the mean ARI between the seeds' types (``ari_between_seeds``).
- ``memory``: peak resident memory of ``rank_state_genes`` on ``--memory-cells`` (10^5) simulated cells x 2,000
  genes above the model (trained for a few steps only: memory does not depend on training).

Writes ``{--out}/{--name}.json`` and ``.md`` (default ``benchmarks/results/state_genes``).
"""

from __future__ import annotations

# isort: off
import _threads  # noqa: F401  first: --threads sets the thread variables before numpy and torch start
# isort: on

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR

ISGS = ["ISG15", "IFIT1", "IFIT3", "IFI6", "MX1", "ISG20", "IFITM3", "OAS1", "RSAD2", "LY6E"]


def part_ifnb(args) -> list[dict]:
    from _common import mean_pairwise_ari, run_scvi_leiden

    rows, types = [], []
    batch_key = None if args.condition_key.lower() == "none" else args.condition_key
    for seed in args.seeds:
        seed_rows, adata, labels = _fit_ifnb(args, seed)
        if args.scvi:  # at the same seed, on the same cells and genes, with the condition as its batch
            fit = run_scvi_leiden(adata.copy(), labels, seed=seed, max_epochs=args.scvi_epochs, batch_key=batch_key)
            seed_rows[-1]["scvi_leiden_ari"] = fit["ari"]
        print(seed_rows[-1], flush=True)
        rows += seed_rows
        types.append(adata.obs["cplmixvae_type"].astype(str).to_numpy())
    aris = [r["ari"] for r in rows if r["reference_type"] == "SUMMARY"]
    scvi_aris = [r["scvi_leiden_ari"] for r in rows if "scvi_leiden_ari" in r]
    rows.append({"part": "ifnb", "reference_type": "SEEDS", "n_seeds": len(aris), "ari": float(np.mean(aris)),
                 "ari_sd": float(np.std(aris, ddof=1)) if len(aris) > 1 else None,
                 "ari_between_seeds": mean_pairwise_ari(types),
                 "scvi_leiden_ari": float(np.mean(scvi_aris)) if scvi_aris else None})  # fmt: skip
    print(rows[-1], flush=True)
    return rows


def _fit_ifnb(args, seed: int):
    import anndata as ad
    import scanpy as sc
    import scvi
    from _common import SHARED_DATA, clustering_scores

    import scmixvae
    from scmixvae.model import CplMixVAE

    full = ad.read_h5ad(SHARED_DATA / "ifnb_2800.h5ad")
    probe = full.copy()
    sc.pp.normalize_total(probe, target_sum=1e4)
    sc.pp.log1p(probe)
    sc.pp.highly_variable_genes(probe, n_top_genes=2000)
    keep = probe.var["highly_variable"].to_numpy() | full.var_names.isin(ISGS)
    adata = full[:, keep].copy()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    scvi.settings.seed = seed
    condition_key = None if args.condition_key.lower() == "none" else args.condition_key
    CplMixVAE.setup_anndata(adata, condition_key=condition_key)
    likelihood = {} if args.likelihood is None else {"likelihood": args.likelihood}
    model = CplMixVAE(adata, n_categories=len(np.unique(labels)), **likelihood, **args.model_kwargs)
    model.train(enable_progress_bar=False, **({} if args.max_epochs is None else {"max_epochs": args.max_epochs}))
    scmixvae.tl.annotate(adata, model)
    types = adata.obs["cplmixvae_type"].astype(str)
    scores = clustering_scores(labels, types.to_numpy())
    stim = (adata.obs["condition"].astype(str) == "STIM").to_numpy()
    state = adata.obsm["X_cplmixvae_state"]
    rows = [{"part": "ifnb", "seed": seed, "reference_type": ref, "n_cells": int((labels == ref).sum()),
             "consensus_type": types[labels == ref].value_counts().idxmax()}
            for ref in np.unique(labels)]  # fmt: skip
    summary = {"part": "ifnb", "seed": seed, "reference_type": "SUMMARY", "ari": scores["ari"], "nmi": scores["nmi"],
               "ari_to_start": clustering_scores(model.start_labels, types.to_numpy())["ari"],
               "filled_types": int(types.nunique()),
               "cells_in_one_condition_types": one_condition_share(types.to_numpy(), stim)}  # fmt: skip
    for name in args.axes:  # "default": rank_state_genes' default axis (the condition's with one registered)
        axis_name, _, measure = name.partition(":")
        axis = None if axis_name == "default" else int(axis_name) if axis_name.isdigit() else axis_name
        key = f"state_genes_{name.replace(':', '_')}"
        measure_kwargs = {"measure": measure} if measure else {}
        scmixvae.tl.rank_state_genes(adata, model, key_added=key, axis=axis, normalize=args.normalize, **measure_kwargs)
        table = scmixvae.tl.get_state_genes(adata, key=key)
        traversal = adata.uns[key]["traversal"]
        groups = list(np.asarray(traversal["groups"], dtype=str))
        position = path_position(types.to_numpy(), state, traversal)
        for row in rows:
            sel = labels == row["reference_type"]
            consensus = row["consensus_type"]
            top = table[table["group"].astype(str) == consensus].nlargest(20, "scores")["names"].tolist()
            direction = np.asarray(traversal["direction"])[groups.index(consensus)] if consensus in groups else None
            proj = state[sel] @ direction if direction is not None else state[sel, 0]
            row[f"isgs_in_top20_{name}"] = len(set(top) & set(ISGS))
            row[f"auroc_{name}"] = separation(stim[sel], proj)
            on_path = sel & ~np.isnan(position)
            row[f"auroc_own_frame_{name}"] = separation(stim[on_path], position[on_path])
        summary[f"types_with_5_isgs_{name}"] = sum(r[f"isgs_in_top20_{name}"] >= 5 for r in rows)
        summary[f"mean_auroc_{name}"] = float(np.nanmean([r[f"auroc_{name}"] for r in rows]))
        summary[f"mean_auroc_own_frame_{name}"] = float(np.nanmean([r[f"auroc_own_frame_{name}"] for r in rows]))
        summary[f"axis_{name}"] = adata.uns[key]["params"]["axis"]
        summary[f"mean_auroc_by_type_{name}"] = auroc_by_model_type(
            types.to_numpy(), state, stim, groups, traversal["direction"]
        )
    for row in rows:
        print(row, flush=True)
    rows.append(summary)
    return rows, adata, labels


def one_condition_share(types: np.ndarray, stim: np.ndarray) -> float:
    """Fraction of the cells in types of which at least 90% are of one condition (a type split by condition)."""
    share = pd.Series(stim).groupby(types).transform("mean").to_numpy()
    return float(np.mean((share >= 0.9) | (share <= 0.1)))


def auroc_by_model_type(types: np.ndarray, state: np.ndarray, stim: np.ndarray, groups, directions) -> float:
    """Mean over the model's types of the AUROC of CTRL vs STIM along the type's own traversal direction.

    Each cell is projected on the direction of the type it is assigned to (its state is read in that type's frame);
    types without cells of both conditions are left out.
    """
    aurocs = [separation(stim[types == group], state[types == group] @ direction)
              for group, direction in zip(groups, np.asarray(directions), strict=True)]  # fmt: skip
    return float(np.nanmean(aurocs)) if not np.isnan(aurocs).all() else float("nan")


def path_position(types: np.ndarray, state: np.ndarray, traversal: dict) -> np.ndarray:
    """Each cell's position on its own type's traversal path, ``(s - center) @ direction / sigma``.

    A cell's state is read in the frame of the type it is assigned to (the decoder pairs it with that type), so a
    reference type split over several model types is compared along each part's own path, in units of its spread.
    Cells of a type that ``rank_state_genes`` left out (too few cells, or no spread) have no path: NaN.
    """
    position = np.full(len(types), np.nan)
    for group, center, direction, sigma in zip(
        np.asarray(traversal["groups"], dtype=str),
        traversal["center"],
        traversal["direction"],
        traversal["sigma"],
        strict=True,
    ):
        cells = types == group
        position[cells] = (state[cells] - center) @ direction / sigma  # a ranked type spreads: sigma > 0
    return position


def separation(stim: np.ndarray, projection: np.ndarray) -> float:
    """AUROC of CTRL vs STIM along ``projection``, whichever way it points; NaN without cells of both conditions."""
    from sklearn.metrics import roc_auc_score

    if not (stim.any() and (~stim).any()):
        return float("nan")
    auroc = roc_auc_score(stim, projection)
    return max(auroc, 1 - auroc)


def part_memory(args) -> list[dict]:
    from _common import Timer

    import scmixvae
    from scmixvae.model import CplMixVAE

    adata = scmixvae.data.simulate(n_cells=args.memory_cells, n_genes=2000, n_types=8, seed=0)
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_categories=8)
    model.train(max_epochs=1, state_epochs=0, limit_train_batches=5, enable_progress_bar=False)
    with Timer() as timer:
        scmixvae.tl.rank_state_genes(adata, model, batch_size=1024)
    row = {"part": "memory", "n_cells": adata.n_obs, "n_genes": adata.n_vars, "seconds": timer.seconds,
           "peak_growth_mb": timer.peak_mb}  # fmt: skip
    print(row, flush=True)
    return [row]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["ifnb", "memory"], choices=["ifnb", "memory"])
    p.add_argument("--likelihood", default=None, help="None: the model's default")
    p.add_argument(
        "--axes",
        nargs="+",
        default=["default", "pc1"],
        help="traversal axes to rank by: 'default' (rank_state_genes' own choice), 'pc1', 'condition' or an index,"
        " optionally with ':endpoints' or ':range' for the score (default: rank_state_genes')",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="model seeds (one fit each)")
    p.add_argument(
        "--condition-key",
        default="condition",
        help="obs column registered as the condition (CTRL/STIM); 'none' to register none",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scvi", action=argparse.BooleanOptionalAction, default=True, help="scVI + Leiden's ARI")
    p.add_argument("--scvi-epochs", type=int, default=None, help="scVI's max_epochs; default: scVI's heuristic")
    p.add_argument("--memory-cells", type=int, default=100_000)
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the result files")
    p.add_argument("--name", default="state_genes")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs of each fit (default: the model's)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON, e.g. '{\"beta\": 0.5}'")
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="divide traversal scores by each gene's overall spread (rank_state_genes(normalize=...); default: no,"
        " as the library's default)",
    )
    args = p.parse_args(argv)
    from _common import quiet, set_threads, write_results

    quiet()
    set_threads(args.threads)
    rows = []
    for part in args.parts:
        rows += {"ifnb": part_ifnb, "memory": part_memory}[part](args)
    write_results(args.name, rows, out=args.out)


if __name__ == "__main__":
    main()
