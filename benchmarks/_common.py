"""Shared helpers of the benchmark scripts: data loading, timing and memory, peer pipelines, result files.

Not part of the ``scmixvae`` package. Import it from a script in this folder (``from _common import ...``) or
with ``benchmarks`` on ``sys.path``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable
from importlib.metadata import version as _version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scanpy as sc
import torch
from lightning.pytorch.callbacks import Callback
from scipy import sparse
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from scmixvae._neighbors import leiden, neighbors

logger = logging.getLogger(__name__)

_MISSING = [name for name in ("psutil", "skmisc") if find_spec(name) is None]
if _MISSING:
    raise SystemExit(f"the benchmarks need {', '.join(_MISSING)}: pip install -e '.[bench]'")

#: The real data sets, beside the project (see ``../shared/data/README.md``).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: Where :func:`write_results` writes.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: name -> (file in :data:`SHARED_DATA`, ``obs`` column of the reference labels).
REAL_DATASETS: dict[str, tuple[str, str]] = {
    "ifnb": ("ifnb_2800.h5ad", "cell_type"),
    "worm": ("worm_neuron_cell.h5ad", "label"),
    "bladder": ("mouse_bladder_cell_top2000.h5ad", "label"),
    "pbmc": ("10X_PBMC_top2000.h5ad", "label"),
    "kidney": ("human_kidney_counts_top2000.h5ad", "label"),
}
#: Gene count that :func:`load_real` reduces larger sets to.
N_TOP_GENES = 2000


# --------------------------------------------------------------------------------------------- data


def _top_genes(counts: ad.AnnData, n_top_genes: int) -> np.ndarray:
    """Boolean mask of the ``n_top_genes`` most variable genes of a raw-count AnnData (left unchanged)."""
    tmp = ad.AnnData(counts.X.copy(), obs=counts.obs[[]].copy(), var=counts.var[[]].copy())
    try:
        sc.pp.highly_variable_genes(tmp, flavor="seurat_v3", n_top_genes=n_top_genes)
    except ImportError as err:  # a silent fallback would change the genes of ifnb, and every score on it
        msg = "The benchmarks select genes with scanpy's seurat_v3 flavor, which needs scikit-misc: "
        msg += "pip install -e '.[bench]'."
        raise ImportError(msg) from err
    except ValueError as err:  # worm: the loess fit is singular
        logger.warning("seurat_v3 gene selection failed (%s); using the default flavor on log-normalised data.", err)
        tmp = ad.AnnData(counts.X.copy(), obs=counts.obs[[]].copy(), var=counts.var[[]].copy())
        sc.pp.normalize_total(tmp, target_sum=1e4)
        sc.pp.log1p(tmp)
        sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes)
    return tmp.var["highly_variable"].to_numpy()


def load_real(name: str, *, n_top_genes: int = N_TOP_GENES) -> tuple[ad.AnnData, np.ndarray]:
    """Load one of :data:`REAL_DATASETS` as raw counts with at most about ``n_top_genes`` genes.

    Sets with more than ``n_top_genes`` genes (ifnb, worm) are reduced to their ``n_top_genes`` most variable
    genes: scanpy's ``seurat_v3`` flavor on the counts (scikit-misc), or, where its loess fit fails (worm), the
    default flavor on library-normalised ``log1p`` data. Of the ``*_top2000`` files only bladder (2,003 genes)
    is touched: it loses 3.

    Parameters
    ----------
    name
        A key of :data:`REAL_DATASETS`.
    n_top_genes
        Gene budget.

    Returns
    -------
    A new AnnData with integer counts in ``X`` (CSR, float32), the file's ``obs`` and gene names, nothing
    else; and the reference labels as an array of ``str``.
    """
    if name not in REAL_DATASETS:
        msg = f"Unknown data set {name!r}; choose one of {sorted(REAL_DATASETS)}."
        raise ValueError(msg)
    file, label_key = REAL_DATASETS[name]
    path = SHARED_DATA / file
    if not path.exists():
        msg = f"{path} not found: the real data sets live in ../shared/data beside the project."
        raise FileNotFoundError(msg)
    raw = ad.read_h5ad(path)
    x = raw.X if sparse.issparse(raw.X) else sparse.csr_matrix(raw.X)
    x = sparse.csr_matrix(x, dtype=np.float32)
    counts = ad.AnnData(x, obs=raw.obs.copy(), var=raw.var[[]].copy())
    counts.var_names_make_unique()
    if counts.n_vars > n_top_genes:
        counts = counts[:, _top_genes(counts, n_top_genes)].copy()
    labels = counts.obs[label_key].astype(str).to_numpy()
    return counts, labels


# ------------------------------------------------------------------------------------ time and memory


def quiet() -> None:
    """Silence warnings and Lightning's and scvi-tools' INFO logs in a benchmark process."""
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "scvi", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def set_threads(n: int) -> None:
    """Use ``n`` threads in torch, BLAS/OpenMP (threadpoolctl), numba and scanpy, and in child processes."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first parallel work
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass
    if "numba" in sys.modules:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    sc.settings.n_jobs = n


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started (``getrusage``), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        return None
    return None


