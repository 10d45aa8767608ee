"""Simulated and real single-cell count data: :func:`simulate` and the dataset loaders."""

from __future__ import annotations

from ._datasets import (
    DATASETS,
    data_dir,
    human_kidney,
    ifnb,
    mouse_bladder,
    pbmc68k_counts,
    pbmc_10x,
    read_counts,
    read_scdcc_h5,
    worm_neuron,
)
from ._simulate import simulate

__all__ = [
    "DATASETS",
    "data_dir",
    "human_kidney",
    "ifnb",
    "mouse_bladder",
    "pbmc68k_counts",
    "pbmc_10x",
    "read_counts",
    "read_scdcc_h5",
    "simulate",
    "worm_neuron",
]
