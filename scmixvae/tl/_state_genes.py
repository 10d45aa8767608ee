"""Type-specific state genes: traverse each type's state axis and rank genes by the decoded change."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse, stats
from scvi import REGISTRY_KEYS
from torch.nn import functional as F

from .. import _validation as check
from .._constants import CONDITION_KEY, DEFAULT_STATE_GENES_KEY, NORMALISATION_SCALE, category_name
from .._preprocess import log_normalise_block
from ..module._module import eval_mode

logger = logging.getLogger(__name__)

#: ``params["method"]`` of the rankings written by :func:`rank_state_genes`.
METHOD = "cplmixvae_state_traversal"
#: Rows of the count matrix read at once by the streamed gene statistics.
_CHUNK_SIZE = 4096
#: Smallest number of cells a group needs for its state axis and spread.
_MIN_CELLS = 3
#: Fraction of a group's cells at each end of its state (``logfoldchanges`` of :func:`rank_state_genes`).
ENDS_QUANTILE = 0.25
#: Matrix entries densified at once by the per-gene test over cells.
_DENSE_ENTRIES = 1 << 20
#: Top genes of each group whose decoded path :func:`rank_state_genes` stores (``traversal["expression"]``).
N_STORED_GENES = 50

Axis = Literal["pc1", "condition"] | int
Measure = Literal["endpoints", "range"]


def group_key(key: str) -> str:
    """``obs`` column of the consensus groups written by :func:`rank_state_genes` when ``groupby=None``."""
    return f"{key}_group"


# ---------------------------------------------------------------------------------------------- checks
def _resolve_axis(model, axis):
    """``None``: ``"condition"`` for models set up with a condition, else ``"pc1"``."""
    if axis is None:
        return "condition" if _condition_key(model) is not None else "pc1"
    return axis


def _check_traversal_args(model, *, axis, n_sigma, n_steps, agent) -> None:
    if isinstance(axis, bool) or not (axis in ("pc1", "condition") or isinstance(axis, int | np.integer)):
        raise ValueError(f'`axis` must be "pc1", "condition" or the index of a state dimension, got {axis!r}.')
    if axis == "condition" and _condition_key(model) is None:
        raise ValueError(
            '`axis="condition"` needs a condition registered with the model: '
            "CplMixVAE.setup_anndata(adata, condition_key=...)."
        )
    n_state = model.module.n_state
    if not isinstance(axis, str) and not 0 <= int(axis) < n_state:
        raise ValueError(
            f"`axis`={axis} is out of range: the model has {n_state} state dimension(s) (0..{n_state - 1})."
        )
    check.check_float("n_sigma", n_sigma, strict=True)
    check.check_int("n_steps", n_steps, minimum=2)  # the start and the end of the path
    check.check_int("agent", agent, minimum=0, maximum=model.module.n_agents - 1)


def _condition_key(model) -> str | None:
    """Return the ``obs`` column registered as the model's condition (``setup_anndata(condition_key=...)``)."""
    return model.adata_manager.registry.get("setup_args", {}).get("condition_key")


def _check_condition_column(model, adata: AnnData, axis, given_axis) -> None:
    """Before any work: the condition axis needs the model's condition column in ``adata``, without NaN."""
    if axis != "condition":
        return
    key = _condition_key(model)
    default = (
        ' (the default axis of a model set up with a condition; pass axis="pc1" for the first principal axis)'
        if given_axis is None
        else ""
    )
    if key not in adata.obs:
        raise ValueError(f'`axis="condition"`{default}: adata.obs has no column {key!r}, the model\'s condition.')
    if adata.obs[key].isna().any():
        raise ValueError(f'`axis="condition"`{default}: adata.obs[{key!r}] has missing values.')


def _conditions_for(model, adata: AnnData, axis) -> tuple[np.ndarray | None, list[str]]:
    """Return the cells' conditions and their order when ``axis="condition"``, else ``(None, [])``.

    The conditions are read from the column the model was set up with, and ordered as the model registered them
    (the categories of its training column), whatever the order of the column given; conditions the model has
    not seen follow, sorted.
    """
    if axis != "condition":
        return None, []
    _check_condition_column(model, adata, axis, axis)
    labels = np.asarray(adata.obs[_condition_key(model)].astype(str))
    field = model.adata_manager.registry["field_registries"].get(CONDITION_KEY, {})
    registered = [str(c) for c in field.get("state_registry", {}).get("categorical_mapping", [])]
    present = set(np.unique(labels).tolist())
    return labels, [c for c in registered if c in present] + sorted(present - set(registered))


