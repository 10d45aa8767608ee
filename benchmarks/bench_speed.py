"""Speed and memory against scVI: seconds per step, the whole fit, 10^4 to 10^6 cells, two fits side by side.

    python benchmarks/bench_speed.py --threads 1                                    # every part (hours)
    python benchmarks/bench_speed.py --parts throughput --likelihoods gaussian nb --steps 30 --repeats 3 --threads 1
    python benchmarks/bench_speed.py --n-cells 3000 --n-genes 300 --steps 5 --epochs 2 --repeats 1 \
        --scale-sizes 2000 5000 --in-memory-max 3000 --scale-steps 5 --scale-epochs 2 --tmp /tmp/x/scale \
        --wholefit-cells 1000 --scvi-epochs 2 --wholefit-train '{"max_epochs": 2, "state_epochs": 0, "n_restarts": 1,
        "prune_kwargs": {"max_rounds": 1, "epochs_per_round": 1}}' --side-cells 1000 --side-genes 200 \
        --side-epochs 2 --out /tmp/x --threads 1                   # smoke test, minutes

All data come from ``scmixvae.data.simulate`` (10 types). Every CplMixVAE has two agents. Parts (``--parts``; each
adds its rows, with a ``part`` column, to the one result file ``{--out}/{--name}``, default
``benchmarks/results/speed``):

- ``throughput``: scVI (default model) and CplMixVAE (``n_categories=10``, each ``--likelihoods``) on
  ``--n-cells`` x ``--n-genes`` at each ``--batch-sizes``, in this process: ``--epochs`` epochs of ``--steps``
  minibatches (``limit_train_batches``), the first dropped, fastest of ``--repeats`` interleaved runs; seconds
  per epoch extrapolated to ``ceil(n_cells / batch_size)`` steps. Each model is created once: its first
  ``train()`` (the Leiden start of CplMixVAE) is not timed. FLOPs of one step: ``FlopCounterMode`` around the
  first training step of a ``train()`` (matrix products: forward, backward), against the peak of a ``torch.mm`` here.
  ``--precision`` and ``--compile`` (``plan_kwargs={"compile": True}``) for GPUs (``gpu.sh``).
- ``wholefit``: ``CplMixVAE(adata).train()`` with every default (K unknown: start, training, pruning,
  restarts, state phase; ``--wholefit-train`` to change them) against scVI's default ``train()``
  (``--scvi-epochs N``: N epochs, times scaled to its default number and flagged ``extrapolated``) and Leiden on
  its latent, on ``--wholefit-cells`` cells, each in a fresh process: chosen K, ARI, NMI, seconds, peak memory.
- ``scale``: one fresh process per size of ``--scale-sizes`` and method; sizes above ``--in-memory-max`` are
  written once under ``--tmp`` in chunks of 10^5 cells and read with ``read_h5ad(backed="r")``. Load and set-up
  seconds, ``start_seconds`` (the first ``train()`` call less its epochs: CplMixVAE's Leiden start), milliseconds
  per step, seconds per epoch extrapolated to ``ceil(n / 128)`` steps (every cell trains), peak resident memory of
  the process.
- ``side-by-side``: each method (scVI; CplMixVAE with K given) alone in a fresh process with only
  ``OMP_NUM_THREADS`` set (to ``--threads``), then two at once: ``ratio_to_alone`` is the slowdown of sharing.
"""

from __future__ import annotations

# isort: off
import _threads  # noqa: F401  first: --threads sets the thread variables before numpy and torch start
# isort: on

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS_DIR  # noqa: E402

CHUNK = 100_000


