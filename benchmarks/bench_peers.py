"""Peer baselines on the real data sets: scanpy's PCA + Leiden and scVI + Leiden.

    python benchmarks/bench_peers.py --datasets all --threads 1
    python benchmarks/bench_peers.py --datasets pbmc bladder --methods pca --threads 1
    python benchmarks/bench_peers.py --datasets bladder --methods scvi --max-epochs 2 --name peers_smoke

Writes ``benchmarks/results/{name}.json`` and ``.md`` (default name ``peers``).
"""

from __future__ import annotations

# isort: off
import _threads  # noqa: F401  first: --threads sets the thread variables before numpy and torch start
# isort: on

import argparse
import logging
import os
import sys
import time
import warnings


def _parse(argv: list[str] | None) -> argparse.Namespace:
    names = ["ifnb", "worm", "bladder", "pbmc", "kidney"]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["all"], choices=["all", *names], help="data sets to run")
    p.add_argument("--methods", nargs="+", default=["pca", "scvi"], choices=["pca", "scvi"])
    p.add_argument("--threads", type=int, default=1, help="torch/BLAS/numba threads (default 1)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--max-epochs", type=int, default=None, help="scVI epochs (default: scVI's heuristic)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--accelerator", default="cpu", help="scVI accelerator: cpu (default), gpu or auto")
    p.add_argument("--name", default="peers", help="results file stem")
    args = p.parse_args(argv)
    args.datasets = names if "all" in args.datasets else args.datasets
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    # Before numpy/torch start their thread pools.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for message in (".*LeafSpec.*", ".*log_every_n_steps.*", ".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message=message)
    C.set_threads(args.threads)

    _warm_up(C, args)
    rows = []
    for name in args.datasets:
        adata, labels = C.load_real(name)
        base = {
            "dataset": name,
            "cells": adata.n_obs,
            "genes": adata.n_vars,
            "types": len(set(labels)),
        }
        for seed in args.seeds:
            if "pca" in args.methods:
                out = C.run_pca_leiden(adata, labels, seed=seed)
                rows.append({**base, "seed": seed, **out})
                _progress(rows[-1])
            if "scvi" in args.methods:
                out = C.run_scvi_leiden(
                    adata,
                    labels,
                    seed=seed,
                    max_epochs=args.max_epochs,
                    batch_size=args.batch_size,
                    accelerator=args.accelerator,
                )
                rows.append({**base, "seed": seed, **out})
                _progress(rows[-1])

    extra = (
        f"Command: `python benchmarks/bench_peers.py {' '.join(argv if argv is not None else sys.argv[1:])}`.\n\n"
        "PCA+Leiden: normalize_total(1e4), log1p, 50-PC PCA, 15-NN graph, Leiden (igraph) at resolution 1. "
        "scVI+Leiden: default SCVI on raw counts, batch size "
        f"{args.batch_size}, epochs {'scVI heuristic' if args.max_epochs is None else args.max_epochs}, "
        "15-NN graph and Leiden at resolution 1 on the latent mean. `seconds`: whole pipeline; `peak_mb`: peak "
        "resident memory on top of what the process held before; `s_per_epoch`: train time / epochs; "
        "`s_per_epoch_steady`: mean epoch time after the first."
    )
    C.write_results(args.name, rows, extra_md=extra)


def _warm_up(C, args: argparse.Namespace) -> None:
    """Run each pipeline once on 300 simulated cells so that numba/torch start-up is not timed."""
    import anndata as ad
    import numpy as np
    from scipy import sparse

    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(3), 100)
    rates = rng.gamma(0.5, 2.0, size=(3, 200))
    adata = ad.AnnData(sparse.csr_matrix(rng.poisson(rates[truth]).astype(np.float32)))
    if "pca" in args.methods:
        C.run_pca_leiden(adata, truth)
    if "scvi" in args.methods:
        C.run_scvi_leiden(adata, truth, max_epochs=1, batch_size=args.batch_size, accelerator=args.accelerator)


def _progress(row: dict) -> None:
    keys = ("dataset", "method", "seed", "ari", "nmi", "n_clusters", "seconds")
    print(
        time.strftime("%H:%M:%S"),
        " ".join(f"{k}={row[k]:.3f}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys),
        flush=True,
    )


if __name__ == "__main__":
    main()
