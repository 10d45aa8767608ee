"""Pure scores of the agents' consensus: co-assignment, agreement, the pruning decisions and the medoid.

Functions of labels and posteriors only (numpy and pandas in, numpy out): they drive no model, so that the
model, its choice of the number of types and the analysis tools all use them without importing one another.
Category indices are indices among a model's *initial* ``n_categories`` (the positions of
``module.category_mask``); arrays indexed by category have that full length.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from . import _validation as check

# --------------------------------------------------------------------------------------------- scores


def co_assignment(labels_a: np.ndarray, labels_b: np.ndarray, n_categories: int) -> np.ndarray:
    """Co-assignment counts of two labelings, ``(K, K)``.

    Parameters
    ----------
    labels_a, labels_b
        Category index of every cell, ``(n,)``, in ``[0, n_categories)``.
    n_categories
        ``K``.

    Returns
    -------
    Integer matrix ``M`` with ``M[k, l]`` the number of cells labelled ``k`` in ``labels_a`` and ``l`` in
    ``labels_b``.
    """
    labels_a, labels_b = np.asarray(labels_a, dtype=np.int64), np.asarray(labels_b, dtype=np.int64)
    if labels_a.shape != labels_b.shape or labels_a.ndim != 1:
        raise ValueError(f"Expected two label vectors of one shape, got {labels_a.shape} and {labels_b.shape}.")
    flat = labels_a * n_categories + labels_b
    return np.bincount(flat, minlength=n_categories * n_categories).reshape(n_categories, n_categories)


def agreement_matrix(labels: np.ndarray) -> np.ndarray:
    """Fraction of cells on which each pair of agents gives the same label, ``(A, A)``; ``labels`` is ``(A, n)``."""
    labels = np.asarray(labels)
    return (labels[:, None, :] == labels[None, :, :]).mean(-1)


def _check_labels(labels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, mask = np.asarray(labels, dtype=np.int64), np.asarray(mask, dtype=bool)
    if labels.ndim != 2 or labels.shape[0] < 2:
        raise ValueError(f"Expected labels of shape (n_agents >= 2, n_cells), got {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() >= mask.size or not mask[labels].all()):
        raise ValueError("Labels must be indices of surviving categories (True entries of `mask`).")
    return labels, mask


def category_agreement(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Agreement of the agents on each category.

    For a pair of agents with co-assignment matrix ``M`` (:func:`co_assignment`), the agreement on category
    ``k`` is ``M[k, k] / max(row_k, col_k)``: the share of the cells that either agent puts in ``k`` on which
    the other agrees. It is averaged over all pairs of agents.

    Parameters
    ----------
    labels
        Each agent's category index of every cell, ``(A, n)`` with ``A >= 2``.
    mask
        Surviving categories, ``(K,)`` bool.

    Returns
    -------
    ``(K,)`` array: the agreement of every surviving category (0 for one that no agent uses), NaN for masked
    categories.
    """
    labels, mask = _check_labels(labels, mask)
    n_agents, k = labels.shape[0], mask.size
    total = np.zeros(k)
    pairs = [(a, b) for a in range(n_agents) for b in range(a + 1, n_agents)]
    for a, b in pairs:
        m = co_assignment(labels[a], labels[b], k)
        denom = np.maximum(m.sum(1), m.sum(0))
        total += np.divide(np.diag(m), denom, out=np.zeros(k), where=denom > 0)
    agreement = total / len(pairs)
    agreement[~mask] = np.nan
    return agreement


def mean_consensus(labels: np.ndarray, mask: np.ndarray) -> float:
    """Mean consensus: the diagonal of the row-normalised co-assignment matrix, averaged.

    For every ordered pair of agents ``(a, b)``, ``M`` is row-normalised (rows: agent ``a``) and its diagonal
    is averaged over the surviving categories that agent ``a`` uses (``row_k > 0``); the result is the mean
    over the ordered pairs. Both orders of a pair count, so a category that only one agent uses lowers it.

    Parameters
    ----------
    labels
        Each agent's category index of every cell, ``(A, n)`` with ``A >= 2``.
    mask
        Surviving categories, ``(K,)`` bool.

    Returns
    -------
    The mean consensus in ``[0, 1]``; NaN when there are no cells.
    """
    labels, mask = _check_labels(labels, mask)
    n_agents, k = labels.shape[0], mask.size
    if labels.shape[1] == 0:
        return float("nan")
    values = []
    for a in range(n_agents):
        for b in range(n_agents):
            if a == b:
                continue
            m = co_assignment(labels[a], labels[b], k)
            rows = m.sum(1)
            used = mask & (rows > 0)
            values.append(float(np.mean(np.diag(m)[used] / rows[used])))
    return float(np.mean(values))


