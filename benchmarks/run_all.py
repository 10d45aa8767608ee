"""Run the benchmark suite in one command and write a combined results file.

    python benchmarks/run_all.py --threads 1                 # the full suite: a day or more on one thread
    python benchmarks/run_all.py --threads 1 --quick         # every script on small settings: minutes
    python benchmarks/run_all.py --only speed pruning --threads 1

Each script runs in its own process, one after the other, with ``--threads`` passed on and the thread variables
(``OMP_NUM_THREADS``...) set; a failing script is reported and the others still run. Every script writes its own
``{out}/{name}.json`` and ``.md`` (``--out``, default ``benchmarks/results``); this one then writes
``{out}/all.md`` (and ``.json``, not committed): one row per script (result name, exit status, wall seconds, rows)
followed by every script's table. ``--quick`` writes to ``/tmp/scmixvae_bench_quick`` unless ``--out`` is given,
so that it never overwrites the full results.
"""

from __future__ import annotations

# isort: off
import _threads  # noqa: F401  first: --threads sets the thread variables before numpy and torch start
# isort: on

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
QUICK = Path("/tmp/scmixvae_bench_quick")

#: name -> (script, arguments of the full run, arguments of the quick run). Result file stem = name. The full
#: arguments are those each stored result file records (its command), but the folders of the cached fits.
_REAL_QUICK = ["--seeds", "0", "1", "--max-epochs", "2", "--scvi-epochs", "2", "--state-epochs", "0"]
_CPL_QUICK = ["--restarts", "1", "--prune-kwargs", '{"max_rounds": 1, "epochs_per_round": 1}']
SUITE: dict[str, tuple[str, list[str], list[str]]] = {
    "real": (
        "bench_real.py",
        ["--methods", "cpl", "scvi", "pca", "--seeds", "0", "1", "2", "3", "4", "--state-epochs", "0",
         "--jobs", "2", "--fits", "/tmp/scmixvae_fits"],
        ["--methods", "cpl", "scvi", "pca", "--datasets", "pbmc", *_REAL_QUICK, *_CPL_QUICK,
         "--fits", "/tmp/scmixvae_fits_quick"],
    ),
    "real_condition": (
        "bench_real.py",
        ["--methods", "cpl", "scvi", "pca", "--datasets", "ifnb", "--condition", "none", "registered", "--seeds",
         "0", "1", "2", "3", "4", "--state-epochs", "0", "--jobs", "2", "--fits", "/tmp/scmixvae_fits_condition",
         "--name", "real_condition"],
        ["--methods", "cpl", "scvi", "pca", "--datasets", "ifnb", "--condition", "none", "registered", *_REAL_QUICK,
         *_CPL_QUICK, "--fits", "/tmp/scmixvae_fits_condition_quick", "--name", "real_condition"],
    ),
    "real_k": (
        "bench_real.py",
        ["--methods", "cpl-k", "scvi", "pca", "--seeds", "0", "--state-epochs", "0", "--jobs", "1",
         "--fits", "/tmp/scmixvae_fits_k", "--name", "real_k"],
        ["--methods", "cpl-k", "scvi", "pca", "--datasets", "pbmc", *_REAL_QUICK, "--fits",
         "/tmp/scmixvae_fits_k_quick", "--name", "real_k"],
    ),
    "pruning": (
        "bench_simulated.py",
        ["--seeds", "0", "1", "2", "3", "4", "--model-seeds", "0", "1", "--state-epochs", "0"],
        ["--seeds", "0", "1", "--n-cells", "600", "--n-genes", "200", "--max-epochs", "2", "--state-epochs", "0",
         *_CPL_QUICK],
    ),
    "states": (
        "bench_simulated.py",
        ["--parts", "states", "--seeds", "0", "1", "2", "3", "4"],
        ["--parts", "states", "--seeds", "0", "--regimes", "strong", "--max-epochs", "2", "--state-epochs", "2"],
    ),
    "subtle_k": (
        "bench_simulated.py",
        ["--parts", "subtle_k", "--seeds", "0", "1", "2", "3", "4", "--state-epochs", "0"],
        ["--parts", "subtle_k", "--seeds", "0", "--max-epochs", "2", "--state-epochs", "0", *_CPL_QUICK],
    ),
    "state_genes": (
        "bench_state_genes.py",
        ["--parts", "ifnb", "memory", "--seeds", "0", "1", "2", "3", "4"],
        ["--seeds", "0", "--max-epochs", "2", "--scvi-epochs", "2", "--memory-cells", "2000"],
    ),
    "speed": (
        "bench_speed.py",
        [],
        ["--n-cells", "3000", "--n-genes", "300", "--steps", "5", "--epochs", "2", "--repeats", "1",
         "--scale-sizes", "2000", "5000", "--in-memory-max", "3000", "--scale-steps", "5", "--scale-epochs", "2",
         "--wholefit-cells", "1000", "--scvi-epochs", "2", "--side-cells", "1000", "--side-genes", "200",
         "--side-epochs", "2", "--tmp", "/tmp/scmixvae_scale_quick"],
    ),
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small settings, written to --out (default: /tmp)")
    p.add_argument("--out", type=Path, default=None, help=f"folder of the result files (default {RESULTS})")
    p.add_argument("--only", nargs="+", choices=sorted(SUITE), default=None, help="a subset of the suite")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per script")
    args = p.parse_args(argv)
    out = args.out or (QUICK if args.quick else RESULTS)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(args.threads)
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    summary = []
    for name in args.only or list(SUITE):
        script, full, quick = SUITE[name]
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        cmd += ["--threads", str(args.threads), "--out", str(out)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        try:
            status = subprocess.run(cmd, env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
        seconds = time.perf_counter() - start
        path = out / f"{name}.json"
        fresh = path.exists() and path.stat().st_mtime >= time.time() - seconds - 1
        n_rows = len(json.loads(path.read_text())["rows"]) if fresh else 0
        summary.append({"benchmark": name, "script": script, "result": f"{name}.md" if fresh else "",
                        "status": status, "seconds": round(seconds, 1), "rows": n_rows})  # fmt: skip
        print(summary[-1], flush=True)
    lines = ["| benchmark | script | result | status | seconds | rows |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['benchmark']} | {s['script']} | {s['result']} | {s['status']} | {s['seconds']} | {s['rows']} |"
              for s in summary]  # fmt: skip
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    command = f"python benchmarks/run_all.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    md = ["# all\n", f"{date} · `{command}`\n", "\n".join(lines), ""]
    for s in summary:
        if s["result"]:
            table = (out / s["result"]).read_text().split("\n", 2)[-1]
            md += [f"## {s['benchmark']} ({s['result']})\n", table.strip(), ""]
    (out / "all.md").write_text("\n".join(md) + "\n")
    (out / "all.json").write_text(json.dumps({"date": date, "command": command, "runs": summary}, indent=2))
    print("\n".join(lines))
    if any(s["status"] != 0 for s in summary):
        sys.exit(1)


if __name__ == "__main__":
    main()
