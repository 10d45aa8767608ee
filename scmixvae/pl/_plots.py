"""Plots of a trained model and of the results written by :mod:`scmixvae.tl` (matplotlib only)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib import colors as mcolors
from matplotlib import rcParams
from matplotlib.axes import Axes
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .. import _validation as check
from .._constants import DEFAULT_KEY, DEFAULT_STATE_GENES_KEY, state_key, type_key
from .._io import atomic_write

logger = logging.getLogger(__name__)


def _check_save(save: str | os.PathLike | None) -> Path | None:
    """Return the path to save to, checked before drawing: its folder exists and matplotlib knows its format."""
    if save is None:
        return None
    if not isinstance(save, str | os.PathLike) or not str(save):
        raise TypeError(f"`save` must be a file path (str or os.PathLike) or None, got {save!r}.")
    path = Path(save)
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise ValueError(f"`save`={str(save)!r} needs a file extension of a matplotlib format: {sorted(formats)}.")
    if not path.parent.is_dir():
        raise ValueError(f"`save`: the folder {str(path.parent)!r} does not exist; create it first.")
    return path


def save_figure(fig: Figure, path: str | os.PathLike, **kwargs) -> None:
    """Write ``fig`` to ``path`` whole or not at all: to a temporary file in the same folder, then moved into place.

    ``bbox_inches="tight"`` by default, so that legends and labels outside the axes are kept.
    """
    kwargs.setdefault("bbox_inches", "tight")
    atomic_write(path, lambda tmp: fig.savefig(tmp, **kwargs))


def _finish(fig: Figure, axes, *, show: bool | None, return_fig: bool, save: Path | None = None):
    """Save the figure (``save``), then return it, show it (``None``), or return the axes, as scanpy's plots do."""
    if save is not None:
        save_figure(fig, save)
        logger.info("Saved the figure to %s.", save)
    if return_fig:
        return fig
    if show is None:
        import scanpy as sc

        show = bool(sc.settings.autoshow) and save is None
    if show:
        plt.show()
        return None
    return axes


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is None:  # constrained: legends, colour bars and labels outside the axes stay in the figure
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
        return fig, ax
    if not isinstance(ax, Axes):
        raise TypeError(f"`ax` must be a matplotlib Axes or None, got {type(ax).__name__}.")
    return ax.figure, ax


def _heatmap(ax: Axes, values: np.ndarray, *, cmap: str, vmin=None, vmax=None, label: str = ""):
    image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.grid(False)  # scanpy's figure style turns grids on; they would cross every cell
    ax.figure.colorbar(image, ax=ax, label=label, shrink=0.8)
    return image


def consensus_heatmap(
    model_or_matrix,
    agent_a: int = 0,
    agent_b: int = 1,
    *,
    adata: AnnData | None = None,
    normalize: bool = True,
    annotate: bool | None = None,
    cmap: str = "viridis",
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | Axes | None:
    """Agent-versus-agent co-assignment of the categories.

    Parameters
    ----------
    model_or_matrix
        A trained :class:`~scmixvae.model.CplMixVAE` (its
        :meth:`~scmixvae.model.CplMixVAE.get_consensus_matrix` is plotted) or a square matrix
        (:class:`~pandas.DataFrame` or array) of co-assignments.
    agent_a, agent_b
        Agents on the rows and columns (with a model).
    adata
        Cells to use with a model; its training data by default.
    normalize
        With a model: divide each row by its sum, so that the diagonal is the per-category consensus.
    annotate
        Write the values in the cells; by default when there are at most 20 categories.
    cmap
        Colour map.
    ax, show, return_fig
        Axes to draw on; whether to show the figure; return the figure instead of the axes.
    save
        File to write the figure to (format from its extension, e.g. ``"types.pdf"``), legends and labels
        included; written to a temporary file first and then moved into place. Not shown when saved
        (``show=None``).

    Returns
    -------
    The figure with ``return_fig=True``, ``None`` when shown, the axes otherwise.
    """
    save = _check_save(save)
    from ..model import CplMixVAE

    if isinstance(model_or_matrix, CplMixVAE):
        matrix = model_or_matrix.get_consensus_matrix(agent_a, agent_b, adata, normalize=normalize)
    elif isinstance(model_or_matrix, pd.DataFrame | np.ndarray):
        shape = np.shape(model_or_matrix)  # before the DataFrame, which makes a column of a 1-D array
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"The co-assignment matrix must be square, got shape {shape}.")
        matrix = pd.DataFrame(model_or_matrix)
    else:
        raise TypeError(
            f"`model_or_matrix` must be a CplMixVAE or a square matrix, got {type(model_or_matrix).__name__}."
        )
    values = matrix.to_numpy(dtype=float)
    k = values.shape[0]
    fig, ax = _new_axes(ax, (1.5 + 0.45 * k, 1.0 + 0.4 * k))
    bounded = values.min() >= 0 and values.max() <= 1
    _heatmap(ax, values, cmap=cmap, vmin=0, vmax=1 if bounded else None, label="fraction" if bounded else "cells")
    ax.set_xticks(range(k), [str(c) for c in matrix.columns], rotation=90)
    ax.set_yticks(range(k), [str(i) for i in matrix.index])
    ax.set_xlabel(matrix.columns.name or f"agent{agent_b}")
    ax.set_ylabel(matrix.index.name or f"agent{agent_a}")
    if annotate or (annotate is None and k <= 20):
        for i in range(k):
            for j in range(k):
                text = f"{values[i, j]:.2f}" if bounded else f"{values[i, j]:g}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w" if values[i, j] < 0.5 else "k")
    ax.set_title("category consensus")
    return _finish(fig, ax, show=show, return_fig=return_fig, save=save)


