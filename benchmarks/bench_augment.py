"""Issue 4 benchmark: the augmentation options.

    python benchmarks/bench_augment.py --threads 1                          # everything
    python benchmarks/bench_augment.py --parts preserve --threads 1         # type preservation only

Parts:
- ``preserve``: simulator (8 unbalanced types, 3,000 cells x 1,000 genes). A logistic regression trained on half of
  the real cells' true types (log-normalised expression) classifies the other half and their copies made by each
  option (without and with the default 0.5 input dropout on top); reported: accuracy on the copies as a fraction
  of the accuracy on the real cells, and the distance of a copy to its cell relative to the distance of the cell
  to its nearest neighbour of the same type (log-normalised expression).
- ``fit``: every option on the simulator and the five files in ``../shared/data`` with ``n_categories`` = number of
  reference labels: ARI, NMI, agreement, training time (the learned augmenter's own training and the neighbour
  search counted separately), and the augmenter's cost as a fraction of the main fit.
- ``prune``: every option from ``K_max = 30`` (simulator) or 50 (real sets named in ``--prune-sets``) with
  ``model.prune()``: chosen K, ARI.

Writes ``benchmarks/results/{name}.json`` and ``.md``.
"""

from __future__ import annotations

# isort: off
import _threads  # noqa: F401  first: --threads sets the thread variables before numpy and torch start
# isort: on

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

OPTIONS = ("dropout", "thinning", "knn", "learned")


def _sim(seed: int):
    from scmixvae.data import simulate

    return simulate(n_cells=3000, n_genes=1000, n_types=8, type_sizes="unbalanced", seed=seed)


MODEL_KWARGS: dict = {}


def _model(adata, option: str, seed: int, **kwargs):
    import anndata as ad
    import scvi

    from scmixvae.model import CplMixVAE

    scvi.settings.seed = seed
    a = ad.AnnData(adata.X.copy(), obs=adata.obs[[]].copy(), var=adata.var[[]].copy())
    CplMixVAE.setup_anndata(a)
    return CplMixVAE(a, augmentation=option, **(MODEL_KWARGS | kwargs))


def _prepare(model) -> dict[str, float]:
    """Train the augmenter / find the neighbours explicitly, so that their time is reported on its own."""
    import scvi
    from scvi import REGISTRY_KEYS

    from scmixvae.model._start import neighbour_table

    seconds = {"augmenter_seconds": 0.0, "neighbour_seconds": 0.0}
    start = time.perf_counter()
    if model.module.augmentation == "learned":
        model.train_augmenter()
        seconds["augmenter_seconds"] = time.perf_counter() - start
    elif model.module.augmentation == "knn":
        matrix = model.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        model.neighbours_ = neighbour_table(matrix, seed=scvi.settings.seed or 0)
        seconds["neighbour_seconds"] = time.perf_counter() - start
    return seconds


def _copies(model, dropout: float) -> np.ndarray:
    """One copy of every cell as agent 0 sees it in training, log-normalised, ``(n, D)``."""
    import torch
    from scvi import REGISTRY_KEYS

    from scmixvae._constants import NEIGHBOUR_X_KEY

    module = model.module
    module.input_dropout = dropout
    manager = model.adata_manager
    manager.neighbours = getattr(model, "neighbours_", None) if module.augmentation == "knn" else None
    out = []
    try:
        module.train()
        loader = model._make_data_loader(adata=model.adata, batch_size=512)
        with torch.no_grad():
            for tensors in loader:
                x = tensors[REGISTRY_KEYS.X_KEY]
                library = x.sum(-1, keepdim=True)
                x_norm = module.normalise(x, library)
                views = module._augment(x, x_norm, library, x.nonzero(as_tuple=True), tensors.get(NEIGHBOUR_X_KEY))
                out.append((views[0] if views.dim() == 3 else views).numpy())
    finally:
        manager.neighbours = None
        module.eval()
        module.input_dropout = 0.5
    return np.vstack(out)


