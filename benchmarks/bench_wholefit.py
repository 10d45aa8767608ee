"""Issue 8 benchmark: wall time of the whole default fit with pruning against scVI's default ``train()``.

    python benchmarks/bench_wholefit.py --threads 1                        # 10^5 cells x 2,000 genes, 10 types
    python benchmarks/bench_wholefit.py --n-cells 5000 --name wholefit_smoke --threads 1

Data: ``scmixvae.data.simulate(n_cells, n_genes, n_types=10, seed=0)``. Each method runs in a fresh Python process
(``--worker``), so that its peak resident memory is its own; by default the two run one after the other
(``--parallel`` runs them side by side, each with ``--threads`` threads: only sensible with one thread each on a
machine with two free cores).

- CplMixVAE: ``CplMixVAE(adata)`` and ``model.train()``, all defaults: the number of types unknown, so the model
  starts from ``default_n_categories`` (50 here), uses ``augmentation="knn"``, trains its default epochs, prunes
  and selects ``K``. With ``--k-max K``: ``CplMixVAE(adata, n_categories=K)`` (augmentation ``"dropout"``) and
  ``model.prune()``. Wall time from the constructor to the end of ``prune`` (the Leiden start and the
  neighbour search included); chosen K, ARI and NMI of ``predict()``.
- scVI: ``SCVI(adata)`` and ``train()`` at its defaults (``max_epochs = min(round(20000 / n * 400), 400)``,
  batch 128, early stopping off), timed alone (the target's denominator), then neighbours and Leiden on its latent
  space at resolution 1 (scanpy defaults), timed as part of the whole pipeline. With ``--scvi-epochs N`` scVI trains
  only N epochs and its times are scaled to its default number of epochs (column ``extrapolated``; scVI's epochs
  take the same time each, no early stopping); its ARI is then that of the shorter training.

Target (issue 8): the whole CplMixVAE fit within 1.5x scVI's ``train()``. Writes ``benchmarks/results/{name}.json``
and ``.md``.
"""

from __future__ import annotations

# isort: off
import _threads  # noqa: F401  first: --threads sets the thread variables before numpy and torch start
# isort: on

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _data(args):
    from scmixvae.data import simulate

    return simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_types=args.n_types, seed=0)


def worker(args) -> dict:
    import numpy as np
    import scvi
    from _common import EpochTimer, clustering_scores, peak_rss_mb, quiet, run_scvi_leiden, set_threads

    set_threads(args.threads)
    quiet()
    adata = _data(args)
    truth = adata.obs["type"].astype(str).to_numpy()
    if args.worker == "scvi":
        default_epochs = min(round(20000 / adata.n_obs * 400), 400)  # scVI's train() heuristic
        epochs = default_epochs if args.scvi_epochs is None else min(args.scvi_epochs, default_epochs)
        res = run_scvi_leiden(adata, truth, seed=args.seed, max_epochs=epochs, accelerator=args.accelerator)
        scale = default_epochs / res["epochs"]  # 1 unless --scvi-epochs cut the training short
        return {
            "method": "scVI + Leiden", "n_clusters": res["n_clusters"], "ari": res["ari"], "nmi": res["nmi"],
            "epochs": default_epochs, "epochs_run": res["epochs"], "train_seconds": res["train_seconds"] * scale,
            "seconds": res["seconds"] + res["train_seconds"] * (scale - 1), "extrapolated": scale != 1,
            "threads": res["threads"], "peak_rss_mb": peak_rss_mb(),
        }  # fmt: skip
    from scmixvae.model import CplMixVAE

    scvi.settings.seed = args.seed
    timer = EpochTimer()  # the threads of every training epoch, the Leiden start's neighbour search before them
    start = time.perf_counter()
    CplMixVAE.setup_anndata(adata)
    if args.k_max is None:  # the default: the model chooses K, its first train() prunes
        model = CplMixVAE(adata, **args.model_kwargs)
        model.train(accelerator=args.accelerator, enable_progress_bar=False, callbacks=[timer])
    else:
        model = CplMixVAE(adata, n_categories=args.k_max, **args.model_kwargs)
        model.prune(accelerator=args.accelerator, enable_progress_bar=False, callbacks=[timer])
    history = model.pruning_history
    seconds = time.perf_counter() - start
    pred = model.predict().astype(str).to_numpy()
    return {
        "method": "CplMixVAE (prune)", "n_clusters": len(np.unique(pred)), **clustering_scores(truth, pred),
        "chosen_k": int(model.n_categories), "rounds": len(history),
        "epochs": int(history["epochs"].sum()), "train_seconds": seconds, "seconds": seconds,
        "threads": timer.threads_used(), "peak_rss_mb": peak_rss_mb(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-cells", type=int, default=100_000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--n-types", type=int, default=10)
    p.add_argument(
        "--k-max",
        type=int,
        default=None,
        help="n_categories to prune from, then model.prune(); default: CplMixVAE(adata).train()",
    )
    p.add_argument("--seed", type=int, default=0, help="model seed (the data always use seed 0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help='JSON, e.g. \'{"augmentation": "knn"}\'')
    p.add_argument(
        "--scvi-epochs",
        type=int,
        default=None,
        help="train scVI this many epochs and scale its time to its default number (flagged)",
    )
    p.add_argument("--only", choices=["cpl", "scvi"], default=None, help="run one of the two workers")
    p.add_argument("--parallel", action="store_true", help="run the two workers side by side")
    p.add_argument("--name", default="wholefit")
    p.add_argument("--worker", choices=["cpl", "scvi"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args)))
        return

    from _common import write_results

    own = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--parallel"]
    procs, outs = {}, {}
    for kind in ("cpl", "scvi") if args.only is None else (args.only,):
        outs[kind] = Path(f"/tmp/scmixvae_wholefit_{os.getpid()}_{kind}.json")
        cmd = [sys.executable, __file__, *own, "--worker", kind, "--out", str(outs[kind])]
        procs[kind] = subprocess.Popen(cmd)
        if not args.parallel:
            procs[kind].wait()
    rows, failed = [], []
    for kind, proc in procs.items():
        if proc.wait() != 0 or not outs[kind].exists():
            failed.append(kind)
            continue
        rows.append({"dataset": f"sim_{args.n_cells}x{args.n_genes}_{args.n_types}types",
                     **json.loads(outs[kind].read_text())})  # fmt: skip
        outs[kind].unlink()
    scvi_train = next((r["train_seconds"] for r in rows if r["method"].startswith("scVI")), None)
    for row in rows:
        row["ratio_to_scvi_train"] = row["seconds"] / scvi_train if scvi_train else None
    command = " ".join(argv if argv is not None else sys.argv[1:])
    note = (
        "CplMixVAE: constructor to the end of "
        + (
            "`CplMixVAE(adata).train()` (all defaults). "
            if args.k_max is None
            else f"`prune()` from K_max = {args.k_max}. "
        )
        + "scVI: default "
        "`train()`; `train_seconds` is the training alone (the ratio's denominator), `seconds` adds neighbours and "
        f"Leiden. {'Side by side' if args.parallel else 'One after the other'}, {args.threads} thread(s) each."
        + (f" Failed workers: {failed}." if failed else "")
        + f"\n\nCommand: `python benchmarks/bench_wholefit.py {command}`"
    )
    write_results(args.name, rows, extra_md=note)
    if failed:
        raise SystemExit(f"worker(s) failed: {failed}")


if __name__ == "__main__":
    main()
