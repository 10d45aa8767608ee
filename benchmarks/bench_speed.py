"""Issue 8 benchmark: seconds per epoch against scVI on simulated data, and achieved FLOP/s of a training step.

    python benchmarks/bench_speed.py --threads 1                                  # 10^5 cells x 2,000 genes
    python benchmarks/bench_speed.py --n-cells 20000 --steps 30 --name speed_smoke

For each batch size, scVI (default model: ZINB, 128 hidden units) and CplMixVAE (two agents, ``nb`` and
``gaussian``) train one after the other in this process on the same simulated AnnData (``scmixvae.data.simulate``)
for ``--epochs`` epochs of ``--steps`` minibatches each (``limit_train_batches``; no validation). The first epoch
is dropped; seconds per full epoch are the mean time per step times the number of minibatches of a whole epoch
(``ceil(n_cells / batch_size)``), an extrapolation the table says it is. ``--repeats`` runs every model that many
times, interleaved, and keeps each one's fastest run (the machine is shared). Ratios are to scVI in the same run.

FLOP/s: ``torch.utils.flop_counter.FlopCounterMode`` counts the floating-point operations of one forward and
backward pass of the loss (matrix products, as the counter does); divided by the measured seconds per step it gives
the achieved rate, next to this machine's single-thread peak measured on a large ``torch.mm``.

Each row gives ``threads``, torch's thread count while the method trained (read at every epoch).

``--side-by-side`` measures instead what two fits on one machine do to each other: each method (scVI, and
CplMixVAE with ``n_categories`` given, so the fit starts with its Leiden partition and neighbour search) trains
alone in a fresh process with ``OMP_NUM_THREADS`` set to ``--threads``, then twice at once; seconds per epoch
side by side over alone is the slowdown (2 cores: about 1 when each fit keeps to one thread)::

    python benchmarks/bench_speed.py --side-by-side --n-cells 2000 --n-genes 500 --epochs 20 --threads 1

It writes ``speed_side_by_side`` unless ``--name`` is given.

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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def matmul_peak_gflops(size: int = 2048, repeats: int = 5, device: str = "cpu", dtype: str = "float32") -> float:
    """Best GFLOP/s of ``torch.mm`` on two ``size x size`` matrices of ``dtype`` (``2 size^3`` FLOPs per product)."""
    import torch

    a = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def step_flops(model, batch_size: int, *, state_phase: bool = False) -> int:
    """FLOPs of one training step's forward and backward pass (``FlopCounterMode``: matrix products).

    ``state_phase``: a step of the state phase (categorical path frozen).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    module = model.module
    loader = model._make_data_loader(adata=model.adata, batch_size=batch_size, shuffle=True)
    tensors = next(iter(loader))
    tensors = {k: v.to(module.device) if hasattr(v, "to") else v for k, v in tensors.items()}
    module.train()
    if state_phase:  # a CplMixVAE module only
        module.categories_frozen = True
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            _, _, loss = module(tensors)
            loss.loss.backward()
    finally:
        if state_phase:
            module.categories_frozen = False
    module.zero_grad(set_to_none=True)
    torch.set_grad_enabled(True)
    return int(counter.get_total_flops())


def _time_model(kind: str, adata, batch_size: int, args, likelihood: str | None = None) -> tuple[float, object, str]:
    import scvi
    from _common import EpochTimer

    from scmixvae.model import CplMixVAE

    scvi.settings.seed = 0
    kw = {
        "max_epochs": args.epochs,
        "batch_size": batch_size,
        "enable_progress_bar": False,
        "limit_train_batches": args.steps,
        "train_size": 1.0,
        "accelerator": args.accelerator,
        "devices": 1,
    }
    if args.precision:
        kw["precision"] = args.precision
    timer = EpochTimer()
    if kind == "scvi":
        scvi.model.SCVI.setup_anndata(adata)
        model = scvi.model.SCVI(adata)
        model.train(callbacks=[timer], **kw)
    else:
        CplMixVAE.setup_anndata(adata)
        model = CplMixVAE(adata, n_agents=2, n_categories=10, likelihood=likelihood, **args.model_kwargs)
        model.category_init_done_ = True  # random weights: no Leiden start
        plan = {"compile": True} if args.compile else {}
        if args.state_phase:  # the state phase's steps (categorical path frozen) from the first epoch
            plan["state_phase_start"] = 0
        # the steps of one phase at a time: no state phase appended to the timed epochs
        model.train(callbacks=[timer], plan_kwargs=plan or None, state_epochs=0, **kw)
    steps = min(args.steps, math.ceil(adata.n_obs / batch_size))
    return timer.seconds_per_epoch() / steps, model, timer.threads_used()


