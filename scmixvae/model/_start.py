"""The start of a fit: the Leiden partition, the ``"knn"`` neighbours and the learned augmenter.

Deep clustering models (DEC, VaDE, scDeepCluster) start their cluster assignment from a
classical clustering rather than from random weights; cpl-mixVAE started from random weights, and its agents then
settle in whichever partition they reach first. Here the agents' categorical heads are first fitted, for a few
passes, to a Leiden partition with as many clusters as categories, computed on a truncated SVD of log-normalised
counts; full training then refines it with the coupled objective.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
import scvi
import torch
from scvi import REGISTRY_KEYS
from torch.utils.data import Dataset, default_convert

from .._constants import CONDITION_KEY
from .._preprocess import log_normalise_block

if TYPE_CHECKING:
    from sklearn.decomposition import TruncatedSVD

logger = logging.getLogger(__name__)

_CHUNK = 10_000


def log_normalised(matrix, *, max_cells: int | None = None, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """``log1p`` of library-normalised counts as CSR, built in row chunks (optionally of a random subset).

    Returns the matrix and the row indices it holds.
    """
    n = matrix.shape[0]
    rows = np.arange(n)
    if max_cells is not None and n > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))
    blocks = []
    for start in range(0, len(rows), _CHUNK):
        blocks.append(log_normalise_block(sp.csr_matrix(matrix[rows[start : start + _CHUNK]])))
    return sp.vstack(blocks, format="csr"), rows


def log_normalised_svd(
    matrix, *, n_components: int = 30, max_cells: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, TruncatedSVD]:
    """Fit a truncated SVD to log-normalised counts (:func:`log_normalised`) of at most ``max_cells`` cells.

    Returns the representation ``(n_fit, n_components)`` (float32) of the cells it was fitted on, their row
    indices, and the fitted SVD (:func:`project` applies it to every cell, chunk by chunk).
    """
    from sklearn.decomposition import TruncatedSVD

    x, rows = log_normalised(matrix, max_cells=max_cells, seed=seed)
    n_components = max(1, min(n_components, x.shape[1] - 1, x.shape[0] - 1))
    svd = TruncatedSVD(n_components=n_components, random_state=seed).fit(x)
    return svd.transform(x).astype(np.float32), rows, svd


def project(matrix, svd: TruncatedSVD) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, representation)`` of every chunk of cells: ``svd`` applied to their log-normalised counts."""
    for start in range(0, matrix.shape[0], _CHUNK):  # bounded memory: one chunk of cells at a time
        yield start, svd.transform(log_normalised(matrix[start : start + _CHUNK])[0])


