"""Training plans and schedules of scmixvae."""

from .._scoring import (
    categories_to_prune,
    category_agreement,
    check_collapse,
    co_assignment,
    mean_consensus,
    medoid,
    select_round,
)
from ._callbacks import ConvergenceStopping
from ._trainingplan import CplMixVAETrainingPlan, TrainingCheckpoint, TrainingDivergedError

__all__ = [
    "ConvergenceStopping",
    "CplMixVAETrainingPlan",
    "TrainingCheckpoint",
    "TrainingDivergedError",
    "categories_to_prune",
    "category_agreement",
    "check_collapse",
    "co_assignment",
    "mean_consensus",
    "medoid",
    "select_round",
]
