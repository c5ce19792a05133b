"""Importance measures (paper Sec. 4.2.2, SPEC 3): row and column scores of each adapted pretrained weight."""

from partial_lora.importance.measures import (
    LayerScores,
    compute_importance,
    gradient_scores,
    preserve_flow,
    svd_scores,
)

__all__ = ["LayerScores", "compute_importance", "gradient_scores", "preserve_flow", "svd_scores"]