def _check_groupby(adata: AnnData, groupby: str) -> None:
    """``groupby`` must name a categorical ``obs`` column with string categories (what scanpy's plots need)."""
    if not isinstance(groupby, str) or groupby not in adata.obs:
        raise ValueError(f"`groupby`={groupby!r} is not a column of adata.obs; pass an obs column or None.")
    column = adata.obs[groupby]
    if not isinstance(column.dtype, pd.CategoricalDtype) or not all(isinstance(c, str) for c in column.cat.categories):
        raise ValueError(
            f"adata.obs[{groupby!r}] must be categorical with string categories (as scanpy's rankings need); "
            f"convert it first: adata.obs[{groupby!r}] = adata.obs[{groupby!r}].astype(str).astype('category')."
        )


def _category_index(model, category: str | int) -> int:
    """Index among the initial categories of a surviving category given by name or index."""
    names = model.category_names
    name = category_name(int(category)) if isinstance(category, int | np.integer) else category
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"`category` must be one of the model's surviving categories {names}, got {category!r}.")
    return int(name)


# ---------------------------------------------------------------------------------------------- streamed reads
def gene_std(x, *, chunk_size: int = _CHUNK_SIZE) -> np.ndarray:
    """Per-gene standard deviation of ``log1p`` of library-normalised counts, streamed over row chunks.

    Each chunk of ``chunk_size`` cells is normalised to ``1e4`` counts per cell (the model's encoder
    input), transformed with ``log1p`` and reduced to per-gene sums and sums of squares in float64;
    a sparse matrix stays sparse, so memory is bounded by one chunk whatever the number of cells.

    Parameters
    ----------
    x
        Raw counts, cells x genes: a :mod:`scipy.sparse` matrix, a dense array or a backed AnnData matrix.
    chunk_size
        Number of rows read at once.

    Returns
    -------
    The population standard deviation (``ddof=0``) of every gene, float64 ``(n_genes,)``.
    """
    n_obs, n_vars = x.shape
    if n_obs == 0:
        raise ValueError("Cannot compute gene spreads on an empty matrix (0 cells).")
    total = np.zeros(n_vars)
    total_sq = np.zeros(n_vars)
    for start in range(0, n_obs, chunk_size):
        block = log_normalise_block(x[start : start + chunk_size], dtype=np.float64)
        if sparse.issparse(block):
            total += np.asarray(block.sum(0)).ravel()
            total_sq += np.asarray(block.multiply(block).sum(0)).ravel()
        else:
            total += block.sum(0)
            total_sq += (block**2).sum(0)
    mean = total / n_obs
    return np.sqrt(np.maximum(total_sq / n_obs - mean**2, 0.0))


@torch.inference_mode()
def _encode(model, adata: AnnData, batch_size: int | None) -> tuple[np.ndarray, torch.Tensor, torch.Tensor | None]:
    """One pass over the cells: consensus category (initial index), state features ``hs`` ``(A, n, F)``.

    Also returns the mean of the continuous covariates (``None`` without them). Memory is ``n x A x F``
    floats (the state features' width, not the genes).
    """
    consensus, hs = [], []
    cont_sum, n = None, 0
    for inputs, out in model.iter_inference(adata, batch_size=batch_size):
        consensus.append(out["q"].mean(0).argmax(-1).cpu())
        hs.append(out["hs"].cpu())
        cont = inputs.get("cont_covs")
        if cont is not None and cont.shape[-1] > 0:
            part = cont.float().sum(0).cpu()
            cont_sum = part if cont_sum is None else cont_sum + part
        n += out["hs"].shape[1]
    cont_mean = None if cont_sum is None else cont_sum / n
    return torch.cat(consensus).numpy(), torch.cat(hs, dim=1), cont_mean


@torch.inference_mode()
def _states(model, hs: torch.Tensor, k: int, agent: int) -> np.ndarray:
    """State posterior means of agent ``agent`` for state features ``hs`` ``(A, n, F)`` conditioned on ``k``."""
    module = model.module
    hs = hs.to(module.device)
    c = F.one_hot(torch.full((hs.shape[1],), k, device=hs.device), module.n_categories).float()
    with eval_mode(module):  # the state head of the read-outs that gave hs
        mean, _ = module.state_posterior(hs, c.expand(module.n_agents, -1, -1))
    return mean[agent].cpu().numpy().astype(np.float64)


def _condition_direction(states: np.ndarray, conditions: np.ndarray, order: Sequence[str]) -> np.ndarray | None:
    """Return the unit direction along which the conditions' mean states lie (``None``: fewer than two).

    Two conditions: from the mean state of the first (in ``order``) to that of the second. More: the first
    principal axis of the conditions' mean states weighted by their numbers of cells, oriented from the
    first condition present towards the last.
    """
    present = [c for c in order if (conditions == c).any()]
    if len(present) < 2:
        return None
    means = np.stack([states[conditions == c].mean(0) for c in present])
    weights = np.array([(conditions == c).sum() for c in present], dtype=np.float64)
    if len(present) == 2:
        direction = means[1] - means[0]
    else:
        centred = means - np.average(means, axis=0, weights=weights)
        _, eigvec = np.linalg.eigh((centred * weights[:, None]).T @ centred)
        direction = eigvec[:, -1]
        direction = direction * (np.sign(direction @ (means[-1] - means[0])) or 1.0)
    norm = np.linalg.norm(direction)
    return direction / norm if norm > 0 else None