#: Timers inside whose block we are; a nested timer's reset must not hide the outer ones' peak.
_OPEN_TIMERS: list[Timer] = []


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0); whether it worked."""
    hwm = _proc_status_mb("VmHWM")
    if hwm is None:
        return False
    for timer in _OPEN_TIMERS:  # hand the peak so far to the enclosing timers before it is forgotten
        timer._hwm_before_reset = max(timer._hwm_before_reset, hwm)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _current_rss_mb() -> float:
    rss = _proc_status_mb("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return peak_rss_mb()


class Timer:
    """Context that records wall time and the peak resident memory reached inside it.

    Peak memory comes from the kernel's high-water mark, reset on entry (Linux); otherwise from psutil,
    sampling every 10 ms, when it is installed; otherwise from ``getrusage``, which only sees growth past the
    process's earlier peak (a lower bound). ``method`` says which. Python allocations and torch's alike count,
    unlike ``tracemalloc``.

    Attributes
    ----------
    seconds
        Wall time of the block.
    rss_start_mb
        Resident memory on entry, MiB.
    peak_rss_mb
        Peak resident memory inside the block, MiB.
    peak_growth_mb
        ``peak_rss_mb - rss_start_mb``: memory the block needed on top of what was already held.

    Examples
    --------
    >>> with Timer() as t:
    ...     x = [0] * 10_000_000
    >>> t.seconds > 0 and t.peak_growth_mb > 50
    True
    """

    def __init__(self) -> None:
        self.seconds = float("nan")
        self.rss_start_mb = float("nan")
        self.peak_rss_mb = float("nan")
        self.peak_growth_mb = float("nan")
        self.method = ""
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._sampled_peak = 0.0
        self._hwm_before_reset = 0.0

    def _sample(self, process: Any) -> None:
        while not self._stop.wait(0.01):
            self._sampled_peak = max(self._sampled_peak, process.memory_info().rss / 2**20)

    def __enter__(self) -> Timer:
        self.rss_start_mb = _current_rss_mb()
        if _reset_peak_rss():
            self.method = "VmHWM"
            _OPEN_TIMERS.append(self)
        else:
            try:
                import psutil

                self.method = "psutil"
                self._sampled_peak = self.rss_start_mb
                self._sampler = threading.Thread(target=self._sample, args=(psutil.Process(),), daemon=True)
                self._sampler.start()
            except ImportError:
                self.method = "getrusage"
                self._maxrss_before = peak_rss_mb()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self.method == "VmHWM":
            _OPEN_TIMERS.remove(self)
            self.peak_rss_mb = max(_proc_status_mb("VmHWM") or float("nan"), self._hwm_before_reset)
        elif self.method == "psutil":
            self._stop.set()
            assert self._sampler is not None
            self._sampler.join()
            self.peak_rss_mb = max(self._sampled_peak, _current_rss_mb())
        else:  # the process peak moved only if the block went past every earlier peak; else a lower bound
            after = peak_rss_mb()
            self.peak_rss_mb = after if after > self._maxrss_before else max(_current_rss_mb(), self.rss_start_mb)
        self.peak_growth_mb = max(self.peak_rss_mb - self.rss_start_mb, 0.0)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """``{prefix}seconds`` and ``{prefix}peak_mb`` (peak growth), for a results row."""
        return {f"{prefix}seconds": self.seconds, f"{prefix}peak_mb": self.peak_growth_mb}


def measure(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, Timer]:
    """Call ``fn(*args, **kwargs)`` inside a :class:`Timer`; return its result and the timer."""
    with Timer() as timer:
        result = fn(*args, **kwargs)
    return result, timer


class EpochTimer(Callback):
    """Lightning callback that records the wall time of every training epoch.

    Works with any scvi-tools model: ``model.train(..., callbacks=[EpochTimer()])``. An epoch runs from
    ``on_train_epoch_start`` to ``on_train_epoch_end``, validation included where the model validates.

    Attributes
    ----------
    durations
        Seconds of each epoch, in order.
    threads
        ``torch.get_num_threads()`` at the start of each epoch: the threads the method actually trained with.
    """

    def __init__(self) -> None:
        super().__init__()
        self.durations: list[float] = []
        self.threads: list[int] = []
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.threads.append(torch.get_num_threads())
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._start is not None:
            self.durations.append(time.perf_counter() - self._start)
            self._start = None

    def threads_used(self) -> str:
        """The thread counts seen while training, e.g. ``"1"``, or ``"1-2"`` when they changed."""
        seen = sorted(set(self.threads))
        if not seen:
            return ""
        return str(seen[0]) if len(seen) == 1 else f"{seen[0]}-{seen[-1]}"

    def seconds_per_epoch(self, skip_first: bool = True) -> float:
        """Mean epoch time, leaving out the first epoch (warm-up) unless it is the only one."""
        times = self.durations[1:] if skip_first and len(self.durations) > 1 else self.durations
        return float(np.mean(times)) if times else float("nan")


# ---------------------------------------------------------------------------------------- pipelines


def clustering_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Adjusted Rand index and normalised mutual information of a clustering against reference labels."""
    truth, pred = np.asarray(truth).astype(str), np.asarray(pred).astype(str)
    return {"ari": float(adjusted_rand_score(truth, pred)), "nmi": float(normalized_mutual_info_score(truth, pred))}


