"""Shared helpers of the benchmark scripts: data, timing and memory, the peer pipelines, result files.

Not part of the ``scmixvae`` package, and like the scripts it uses only the package's public API. Import it from
a script in this folder (``from _common import ...``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import resource
import shlex
import sys
import time
from importlib.metadata import PackageNotFoundError
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

logger = logging.getLogger(__name__)

if find_spec("skmisc") is None:
    raise SystemExit("the benchmarks need scikit-misc: pip install -e '.[bench]'")

DATASETS = ["ifnb", "worm", "bladder", "pbmc", "kidney"]

#: The real data sets, beside the project (see ``../shared/data/README.md``).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: Where :func:`write_results` writes unless told otherwise (``--out`` of every script).
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: name -> (file in :data:`SHARED_DATA`, ``obs`` column of the reference labels).
REAL_DATASETS: dict[str, tuple[str, str]] = {
    "ifnb": ("ifnb_2800.h5ad", "cell_type"),
    "worm": ("worm_neuron_cell.h5ad", "label"),
    "bladder": ("mouse_bladder_cell_top2000.h5ad", "label"),
    "pbmc": ("10X_PBMC_top2000.h5ad", "label"),
    "kidney": ("human_kidney_counts_top2000.h5ad", "label"),
}
#: name -> ``obs`` column of the set's experimental condition, for the sets that have one.
REAL_CONDITIONS: dict[str, str] = {"ifnb": "condition"}
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

    import scvi

    warnings.filterwarnings("ignore")
    scvi.settings.verbosity = logging.WARNING  # scmixvae's messages follow scvi-tools' verbosity
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
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n)
    if "numba" in sys.modules:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    sc.settings.n_jobs = n


def _status_mb(field: str) -> float | None:
    """A field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB; ``None`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MiB (``VmHWM``; ``getrusage`` off Linux)."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class Timer:
    """Context that records the wall time of a block and, with ``memory=True``, its peak memory growth.

    On Linux the kernel's peak-RSS mark is reset on entry (``/proc/self/clear_refs``), so ``peak_mb`` is the
    peak resident memory inside the block above what the process held on entry; elsewhere it is a lower bound
    (growth past the process's earlier peak). Do not nest two timers with ``memory=True``: the inner reset would
    hide the outer block's earlier peak.
    """

    def __init__(self, memory: bool = True) -> None:
        self.memory = memory
        self.seconds = self.peak_mb = float("nan")

    def __enter__(self) -> Timer:
        if self.memory:
            self._rss0 = _status_mb("VmRSS") or peak_rss_mb()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self.memory:
            self.peak_mb = max(peak_rss_mb() - self._rss0, 0.0)

    def as_dict(self) -> dict[str, float]:
        """``seconds`` and ``peak_mb``, for a results row."""
        return {"seconds": self.seconds, "peak_mb": self.peak_mb}


class EpochTimer(Callback):
    """Lightning callback that records the wall time and torch's thread count of every training epoch.

    Works with any scvi-tools model: ``model.train(..., callbacks=[EpochTimer()])``.
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


def warm_up(accelerator: str = "cpu") -> None:
    """One tiny CplMixVAE fit, so that numba compilation and torch's start are not timed in the first fit."""
    from scmixvae.data import simulate
    from scmixvae.model import CplMixVAE

    adata = simulate(n_cells=300, n_genes=100, n_types=3, seed=0)
    CplMixVAE.setup_anndata(adata)
    model = CplMixVAE(adata, n_categories=4, n_hidden=16)
    model.train(max_epochs=1, state_epochs=0, accelerator=accelerator, enable_progress_bar=False)
    model.prune(max_rounds=1, epochs_per_round=1, accelerator=accelerator, enable_progress_bar=False)
    model.predict()


# ---------------------------------------------------------------------------------------- pipelines


def clustering_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Adjusted Rand index and normalised mutual information of a clustering against reference labels."""
    truth, pred = np.asarray(truth).astype(str), np.asarray(pred).astype(str)
    return {"ari": float(adjusted_rand_score(truth, pred)), "nmi": float(normalized_mutual_info_score(truth, pred))}


def mean_pairwise_ari(labelings: list[np.ndarray]) -> float | None:
    """Mean ARI between every two of ``labelings`` (e.g. the types of several seeds); ``None`` with fewer than two."""
    pairs = [clustering_scores(a, b)["ari"] for i, a in enumerate(labelings) for b in labelings[i + 1 :]]
    return float(np.mean(pairs)) if pairs else None


def leiden_clusters(adata: ad.AnnData, use_rep: str, seed: int) -> np.ndarray:
    """15-nearest-neighbour graph on ``obsm[use_rep]`` and Leiden (igraph) at resolution 1; the cluster labels.

    The neighbours are an exact search (``transformer="sklearn"``), the one scanpy chooses itself below 8,192
    cells, so that scanpy 1.11 never reaches pynndescent's graph, which it cannot read under scipy >= 1.14.
    """
    sc.pp.neighbors(adata, use_rep=use_rep, n_neighbors=15, random_state=seed, transformer="sklearn")
    sc.tl.leiden(adata, resolution=1.0, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    return adata.obs["leiden"].astype(str).to_numpy()


def _scores(labels: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    return {**clustering_scores(labels, pred), "n_clusters": int(np.unique(pred).size), "labels": pred}


def run_pca_leiden(adata: ad.AnnData, labels: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Scanpy's default clustering: ``normalize_total`` (10^4), ``log1p``, 2,000 HVGs where there are more,
    50-component PCA, then :func:`leiden_clusters`. ``adata`` (raw counts) is not changed.

    Returns ``method``, ``ari``, ``nmi``, ``n_clusters``, ``labels``, ``seconds`` and ``peak_mb``.
    """
    with Timer() as timer:
        a = adata.copy()
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        if a.n_vars > N_TOP_GENES:
            sc.pp.highly_variable_genes(a, n_top_genes=N_TOP_GENES, subset=True)
        sc.pp.pca(a, n_comps=min(50, a.n_vars - 1), random_state=seed)
        pred = leiden_clusters(a, "X_pca", seed)
    return {"method": "PCA+Leiden", **_scores(labels, pred), **timer.as_dict()}


def run_scvi_leiden(
    adata: ad.AnnData,
    labels: np.ndarray,
    seed: int = 0,
    max_epochs: int | None = None,
    accelerator: str = "cpu",
    batch_key: str | None = None,
) -> dict[str, Any]:
    """scVI (default model and ``train()``, batch 128) on raw counts, then :func:`leiden_clusters` on its latent.

    ``max_epochs=None``: scVI's own heuristic, ``min(round(20000 / n_cells * 400), 400)``. ``batch_key``: an
    ``obs`` column registered as scVI's batch (its effect is removed from the latent). ``adata`` is not
    changed (the model trains on a copy). Returns ``method``, ``ari``, ``nmi``, ``n_clusters``, ``labels``,
    ``epochs``, ``train_seconds``, ``s_per_epoch`` (mean epoch time after the first), ``threads``, ``seconds``
    (whole pipeline) and ``peak_mb``.
    """
    import scvi

    scvi.settings.seed = seed
    epochs = EpochTimer()
    with Timer() as total:
        obs = adata.obs[[batch_key] if batch_key else []].copy()
        a = ad.AnnData(adata.X.copy(), obs=obs, var=adata.var[[]].copy())
        scvi.model.SCVI.setup_anndata(a, batch_key=batch_key)
        model = scvi.model.SCVI(a)
        with Timer(memory=False) as train:
            model.train(max_epochs=max_epochs, accelerator=accelerator, enable_progress_bar=False, callbacks=[epochs])
        a.obsm["X_scVI"] = model.get_latent_representation(batch_size=1024)
        pred = leiden_clusters(a, "X_scVI", seed)
    return {
        "method": "scVI+Leiden", **_scores(labels, pred), "epochs": len(epochs.durations),
        "train_seconds": train.seconds, "s_per_epoch": epochs.seconds_per_epoch(), "threads": epochs.threads_used(),
        **total.as_dict(),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ results


#: Libraries behind the neighbour graph and Leiden, recorded with every result (see :func:`machine_info`).
LEIDEN_STACK = ("scipy", "scikit-learn", "pynndescent", "numba", "igraph", "leidenalg")


def _installed_version(name: str) -> str | None:
    try:
        return _version(name)
    except PackageNotFoundError:
        return None


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
        "scmixvae": _version("scmixvae"),
        "numpy": np.__version__,
        # the Leiden start and the peers' clusters depend on these: a result must say which it was measured with
        **{name: _installed_version(name) for name in LEIDEN_STACK},
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool | np.generic)


def _fmt(value: Any) -> str:
    value = value.item() if isinstance(value, np.generic) else value
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


def write_results(name: str, rows: list[dict[str, Any]], extra_md: str = "", out: Path | None = None) -> str:
    """Write ``{out}/{name}.json`` and ``{out}/{name}.md`` (``out``: :data:`RESULTS_DIR`) and print the table.

    Only the scalar fields of the rows are written (labels and latents are left out); the JSON also records the
    date, the machine and the command. Both files are written to a temporary name first, then moved into place.
    """
    out = RESULTS_DIR if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    clean = [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items() if _is_scalar(v)} for r in rows]
    command = "python " + shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    payload = {"name": name, "date": date, "machine": info, "command": command, "rows": clean}
    table = markdown_table(clean)
    machine = (
        f"{info['cpu_count']} CPUs ({info['cpu_affinity']} usable), {info['torch_threads']} torch thread(s), "
        f"torch {info['torch']}, scvi-tools {info['scvi']}, scanpy {info['scanpy']}, scmixvae {info['scmixvae']}, "
        f"igraph {info['igraph']}, leidenalg {info['leidenalg']}" + (f", GPU {info['cuda']}" if info["cuda"] else "")
    )
    md = f"# {name}\n\n{date} · {machine}\n\n{table}\n"
    if extra_md:
        md += f"\n{extra_md.strip()}\n"
    md += f"\nCommand: `{command}`\n"
    for suffix, text in ((".json", json.dumps(payload, indent=2) + "\n"), (".md", md)):
        tmp = out / f".{name}{suffix}.partial"
        tmp.write_text(text)
        tmp.replace(out / f"{name}{suffix}")
    print(table)
    return table