def _log_no_condition_axis(names: Sequence[str]) -> None:
    """Log, in one line, the groups or categories whose condition axis fell back to ``pc1``."""
    if names:
        logger.warning(
            "No condition axis for %s (one condition only, or equal mean states): axis pc1 instead.", ", ".join(names)
        )


def _path_geometry(
    states: np.ndarray,
    axis: Axis,
    conditions: np.ndarray | None = None,
    order: Sequence[str] = (),
) -> tuple[np.ndarray, np.ndarray, float, str]:
    """Centre, unit direction and spread (sd of the projections) of the chosen axis of ``states``, and the axis.

    ``axis="condition"`` needs the cells' ``conditions``; where fewer than two conditions are present, or
    their mean states coincide, it falls back to the first principal component (the returned axis says so, and
    the caller logs it: :func:`_log_no_condition_axis`).
    """
    center = states.mean(0)
    if axis == "condition":
        direction = _condition_direction(states, conditions, order)
        if direction is not None:
            return center, direction, float(((states - center) @ direction).std(ddof=1)), "condition"
        axis = "pc1"
    if axis == "pc1":
        centred = states - center
        cov = centred.T @ centred / max(len(states) - 1, 1)
        eigval, eigvec = np.linalg.eigh(cov)
        direction = eigvec[:, -1]
        # deterministic sign (as sklearn's svd_flip): the largest loading is positive
        direction = direction * np.sign(direction[np.argmax(np.abs(direction))])
        sigma = float(np.sqrt(max(eigval[-1], 0.0)))
    else:
        direction = np.zeros(states.shape[1])
        direction[int(axis)] = 1.0
        sigma = float(states[:, int(axis)].std(ddof=1))
    return center, direction, sigma, str(axis)