def _leiden_scores(adata: ad.AnnData, labels: np.ndarray, use_rep: str, seed: int) -> dict[str, Any]:
    neighbors(adata, use_rep=use_rep, random_state=seed)
    leiden(adata, resolution=1.0, random_state=seed)
    pred = adata.obs["leiden"].astype(str).to_numpy()
    return {**clustering_scores(labels, pred), "n_clusters": int(np.unique(pred).size), "labels": pred}


def run_pca_leiden(adata: ad.AnnData, labels: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Scanpy's default clustering: normalise, log1p, (HVG), PCA, neighbours, Leiden at resolution 1.

    ``normalize_total`` to 10⁴ counts, ``log1p``, the 2,000 most variable genes (default flavor) only where
    there are more, 50-component PCA, 15-neighbour graph and Leiden (igraph) at resolution 1.

    Parameters
    ----------
    adata
        Raw counts in ``X``; not changed.
    labels
        Reference labels, one per cell.
    seed
        Seed of PCA, neighbour search and Leiden.

    Returns
    -------
    ``ari``, ``nmi``, ``n_clusters``, ``seconds`` (whole pipeline), ``peak_mb`` (peak memory growth),
    ``labels`` (the Leiden clusters).
    """
    with Timer() as timer:
        a = adata.copy()
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        if a.n_vars > N_TOP_GENES:
            sc.pp.highly_variable_genes(a, n_top_genes=N_TOP_GENES, subset=True)
        sc.pp.pca(a, n_comps=min(50, a.n_vars - 1), random_state=seed)
        out = _leiden_scores(a, labels, "X_pca", seed)
    return {"method": "PCA+Leiden", **out, **timer.as_dict()}


def _scvi_model(adata: ad.AnnData):
    import scvi

    a = ad.AnnData(adata.X.copy(), obs=adata.obs[[]].copy(), var=adata.var[[]].copy())
    scvi.model.SCVI.setup_anndata(a)
    return scvi.model.SCVI(a)


def run_scvi_leiden(
    adata: ad.AnnData,
    labels: np.ndarray,
    seed: int = 0,
    max_epochs: int | None = None,
    batch_size: int = 128,
    accelerator: str = "auto",
) -> dict[str, Any]:
    """scVI (default model) on raw counts, then neighbours and Leiden at resolution 1 on its latent space.

    Parameters
    ----------
    adata
        Raw counts in ``X``; not changed (the model trains on a copy).
    labels
        Reference labels, one per cell.
    seed
        ``scvi.settings.seed`` and the seed of neighbours and Leiden.
    max_epochs
        ``None``: scVI's own heuristic, ``min(round(20000 / n_cells * 400), 400)``.
    batch_size
        Minibatch size.
    accelerator
        Passed to ``model.train``.

    Returns
    -------
    ``ari``, ``nmi``, ``n_clusters``, ``epochs`` (run), ``train_seconds``, ``s_per_epoch`` (train time /
    epochs), ``s_per_epoch_steady`` (mean epoch time after the first), ``threads`` (torch's thread count while
    training, see :meth:`EpochTimer.threads_used`), ``seconds`` (whole pipeline),
    ``peak_mb`` (peak memory growth), ``labels`` and ``latent`` (cells × 10).
    """
    import scvi

    scvi.settings.seed = seed
    with Timer() as total:
        model = _scvi_model(adata)
        epoch_timer = EpochTimer()
        with Timer() as train:
            model.train(
                max_epochs=max_epochs,
                batch_size=batch_size,
                accelerator=accelerator,
                enable_progress_bar=False,
                callbacks=[epoch_timer],
            )
        epochs = len(model.history["elbo_train"])
        latent = model.get_latent_representation(batch_size=1024)
        a = ad.AnnData(obs=adata.obs[[]].copy())
        a.obsm["X_scVI"] = latent
        out = _leiden_scores(a, labels, "X_scVI", seed)
    return {
        "method": "scVI+Leiden",
        **out,
        "epochs": epochs,
        "train_seconds": train.seconds,
        "s_per_epoch": train.seconds / epochs,
        "s_per_epoch_steady": epoch_timer.seconds_per_epoch(),
        "threads": epoch_timer.threads_used(),
        **total.as_dict(),
        "latent": latent,
    }


def scvi_seconds_per_epoch(adata: ad.AnnData, batch_size: int = 128, n_epochs: int = 3, seed: int = 0) -> float:
    """Seconds per scVI training epoch on ``adata`` (raw counts), the first (warm-up) epoch left out.

    Parameters
    ----------
    adata
        Raw counts in ``X``; not changed.
    batch_size
        Minibatch size.
    n_epochs
        Epochs to train, at least 2.
    seed
        ``scvi.settings.seed``.
    """
    import scvi

    if n_epochs < 2:
        msg = f"n_epochs must be at least 2 (the first is warm-up and not timed), got {n_epochs}."
        raise ValueError(msg)
    scvi.settings.seed = seed
    model = _scvi_model(adata)
    timer = EpochTimer()
    model.train(max_epochs=n_epochs, batch_size=batch_size, enable_progress_bar=False, callbacks=[timer])
    return timer.seconds_per_epoch(skip_first=True)


# ------------------------------------------------------------------------------------------ results


def machine_info() -> dict[str, Any]:
    """CPU, threads and library versions, for a results file."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "scvi": _version("scvi-tools"),
        "scanpy": _version("scanpy"),
        "anndata": _version("anndata"),
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool | np.generic)


