"""Issue 8 benchmark: seconds per epoch and peak memory from 10^4 to 10^6 simulated cells x 2,000 genes.

    python benchmarks/bench_scale.py --threads 1                                   # 1e4, 1e5, 1e6 (backed)
    python benchmarks/bench_scale.py --sizes 10000 100000 --name scale_small --threads 1

Every size is measured in a fresh Python process (``--worker``), so its peak resident memory (``VmHWM`` of the
process: torch, the data and everything else) is its own. Data: ``scmixvae.data.simulate`` (10 types, 2,000
genes); sizes above ``--in-memory-max`` cells are written once to an ``.h5ad`` under ``--tmp`` (not the repository)
in chunks of 10^5 cells, each chunk a ``simulate`` call with its own seed (no more than one chunk is ever in
memory), and read back with ``anndata.read_h5ad(..., backed="r")``. ``--backed-all`` reads every size from disk.

In the worker: ``setup_anndata`` (the chunked count check), ``CplMixVAE`` (two agents, ``nb``,
random weights: the Leiden start is skipped and timed apart with ``--init``), then ``--epochs`` epochs of
``--steps`` minibatches of ``--batch-size`` cells (``limit_train_batches``). Seconds per epoch are extrapolated
from the mean step time of the epochs after the first to ``ceil(0.9 n / batch_size)`` steps (scvi-tools' 90%
training split); the table says so. scVI is timed the same way in its own worker, on the same file.

Writes ``benchmarks/results/{name}.json`` and ``.md``.
"""

from __future__ import annotations

# isort: off
import _threads  # noqa: F401  first: --threads sets the thread variables before numpy and torch start
# isort: on

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHUNK = 100_000