# ------------------------------------------------------------------------------------------- decisions


def select_round(history: pd.DataFrame, threshold: float) -> int:
    """Return the round chosen by the consensus criterion.

    Among the rounds whose ``mean_consensus`` is at least ``threshold``, the one with the largest
    ``n_categories`` (ties: the higher consensus, then the earlier round). When no round reaches
    ``threshold``, the round with the highest consensus (ties: the larger ``n_categories``, then the earlier
    round). NaN consensus counts as below every value.

    Because every round removes at least one category, the first round that reaches ``threshold`` is the one
    this criterion selects: :meth:`~scmixvae.model.CplMixVAE.prune` stops there by default.

    Parameters
    ----------
    history
        One row per round with columns ``n_categories`` and ``mean_consensus``, and ``round`` (otherwise the
        index labels are the round numbers).
    threshold
        Consensus a round must reach.

    Returns
    -------
    The ``round`` value (or index label) of the chosen row, not its position.
    """
    if len(history) == 0:
        raise ValueError("The history is empty: there is no round to select.")
    missing = {"n_categories", "mean_consensus"} - set(history.columns)
    if missing:
        raise ValueError(f"The history lacks the column(s) {sorted(missing)}.")
    rounds = history["round"].to_numpy() if "round" in history.columns else history.index.to_numpy()
    keys = [
        _selection_key(k, c, threshold) for k, c in zip(history["n_categories"], history["mean_consensus"], strict=True)
    ]
    best = max(range(len(keys)), key=lambda i: (keys[i], -i))  # earliest position wins full ties
    return int(rounds[best])


def _selection_key(n_categories: float, consensus: float, threshold: float) -> tuple[bool, float, float]:
    """Total order of :func:`select_round`: rounds that reach the threshold first, then K or consensus."""
    consensus = -math.inf if consensus is None or not np.isfinite(consensus) else float(consensus)
    reached = consensus >= threshold
    if reached:
        return True, float(n_categories), consensus
    return False, consensus, float(n_categories)


def medoid(labels: list[np.ndarray]) -> tuple[int, np.ndarray]:
    """Find the labelling that agrees best with the others: the medoid under the adjusted Rand index.

    Parameters
    ----------
    labels
        Two or more labellings of the same cells (any hashable labels; their names need not match).

    Returns
    -------
    The index of the labelling with the highest mean adjusted Rand index with every other one (the first
    such on a tie), and the symmetric matrix of adjusted Rand indices (ones on the diagonal).
    """
    from sklearn.metrics import adjusted_rand_score

    n = len(labels)
    if n < 2:
        raise ValueError(f"A medoid needs at least two labellings; got {n}.")
    sizes = {len(x) for x in labels}
    if len(sizes) != 1:
        raise ValueError(f"The labellings must cover the same cells; got lengths {sorted(sizes)}.")
    ari = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            ari[i, j] = ari[j, i] = adjusted_rand_score(labels[i], labels[j])
    return int(np.argmax(mean_agreement(ari))), ari  # argmax: the first on a tie


def mean_agreement(ari: np.ndarray) -> np.ndarray:
    """Each labelling's mean adjusted Rand index with the others, from the matrix :func:`medoid` returns."""
    return (ari.sum(1) - 1) / (len(ari) - 1)