def _fmt(value: Any) -> str:
    value = _scalar(value)
    if value is None:
        return ""
    if isinstance(value, float):
        if not np.isfinite(value):
            return "–"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the scalar fields of ``rows``; columns in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if _is_scalar(v) and k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, rows: list[dict[str, Any]], extra_md: str = "") -> str:
    """Write ``results/{name}.json`` and ``results/{name}.md`` and print the table.

    Only scalar fields of the rows are written; arrays (labels, latents) are left out.

    Parameters
    ----------
    name
        File stem.
    rows
        One dict per result.
    extra_md
        Markdown appended below the table (how it was run, notes).

    Returns
    -------
    The markdown table.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    clean = [{k: _scalar(v) for k, v in row.items() if _is_scalar(v)} for row in rows]
    payload = {"name": name, "date": date, "machine": info, "command": " ".join(sys.argv), "rows": clean}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown_table(clean)
    machine = (
        f"{info['cpu_count']} CPUs ({info['cpu_affinity']} usable), {info['torch_threads']} torch thread(s), "
        f"torch {info['torch']}, scvi-tools {info['scvi']}, scanpy {info['scanpy']}"
        + (f", GPU {info['cuda']}" if info["cuda"] else "")
    )
    md = f"# {name}\n\n{date} · {machine}\n\n{table}\n"
    if extra_md:
        md += f"\n{extra_md.strip()}\n"
    (RESULTS_DIR / f"{name}.md").write_text(md)
    print(table)
    return table