def state_traversal_heatmap(
    adata: AnnData,
    category: str | int,
    *,
    n_genes: int = 20,
    key: str = DEFAULT_STATE_GENES_KEY,
    standard_scale: Literal["var"] | None = "var",
    cmap: str = "viridis",
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | Axes | None:
    """Plot the decoded expression of a group's top state genes along its state path.

    :func:`~scmixvae.tl.rank_state_genes` decodes each group's path and stores the decoded expression of the
    group's top genes in ``uns[key]["traversal"]``; this draws it (no model needed).

    Parameters
    ----------
    adata
        AnnData with the ranking in ``uns[key]``.
    category
        A group of the ranking (a field of ``uns[key]["names"]``); an integer is read as the group of that name
        (``2`` for ``"2"``), as in :func:`~scmixvae.tl.get_state_genes`.
    n_genes
        Number of top-ranked genes (rows), at most the number stored (50).
    key
        Key of the ranking in ``uns``.
    standard_scale
        ``"var"``: scale each gene to ``[0, 1]`` along the path; ``None``: decoded ``log1p`` normalised
        expression.
    cmap
        Colour map.
    ax, show, return_fig
        Axes to draw on; whether to show the figure; return the figure instead of the axes.
    save
        File to write the figure to (format from its extension, e.g. ``"types.pdf"``), legends and labels
        included; written to a temporary file first and then moved into place. Not shown when saved
        (``show=None``).

    Returns
    -------
    The figure with ``return_fig=True``, ``None`` when shown, the axes otherwise.
    """
    save = _check_save(save)
    from ..tl._state_genes import _get_ranking

    ranking = _get_ranking(adata, key)
    traversal = ranking.get("traversal")
    if traversal is None or "expression" not in traversal:
        raise ValueError(
            f"uns[{key!r}] has no decoded traversal; it must come from scmixvae.tl.rank_state_genes (run it again "
            "if it was written by an older version)."
        )
    groups = [str(g) for g in traversal["groups"]]
    if isinstance(category, int | np.integer) and not isinstance(category, bool):
        category = str(category)
    if category not in groups:
        raise ValueError(f"`category`={category!r} is not a group of uns[{key!r}]; groups: {groups}.")
    expression = np.asarray(traversal["expression"])
    check.check_int("n_genes", n_genes, minimum=1, maximum=expression.shape[2])
    if standard_scale not in ("var", None):
        raise ValueError(f'`standard_scale` must be "var" or None, got {standard_scale!r}.')
    steps = np.asarray(traversal["steps"], dtype=float)
    values = expression[groups.index(category), :, :n_genes].T.astype(float)
    genes = np.asarray(ranking["names"][category], dtype=str)[:n_genes]
    if standard_scale == "var":
        low, high = values.min(1, keepdims=True), values.max(1, keepdims=True)
        values = np.divide(values - low, high - low, out=np.zeros_like(values), where=high > low)
    fig, ax = _new_axes(ax, (0.4 * len(steps) + 2.5, 0.25 * len(genes) + 1.5))
    _heatmap(ax, values, cmap=cmap, label="scaled expression" if standard_scale else "log1p expression")
    ax.set_yticks(range(len(genes)), genes)
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 5)).round().astype(int))  # labels apart
    ax.set_xticks(ticks, [f"{steps[t]:+.1f}" for t in ticks])
    ax.set_xlabel("state along the axis (sd)")
    ax.set_title(f"{category}: state genes")
    return _finish(fig, ax, show=show, return_fig=return_fig, save=save)