def _side_by_side_worker(args) -> dict:
    """One fit in this process (threads from the environment only, as a user sets them): seconds per epoch."""
    import scvi
    from _common import EpochTimer, quiet

    from scmixvae.data import simulate
    from scmixvae.model import CplMixVAE

    quiet()
    adata = simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_types=6, seed=0)
    scvi.settings.seed = 0
    timer = EpochTimer()
    kw = {"max_epochs": args.epochs, "batch_size": 128, "enable_progress_bar": False, "callbacks": [timer]}
    if args.side_worker == "scvi":
        scvi.model.SCVI.setup_anndata(adata)
        scvi.model.SCVI(adata).train(**kw)
    else:
        CplMixVAE.setup_anndata(adata)
        CplMixVAE(adata, n_categories=6).train(state_epochs=0, **kw)
    return {"s_per_epoch": timer.seconds_per_epoch(), "threads": timer.threads_used()}


def side_by_side(args, argv: list[str]) -> None:
    """Each method alone, then two of it at once, each in a fresh process; rows of seconds per epoch."""
    import subprocess
    import tempfile

    from _common import write_results

    # each fit as a user starts it: OMP_NUM_THREADS exported, no other thread setting
    user_env = {key: value for key, value in os.environ.items() if not key.endswith("_NUM_THREADS")}
    user_env["OMP_NUM_THREADS"] = str(args.threads)
    rows = []
    for method in ("scvi", "cpl"):
        alone = None
        for n_at_once in (1, 2):
            outs = [Path(tempfile.mkstemp(suffix=".json")[1]) for _ in range(n_at_once)]
            cmd = [sys.executable, __file__, *argv, "--side-worker", method, "--omp-only"]
            procs = [subprocess.Popen([*cmd, "--out", str(out)], env=user_env) for out in outs]
            if any(proc.wait() != 0 for proc in procs):
                raise SystemExit(f"a {method} worker failed")
            results = [json.loads(out.read_text()) for out in outs]
            for out in outs:
                out.unlink()
            seconds = sum(r["s_per_epoch"] for r in results) / n_at_once
            alone = seconds if n_at_once == 1 else alone
            rows.append({
                "dataset": f"sim_{args.n_cells}x{args.n_genes}", "method": "scVI" if method == "scvi" else
                "CplMixVAE (K given, Leiden start)", "fits_at_once": n_at_once,
                "threads": ",".join(r["threads"] for r in results), "s_per_epoch": seconds,
                "ratio_to_alone": seconds / alone,
            })  # fmt: skip
            print(rows[-1], flush=True)
    note = (
        f"Each fit in a fresh process with OMP_NUM_THREADS={args.threads} (nothing else set), {args.epochs} epochs "
        "of batch 128, the first dropped; `threads`: torch's count during each fit's epochs; `ratio_to_alone`: "
        "seconds per epoch of the fits side by side over the same method alone.\n\n"
        f"Command: `python benchmarks/bench_speed.py {' '.join(argv)}`"
    )
    write_results(args.name or "speed_side_by_side", rows, extra_md=note)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-cells", type=int, default=100_000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 1000])
    p.add_argument("--likelihoods", nargs="+", default=["nb", "gaussian"])
    p.add_argument("--steps", type=int, default=60, help="minibatches timed per epoch (limit_train_batches)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per fit; the first is dropped")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default=None, help="Lightning precision, e.g. 16-mixed or bf16-mixed on a GPU")
    p.add_argument(
        "--state-phase", action="store_true", help="time the steps of the state phase (categorical path frozen)"
    )
    p.add_argument("--compile", action="store_true", help="plan_kwargs={'compile': True} (torch.compile)")
    p.add_argument("--side-by-side", action="store_true", help="two fits at once against one alone (see above)")
    p.add_argument("--side-worker", choices=["scvi", "cpl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--omp-only", action="store_true", help=argparse.SUPPRESS)  # read by _threads
    p.add_argument("--name", default=None, help="result file (default: speed, or speed_side_by_side)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help='JSON, e.g. \'{"state_encoder": "separate"}\'')
    args = p.parse_args(argv)
    if args.side_worker:
        Path(args.out).write_text(json.dumps(_side_by_side_worker(args)))
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    if args.side_by_side:
        side_by_side(args, argv if argv is not None else sys.argv[1:])
        return
    import torch
    from _common import quiet, set_threads, write_results

    from scmixvae.data import simulate

    set_threads(args.threads)
    quiet()
    device = "cuda" if args.accelerator in ("gpu", "cuda") and torch.cuda.is_available() else "cpu"
    # On a GPU the peak is that of the precision the step runs in: float32 (TF32 off, torch's default) or the
    # 16-bit type of mixed precision, on 8192 x 8192 products; on a CPU float32 on 2048 x 2048.
    peak_dtype = "float32"
    if device == "cuda" and args.precision:
        peak_dtype = "bfloat16" if "bf16" in args.precision else "float16"
    peak_size = 8192 if device == "cuda" else 2048
    peak = matmul_peak_gflops(size=peak_size, device=device, dtype=peak_dtype)
    print(f"matmul peak: {peak:.1f} GFLOP/s ({device}, {peak_dtype})", flush=True)
    adata = simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_types=10, seed=0)
    dataset = f"sim_{args.n_cells}x{args.n_genes}"
    rows = []
    for batch_size in args.batch_sizes:
        configs = [("scvi", None)] + [("cpl", lik) for lik in args.likelihoods]
        best: dict[tuple, float] = {}
        flops: dict[tuple, int] = {}
        threads: dict[tuple, str] = {}
        for _ in range(args.repeats):
            for kind, lik in configs:
                seconds, model, threads[(kind, lik)] = _time_model(kind, adata.copy(), batch_size, args, lik)
                best[(kind, lik)] = min(best.get((kind, lik), math.inf), seconds)
                if (kind, lik) not in flops:
                    flops[(kind, lik)] = step_flops(model, batch_size, state_phase=args.state_phase and kind != "scvi")
                print(kind, lik, batch_size, f"{seconds * 1e3:.1f} ms/step", flush=True)
        steps_per_epoch = math.ceil(args.n_cells / batch_size)
        scvi_step = best[("scvi", None)]
        phase = " state phase" if args.state_phase else ""
        for kind, lik in configs:
            step = best[(kind, lik)]
            gflops = flops[(kind, lik)] / 1e9
            rows.append({
                "dataset": dataset, "method": "scVI" if kind == "scvi" else f"CplMixVAE[{lik}] A=2{phase}",
                "batch_size": batch_size, "threads": threads[(kind, lik)], "ms_per_step": step * 1e3,
                "s_per_epoch_extrapolated": step * steps_per_epoch, "ratio_to_scvi": step / scvi_step,
                "cells_per_s": batch_size / step, "gflop_per_step": gflops, "achieved_gflops": gflops / step,
                "peak_gflops": peak,
                "fraction_of_peak": gflops / step / peak,
            })  # fmt: skip
            print(rows[-1], flush=True)
    command = " ".join(argv or sys.argv[1:])
    note = (
        f"Seconds per epoch extrapolated from {args.steps} timed minibatches per epoch ({args.epochs} epochs, the "
        f"first dropped, fastest of {args.repeats} interleaved runs) to ceil(n_cells / batch_size) minibatches. "
        "FLOPs: FlopCounterMode, forward + backward of one minibatch (matrix products only); peak: torch.mm "
        f"{peak_size} x {peak_size} {peak_dtype} on {device} in this process.\n\n"
        f"Command: `python benchmarks/bench_speed.py {command}`"
    )
    write_results(args.name or "speed", rows, extra_md=note)


if __name__ == "__main__":
    main()
