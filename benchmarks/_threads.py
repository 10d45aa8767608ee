"""Thread settings taken from ``--threads`` before numpy, numba, scikit-learn and torch start their pools.

Imported first by every benchmark script. Setting the variables later (``_common.set_threads``) limits torch and
BLAS, but some libraries read them only once, at import: numerical results then depended on the shell's
``OMP_NUM_THREADS`` (on ``10X_PBMC_top2000`` the Leiden start and the neighbour table of the pruning benchmark
differed, and so did the chosen K). With this module they depend on ``--threads`` only.
"""

from __future__ import annotations

import os
import sys


def threads_from_argv(argv: list[str], default: int = 1) -> int:
    """Value of ``--threads N`` or ``--threads=N`` in ``argv`` (``default`` when absent)."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return default


THREADS = threads_from_argv(sys.argv[1:])
# ``--omp-only``: only OMP_NUM_THREADS, as a user who exports it and nothing else (bench_speed --side-by-side)
_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
for _var in _VARS[:1] if "--omp-only" in sys.argv[1:] else _VARS:
    os.environ[_var] = str(THREADS)