def part_preserve(args) -> list[dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import NearestNeighbors

    from scmixvae._preprocess import log_normalise_block

    rows = []
    for seed in args.seeds:
        adata = _sim(seed)
        types = adata.obs["type"].astype(str).to_numpy()
        real = log_normalise_block(adata.X).toarray()
        rng = np.random.default_rng(seed)
        train = rng.random(adata.n_obs) < 0.5
        clf = LogisticRegression(max_iter=2000).fit(real[train], types[train])
        base = float((clf.predict(real[~train]) == types[~train]).mean())
        nn_dist = np.empty(adata.n_obs)
        for t in np.unique(types):
            sel = np.flatnonzero(types == t)
            d, _ = NearestNeighbors(n_neighbors=2).fit(real[sel]).kneighbors(real[sel])
            nn_dist[sel] = d[:, 1]
        for option in OPTIONS:
            model = _model(adata, option, seed, n_categories=8)
            _prepare(model)
            for dropout in (0.0, 0.5):
                if option == "dropout" and dropout == 0.0:
                    continue
                copies = _copies(model, dropout)
                acc = float((clf.predict(copies[~train]) == types[~train]).mean())
                dist = np.linalg.norm(copies - real, axis=1)
                rows.append({
                    "part": "preserve", "dataset": "sim_3000x1000_8types", "seed": seed, "option": option,
                    "input_dropout": dropout, "accuracy_real": base, "accuracy_copies": acc,
                    "accuracy_kept": acc / base, "distance": float(dist.mean()),
                    "distance_rel_nn": float(np.mean(dist / nn_dist)),
                })  # fmt: skip
                print(rows[-1], flush=True)
    return rows


def part_fit(args) -> list[dict]:
    from _common import clustering_scores, load_real

    rows = []
    sets = [("sim_3000x1000_8types", None)] + [(name, None) for name in args.datasets]
    for name, _ in sets:
        if name.startswith("sim"):
            adata = _sim(args.seeds[0])
            labels = adata.obs["type"].astype(str).to_numpy()
        else:
            adata, labels = load_real(name)
        k = len(np.unique(labels))
        for option in args.options:
            model = _model(adata, option, args.seeds[0], n_categories=k)
            prep = _prepare(model)
            start = time.perf_counter()
            model.train(enable_progress_bar=False)
            seconds = time.perf_counter() - start
            pred = model.predict().astype(str).to_numpy()
            rows.append({
                "part": "fit", "dataset": name, "option": option, "k_ref": k, **clustering_scores(labels, pred),
                "agreement": float(model.get_agent_agreement().iloc[0, 1]), "epochs": len(model.history["train_loss"]),
                "train_seconds": seconds, **prep,
                "augmenter_fraction": prep["augmenter_seconds"] / seconds if option == "learned" else None,
            })  # fmt: skip
            print(rows[-1], flush=True)
    for option in args.options:
        real = [r for r in rows if r["option"] == option and not r["dataset"].startswith("sim")]
        if real:
            rows.append({"part": "fit", "dataset": "MEAN(real)", "option": option,
                         "ari": float(np.mean([r["ari"] for r in real])),
                         "nmi": float(np.mean([r["nmi"] for r in real])),
                         "agreement": float(np.mean([r["agreement"] for r in real]))})  # fmt: skip
    return rows


def part_prune(args) -> list[dict]:
    from _common import clustering_scores, load_real

    rows = []
    sets = [("sim_3000x1000_8types", seed) for seed in args.seeds] if "sim" in args.prune_sets else []
    sets += [(name, args.seeds[0]) for name in args.prune_sets if name != "sim"]
    for name, seed in sets:
        if name.startswith("sim"):
            adata = _sim(seed)
            labels = adata.obs["type"].astype(str).to_numpy()
            k_max = args.k_max
        else:
            adata, labels = load_real(name)
            k_max = args.k_max_real
        for option in args.options:
            model = _model(adata, option, seed, n_categories=k_max)
            start = time.perf_counter()
            _prepare(model)
            model.train(enable_progress_bar=False)
            history = model.prune(enable_progress_bar=False)
            seconds = time.perf_counter() - start
            pred = model.predict().astype(str).to_numpy()
            rows.append({
                "part": "prune", "dataset": name, "seed": seed, "option": option, "k_max": k_max,
                "chosen_k": model.n_categories, "k_ref": len(np.unique(labels)), **clustering_scores(labels, pred),
                "k_path": ">".join(str(k) for k in history["n_categories"]), "seconds": seconds,
            })  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    from _common import REAL_DATASETS, quiet, set_threads, write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["preserve", "fit", "prune"])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS))
    parser.add_argument("--datasets", nargs="+", default=list(REAL_DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--k-max", type=int, default=30, help="K_max of the simulator's pruning")
    parser.add_argument("--k-max-real", type=int, default=50, help="K_max of the real sets' pruning")
    parser.add_argument("--prune-sets", nargs="+", default=["sim"], help="'sim' and/or real set names")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="augment")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help='JSON, e.g. \'{"coupling": "clr"}\'')
    args = parser.parse_args(argv)
    MODEL_KWARGS.update(args.model_kwargs)
    set_threads(args.threads)
    quiet()
    parts = {"preserve": part_preserve, "fit": part_fit, "prune": part_prune}
    rows = []
    for part in args.parts:
        rows += parts[part](args)
    write_results(
        args.name,
        rows,
        extra_md=f"Command: `python benchmarks/bench_augment.py {' '.join(argv or sys.argv[1:])}`\n\n"
        "`accuracy_kept`: classifier accuracy on the copies / on the real cells (held-out half). "
        "`distance_rel_nn`: copy-to-cell distance / cell-to-nearest-same-type-cell distance (log-normalised "
        "expression). Training times exclude the neighbour search and the augmenter's training, shown apart.",
    )


if __name__ == "__main__":
    main()