def balanced_neighbours(rep: np.ndarray, groups: np.ndarray, n_neighbors: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Every cell's nearest neighbours taken equally from each group (batch-balanced k-NN), itself excluded.

    Returns distances and indices ``(n_cells, n_groups, k)``, ``k = ceil(n_neighbors / n_groups)`` (fewer when a
    group is smaller), groups in sorted order, nearest first within each group.
    """
    from sklearn.neighbors import NearestNeighbors

    n = rep.shape[0]
    codes, sizes = np.unique(groups, return_counts=True)
    k = max(1, min(int(np.ceil(n_neighbors / len(codes))), int(sizes.min()) - 1))
    dists, idxs = [], []
    for code in codes:
        members = np.flatnonzero(groups == code)
        dist, idx = NearestNeighbors(n_neighbors=min(k + 1, len(members))).fit(rep[members]).kneighbors(rep)
        idx = members[idx]
        # drop the cell itself where found, else the farthest of the k + 1 (a stable sort keeps the order)
        drop = idx == np.arange(n)[:, None]
        drop[~drop.any(1), -1] = True
        order = np.argsort(drop, axis=1, kind="stable")[:, :k]
        dists.append(np.take_along_axis(dist, order, 1))
        idxs.append(np.take_along_axis(idx, order, 1))
    return np.stack(dists, 1), np.stack(idxs, 1)


def balanced_knn_graph(rep: np.ndarray, groups: np.ndarray, n_neighbors: int = 15) -> sp.csr_matrix:
    """Symmetric k-NN graph in which every cell takes its neighbours equally from each group.

    The neighbours come from :func:`balanced_neighbours`. Within each group's neighbours the weights are
    ``exp(-(d - rho) / sigma)``, ``rho`` the distance to the nearest of them and ``sigma`` the median of
    ``d - rho`` (UMAP-like): the nearest neighbour in every group weighs 1, however far the condition has moved
    the group. The graph is made symmetric by the larger of the two weights. A cell's type-mates in another
    condition are then among its strongest edges, so that a clustering of the graph follows the types rather
    than the conditions.
    """
    n = rep.shape[0]
    dist, idx = balanced_neighbours(rep, groups, n_neighbors)  # (n, G, k)
    excess = dist - dist[..., :1]
    sigma = np.median(excess, axis=-1, keepdims=True)
    sigma = np.where(sigma > 0, sigma, 1.0)
    weights = np.exp(-excess / sigma)
    rows = np.repeat(np.arange(n), idx.shape[1] * idx.shape[2])
    graph = sp.csr_matrix((weights.ravel(), (rows, idx.ravel())), shape=(n, n))
    return graph.maximum(graph.T).tocsr()


def leiden_labels(
    matrix,
    n_clusters: int | None,
    *,
    resolution: float = 1.0,
    n_components: int = 30,
    max_cells: int = 100_000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Leiden partition of the cells into (as close as possible to) ``n_clusters`` clusters.

    The resolution is found by bisection on a log scale; with ``n_clusters=None``, the partition at ``resolution``
    (scanpy's default, 1). Above ``max_cells`` cells the partition is computed on a random subset and extended to
    every cell through its nearest subset neighbour. With ``groups`` (a group code per cell: batch, condition or
    both; :func:`balance_groups`), the graph takes every cell's neighbours equally from each group
    (:func:`balanced_knn_graph`).
    """
    import anndata
    from sklearn.neighbors import KNeighborsClassifier

    from .._neighbors import leiden, neighbors

    rep, rows, svd = log_normalised_svd(matrix, n_components=n_components, max_cells=max_cells, seed=seed)
    graph = anndata.AnnData(obs={"i": np.arange(len(rows))}, obsm={"X_rep": rep})
    leiden_kwargs = {"random_state": seed}
    if groups is not None and len(np.unique(groups[rows])) > 1:
        leiden_kwargs["adjacency"] = balanced_knn_graph(rep, np.asarray(groups)[rows], min(15, len(rows) - 1))
    else:
        neighbors(graph, use_rep="X_rep", n_neighbors=min(15, len(rows) - 1), random_state=seed)
    if n_clusters is None:
        leiden(graph, resolution=resolution, **leiden_kwargs)
        labels = graph.obs["leiden"].cat.codes.to_numpy().astype(np.int64)
        logger.info("Leiden at resolution %.3g: %d clusters", resolution, labels.max() + 1)
    else:
        labels, resolution = _leiden_with_k(graph, n_clusters, leiden_kwargs)
        logger.info("Leiden initialisation: %d clusters at resolution %.3g", labels.max() + 1, resolution)
    if len(rows) == matrix.shape[0]:
        return labels
    knn = KNeighborsClassifier(n_neighbors=1).fit(rep, labels)
    out = np.empty(matrix.shape[0], dtype=np.int64)
    for start, block in project(matrix, svd):
        out[start : start + block.shape[0]] = knn.predict(block)
    return out


def _leiden_with_k(graph, n_clusters: int, leiden_kwargs: dict) -> tuple[np.ndarray, float]:
    """Bisect Leiden's resolution (log scale) for ``n_clusters`` clusters; merge the smallest ones if above it."""
    from .._neighbors import leiden

    best, lo, hi = None, 1e-3, 10.0
    for _ in range(20):
        resolution = float(np.sqrt(lo * hi))
        leiden(graph, resolution=resolution, **leiden_kwargs)
        labels = graph.obs["leiden"].cat.codes.to_numpy().astype(np.int64)  # int8 below 128 clusters
        k = labels.max() + 1
        if (
            best is None
            or abs(k - n_clusters) < abs(best[0] - n_clusters)
            or (abs(k - n_clusters) == abs(best[0] - n_clusters) and k < best[0])
        ):
            best = (k, labels)
        if k == n_clusters:
            break
        lo, hi = (resolution, hi) if k < n_clusters else (lo, resolution)
    labels = best[1]
    if best[0] > n_clusters:  # merge the smallest clusters into the largest until K remain
        order = np.argsort(np.bincount(labels))[::-1]
        remap = np.empty(best[0], dtype=np.int64)
        remap[order[:n_clusters]] = np.arange(n_clusters)
        remap[order[n_clusters:]] = 0
        labels = remap[labels]
    return labels, resolution


def indexed_dataset(model) -> Dataset:
    """Return the registered cells of ``model`` as a dataset whose minibatches carry their cells' indices.

    Built once for all the passes of :func:`fit_categorical_heads` or :func:`train_augmenter` (scvi-tools' loader
    builds one, with its registry lookups, per pass); the indices give the targets of the cells in a minibatch.
    """
    with model.adata_manager.indexed_minibatches():
        return model.adata_manager.create_torch_dataset()


def minibatches(dataset: Dataset, order: np.ndarray, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the minibatches of the cells ``order`` that scvi-tools' data loader gives (``shuffle=False``).

    A pass also takes one number from torch's random generator, as a data loader's iterator does (its base seed), so
    that the random draws of training (input dropout, augmentations) stay those of a fit through data loaders.
    """
    torch.empty((), dtype=torch.int64).random_()
    for start in range(0, len(order), batch_size):
        yield default_convert(dataset[order[start : start + batch_size]])


def fit_categorical_heads(
    model, labels: np.ndarray, *, min_steps: int = 300, min_epochs: int = 2, batch_size: int = 256, lr: float = 1e-3
) -> float:
    """Fit every agent's encoder and categorical head to ``labels`` (cross-entropy), in place.

    Runs at least ``min_epochs`` passes and at least ``min_steps`` minibatch steps; returns the fraction of
    (agent, cell) pairs whose argmax matches the labels in the last pass.
    """
    steps_per_epoch = int(np.ceil(model.adata.n_obs / batch_size))
    epochs = max(min_epochs, int(np.ceil(min_steps / steps_per_epoch)))
    module = model.module
    labels_t = torch.tensor(np.asarray(labels), dtype=torch.long)
    params = [p for name, p in module.named_parameters() if not name.startswith(("decoder", "px_"))]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = np.random.default_rng(0)
    was_training = module.training
    module.train()
    correct = total = 0
    dataset = indexed_dataset(model)
    for _ in range(epochs):
        correct = total = 0
        for tensors in minibatches(dataset, generator.permutation(model.adata.n_obs), batch_size):
            target = labels_t[tensors[REGISTRY_KEYS.INDICES_KEY].reshape(-1).long()].to(module.device)
            out = module.inference(**module._get_inference_input(tensors))
            log_q = out["log_q"]
            loss = torch.nn.functional.nll_loss(
                log_q.reshape(-1, log_q.shape[-1]).clamp(min=-30.0), target.repeat(module.n_agents)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            correct += int((log_q.argmax(-1) == target).sum())
            total += target.numel() * module.n_agents
    module.train(was_training)
    accuracy = correct / max(total, 1)
    logger.info("categorical heads fitted to the initial partition: accuracy %.3f after %d epochs", accuracy, epochs)
    return accuracy


def neighbour_table(
    matrix,
    *,
    n_neighbors: int = 15,
    n_components: int = 30,
    max_fit_cells: int = 100_000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Find the indices ``(n_cells, n_neighbors)`` of each cell's nearest neighbours (itself excluded).

    Neighbours are found once, in a truncated SVD of log-normalised counts (fitted on at most ``max_fit_cells``
    cells and applied chunk by chunk, so memory stays bounded). With ``groups`` (a group code per cell) they
    are taken equally from each group (:func:`balanced_neighbours`; about
    ``n_neighbors`` in all), so that mixing a cell with a neighbour also mixes batches and conditions.
    """
    n = matrix.shape[0]
    n_neighbors = max(1, min(n_neighbors, n - 1))
    rep, rows, svd = log_normalised_svd(matrix, n_components=n_components, max_cells=max_fit_cells, seed=seed)
    if len(rows) < n:
        rep = np.vstack([block for _, block in project(matrix, svd)]).astype(np.float32)
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)  # one group: plain k-NN
    _, idx = balanced_neighbours(rep, groups, n_neighbors)
    return idx.reshape(n, -1).astype(np.int64)


def label_codes(labels, n_cells: int, n_classes: int) -> np.ndarray:
    """Check user-given types of the training cells and turn them into integer codes below ``n_classes``."""
    labels = np.asarray(labels)
    if labels.shape != (n_cells,):
        raise ValueError(f"`labels` must have one entry per cell ({n_cells}), got {labels.shape}.")
    if pd.isna(labels).any():
        raise ValueError("`labels` contains missing values.")
    codes = pd.factorize(labels, sort=True)[0]
    if codes.max() >= n_classes:
        raise ValueError(
            f"`labels` has {codes.max() + 1} classes; the augmenter distinguishes at most n_categories={n_classes}."
        )
    return codes


def train_augmenter(
    model,
    labels: np.ndarray,
    *,
    max_epochs: int,
    batch_size: int = 256,
    lr: float = 1e-3,
) -> pd.DataFrame:
    """Train the model's :class:`~scmixvae.module.AugmenterModule` on its data, with ``labels`` as types.

    Returns the mean of each loss term per epoch.
    """
    module = model.module
    augmenter = module.augmenter
    labels_t = torch.tensor(np.asarray(labels), dtype=torch.long)
    optimizer = torch.optim.Adam(augmenter.parameters(), lr=lr)
    generator = np.random.default_rng(int(torch.randint(2**31 - 1, (1,))))
    was_training = augmenter.training
    augmenter.train()
    rows = []
    dataset = indexed_dataset(model)
    for _ in range(max_epochs):
        sums, n_steps = {}, 0
        for tensors in minibatches(dataset, generator.permutation(model.adata.n_obs), batch_size):
            x = tensors[REGISTRY_KEYS.X_KEY].to(module.device)
            target = labels_t[tensors[REGISTRY_KEYS.INDICES_KEY].reshape(-1).long()].to(module.device)
            x_norm = module.normalise(x, x.sum(-1, keepdim=True))
            terms = augmenter.loss(x_norm, target)
            optimizer.zero_grad()
            terms["loss"].backward()
            optimizer.step()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            n_steps += 1
        rows.append({key: value / max(n_steps, 1) for key, value in sums.items()})
    augmenter.train(was_training)
    augmenter.trained.fill_(True)
    history = pd.DataFrame(rows).rename_axis("epoch")
    logger.info("augmenter trained for %d epochs: %s", max_epochs, history.iloc[-1].round(3).to_dict())
    return history


def balance_groups(model) -> np.ndarray | None:
    """Group of every training cell of ``model`` over which the start is balanced, or ``None`` (no groups).

    The groups are the registered batches (``setup_anndata(batch_key=...)``), the registered conditions, or the
    combinations of both. The Leiden start and the ``"knn"`` neighbours take every cell's neighbours equally from
    each group, so that a strong batch or condition effect does not split the start's partition (or the
    neighbours the agents' views mix) along it.
    """
    registry = model.adata_manager.data_registry
    codes = []
    if model.summary_stats.n_batch > 1:
        codes.append(np.asarray(model.adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)).ravel())
    if CONDITION_KEY in registry:
        codes.append(np.asarray(model.adata_manager.get_from_registry(CONDITION_KEY)).ravel())
    if not codes:
        return None
    if len(codes) == 1:
        return codes[0]
    return pd.factorize(pd.MultiIndex.from_arrays(codes), sort=True)[0]


