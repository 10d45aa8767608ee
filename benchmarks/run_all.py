"""Run the benchmark suite in one command and write a combined results file.

    python benchmarks/run_all.py --threads 1                 # the full suite: many hours on one thread
    python benchmarks/run_all.py --threads 1 --quick         # every script on small settings: minutes
    python benchmarks/run_all.py --only speed scale --threads 1

Each script runs in its own process, one after the other, with ``--threads`` passed on and the thread variables
(``OMP_NUM_THREADS``...) set; a failing script is reported and the others still run. Every script writes its own
``benchmarks/results/{name}.json`` and ``.md``; this one then writes ``benchmarks/results/{prefix}all.md`` (and
``.json``): one row per script (result name, exit status, wall seconds, rows) followed by every script's table.
With ``--quick`` the result names get the prefix ``quick_`` so that they never overwrite the full results.
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

#: name -> (script, arguments of the full run, arguments of the quick run). Result file stem = name: the current
#: result files in ``results/`` were written by these arguments (see ``benchmarks/README.md``).
SUITE: dict[str, tuple[str, list[str], list[str]]] = {
    "peers": (
        "bench_peers.py",
        ["--datasets", "all", "--methods", "pca", "scvi"],
        ["--datasets", "bladder", "--max-epochs", "2"],
    ),
    "core": (
        "bench_core.py",
        ["--parts", "real", "--likelihoods", "nb", "gaussian", "--seeds", "0",
         "--peers-from", str(RESULTS / "peers.json")],
        ["--parts", "sim", "--likelihoods", "nb"],
    ),
    "speed": (
        "bench_speed.py",
        ["--n-cells", "100000", "--likelihoods", "gaussian", "nb", "--steps", "30", "--repeats", "3"],
        ["--n-cells", "20000", "--steps", "10", "--epochs", "2", "--repeats", "1"],
    ),
    "scale": (
        "bench_scale.py",
        [],
        ["--sizes", "5000", "20000", "--in-memory-max", "10000", "--steps", "5", "--epochs", "2"],
    ),
    "state_genes": (
        "bench_state_genes.py",
        ["--parts", "ifnb", "--seeds", "0", "1", "2", "--axes", "default", "--likelihood", "gaussian"],
        ["--parts", "memory"],
    ),
    "pruning": (
        "bench_pruning.py",
        ["--parts", "sim", "--seeds", "0", "1", "2", "3", "4", "--model-seeds", "0", "1", "--state-epochs", "0",
         "--restarts", "3"],
        ["--parts", "sim", "--seeds", "0", "--n-cells", "300", "--n-genes", "100", "--max-epochs", "1",
         "--epochs-per-round", "1", "--max-rounds", "1", "--scvi-max-epochs", "1"],
    ),
    "augment": ("bench_augment.py", ["--parts", "preserve", "fit"], ["--parts", "preserve"]),
    "wholefit": (
        "bench_wholefit.py",
        ["--n-cells", "5000", "--scvi-epochs", "50"],
        ["--n-cells", "3000", "--n-genes", "300", "--scvi-epochs", "2"],
    ),
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small settings; results named quick_*")
    p.add_argument("--only", nargs="+", choices=sorted(SUITE), default=None, help="a subset of the suite")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per script")
    args = p.parse_args(argv)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(args.threads)
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    prefix = "quick_" if args.quick else ""
    summary = []
    for name in args.only or list(SUITE):
        script, full, quick = SUITE[name]
        result = prefix + name
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        cmd += ["--threads", str(args.threads), "--name", result]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        try:
            status = subprocess.run(cmd, env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
        seconds = time.perf_counter() - start
        path = RESULTS / f"{result}.json"
        fresh = path.exists() and path.stat().st_mtime >= time.time() - seconds - 1
        n_rows = len(json.loads(path.read_text())["rows"]) if fresh else 0
        summary.append({"benchmark": name, "script": script, "result": f"{result}.md" if fresh else "",
                        "status": status, "seconds": round(seconds, 1), "rows": n_rows})  # fmt: skip
        print(summary[-1], flush=True)
    lines = ["| benchmark | script | result | status | seconds | rows |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['benchmark']} | {s['script']} | {s['result']} | {s['status']} | {s['seconds']} | {s['rows']} |"
              for s in summary]  # fmt: skip
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    command = f"python benchmarks/run_all.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    md = [f"# {prefix}all\n", f"{date} · `{command}`\n", "\n".join(lines), ""]
    for s in summary:
        if s["result"]:
            table = (RESULTS / s["result"]).read_text().split("\n", 2)[-1]
            md += [f"## {s['benchmark']} ({s['result']})\n", table.strip(), ""]
    (RESULTS / f"{prefix}all.md").write_text("\n".join(md) + "\n")
    (RESULTS / f"{prefix}all.json").write_text(
        json.dumps({"date": date, "command": command, "runs": summary}, indent=2)
    )
    print("\n".join(lines))
    if any(s["status"] != 0 for s in summary):
        sys.exit(1)


if __name__ == "__main__":
    main()