def matmul_peak_gflops(size: int, device: str, dtype: str, repeats: int = 5) -> float:
    """Best GFLOP/s of ``torch.mm`` on two ``size x size`` matrices (``2 size^3`` FLOPs per product)."""
    import torch

    a, b = (torch.randn(size, size, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    torch.mm(a, b)
    best = math.inf
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _models(adata, args) -> dict[str, object]:
    """scVI and one CplMixVAE per likelihood, each trained one step (the start is done once, untimed)."""
    import scvi

    from scmixvae.model import CplMixVAE

    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata)
    models = {"scVI": scvi.model.SCVI(adata)}
    CplMixVAE.setup_anndata(adata)
    for lik in args.likelihoods:
        models[f"CplMixVAE[{lik}] A=2"] = CplMixVAE(adata, n_agents=2, n_categories=10, likelihood=lik)
    for model in models.values():
        _train(model, args, max_epochs=1, limit_train_batches=1)
    return models


def _train(model, args, **kw) -> None:
    kw = {"train_size": 1.0, "accelerator": args.accelerator, "devices": 1, "enable_progress_bar": False, **kw}
    if args.precision:
        kw["precision"] = args.precision
    if type(model).__name__ == "CplMixVAE":  # the steps of every part only: no state phase
        kw |= {"state_epochs": 0, "plan_kwargs": {"compile": True} if args.compile else None}
    model.train(**kw)


def step_flops_callback():
    """A Lightning callback counting the FLOPs of the first training step (forward, backward, optimiser) only.

    Counting around a whole ``train()`` would add what runs after the steps: CplMixVAE's pass over every cell
    that sets its batch norms' statistics from the real cells.
    """
    from lightning.pytorch.callbacks import Callback
    from torch.utils.flop_counter import FlopCounterMode

    class StepFlops(Callback):
        def __init__(self) -> None:
            self.flops, self._counter = None, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.flops is None:
                self._counter = FlopCounterMode(display=False)
                self._counter.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self._counter is not None:
                self._counter.__exit__(None, None, None)
                self.flops, self._counter = self._counter.get_total_flops(), None

    return StepFlops()


def part_throughput(args) -> list[dict]:
    import torch
    from _common import EpochTimer

    from scmixvae.data import simulate

    device = "cuda" if args.accelerator in ("gpu", "cuda") and torch.cuda.is_available() else "cpu"
    dtype = {"bf16": "bfloat16", "16": "float16"}.get((args.precision or "32").split("-")[0], "float32")
    peak_size = 8192 if device == "cuda" else 2048
    peak = matmul_peak_gflops(peak_size, device, dtype if device == "cuda" else "float32")
    adata = simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_types=10, seed=0)
    models = _models(adata, args)
    rows = []
    for batch_size in args.batch_sizes:
        best, threads, flops = {}, {}, {}
        for _, (name, model) in ((r, m) for r in range(args.repeats) for m in models.items()):
            timer = EpochTimer()
            _train(model, args, max_epochs=args.epochs, batch_size=batch_size, limit_train_batches=args.steps,
                   callbacks=[timer])  # fmt: skip
            step = timer.seconds_per_epoch() / min(args.steps, math.ceil(args.n_cells / batch_size))
            best[name], threads[name] = min(best.get(name, math.inf), step), timer.threads_used()
            if name not in flops:
                counter = step_flops_callback()
                _train(model, args, max_epochs=1, batch_size=batch_size, limit_train_batches=1, callbacks=[counter])
                flops[name] = counter.flops / 1e9
        for name, step in best.items():
            rows.append({
                "part": "throughput", "dataset": f"sim_{args.n_cells}x{args.n_genes}", "method": name,
                "batch_size": batch_size, "threads": threads[name], "ms_per_step": step * 1e3,
                "s_per_epoch_extrapolated": step * math.ceil(args.n_cells / batch_size),
                "ratio_to_scvi": step / best["scVI"], "cells_per_s": batch_size / step,
                "gflop_per_step": flops[name], "achieved_gflops": flops[name] / step, "peak_gflops": peak,
                "fraction_of_peak": flops[name] / step / peak, "precision": args.precision or "32",
            })  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def worker_wholefit(spec: dict, args) -> dict:
    """The whole default fit of one method on simulated cells, in this (fresh) process."""
    import numpy as np
    import scvi
    from _common import EpochTimer, Timer, clustering_scores, peak_rss_mb, run_scvi_leiden

    from scmixvae.data import simulate
    from scmixvae.model import CplMixVAE

    adata = simulate(n_cells=spec["n"], n_genes=args.n_genes, n_types=10, seed=0)
    truth = adata.obs["type"].astype(str).to_numpy()
    if spec["method"] == "scVI":
        default = min(round(20000 / adata.n_obs * 400), 400)  # scVI's train() heuristic
        res = run_scvi_leiden(adata, truth, max_epochs=min(args.scvi_epochs or default, default))
        scale = default / res["epochs"]  # 1 unless --scvi-epochs cut the training short
        return {"method": "scVI+Leiden", "n_clusters": res["n_clusters"], "ari": res["ari"], "nmi": res["nmi"],
                "epochs": default, "train_seconds": res["train_seconds"] * scale,
                "seconds": res["seconds"] + res["train_seconds"] * (scale - 1), "extrapolated": scale != 1,
                "threads": res["threads"], "peak_rss_mb": peak_rss_mb()}  # fmt: skip
    scvi.settings.seed = 0
    epochs = EpochTimer()
    with Timer(memory=False) as timer:
        CplMixVAE.setup_anndata(adata)
        model = CplMixVAE(adata)
        model.train(accelerator=args.accelerator, enable_progress_bar=False, callbacks=[epochs], **args.wholefit_train)
    pred = model.predict().astype(str).to_numpy()
    return {"method": "CplMixVAE", "n_clusters": int(np.unique(pred).size), **clustering_scores(truth, pred),
            "chosen_k": int(model.n_categories), "restarts": len(model.restart_history) or 1,
            "epochs": len(model.history["train_loss"]), "train_seconds": timer.seconds, "seconds": timer.seconds,
            "threads": epochs.threads_used(), "peak_rss_mb": peak_rss_mb()}  # fmt: skip