@torch.inference_mode()
def _decode_path(
    model,
    k: int,
    center: np.ndarray,
    direction: np.ndarray,
    sigma: float,
    *,
    n_sigma: float,
    n_steps: int,
    agent: int,
    cont_mean: torch.Tensor | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode ``s = center + t sigma direction`` for ``t`` in ``[-n_sigma, n_sigma]`` with ``c = onehot(k)``.

    Covariates: batch 0 (the first category of the batch key), code 0 of every categorical
    covariate, the mean of every continuous covariate. Returns ``t`` ``(n_steps,)``, the decoded
    ``log1p`` normalised expression ``(n_steps, D)`` and the normalised expression itself (per
    ``1e4``).
    """
    module = model.module
    with eval_mode(module):
        device = module.device
        t = np.linspace(-n_sigma, n_sigma, n_steps)
        s = torch.as_tensor(center[None] + (t * sigma)[:, None] * direction[None], dtype=torch.float32, device=device)
        c = F.one_hot(torch.full((n_steps,), k, device=device), module.n_categories).float()
        batch_index = torch.zeros((n_steps, 1), dtype=torch.long, device=device)
        cat_covs = (
            torch.zeros((n_steps, len(module.n_cats_per_cov)), dtype=torch.long, device=device)
            if module.n_cats_per_cov
            else None
        )
        cont = None if cont_mean is None else cont_mean.to(device)[None].expand(n_steps, -1)
        cov = module.covariates(batch_index, cat_covs, cont)
        library = torch.ones((n_steps, 1), device=device)
        out = module.generative(s, c, library, batch_index, cov)
        if module.likelihood == "gaussian":
            x_log = out["px_mean"][agent].double().cpu().numpy()
            expr = np.maximum(np.expm1(x_log), 0.0)
        else:
            expr = (out["px_log_scale"][agent].double().exp() * NORMALISATION_SCALE).cpu().numpy()
            x_log = np.log1p(expr)
    return t, x_log, expr


# ---------------------------------------------------------------------------------------------- statistics
def _position_of_ends(position: np.ndarray, quantile: float) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the cells at the low and high ends: at most the ``quantile`` and at least the ``1 - quantile`` one."""
    low, high = np.quantile(position, [quantile, 1.0 - quantile])
    return position <= low, position >= high


def observed_state_statistics(
    counts, position: np.ndarray, *, quantile: float = ENDS_QUANTILE, max_entries: int = _DENSE_ENTRIES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold change between the ends of a state and a test of each gene's association with it, over cells.

    Parameters
    ----------
    counts
        Raw counts of the cells of one group, cells x genes (sparse or dense).
    position
        Each cell's coordinate along the state axis ``(n_cells,)``.
    quantile
        The low end is the cells at or below this quantile of ``position``, the high end those at or above
        ``1 - quantile``.
    max_entries
        Largest number of matrix entries densified at once (the cells of a block of genes).

    Returns
    -------
    ``logfoldchanges``: ``log2`` of the mean normalised expression (counts per ``1e4``) of the high end over that
    of the low end (``1e-9`` added to both, as scanpy); ``rho`` and ``pvals``: Spearman correlation of each gene's
    ``log1p`` normalised expression with ``position`` and its two-sided p-value (:func:`scipy.stats.pearsonr` of
    the ranks); genes constant over the cells get ``rho = 0`` and ``p = 1``. Each ``(n_genes,)``.
    """
    library = np.asarray(counts.sum(1), dtype=np.float64).ravel()
    scale = NORMALISATION_SCALE / np.maximum(library, 1.0)
    if sparse.issparse(counts):  # one float64 CSC copy, scaled in place (the genes' blocks below are its columns)
        normalised = sparse.csc_matrix(counts).astype(np.float64)
        normalised.data *= scale[normalised.indices]
    else:
        normalised = np.array(counts, dtype=np.float64)
        normalised *= scale[:, None]
    low, high = _position_of_ends(position, quantile)
    mean_high = np.asarray(normalised[high].mean(0)).ravel()
    mean_low = np.asarray(normalised[low].mean(0)).ravel()
    lfc = np.log2((mean_high + 1e-9) / (mean_low + 1e-9))

    n_cells, n_genes = normalised.shape
    rho, pvals = np.zeros(n_genes), np.ones(n_genes)
    position_ranks = stats.rankdata(position)
    position_ranks -= position_ranks.mean()
    if n_cells < 3 or not position_ranks.any():
        return lfc, rho, pvals
    width = max(1, max_entries // n_cells)
    for start in range(0, n_genes, width):
        block = normalised[:, start : start + width]
        block = block.toarray() if sparse.issparse(block) else block  # dense: a view of our own copy
        np.log1p(block, out=block)
        varies = np.ptp(block, axis=0) > 0
        if varies.any():
            rho[start : start + width][varies] = _rank_correlation(block[:, varies], position_ranks)
    varies = rho != 0
    pvals[varies] = _correlation_pvalues(rho[varies], n_cells)
    return lfc, rho, pvals


def _rank_correlation(block: np.ndarray, centred_position_ranks: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column's ranks (ties averaged) with the centred ranks of the positions."""
    ranks = stats.rankdata(block, axis=0)
    ranks -= ranks.mean(0)
    norms = np.sqrt(np.einsum("ij,ij->j", ranks, ranks) * (centred_position_ranks @ centred_position_ranks))
    return np.clip((centred_position_ranks @ ranks) / norms, -1.0, 1.0)


def _correlation_pvalues(rho: np.ndarray, n: int) -> np.ndarray:
    """Two-sided p-values of correlations ``rho`` over ``n`` pairs, as :func:`scipy.stats.pearsonr` gives them."""
    null = stats.beta(n / 2 - 1, n / 2 - 1, loc=-1, scale=2)  # the exact null distribution of r (normal data)
    return np.clip(2 * null.sf(np.abs(rho)), 0.0, 1.0)


def _traversal_scores(
    x_log: np.ndarray, expr: np.ndarray, std: np.ndarray | None, measure: Measure
) -> tuple[np.ndarray, np.ndarray]:
    """Score (change along the path, optionally per gene spread) and signed log2 fold change, path end vs start."""
    change = np.abs(x_log[-1] - x_log[0]) if measure == "endpoints" else x_log.max(0) - x_log.min(0)
    if std is not None:
        change = np.divide(change, std, out=np.zeros_like(change), where=std > 0)
    lfc = np.log2((expr[-1] + 1e-9) / (expr[0] + 1e-9))
    return change, lfc


# ---------------------------------------------------------------------------------------------- public API
def state_traversal(
    model,
    category: str | int,
    *,
    adata: AnnData | None = None,
    cells: Sequence[int] | np.ndarray | None = None,
    axis: Axis | None = None,
    n_sigma: float = 3.0,
    n_steps: int = 10,
    agent: int = 0,
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the expression along the main state axis of one category.

    The cells' state posterior means (agent ``agent``, conditioned on ``category``) give a centre and
    a main axis (their first principal component, or one state dimension); ``s`` moves along it from
    ``-n_sigma`` to ``+n_sigma`` standard deviations of the cells' projections and is decoded by agent
    ``agent``'s decoder with ``c = onehot(category)``. Covariates are fixed to a reference: batch 0
    (the first category of the batch key), code 0 of each categorical covariate and the mean of each
    continuous covariate.

    Parameters
    ----------
    model
        A trained :class:`~scmixvae.model.CplMixVAE`.
    category
        A surviving category, by name (as in :attr:`~scmixvae.model.CplMixVAE.category_names`); an integer is
        read as the category of that name (``2`` for ``"2"``, whatever its position among the survivors).
    adata
        AnnData with the model's genes; defaults to the training data.
    cells
        Integer indices or a boolean mask of the cells that define the state distribution; by default
        the cells whose consensus category is ``category``.
    axis
        ``"pc1"``, ``"condition"`` (the direction between the conditions' mean states, for models set up
        with a ``condition_key``; see :func:`rank_state_genes`) or the index of one state dimension.
        ``None`` (default): ``"condition"`` when the model has a condition, else ``"pc1"``.
    n_sigma
        Half-length of the path in standard deviations of the cells along the axis.
    n_steps
        Number of points on the path (at least 2).
    agent
        Agent whose state space and decoder are used.
    batch_size
        Minibatch size of the encoding pass.

    Returns
    -------
    ``steps``, the positions on the path in standard deviations ``(n_steps,)``, and the decoded
    expression ``(n_steps, n_genes)`` as ``log1p`` of library-normalised expression (per ``1e4``), the
    scale of the data's ``log1p``-normalised counts.
    """
    check.check_model(model)
    given_axis, axis = axis, _resolve_axis(model, axis)
    _check_traversal_args(model, axis=axis, n_sigma=n_sigma, n_steps=n_steps, agent=agent)
    k = _category_index(model, category)
    _check_condition_column(model, model.adata if adata is None else adata, axis, given_axis)
    adata = model._validate_anndata(adata)
    if cells is not None:
        cells = check.check_indices(cells, adata.n_obs, name="cells")
    consensus, h, cont_mean = _encode(model, adata, batch_size)
    if cells is None:
        mask = consensus == k
    else:
        mask = np.zeros(adata.n_obs, dtype=bool)
        mask[cells] = True
    if mask.sum() < _MIN_CELLS:
        raise ValueError(
            f"Category {category!r} has {int(mask.sum())} cell(s); the state axis needs at least {_MIN_CELLS}."
        )
    states = _states(model, h[:, torch.as_tensor(np.flatnonzero(mask))], k, agent)
    conditions, order = _conditions_for(model, adata, axis)
    center, direction, sigma, used = _path_geometry(
        states, axis, None if conditions is None else conditions[mask], order
    )
    _log_no_condition_axis([f"category {category!r}"] if used != axis else [])
    t, x_log, _ = _decode_path(
        model, k, center, direction, sigma, n_sigma=n_sigma, n_steps=n_steps, agent=agent, cont_mean=cont_mean
    )
    return t, x_log


def rank_state_genes(
    adata: AnnData,
    model,
    *,
    groupby: str | None = None,
    axis: Axis | None = None,
    n_sigma: float = 3.0,
    n_steps: int = 10,
    normalize: bool = False,
    measure: Measure = "range",
    agent: int = 0,
    batch_size: int | None = None,
    key_added: str = DEFAULT_STATE_GENES_KEY,
    copy: bool = False,
) -> AnnData | None:
    """Rank the genes that change along each type's state axis (type-specific state genes).

    For each group (by default each consensus category of the model): the state posterior means of
    its cells (agent ``agent``, conditioned on the group's category) give a centre and a main axis
    (first principal component, or one state dimension). The state moves along the axis from
    ``-n_sigma`` to ``+n_sigma`` standard deviations and is decoded with the category fixed
    (:func:`state_traversal`). Each gene is ranked by how much its decoded ``log1p`` normalised
    expression changes along that path (the *traversal score*: by default its range along the path,
    unnormalised; the published score is ``|x_end - x_start| / std``, ``measure="endpoints", normalize=True``).
    The fold changes and p-values are observed over the group's cells, not read off the decoder: each cell's
    *position* is its state's coordinate along the axis, the low and high ends of the state are the cells in
    the bottom and top quartile of the positions, and each gene is tested for association with the position
    (:func:`observed_state_statistics`). For models set up with a condition the default axis joins the
    conditions' mean states.

    Parameters
    ----------
    adata
        AnnData with the model's genes (the training data or new cells).
    model
        A trained :class:`~scmixvae.model.CplMixVAE`.
    groupby
        ``obs`` column of the groups. ``None`` uses the model's consensus categories and writes them to
        ``obs[f"{key_added}_group"]``. Otherwise a categorical column with string categories, e.g. the
        ``obs["cplmixvae_type"]`` of :func:`~scmixvae.tl.annotate` or reference cell types; each group is
        decoded with the category most of its cells are assigned to (itself for the consensus types).
    axis
        ``"pc1"`` (first principal component of the group's state means) or the index of one state
        dimension. The sign of a principal axis is arbitrary; it is fixed so that its largest loading is
        positive. ``"condition"`` (models set up with a ``condition_key``): the direction from the mean state
        of the group's cells in the first condition to that in the second (in the order of the categories of
        the column the model was set up with; with more conditions, the main axis of their mean states, oriented
        from the first towards the last): the genes the condition moves along the state, within each type.
        Groups that hold a single condition use ``"pc1"`` (logged; ``traversal["axis"]`` says which axis each
        group used).
        ``None`` (default): ``"condition"`` when the model has a condition, else ``"pc1"``.
    n_sigma
        Half-length of the path, in standard deviations of the group's cells along the axis.
    n_steps
        Number of points on the path (at least 2).
    normalize
        Divide each gene's change by its standard deviation of ``log1p`` normalised expression over all
        cells of ``adata`` (computed streamed over chunks of the count matrix). Genes that never vary get
        a score of 0. ``False`` (default) keeps the change in ``log1p`` units: the published normalisation
        ranks low the genes that respond strongly (e.g. interferon-stimulated genes after a stimulation), since
        their overall spread is large precisely because they respond.
    measure
        ``"range"`` (default): ``max - min`` along the path, which also catches genes that peak inside the
        path; ``"endpoints"``: ``|x_end - x_start|`` (published).
    agent
        Agent whose state space and decoder are used (the consensus state is agent 0's).
    batch_size
        Minibatch size of the encoding pass.
    key_added
        Key in ``uns`` of the ranking.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Writes

    - ``uns[key_added]`` in the schema of :func:`scanpy.tl.rank_genes_groups`, all genes ranked per group
      by decreasing score, so that :func:`scanpy.get.rank_genes_groups_df`,
      :func:`scanpy.pl.rank_genes_groups_dotplot` and :func:`get_state_genes` read it:

      - ``names``, ``scores``, ``logfoldchanges``, ``pvals``, ``pvals_adj`` (scanpy's columns) and
        ``spearman_rho``, ``traversal_logfoldchanges``: record arrays, one field per group, in the genes' order;
      - ``scores``: the decoder's traversal score, the change along the path (per gene standard deviation with
        ``normalize=True``); the genes are ranked by it;
      - ``logfoldchanges``: ``log2`` fold change of the mean normalised expression (counts per ``1e4``) of the
        cells at the high end of the state over that of the cells at the low end (top vs bottom quartile of
        the positions; the direction follows the oriented axis; ``1e-9`` added to both means, as scanpy);
      - ``pvals``: two-sided p-value of the Spearman correlation, over the group's cells, between the gene's
        ``log1p`` normalised expression and the cells' positions (1 for genes constant in the group);
      - ``pvals_adj``: ``pvals`` adjusted across the genes of each group (Benjamini–Hochberg,
        :func:`scipy.stats.false_discovery_control`);
      - ``spearman_rho``: that correlation (signed; 0 for constant genes);
      - ``traversal_logfoldchanges``: signed ``log2`` fold change of the decoded normalised expression
        between the end and the start of the path (``±n_sigma``: an extrapolation of the decoder, not an
        observation);
      - ``params``: ``groupby``, ``reference="rest"``, ``method="cplmixvae_state_traversal"``,
        ``use_raw=False``, ``corr_method="benjamini-hochberg"``, ``test="spearman"``, ``ends_quantile=0.25``
        and the traversal settings;
      - ``traversal``: per group (in the order of ``groups``) the ``category`` decoded, ``n_cells``,
        ``center`` and unit ``direction`` of the axis in state space and ``sigma``, the cells' standard
        deviation along it, and the ``continuous_covariates`` decoded with (their means; empty without
        them); the path's ``steps`` in standard deviations ``(n_steps,)`` and ``expression``, the decoded
        ``log1p`` normalised expression of each group's 50 top-ranked genes, in the ranking's order
        ``(n_groups, n_steps, 50)``, which :func:`~scmixvae.pl.state_traversal_heatmap` draws.

    - ``obs[f"{key_added}_group"]``: the consensus category (categorical; categories without cells are
      left out, as scanpy's plots need), when ``groupby=None``; with another ``groupby``, the column an earlier
      ranking wrote under ``key_added`` is removed.

    Groups with fewer than 3 cells, or whose cells do not spread along the axis, are left out with a
    logged warning.
    """
    check.check_model(model)
    check.check_anndata(adata)
    check.check_key_added(key_added)
    given_axis, axis = axis, _resolve_axis(model, axis)
    _check_traversal_args(model, axis=axis, n_sigma=n_sigma, n_steps=n_steps, agent=agent)
    _check_condition_column(model, adata, axis, given_axis)
    if measure not in ("endpoints", "range"):
        raise ValueError(f'`measure` must be "endpoints" or "range", got {measure!r}.')
    if groupby is not None:
        _check_groupby(adata, groupby)
    if copy:
        adata = check.copy_of(adata)
    model_adata = model._validate_anndata(adata)

    consensus, h, cont_mean = _encode(model, model_adata, batch_size)
    names = model.category_names
    if groupby is None:
        groupby = group_key(key_added)
        # categories without cells are dropped: scanpy's plots fail on empty categories
        groups = pd.Categorical([category_name(k) for k in consensus], categories=names).remove_unused_categories()
        write_groups = True
    else:
        groups, write_groups = adata.obs[groupby].array, False
    counts = model.get_anndata_manager(model_adata, required=True).get_from_registry(REGISTRY_KEYS.X_KEY)
    std = gene_std(counts) if normalize else None
    conditions, order = _conditions_for(model, adata, axis)
    traversal = {"n_sigma": n_sigma, "n_steps": n_steps, "agent": agent, "cont_mean": cont_mean, "measure": measure}
    results, geometry = _rank_groups(model, groups, consensus, h, counts, std, axis, (conditions, order), traversal)
    if not results:
        raise ValueError(
            f"No group of {groupby!r} has at least {_MIN_CELLS} cells spread along the state axis; nothing to rank."
        )
    if write_groups:
        adata.obs[groupby] = groups
    elif groupby != group_key(key_added) and group_key(key_added) in adata.obs:  # an earlier ranking's groups
        del adata.obs[group_key(key_added)]
    adata.uns[key_added] = _to_rank_genes_groups(
        results,
        np.asarray(adata.var_names, dtype=str),
        params={
            "groupby": groupby,
            "reference": "rest",
            "method": METHOD,
            "use_raw": False,
            "corr_method": "benjamini-hochberg",
            "test": "spearman",
            "ends_quantile": ENDS_QUANTILE,
            "axis": str(axis),
            "n_sigma": float(n_sigma),
            "n_steps": int(n_steps),
            "normalize": bool(normalize),
            "measure": measure,
            "agent": int(agent),
        },
    )
    adata.uns[key_added]["traversal"] = _traversal_record(geometry, results, cont_mean)
    return adata if copy else None


def _rank_groups(model, groups, consensus, h, counts, std, axis, conditions, traversal) -> tuple[dict, dict]:
    """Rank the state genes of every group of ``groups`` with enough cells spread along the state axis.

    ``consensus``, ``h``: the cells' consensus categories and features (:func:`_encode`); ``conditions``: the
    cells' condition codes and their order (:func:`_conditions_for`). Returns each ranked group's result of
    :func:`_rank_group` and its geometry ``(category, n_cells, center, direction, sigma, axis)``.
    """
    codes, order = conditions
    results, geometry, without_condition_axis = {}, {}, []
    for group in groups.categories:
        idx = np.flatnonzero(np.asarray(groups == group))
        if len(idx) < _MIN_CELLS:
            logger.warning(
                "Group %r has %d cell(s) (< %d); it is left out of the ranking.", group, len(idx), _MIN_CELLS
            )
            continue
        k = int(np.bincount(consensus[idx]).argmax())
        states = _states(model, h[:, torch.as_tensor(idx)], k, traversal["agent"])
        cell_codes = None if codes is None else codes[idx]
        center, direction, sigma, group_axis = _path_geometry(states, axis, cell_codes, order)
        if group_axis != axis:
            without_condition_axis.append(f"group {group!r}")
        if not sigma > 0:
            logger.warning("The cells of group %r do not spread along the state axis; it is left out.", group)
            continue
        results[str(group)] = _rank_group(model, k, counts[idx], states, center, direction, sigma, std, traversal)
        geometry[str(group)] = (category_name(k), len(idx), center, direction, sigma, str(group_axis))
    _log_no_condition_axis(without_condition_axis)
    return results, geometry


def _traversal_record(
    geometry: dict[str, tuple], results: dict, cont_mean: torch.Tensor | None
) -> dict[str, np.ndarray]:
    """Build the ``traversal`` entry: each ranked group's category, size, path and decoded top genes."""
    values = list(geometry.values())
    return {
        "steps": next(iter(results.values()))["steps"],
        "expression": np.stack([r["top_path"] for r in results.values()]),
        "groups": np.asarray(list(geometry), dtype=str),
        "category": np.asarray([g[0] for g in values], dtype=str),
        "n_cells": np.asarray([g[1] for g in values], dtype=np.int64),
        "center": np.stack([g[2] for g in values]),
        "direction": np.stack([g[3] for g in values]),
        "sigma": np.asarray([g[4] for g in values], dtype=np.float64),
        "axis": np.asarray([g[5] for g in values], dtype=str),
        "continuous_covariates": np.zeros(0) if cont_mean is None else cont_mean.numpy().astype(np.float64),
    }


def _rank_group(model, k, counts, states, center, direction, sigma, std, traversal: dict) -> dict[str, np.ndarray]:
    """One group's ranking: its columns (decoder's traversal, statistics over its cells), order and top genes' path."""
    steps, x_log, expr = _decode_path(
        model,
        k,
        center,
        direction,
        sigma,
        n_sigma=traversal["n_sigma"],
        n_steps=traversal["n_steps"],
        agent=traversal["agent"],
        cont_mean=traversal["cont_mean"],
    )
    scores, traversal_lfc = _traversal_scores(x_log, expr, std, traversal["measure"])
    lfc, rho, pvals = observed_state_statistics(counts, (states - center) @ direction)
    order = np.argsort(-scores, kind="stable")  # the ranking: by decreasing score
    return {
        "order": order,
        "steps": steps,
        "top_path": x_log[:, order[:N_STORED_GENES]].astype(np.float32),
        "scores": scores,
        "logfoldchanges": lfc,
        "pvals": pvals,
        "pvals_adj": stats.false_discovery_control(pvals),
        "spearman_rho": rho,
        "traversal_logfoldchanges": traversal_lfc,
    }


#: Record arrays of :func:`rank_state_genes` and their dtypes (scanpy's five first).
_COLUMNS = {
    "names": "O",
    "scores": "float32",
    "logfoldchanges": "float32",
    "pvals": "float64",
    "pvals_adj": "float64",
    "spearman_rho": "float32",
    "traversal_logfoldchanges": "float32",
}


def _to_rank_genes_groups(results: dict, genes: np.ndarray, *, params: dict) -> dict:
    """Record arrays of :func:`scanpy.tl.rank_genes_groups`, every gene ranked by decreasing score."""
    columns = {column: [] for column in _COLUMNS}
    for result in results.values():
        order = result["order"]
        columns["names"].append(genes[order].astype(object))
        for column in list(_COLUMNS)[1:]:
            columns[column].append(result[column][order].astype(_COLUMNS[column]))
    groups = list(results)
    dtypes = _COLUMNS
    out = {"params": params}
    for column, arrays in columns.items():
        out[column] = np.rec.fromarrays(arrays, dtype=[(g, dtypes[column]) for g in groups])
    return out


def get_state_genes(
    adata: AnnData,
    *,
    key: str = DEFAULT_STATE_GENES_KEY,
    group: str | Sequence[str] | None = None,
    n_genes: int | None = None,
) -> pd.DataFrame:
    """Return the state genes of :func:`rank_state_genes` as a tidy table.

    Parameters
    ----------
    adata
        AnnData on which :func:`rank_state_genes` (or :func:`scanpy.tl.rank_genes_groups`) was run.
    key
        Key of the ranking in ``uns``.
    group
        One group, several, or ``None`` for all; a group is given by its name (``3`` is read as ``"3"``, the name
        of category 3).
    n_genes
        Top genes per group; all by default.

    Returns
    -------
    A :class:`~pandas.DataFrame` with columns ``group``, ``names``, ``scores``, ``logfoldchanges``,
    ``pvals``, ``pvals_adj`` (those present in the ranking), ordered by group and decreasing score.
    """
    ranking = _get_ranking(adata, key)
    available = list(ranking["names"].dtype.names)
    if group is None:
        groups = available
    else:  # names, as the ranking stores them: category 3 is "3"
        groups = list(dict.fromkeys(str(g) for g in check.as_list(group)))
    missing = [g for g in groups if g not in available]
    if missing:
        raise ValueError(f"Group(s) {missing} not in uns[{key!r}]; available groups: {available}.")
    if n_genes is not None:
        check.check_int("n_genes", n_genes, minimum=1)
    columns = [c for c in ("names", "scores", "logfoldchanges", "pvals", "pvals_adj") if c in ranking]
    frames = []
    for g in groups:
        frame = pd.DataFrame({c: ranking[c][g] for c in columns})
        if n_genes is not None:
            frame = frame.iloc[:n_genes]
        frame.insert(0, "group", g)
        frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    out["group"] = pd.Categorical(out["group"], categories=groups)
    out["names"] = out["names"].astype(str)
    return out


def _get_ranking(adata: AnnData, key: str) -> dict:
    """``uns[key]`` after checking that it holds a ``rank_genes_groups``-style ranking."""
    check.check_anndata(adata)
    if key not in adata.uns:
        raise ValueError(f"No gene ranking in adata.uns[{key!r}]; run scmixvae.tl.rank_state_genes first.")
    ranking = adata.uns[key]
    required = ("names", "scores")
    if not isinstance(ranking, dict) or any(r not in ranking for r in required):
        raise ValueError(f"adata.uns[{key!r}] is not a rank_genes_groups-style ranking (needs {required}).")
    return ranking