def state_genes_dotplot(
    adata: AnnData,
    *,
    key: str = DEFAULT_STATE_GENES_KEY,
    n_genes: int = 5,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
    **kwargs,
) -> Figure | dict[str, Axes] | None:
    """Dot plot of each group's top state genes (:func:`scanpy.pl.rank_genes_groups_dotplot`).

    Parameters
    ----------
    adata
        AnnData with the ranking of :func:`~scmixvae.tl.rank_state_genes` in ``uns[key]``.
    key
        Key of the ranking in ``uns``.
    n_genes
        Top genes per group.
    ax, show, return_fig
        Axes to draw on; whether to show the figure; return the figure instead of the axes.
    save
        File to write the figure to (format from its extension, e.g. ``"types.pdf"``), legends and labels
        included; written to a temporary file first and then moved into place. Not shown when saved
        (``show=None``).
    **kwargs
        Passed to :func:`scanpy.pl.rank_genes_groups_dotplot` (``layer``, ``standard_scale``, ``dendrogram``,
        ...; ``dendrogram=False`` by default, so nothing is computed on ``adata``). Groups without cells are
        left out (``categories_order``), as scanpy's dot plot cannot draw them.

    Returns
    -------
    The figure with ``return_fig=True``, ``None`` when shown, otherwise scanpy's dictionary of axes
    (``"mainplot_ax"``, ...).
    """
    save = _check_save(save)
    import scanpy as sc

    from ..tl._state_genes import _get_ranking

    ranking = _get_ranking(adata, key)
    check.check_int("n_genes", n_genes, minimum=1)
    kwargs.setdefault("dendrogram", False)
    groupby = kwargs.pop("groupby", None) or str(ranking["params"]["groupby"])
    plot_data = _without_empty_categories(adata, groupby, key=key, layer=kwargs.get("layer"))
    dotplot = sc.pl.rank_genes_groups_dotplot(
        plot_data, groupby=groupby, key=key, n_genes=n_genes, ax=ax, show=False, return_fig=True, **kwargs
    )
    dotplot.make_figure()
    return _finish(dotplot.fig, dotplot.ax_dict, show=show, return_fig=return_fig, save=save)


def _without_empty_categories(adata: AnnData, groupby: str, *, key: str, layer: str | None) -> AnnData:
    """``adata``, or a light AnnData sharing its matrices whose ``groupby`` has no empty category.

    scanpy's dot plot fails on categories without cells (e.g. a surviving category no cell is assigned to).
    """
    if groupby not in adata.obs:
        raise ValueError(f"adata.obs has no column {groupby!r} (the ranking's groupby).")
    column = adata.obs[groupby]
    if not isinstance(column.dtype, pd.CategoricalDtype) or column.value_counts().min() > 0:
        return adata
    obs = pd.DataFrame({groupby: column.cat.remove_unused_categories()}, index=adata.obs_names)
    layers = {layer: adata.layers[layer]} if layer is not None and layer in adata.layers else None
    plot_data = AnnData(X=adata.X, obs=obs, var=adata.var.copy(), layers=layers, uns={key: adata.uns[key]})
    if adata.raw is not None:  # scanpy plots .raw by default when there is one
        plot_data.raw = AnnData(X=adata.raw.X, var=adata.raw.var)
    return plot_data


def _history_panels(model, keys: Sequence[str] | None) -> list[tuple[str, list[str]]]:
    history = model.history
    if keys is not None:
        keys = check.as_list(keys)
        missing = [k for k in keys if k not in history]
        if missing:
            raise ValueError(f"Keys {missing} are not in model.history; available: {sorted(history)}.")
        return [("", keys)]
    losses = sorted(k for k in history if k.startswith(("reconstruction_agent", "kl_agent")) and k.endswith("_train"))
    coupling = [k for k in ("agreement_train", "coupling_train") if k in history]
    panels = [("loss per agent", losses), ("coupling", coupling)]
    return [(title, ks) for title, ks in panels if ks]