def write_backed(path: Path, n_cells: int, n_genes: int) -> None:
    """Write ``n_cells`` simulated cells to ``path`` in chunks of :data:`CHUNK` cells (one in memory at a time)."""
    import h5py
    import numpy as np
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    from scmixvae.data import simulate

    tmp = path.with_suffix(".partial")
    with h5py.File(tmp, "w") as f:
        for i, start in enumerate(range(0, n_cells, CHUNK)):
            chunk = simulate(n_cells=min(CHUNK, n_cells - start), n_genes=n_genes, n_types=10, seed=i)
            x = chunk.X.astype(np.float32)
            if i == 0:
                write_elem(f, "X", x)
            else:
                sparse_dataset(f["X"]).append(x)
        write_elem(f, "obs", pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]))
        write_elem(f, "var", chunk.var[[]])
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
    tmp.rename(path)


def worker_scale(spec: dict, args) -> dict:
    """Load, set up and train one size and method in this (fresh) process; times and peak memory."""
    import anndata as ad
    import scvi
    from _common import EpochTimer, peak_rss_mb

    from scmixvae.data import simulate
    from scmixvae.model import CplMixVAE

    n, row = spec["n"], {"n_cells": spec["n"], "method": spec["method"], "backed": spec["path"] is not None}
    start = time.perf_counter()
    if spec["path"]:
        adata = ad.read_h5ad(spec["path"], backed="r")
    else:
        adata = simulate(n_cells=n, n_genes=args.n_genes, n_types=10, seed=0)
    row["load_seconds"], row["rss_after_load_mb"] = time.perf_counter() - start, peak_rss_mb()
    scvi.settings.seed = 0
    start = time.perf_counter()
    if spec["method"] == "scVI":
        scvi.model.SCVI.setup_anndata(adata)
        model = scvi.model.SCVI(adata)
    else:
        CplMixVAE.setup_anndata(adata)
        model = CplMixVAE(adata, n_agents=2, n_categories=10)
    row["setup_seconds"] = time.perf_counter() - start
    timer, start = EpochTimer(), time.perf_counter()
    _train(model, args, max_epochs=args.scale_epochs, batch_size=128, limit_train_batches=args.scale_steps,
           callbacks=[timer])  # fmt: skip
    row["start_seconds"] = time.perf_counter() - start - sum(timer.durations)
    step = timer.seconds_per_epoch() / min(args.scale_steps, math.ceil(n / 128))
    row |= {"threads": timer.threads_used(), "ms_per_step": step * 1e3,
            "s_per_epoch_extrapolated": step * math.ceil(n / 128)}  # fmt: skip
    model.get_latent_representation(indices=list(range(min(n, 10_000))), batch_size=1000)  # a read-out
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def worker_side(spec: dict, args) -> dict:
    """One fit as a user starts it (threads from ``OMP_NUM_THREADS`` only): seconds per epoch."""
    import scvi
    from _common import EpochTimer

    from scmixvae.data import simulate
    from scmixvae.model import CplMixVAE

    adata = simulate(n_cells=args.side_cells, n_genes=args.side_genes, n_types=6, seed=0)
    scvi.settings.seed = 0
    timer = EpochTimer()
    kw = {"max_epochs": args.side_epochs, "enable_progress_bar": False, "callbacks": [timer]}
    if spec["method"] == "scVI":
        scvi.model.SCVI.setup_anndata(adata)
        scvi.model.SCVI(adata).train(**kw)
    else:
        CplMixVAE.setup_anndata(adata)
        CplMixVAE(adata, n_categories=6).train(state_epochs=0, **kw)
    return {"s_per_epoch": timer.seconds_per_epoch(), "threads": timer.threads_used()}