def categories_to_prune(
    agreement: np.ndarray,
    mask: np.ndarray,
    counts: np.ndarray,
    *,
    min_categories: int,
    max_fraction: float = 0.2,
    min_agreement: float = 0.5,
    outlier_z: float = 3.0,
    outlier_floor: float = 0.9,
) -> np.ndarray:
    """Categories to mask after a round.

    A surviving category fails when it is **empty** (``counts == 0``) or, among the populated ones, when

    - its agreement is below ``min_agreement`` (the agents disagree on most of its cells), or
    - it is a low outlier: below ``median - outlier_z * MAD`` of the populated categories' agreements (MAD
      scaled by 1.4826 to a standard deviation) *and* below ``outlier_floor``, so that near-perfect
      categories are never outliers of an even more perfect rest.

    All empty categories go. Of the failing populated ones, the least-agreeing go, at most
    ``max(1, floor(max_fraction * n_surviving))`` of them; when none fails, the single least-agreeing
    populated category goes (masking empty categories alone does not change any label, so a round must
    remove at least one populated one). Ties go to the smaller category, then the lower index. Never more
    than ``n_surviving - min_categories`` categories are removed, empty ones first.

    Parameters
    ----------
    agreement
        Agreement of every category, ``(K,)`` (:func:`category_agreement`; values of masked ones are ignored).
    mask
        Surviving categories, ``(K,)`` bool.
    counts
        Cells labelled with every category, ``(K,)`` (summed over the agents).
    min_categories
        Categories that must survive.
    max_fraction
        Largest share of the surviving categories removed in one round, empty ones not counted.
    min_agreement
        Agreement below which a populated category always fails.
    outlier_z
        Robust z-score below which a populated category is a low outlier.
    outlier_floor
        Agreement that a low outlier must also be below.

    Returns
    -------
    Sorted indices of the categories to mask (possibly empty).
    """
    agreement = np.nan_to_num(np.asarray(agreement, dtype=float), nan=0.0)
    mask, counts = np.asarray(mask, dtype=bool), np.asarray(counts)
    if not (agreement.shape == mask.shape == counts.shape) or mask.ndim != 1:
        raise ValueError(
            f"agreement, mask and counts must be vectors of one length, got {agreement.shape}, {mask.shape} and "
            f"{counts.shape}."
        )
    check.check_int("min_categories", min_categories, minimum=1)
    check.check_float("max_fraction", max_fraction, maximum=1.0, strict=True)
    surviving = np.flatnonzero(mask)
    budget = surviving.size - min_categories
    if budget <= 0:
        return np.array([], dtype=np.int64)
    empty = surviving[counts[surviving] == 0][:budget]
    budget -= empty.size
    populated = surviving[counts[surviving] > 0]
    if budget <= 0 or populated.size == 0:
        return np.sort(empty)
    values = agreement[populated]
    median = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - median))
    fails = (values < min_agreement) | ((values < median - outlier_z * mad) & (values < outlier_floor))
    order = np.lexsort((populated, counts[populated], values))  # by agreement, then size, then index
    n_fail = int(fails.sum())
    cap = max(1, math.floor(max_fraction * surviving.size))
    n_remove = min(max(n_fail, 1), cap, budget)
    failing_first = order[np.argsort(~fails[order], kind="stable")]  # failing ones, least-agreeing first
    return np.sort(np.concatenate([empty, populated[failing_first[:n_remove]]]))


# ------------------------------------------------------------------------------------------- collapse


def check_collapse(
    q: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    min_share: float = 0.01,
    min_populated_fraction: float = 0.5,
    max_entropy_fraction: float = 0.9,
    stacklevel: int = 2,
) -> list[str]:
    """Warn when the categorical posteriors have collapsed.

    Two signs, each reported in one :class:`UserWarning`:

    - **few populated categories**: fewer than ``max(2, min_populated_fraction * K)`` categories hold at least
      ``min_share`` of the cells under the consensus label (argmax of the agents' mean posterior);
    - **near-uniform posteriors**: the posterior entropy, averaged over agents and cells, is above
      ``max_entropy_fraction * log K``.

    Nothing is checked for ``K < 2``. Meant for a model after pruning (or trained with about the right K): a
    model with a deliberately over-estimated K leaves categories empty by design.

    Parameters
    ----------
    q
        Posteriors ``(A, n, K)`` or ``(n, K)``.
    mask
        Surviving categories ``(K_max,)``; when given and ``q`` has ``K_max`` columns, only the surviving
        ones are used (``q`` with one column per surviving category is used as is).
    min_share
        Share of the cells that makes a category populated.
    min_populated_fraction
        Share of the categories that must be populated.
    max_entropy_fraction
        Share of ``log K`` above which the mean entropy counts as near uniform.
    stacklevel
        ``stacklevel`` of the warning (2: the caller of this function).

    Returns
    -------
    The problems found (empty when the posteriors look healthy).
    """
    q = np.asarray(q, dtype=float)
    if q.ndim == 2:
        q = q[None]
    if q.ndim != 3:
        raise ValueError(f"Expected posteriors of shape (A, n, K) or (n, K), got {q.shape}.")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if q.shape[-1] == mask.size and mask.sum() != mask.size:
            q = q[..., mask]
    n, k = q.shape[1], q.shape[-1]
    if k < 2 or n == 0:
        return []
    problems = []
    shares = np.bincount(q.mean(0).argmax(-1), minlength=k) / n
    n_populated = int((shares >= min_share).sum())
    needed = max(2.0, min_populated_fraction * k)
    if n_populated < needed:
        problems.append(f"only {n_populated} of {k} categories hold at least {min_share:.0%} of the cells")
    entropy = float(-(q * np.log(np.clip(q, 1e-12, None))).sum(-1).mean())
    if entropy > max_entropy_fraction * math.log(k):
        problems.append(f"the mean posterior entropy {entropy:.3g} is near uniform (log K = {math.log(k):.3g})")
    if problems:
        warnings.warn(
            "The categories look collapsed: "
            + "; ".join(problems)
            + ". Train longer, lower tau (tau=None ties it to 1/K), or start from fewer categories.",
            UserWarning,
            stacklevel=stacklevel,
        )
    return problems