def training_history(
    model,
    keys: Sequence[str] | None = None,
    *,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | Axes | list[Axes] | None:
    """Training curves: the loss terms of each agent, their agreement and the number of categories.

    Parameters
    ----------
    model
        A trained :class:`~scmixvae.model.CplMixVAE`.
    keys
        Keys of ``model.history`` to draw on one axes; by default one panel with each agent's
        reconstruction and KL terms, one with the agreement and coupling distance and, when
        ``model.pruning_history`` holds an ``n_categories`` column, one with the number of categories
        over the pruning rounds (and a dashed line at the number fitted when no round reached consensus).
    ax
        Axes to draw on (all curves on it; the pruning panel is left out).
    show, return_fig
        Whether to show the figure; return the figure instead of the axes.
    save
        File to write the figure to, as in :func:`embedding`.

    Returns
    -------
    The figure with ``return_fig=True``, ``None`` when shown, otherwise the axes (a list of axes for
    several panels).
    """
    save = _check_save(save)
    from ..model import CplMixVAE

    if not isinstance(model, CplMixVAE):
        raise TypeError(f"`model` must be a CplMixVAE, got {type(model).__name__}.")
    if not getattr(model, "is_trained_", False) or not model.history:
        raise ValueError("The model has no training history; train it first.")
    panels = _history_panels(model, keys)
    pruning = getattr(model, "pruning_history", None)
    with_pruning = (
        ax is None
        and keys is None
        and isinstance(pruning, pd.DataFrame)
        and not pruning.empty
        and "n_categories" in pruning
    )
    if ax is not None:
        panels = [("", [k for _, ks in panels for k in ks])]
        fig, axes = ax.figure, [ax]
    else:
        n = len(panels) + int(with_pruning)
        fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
        axes = list(axes[0])
    for axis, (title, ks) in zip(axes, panels, strict=False):
        # the agreement (a fraction) gets its own y axis next to losses: on theirs it would be a flat line
        own_axis = "agreement_train" in ks and len(ks) > 1
        lines = []
        for k in ks:
            series = model.history[k].iloc[:, 0]
            target = axis
            if own_axis and k == "agreement_train":
                target = axis.twinx()
                target.set_ylabel("agreement")
                target.set_ylim(0, 1.02)
            x, y, label = series.index.to_numpy(), series.to_numpy(dtype=float), k.removesuffix("_train")
            lines += target.plot(x, y, label=label, color=f"C{len(lines) % 10}")
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.legend(lines, [line.get_label() for line in lines], fontsize=7)
    if with_pruning:
        axis = axes[-1]
        rounds = pruning["round"].to_numpy() if "round" in pruning else np.arange(len(pruning))
        axis.step(rounds, pruning["n_categories"].to_numpy(), where="post", marker="o")
        axis.set_xlabel("pruning round")
        axis.set_ylabel("categories K")
        axis.set_title("categories")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds and K are whole numbers
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        if (fallback := pruning.attrs.get("fallback_n_categories")) is not None:  # no round reached consensus
            axis.axhline(fallback, color="C3", linestyle="--", label=f"fitted without consensus: {fallback}")
            axis.legend(fontsize=7)
    fig.tight_layout()
    return _finish(fig, axes[0] if len(axes) == 1 else axes, show=show, return_fig=return_fig, save=save)


def _draw_missing(ax: Axes, xy: np.ndarray, missing: np.ndarray, size: float) -> None:
    """Draw the cells without a colour value grey, beneath the others (``"NA"`` in a legend), as scanpy does."""
    if missing.any():
        ax.scatter(xy[missing, 0], xy[missing, 1], s=size, c="lightgrey", label="NA", linewidths=0, zorder=0.5)


def embedding(
    adata: AnnData,
    *,
    basis: str = state_key(DEFAULT_KEY),
    color: str | None = type_key(DEFAULT_KEY),
    components: tuple[int, int] = (0, 1),
    size: float | None = None,
    cmap: str = "viridis",
    legend: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | Axes | None:
    """Cells on an embedding, coloured by type, state or any ``obs`` column or gene.

    Parameters
    ----------
    adata
        AnnData, e.g. after :func:`~scmixvae.tl.annotate`.
    basis
        Key of ``obsm``; ``"umap"`` is read as ``"X_umap"``. Default: the state latent of
        :func:`~scmixvae.tl.annotate`.
    color
        ``obs`` column (categorical, string or boolean: one colour per value; numeric: a colour scale)
        or a gene of ``var_names`` (its values in ``X``); ``None`` draws every cell grey.
    components
        Two dimensions of the embedding to draw.
    size
        Dot size; by default scaled with the number of cells.
    cmap
        Colour map of continuous values.
    legend
        Draw the legend (categories) or colour bar (continuous values).
    ax, show, return_fig
        Axes to draw on; whether to show the figure; return the figure instead of the axes.
    save
        File to write the figure to (format from its extension, e.g. ``"types.pdf"``), legends and labels
        included; written to a temporary file first and then moved into place. Not shown when saved
        (``show=None``).

    Returns
    -------
    The figure with ``return_fig=True``, ``None`` when shown, the axes otherwise.
    """
    save = _check_save(save)
    check.check_anndata(adata)
    key = basis if basis in adata.obsm else f"X_{basis}"
    if key not in adata.obsm:
        raise ValueError(f"No embedding {basis!r} in adata.obsm (keys: {list(adata.obsm)}); run tl.annotate or a UMAP.")
    coords = np.asarray(adata.obsm[key])
    if coords.ndim == 2 and coords.shape[1] < 2:
        raise ValueError(
            f"obsm[{key!r}] has {coords.shape[1]} dimension (a model with n_state=1); draw it on another embedding, "
            "e.g. `sc.tl.umap` then basis='umap' with color=<the state as an obs column>, or a model with n_state >= 2."
        )
    if (
        coords.ndim != 2
        or len(components) != 2
        or len(set(components)) != 2
        or max(components) >= coords.shape[1]
        or min(components) < 0
    ):
        raise ValueError(
            f"`components` {components} must be two different dimensions of obsm[{key!r}] (shape {coords.shape})."
        )
    xy = coords[:, list(components)]
    fig, ax = _new_axes(ax, (5.0, 4.2))
    size = size if size is not None else float(np.clip(12000 / max(adata.n_obs, 1), 1, 40))
    if color is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c="lightgrey", linewidths=0)
    else:
        values = _color_values(adata, color)
        missing = values.isna().to_numpy()
        if isinstance(values.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(values):
            values = values.astype(str).astype("category") if values.dtype == bool else values.astype("category")
            palette = category_colors(adata, color, values.cat.categories)
            for cat, colour in zip(values.cat.categories, palette, strict=True):
                mask = (values == cat).to_numpy()
                if not mask.any():
                    continue
                ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=colour, label=str(cat), linewidths=0)
            _draw_missing(ax, xy, missing, size)
            if legend:
                ax.legend(title=color, fontsize=7, markerscale=max(1.0, 20 / size) ** 0.5, frameon=False,
                          loc="center left", bbox_to_anchor=(1.0, 0.5))  # fmt: skip
        else:
            _draw_missing(ax, xy, missing, size)
            shown = ~missing
            numbers = values.to_numpy(dtype=float)[shown]
            image = ax.scatter(xy[shown, 0], xy[shown, 1], s=size, c=numbers, cmap=cmap, linewidths=0)
            if legend:
                fig.colorbar(image, ax=ax, label=color, shrink=0.8)
        ax.set_title(color)
    name = key.removeprefix("X_")
    ax.set_xlabel(f"{name} {components[0] + 1}")
    ax.set_ylabel(f"{name} {components[1] + 1}")
    ax.set_xticks([])
    ax.set_yticks([])
    return _finish(fig, ax, show=show, return_fig=return_fig, save=save)


def category_colors(adata: AnnData, color: str, categories: Sequence) -> list:
    """Colours of the categories of ``obs[color]`` as scanpy draws them, without writing to ``adata``.

    ``uns[f"{color}_colors"]`` when it holds a valid colour for every category (what :func:`scanpy.pl.umap`
    stored or the user set); otherwise scanpy's defaults: matplotlib's colour cycle when it is long enough,
    else scanpy's 20-, 28- or 102-colour palettes, grey beyond.
    """
    import scanpy as sc

    stored = adata.uns.get(f"{color}_colors")
    if stored is not None and len(stored) >= len(categories) and all(mcolors.is_color_like(c) for c in stored):
        return list(stored)[: len(categories)]
    n = len(categories)
    cycle = rcParams["axes.prop_cycle"].by_key().get("color", [])
    palettes = (cycle, sc.pl.palettes.default_20, sc.pl.palettes.default_28, sc.pl.palettes.default_102)
    palette = next((p for p in palettes if len(p) >= n), ["grey"] * n)
    return list(palette)[:n]


def _color_values(adata: AnnData, color: str) -> pd.Series:
    if color in adata.obs:
        return adata.obs[color]
    if color in adata.var_names:
        column = adata[:, color].X
        column = column.toarray() if hasattr(column, "toarray") else np.asarray(column)
        return pd.Series(column.ravel(), index=adata.obs_names, name=color)
    raise ValueError(f"`color`={color!r} is neither a column of adata.obs nor a gene of adata.var_names.")
