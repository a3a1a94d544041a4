"""`BAPOPolicyLossConfig`: verl's PolicyLossConfig plus BAPO's knobs (arXiv 2510.18927, Sec. 5.1).

Select it with
    actor_rollout_ref.actor.policy_loss._target_=recipe.bapo.config.BAPOPolicyLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=bapo
or compose a preset from configs/policy_loss/ (bapo_paper.yaml, bapo_authors_code.yaml).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from bapo_core import ClipSearchResult, ClipSearchSpec
from verl.workers.config import PolicyLossConfig

BAPO_LOSS_MODE = "bapo"
SCOPES = ("update", "micro_batch")


@dataclass
class UpdateScopeState:
    """Runtime slot the update-scope hook (recipe.bapo.worker) fills around one optimizer step.

    bounds: the bounds searched over the whole mini-batch (all micro-batches, all DP ranks) of the
        step being taken; None outside a step. ratio_assumed_one: that search used r = 1 (the old
        log-probs came from the current policy), skipping the extra forward. dp_group: the
        data-parallel group collectives use.
    """

    bounds: Optional[ClipSearchResult] = None
    ratio_assumed_one: bool = False
    update_index: int = -1  # optimizer steps this worker has taken before the current one
    micro_batch_index: int = 0  # loss calls so far in the current step
    dp_group: Optional[dist.ProcessGroup] = None


@dataclass
class BAPOPolicyLossConfig(PolicyLossConfig):
    """BAPO policy loss settings. Defaults are the paper's (Sec. 5.1).

    | key | paper | default | meaning |
    |---|---|---|---|
    | loss_mode | - | "bapo" | registry name of the loss (must be "bapo") |
    | rho_target | rho0 | 0.4 | target for rho, the positive share of the gradient-carrying contribution |
    | c_low_start | a- | 0.6 | lower ratio bound at the start of every update's search |
    | c_low_max | b- | 0.9 | largest lower bound the search may reach |
    | c_low_step | delta2 | 0.02 | step of the lower bound: 0 (fixed bound) or >= 1e-4 |
    | c_high_start | a+ | 1.2 | upper ratio bound at the start of every update's search |
    | c_high_max | b+ | 3.0 | largest upper bound the search may reach |
    | c_high_step | delta1 | 0.05 | step of the upper bound: 0 (fixed bound) or >= 1e-4 |
    | search_order | - | "high_first" | "high_first" (Algorithm 1) or "low_first" (authors' code) |
    | accounting | - | "gradient" | "gradient": clipped tokens count 0 in rho; "value": at their clamped value (authors' code) |
    | rho_definition | - | "share" | "share" = P/(P+N) (paper) or "ratio" = P/N (authors' code) |
    | scope | - | "update" | "update": one search per optimizer step over all its micro-batches and DP ranks; "micro_batch": one search per micro-batch inside the loss (authors' code) |
    | dual_clip_c | - | None | None = no dual clip (paper); a value > 1 caps A<0 tokens at r = dual_clip_c (authors' code: 3.0) |

    verl's own clip keys (actor.clip_ratio, clip_ratio_low/high, clip_ratio_c) are not used by this loss.
    Every invalid setting raises ValueError naming the key, the value and the valid range.
    """

    loss_mode: str = BAPO_LOSS_MODE
    rho_target: float = 0.4
    c_low_start: float = 0.6
    c_low_max: float = 0.9
    c_low_step: float = 0.02
    c_high_start: float = 1.2
    c_high_max: float = 3.0
    c_high_step: float = 0.05
    search_order: str = "high_first"
    accounting: str = "gradient"
    rho_definition: str = "share"
    scope: str = "update"
    dual_clip_c: Optional[float] = None

    def __post_init__(self):
        if self.loss_mode != BAPO_LOSS_MODE:
            raise ValueError(
                f"BAPO config: loss_mode={self.loss_mode!r} is invalid; valid: {BAPO_LOSS_MODE!r} "
                "(BAPOPolicyLossConfig only configures the bapo loss; use verl's PolicyLossConfig for other losses)"
            )
        if self.scope not in SCOPES:
            raise ValueError(f"BAPO config: scope={self.scope!r} is invalid; valid: one of {list(SCOPES)}")
        self.search_spec  # validates every search key
        # runtime state, not a config field (never in YAML): filled by the update-scope hook
        self.update_state = UpdateScopeState()

    @functools.cached_property
    def search_spec(self) -> ClipSearchSpec:
        """The bapo_core search settings (validated on construction)."""
        return ClipSearchSpec(
            rho_target=self.rho_target,
            c_low_start=self.c_low_start,
            c_low_max=self.c_low_max,
            c_low_step=self.c_low_step,
            c_high_start=self.c_high_start,
            c_high_max=self.c_high_max,
            c_high_step=self.c_high_step,
            search_order=self.search_order,
            accounting=self.accounting,
            rho_definition=self.rho_definition,
            dual_clip_c=self.dual_clip_c,
        )
