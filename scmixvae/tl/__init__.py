"""Analysis verbs: write results of a trained model into AnnData."""

from ._annotate import annotate

__all__ = ["annotate"]