def initial_partition(model) -> np.ndarray:
    """Leiden partition of ``model``'s training cells into ``n_categories`` clusters (computed once per model)."""
    if getattr(model, "_initial_labels", None) is None:
        matrix = model.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        model._initial_labels = leiden_labels(
            matrix, model.module.n_categories, seed=scvi.settings.seed or 0, groups=balance_groups(model)
        )
    return model._initial_labels


def default_resolution_clusters(model) -> int:
    """Count the Leiden clusters of ``model``'s cells at resolution 1 (scanpy's default), on the start's graph."""
    matrix = model.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    labels = leiden_labels(matrix, None, seed=scvi.settings.seed or 0, groups=balance_groups(model))
    return int(labels.max()) + 1


def neighbours(model) -> np.ndarray:
    """``model``'s ``"knn"`` neighbour table (:func:`neighbour_table`), found once and kept as ``neighbours_``.

    Found again when the registered cells changed in number since (e.g. ``sc.pp.filter_cells`` in place between two
    ``train()`` calls): the old table pointed past the last cell, or at other cells.
    """
    table = getattr(model, "neighbours_", None)
    if table is None or table.shape[0] != model.adata.n_obs:
        matrix = model.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        model.neighbours_ = neighbour_table(matrix, seed=scvi.settings.seed or 0, groups=balance_groups(model))
    return model.neighbours_
