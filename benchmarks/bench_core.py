"""Issue 2 benchmark: accuracy on the simulator and the real sets, and seconds per epoch against scVI.

    python benchmarks/bench_core.py --threads 1                      # everything
    python benchmarks/bench_core.py --parts sim speed --threads 1    # a subset
    python benchmarks/bench_core.py --parts real --peers-from benchmarks/results/peers.json

Parts:
- ``sim``: simulator, 8 well-separated types of unequal size, 3,000 cells x 1,000 genes, ``n_categories=8``: ARI of
  the consensus type, mean within-type |Spearman| between the best state coordinate and the true state (the
  issue's measure; ``state_spearman``), the same for the projection on each type's main state axis, the axis the
  state traversal follows (``state_spearman_axis``), agreement.
- ``real``: the five files in ``../shared/data`` with ``n_categories`` = number of reference labels, ``nb`` and
  ``gaussian`` likelihoods, next to scVI + Leiden and PCA + Leiden (run here, or read from ``--peers-from``, the
  output of ``bench_peers.py`` or of an earlier ``bench_core.py --parts real``, which is then named in the
  table).
- ``speed``: seconds per training epoch for A = 1, 2, 3, 5 agents and scVI on the same data and batch size,
  timed in this process one after the other (first epoch dropped), as ratios to scVI.

Writes ``benchmarks/results/{name}.json`` and ``.md``.
"""

from __future__ import annotations

# isort: off
import _threads  # noqa: F401  first: --threads sets the thread variables before numpy and torch start
# isort: on

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _fit(adata, *, seed: int, train_kwargs: dict | None = None, **model_kwargs):
    import scvi

    from scmixvae.model import CplMixVAE

    scvi.settings.seed = seed
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, **model_kwargs)
    start = time.perf_counter()
    model.train(enable_progress_bar=False, **(train_kwargs or {}))
    return model, time.perf_counter() - start


def _train_kwargs(args) -> dict:
    return {} if args.max_epochs is None else {"max_epochs": args.max_epochs}


def state_correlation(state: np.ndarray, truth_state: np.ndarray, types: np.ndarray, *, axis: bool = False) -> float:
    """Mean over true types of the best |Spearman| between a state coordinate and the true state.

    ``axis=True``: instead of the best coordinate, the projection on the main axis (first principal component)
    of the type's state means, the axis :func:`scmixvae.tl.rank_state_genes` traverses by default.
    """
    from scipy.stats import spearmanr

    rhos = []
    for t in np.unique(types):
        sel = types == t
        if axis:
            centred = state[sel] - state[sel].mean(0)
            direction = np.linalg.svd(centred, full_matrices=False)[2][0]
            rhos.append(abs(spearmanr(centred @ direction, truth_state[sel])[0]))
        else:
            rhos.append(max(abs(spearmanr(state[sel, j], truth_state[sel])[0]) for j in range(state.shape[1])))
    return float(np.mean(rhos))


def part_sim(args) -> list[dict]:
    from _common import clustering_scores, run_pca_leiden

    from scmixvae.data import simulate

    rows = []
    for seed in args.seeds:
        adata = simulate(
            n_cells=3000, n_genes=1000, n_types=8, type_sizes="unbalanced", type_separation=args.sim_separation,
            state_strength=args.sim_state_strength, seed=seed,
        )  # fmt: skip
        truth = adata.obs["type"].astype(str).to_numpy()
        peer = run_pca_leiden(adata.copy(), truth, seed=seed)
        rows.append({"part": "sim", "dataset": "sim_3000x1000_8types", "seed": seed, "method": peer["method"],
                     "ari": peer["ari"], "nmi": peer["nmi"], "n_clusters": peer["n_clusters"],
                     "seconds": peer["seconds"]})  # fmt: skip
        for likelihood in args.likelihoods:
            model, seconds = _fit(
                adata, seed=seed, n_categories=8, likelihood=likelihood, train_kwargs=_train_kwargs(args),
                **args.model_kwargs,
            )  # fmt: skip
            pred = model.predict().astype(str).to_numpy()
            state = model.get_latent_representation()
            rows.append({
                "part": "sim", "dataset": "sim_3000x1000_8types", "seed": seed, "method": f"CplMixVAE[{likelihood}]",
                **clustering_scores(truth, pred),
                "state_spearman": state_correlation(state, adata.obs["state"].to_numpy(), truth),
                "state_spearman_axis": state_correlation(state, adata.obs["state"].to_numpy(), truth, axis=True),
                "agreement": float(model.get_agent_agreement().iloc[0, 1]),
                "epochs": len(model.history["train_loss"]), "seconds": seconds,
            })  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def part_real(args) -> list[dict]:
    from _common import clustering_scores, load_real, run_pca_leiden, run_scvi_leiden

    peers = {}
    if args.peers_from:
        for row in json.loads(Path(args.peers_from).read_text())["rows"]:
            if row["method"].startswith("CplMixVAE") or row["dataset"] == "MEAN":  # peers only (any bench's JSON)
                continue
            peers.setdefault(row["dataset"], []).append(row | {"source": Path(args.peers_from).name})
    rows = []
    for name in args.datasets:
        adata, labels = load_real(name)
        k = len(np.unique(labels))
        for likelihood in args.likelihoods:
            model, seconds = _fit(
                adata.copy(),
                seed=args.seeds[0],
                n_categories=k,
                likelihood=likelihood,
                train_kwargs=_train_kwargs(args),
                **args.model_kwargs,
            )
            pred = model.predict().astype(str).to_numpy()
            rows.append({
                "part": "real", "dataset": name, "method": f"CplMixVAE[{likelihood}]", "k_ref": k,
                "n_clusters": len(np.unique(pred)), **clustering_scores(labels, pred),
                "agreement": float(model.get_agent_agreement().iloc[0, 1]),
                "epochs": len(model.history["train_loss"]), "seconds": seconds, "source": "this run",
            })  # fmt: skip
            print(rows[-1], flush=True)
        if name in peers:
            for row in peers[name]:
                rows.append({"part": "real", "dataset": name, "method": row["method"], "k_ref": k,
                             "n_clusters": row.get("n_clusters"), "ari": row["ari"], "nmi": row["nmi"],
                             "seconds": row.get("seconds"), "source": row["source"]})  # fmt: skip
        elif not args.skip_peers:
            for fn in (run_pca_leiden, run_scvi_leiden):
                res = fn(adata.copy(), labels, seed=args.seeds[0])
                rows.append({"part": "real", "dataset": name, "method": res["method"], "k_ref": k,
                             "n_clusters": res["n_clusters"], "ari": res["ari"], "nmi": res["nmi"],
                             "seconds": res["seconds"], "source": "this run"})  # fmt: skip
        print(rows[-1], flush=True)
    means = {}
    for row in rows:
        means.setdefault(row["method"], []).append(row["ari"])
    for method, values in means.items():
        if len(values) == len(args.datasets):
            rows.append({"part": "real", "dataset": "MEAN", "method": method, "ari": float(np.mean(values))})
    return rows