def _rss_mb() -> float:
    """Peak resident memory of this process, MiB: ``VmHWM`` (per address space, so a fresh one after ``exec``).

    ``ru_maxrss`` is not used on Linux: it survives ``execve`` and would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_simulated_h5ad(path: Path, n_cells: int, n_genes: int) -> None:
    """Write ``n_cells`` simulated cells to ``path`` in chunks of :data:`CHUNK` (each its own ``simulate`` seed)."""
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    from scmixvae.data import simulate

    tmp = path.with_suffix(".partial")
    with h5py.File(tmp, "w") as f:
        obs = []
        var = None
        for i, start in enumerate(range(0, n_cells, CHUNK)):
            chunk = simulate(n_cells=min(CHUNK, n_cells - start), n_genes=n_genes, n_types=10, seed=i)
            x = chunk.X.astype(np.float32)
            if i == 0:
                write_elem(f, "X", x)
                var = chunk.var[[]]
            else:
                sparse_dataset(f["X"]).append(x)
            obs.append(pd.DataFrame({"type": chunk.obs["type"].astype(str).to_numpy()}))
            print(f"  wrote cells {start:,}-{start + x.shape[0]:,}", flush=True)
            del chunk, x
        obs = pd.concat(obs, ignore_index=True)
        obs.index = [f"cell{i}" for i in range(len(obs))]
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
    tmp.rename(path)
    backed = ad.read_h5ad(path, backed="r")
    assert backed.shape == (n_cells, n_genes), backed.shape
    backed.file.close()


def worker(args) -> dict:
    """Measure one size in this (fresh) process and return a result row."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "scvi", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(args.threads)
    import anndata as ad
    import scvi

    sys.path.insert(0, str(HERE))
    from _common import EpochTimer

    from scmixvae.model import CplMixVAE

    row = {"n_cells": args.n, "method": args.method, "backed": args.path is not None}
    rss0 = _rss_mb()
    start = time.perf_counter()
    if args.path is not None:
        adata = ad.read_h5ad(args.path, backed="r")
    else:
        from scmixvae.data import simulate

        adata = simulate(n_cells=args.n, n_genes=args.n_genes, n_types=10, seed=0)
    row["load_seconds"] = time.perf_counter() - start
    row["rss_after_load_mb"] = _rss_mb()
    scvi.settings.seed = 0
    start = time.perf_counter()
    if args.method == "scVI":
        scvi.model.SCVI.setup_anndata(adata)
        model = scvi.model.SCVI(adata)
    else:
        CplMixVAE.setup_anndata(adata)
        model = CplMixVAE(adata, n_agents=2, n_categories=10)
        model.category_init_done_ = True  # random weights: the Leiden start is timed apart (--init)
    row["setup_seconds"] = time.perf_counter() - start
    if args.init:
        from scmixvae.model._start import fit_categorical_heads, initial_partition

        start = time.perf_counter()
        labels = initial_partition(model)
        row["leiden_init_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        fit_categorical_heads(model, labels)
        model.category_init_done_ = True
        row["head_fit_seconds"] = time.perf_counter() - start
        row["rss_after_init_mb"] = _rss_mb()
    timer = EpochTimer()
    # the epochs timed are those of every part (the state phase's steps are cheaper; bench_speed.py --state-phase)
    phase = {} if args.method == "scVI" else {"state_epochs": 0}
    model.train(
        **phase,
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        limit_train_batches=args.steps,
        limit_val_batches=0,
        enable_progress_bar=False,
        accelerator="cpu",
        devices=1,
        callbacks=[timer],
    )
    steps = min(args.steps, math.ceil(0.9 * args.n / args.batch_size))
    step = timer.seconds_per_epoch() / steps
    row["threads"] = timer.threads_used()
    row["ms_per_step"] = step * 1e3
    row["s_per_epoch_extrapolated"] = step * math.ceil(0.9 * args.n / args.batch_size)
    model.get_latent_representation(indices=list(range(min(args.n, 10_000))), batch_size=1000)  # a read-out
    row["peak_rss_mb"] = _rss_mb()
    row["peak_rss_growth_mb"] = row["peak_rss_mb"] - rss0
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--methods", nargs="+", default=["CplMixVAE", "scVI"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--in-memory-max", type=int, default=100_000, help="larger sizes are read backed from disk")
    p.add_argument("--backed-all", action="store_true", help="read every size from an on-disk .h5ad")
    p.add_argument("--init", action="store_true", help="also time the Leiden initialisation (CplMixVAE)")
    p.add_argument("--tmp", default="/tmp/scmixvae_scale", help="folder of the on-disk .h5ad files")
    p.add_argument("--name", default="scale")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("ROW " + json.dumps(worker(args)), flush=True)
        return

    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(args.threads)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    rows = []
    for n in args.sizes:
        path = None
        if args.backed_all or n > args.in_memory_max:
            path = Path(args.tmp) / f"sim_{n}x{args.n_genes}.h5ad"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                print(f"writing {path}", flush=True)
                write_simulated_h5ad(path, n, args.n_genes)
        for method in args.methods:
            cmd = [sys.executable, __file__, "--worker", "--n", str(n), "--method", method,
                   "--n-genes", str(args.n_genes), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--epochs", str(args.epochs), "--threads", str(args.threads)]  # fmt: skip
            if path is not None:
                cmd += ["--path", str(path)]
            if args.init and method == "CplMixVAE":
                cmd.append("--init")
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("ROW ")]
            if out.returncode != 0 or not lines:
                print(out.stderr[-3000:], file=sys.stderr)
                raise RuntimeError(f"worker for {method} at {n} cells failed (exit {out.returncode})")
            row = json.loads(lines[-1][4:])
            row["file_gb"] = path.stat().st_size / 1e9 if path is not None else None
            rows.append(row)
            print(row, flush=True)
    by_size = {(r["n_cells"], r["method"]): r for r in rows}
    for row in rows:
        ref = by_size.get((row["n_cells"], "scVI"))
        if ref is not None:
            row["ratio_to_scvi"] = row["ms_per_step"] / ref["ms_per_step"]
    sys.path.insert(0, str(HERE))
    from _common import write_results

    note = (
        f"Seconds per epoch extrapolated: mean step time over epochs 2-{args.epochs} of {args.steps} minibatches "
        f"of {args.batch_size} cells (limit_train_batches), times ceil(0.9 n / batch_size). peak_rss_mb: VmHWM "
        "of a fresh process per size and method (everything: Python, torch, the data). backed: read with "
        "anndata.read_h5ad(backed='r') from a file under /tmp written in chunks of 10^5 simulated cells.\n\n"
        f"Command: `python benchmarks/bench_scale.py {' '.join(argv or sys.argv[1:])}`"
    )
    write_results(args.name, rows, extra_md=note)


if __name__ == "__main__":
    main()