WORKERS = {"wholefit": worker_wholefit, "scale": worker_scale, "side-by-side": worker_side}


def run_workers(specs: list[dict], argv: list[str], *, omp_only: int | None = None) -> list[dict]:
    """Run one fresh worker process per spec, all at once; their rows in order.

    ``omp_only``: start them as a user does, with only ``OMP_NUM_THREADS`` set, to this value.
    """
    env = dict(os.environ)
    if omp_only is not None:
        env = {k: v for k, v in env.items() if not k.endswith("_NUM_THREADS")} | {"OMP_NUM_THREADS": str(omp_only)}
    extra = ["--omp-only"] if omp_only is not None else []
    cmds = [[sys.executable, __file__, *argv, *extra, "--worker", json.dumps(s)] for s in specs]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for cmd in cmds]
    rows = []
    for spec, proc in zip(specs, procs, strict=True):
        lines = [line for line in proc.communicate()[0].splitlines() if line.startswith("ROW ")]
        if proc.returncode or not lines:
            raise SystemExit(f"worker {spec} failed (exit {proc.returncode})")
        rows.append(json.loads(lines[-1][4:]))
    return rows


def part_wholefit(args, argv: list[str]) -> list[dict]:
    rows = [run_workers([{"part": "wholefit", "n": args.wholefit_cells, "method": m}], argv)[0] for m in
            ("CplMixVAE", "scVI")]  # fmt: skip
    for row in rows:
        row |= {"part": "wholefit", "dataset": f"sim_{args.wholefit_cells}x{args.n_genes}_10types",
                "ratio_to_scvi_train": row["seconds"] / rows[1]["train_seconds"]}  # fmt: skip
    return [{"part": r.pop("part"), "dataset": r.pop("dataset"), **r} for r in rows]


def part_scale(args, argv: list[str]) -> list[dict]:
    rows = []
    for n in args.scale_sizes:
        path = None
        if n > args.in_memory_max:
            path = Path(args.tmp) / f"sim_{n}x{args.n_genes}.h5ad"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                write_backed(path, n, args.n_genes)
        for method in ("CplMixVAE", "scVI"):
            spec = {"part": "scale", "n": n, "method": method, "path": str(path) if path else None}
            rows.append({"part": "scale", **run_workers([spec], argv)[0]})
            rows[-1]["file_gb"] = path.stat().st_size / 1e9 if path else None
            print(rows[-1], flush=True)
        rows[-2]["ratio_to_scvi"] = rows[-2]["ms_per_step"] / rows[-1]["ms_per_step"]
    return rows