def part_speed(args) -> list[dict]:
    import scvi
    from _common import EpochTimer, load_real

    from scmixvae.model import CplMixVAE

    adata, _ = load_real(args.speed_dataset)
    rows = []
    for batch_size in args.batch_sizes:
        scvi.settings.seed = 0
        scvi.model.SCVI.setup_anndata(adata)
        timer = EpochTimer()
        scvi.model.SCVI(adata).train(max_epochs=args.speed_epochs, batch_size=batch_size, callbacks=[timer],
                                     enable_progress_bar=False)  # fmt: skip
        scvi_s = timer.seconds_per_epoch()
        rows.append({"part": "speed", "dataset": args.speed_dataset, "method": "scVI", "batch_size": batch_size,
                     "threads": timer.threads_used(), "s_per_epoch": scvi_s, "ratio_to_scvi": 1.0})  # fmt: skip
        for likelihood in args.likelihoods:
            for n_agents in (1, 2, 3, 5):
                CplMixVAE.setup_anndata(adata)
                # per-epoch cost only: the one-off Leiden initialisation is timed in the accuracy parts
                model = CplMixVAE(adata, n_agents=n_agents, n_categories=10, likelihood=likelihood)
                model.category_init_done_ = True  # random weights: no Leiden start
                timer = EpochTimer()
                # epochs of every part only: the state phase's cheaper steps would lower the mean
                model.train(max_epochs=args.speed_epochs, state_epochs=0, batch_size=batch_size, callbacks=[timer],
                            enable_progress_bar=False)  # fmt: skip
                s = timer.seconds_per_epoch()
                rows.append({"part": "speed", "dataset": args.speed_dataset,
                             "method": f"CplMixVAE[{likelihood}] A={n_agents}", "batch_size": batch_size,
                             "threads": timer.threads_used(), "s_per_epoch": s,
                             "ratio_to_scvi": s / scvi_s})  # fmt: skip
                print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["sim", "real", "speed"], choices=["sim", "real", "speed"])
    p.add_argument("--datasets", nargs="+", default=["ifnb", "worm", "bladder", "pbmc", "kidney"])
    p.add_argument("--likelihoods", nargs="+", default=["nb", "gaussian"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peers-from", default=None, help="JSON of bench_peers.py to reuse instead of rerunning peers")
    p.add_argument("--sim-separation", type=float, default=2.0, help="simulate(type_separation=...)")
    p.add_argument("--sim-state-strength", type=float, default=2.5, help="simulate(state_strength=...)")
    p.add_argument("--skip-peers", action="store_true", help="no peer rows (compare with bench_peers.py output)")
    p.add_argument("--speed-dataset", default="pbmc")
    p.add_argument("--speed-epochs", type=int, default=4)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128])
    p.add_argument("--name", default="core")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs of every CplMixVAE fit (default: the model's)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON, e.g. '{\"input_dropout\": 0.2}'")
    args = p.parse_args(argv)
    import os

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numba/torch start their pools
    from _common import quiet, set_threads, write_results

    set_threads(args.threads)
    quiet()
    rows = []
    for part in args.parts:
        rows += {"sim": part_sim, "real": part_real, "speed": part_speed}[part](args)
    command = " ".join(argv or sys.argv[1:])
    write_results(args.name, rows, extra_md=f"Command: `python benchmarks/bench_core.py {command}`")


if __name__ == "__main__":
    main()
