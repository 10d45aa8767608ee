"""Training plans and schedules of scmixvae."""

from ._trainingplan import CplMixVAETrainingPlan

__all__ = ["CplMixVAETrainingPlan"]
