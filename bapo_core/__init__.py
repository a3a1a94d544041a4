"""BAPO (arXiv 2510.18927) in plain PyTorch: the clip-bound search and the clipped objective.

No verl or ray imports here; `recipe/bapo` adapts this to verl 0.9.1.
"""

from .clip_search import (
    paper_path_sums,
    path_contributions,
    reduce_and_select,
    rho_along_path,
    search_clip_bounds,
    search_dtype,
    select_bounds,
)
from .objective import LOG_RATIO_CLAMP, LOSS_AGG_MODES, aggregation_weights, clip_diagnostics, log_ratio_of, ppo_clip_loss
from .spec import ClipPath, ClipSearchResult, ClipSearchSpec, rho_value

__all__ = [
    "LOG_RATIO_CLAMP",
    "LOSS_AGG_MODES",
    "aggregation_weights",
    "ClipPath",
    "ClipSearchResult",
    "ClipSearchSpec",
    "clip_diagnostics",
    "log_ratio_of",
    "paper_path_sums",
    "path_contributions",
    "ppo_clip_loss",
    "reduce_and_select",
    "rho_along_path",
    "rho_value",
    "search_clip_bounds",
    "search_dtype",
    "select_bounds",
]
