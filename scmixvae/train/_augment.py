"""Training-time helpers of the augmentations: the neighbour table (``"knn"``) and the learned augmenter."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS

from ._init import balanced_neighbours, log_normalised_svd, project

logger = logging.getLogger(__name__)


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
    cells and applied chunk by chunk, so memory stays bounded). With ``groups`` (a condition code per cell) they
    are taken equally from each group (:func:`~scmixvae.train._init.balanced_neighbours`; about
    ``n_neighbors`` in all), so that mixing a cell with a neighbour also mixes conditions.
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
    for _ in range(max_epochs):
        order = generator.permutation(model.adata.n_obs)
        with model.adata_manager.indexed_minibatches():  # targets from the cells actually in each minibatch
            loader = model._make_data_loader(adata=model.adata, indices=order, batch_size=batch_size, shuffle=False)
        sums, n_steps = {}, 0
        for tensors in loader:
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
