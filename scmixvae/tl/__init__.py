"""Analysis verbs: write results of a trained model into AnnData."""

from ._annotate import annotate
from ._gene_sets import gene_set_enrichment, gene_sets
from ._state_genes import get_state_genes, rank_state_genes, state_traversal

__all__ = ["annotate", "gene_set_enrichment", "gene_sets", "get_state_genes", "rank_state_genes", "state_traversal"]
