"""Plots of a trained model and of the results written by :mod:`scmixvae.tl`."""

from ._plots import consensus_heatmap, embedding, state_genes_dotplot, state_traversal_heatmap, training_history

__all__ = ["consensus_heatmap", "embedding", "state_genes_dotplot", "state_traversal_heatmap", "training_history"]