def part_side(args, argv: list[str]) -> list[dict]:
    rows = []
    for method in ("scVI", "CplMixVAE"):
        for at_once in (1, 2):
            results = run_workers([{"part": "side-by-side", "method": method}] * at_once, argv, omp_only=args.threads)
            seconds = sum(r["s_per_epoch"] for r in results) / at_once
            alone = seconds if at_once == 1 else rows[-1]["s_per_epoch"]
            rows.append({"part": "side-by-side", "dataset": f"sim_{args.side_cells}x{args.side_genes}",
                         "method": method if method == "scVI" else "CplMixVAE (K given)", "fits_at_once": at_once,
                         "threads": ",".join(r["threads"] for r in results), "s_per_epoch": seconds,
                         "ratio_to_alone": seconds / alone})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["throughput", "wholefit", "scale", "side-by-side"],
                   choices=["throughput", "wholefit", "scale", "side-by-side"])  # fmt: skip
    p.add_argument("--n-cells", type=int, default=100_000, help="throughput")
    p.add_argument("--n-genes", type=int, default=2000, help="throughput, wholefit, scale")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 1000], help="throughput")
    p.add_argument("--likelihoods", nargs="+", default=["gaussian", "nb"], help="throughput")
    p.add_argument("--steps", type=int, default=30, help="throughput: minibatches timed per epoch")
    p.add_argument("--epochs", type=int, default=3, help="throughput: epochs per run, the first dropped")
    p.add_argument("--repeats", type=int, default=3, help="throughput: interleaved runs, the fastest kept")
    p.add_argument("--precision", default=None, help="throughput: Lightning precision, e.g. bf16-mixed on a GPU")
    p.add_argument("--compile", action="store_true", help="throughput: plan_kwargs={'compile': True}")
    p.add_argument("--wholefit-cells", type=int, default=5000)
    p.add_argument("--wholefit-train", type=json.loads, default={}, help="wholefit: CplMixVAE's train() kwargs, JSON")
    p.add_argument("--scvi-epochs", type=int, default=None, help="wholefit: scVI epochs, times scaled to its default")
    p.add_argument("--scale-sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    p.add_argument("--scale-steps", type=int, default=50)
    p.add_argument("--scale-epochs", type=int, default=3)
    p.add_argument("--in-memory-max", type=int, default=100_000, help="scale: larger sizes are read backed")
    p.add_argument("--tmp", default="/tmp/scmixvae_scale", help="scale: folder of the on-disk .h5ad files")
    p.add_argument("--side-cells", type=int, default=2000)
    p.add_argument("--side-genes", type=int, default=500)
    p.add_argument("--side-epochs", type=int, default=20)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--omp-only", action="store_true", help=argparse.SUPPRESS)  # read by _threads
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the result files")
    p.add_argument("--name", default="speed")
    p.add_argument("--worker", type=json.loads, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from _common import quiet, set_threads, write_results

    quiet()
    if args.worker:
        if not args.omp_only:
            set_threads(args.threads)
        print("ROW " + json.dumps(WORKERS[args.worker["part"]](args.worker, args)), flush=True)
        return
    set_threads(args.threads)
    parts = {"throughput": lambda: part_throughput(args), "wholefit": lambda: part_wholefit(args, argv),
             "scale": lambda: part_scale(args, argv), "side-by-side": lambda: part_side(args, argv)}  # fmt: skip
    rows = [row for part in args.parts for row in parts[part]()]
    note = (
        "throughput: seconds per epoch extrapolated from the timed minibatches; FLOPs: FlopCounterMode over one "
        "training step (matrix products); peak: torch.mm here. wholefit: constructor to the end of train(); "
        "scVI's `train_seconds` is the ratio's denominator. scale: `peak_rss_mb` is the VmHWM of a fresh process "
        "per size and method. side-by-side: fresh processes with OMP_NUM_THREADS only."
    )
    write_results(args.name, rows, extra_md=note, out=args.out)


if __name__ == "__main__":
    main()
