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

import torch
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
        log-probs came from the current weights), skipping the extra forward. dp_group: the
        data-parallel group collectives use (set when the actor's hook is in place). entropy:
        (bsz, resp_len) per-position entropy of the current micro-batch when verl computed it in
        the gradient pass (actor.calculate_entropy or entropy_coeff != 0), else None.
    """

    bounds: Optional[ClipSearchResult] = None
    ratio_assumed_one: bool = False
    update_index: int = -1  # optimizer steps this worker has taken before the current one
    micro_batch_index: int = 0  # loss calls so far in the current step
    dp_group: Optional[dist.ProcessGroup] = None
    entropy: Optional[torch.Tensor] = None


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
    | rho_definition | - | "share" | "share" = P/(P+N) (paper) or "ratio" = P/(N+1e-8), inf when N <= 0 (authors' code) |
    | clamp_last_step | - | false | false: a bound moves while start + k*step <= max (Algorithm 1); true: a last shorter step reaches the max (authors' code) |
    | rollout_is_in_rho | - | true | rollout-IS weights (verl's rollout correction) multiply each token's contribution to rho, as they do its loss; false: rho ignores them (authors' code) |
    | scope | - | "update" | "update": one search per optimizer step over all its micro-batches and DP ranks; "micro_batch": one search per micro-batch inside the loss (authors' code) |
    | ratio_one_shortcut | - | true | in `scope: update`, skip the extra forward when the old log-probs provably came from the weights about to be trained (r = 1 exactly); false: always run it |
    | dual_clip_c | - | None | None = no dual clip (paper); a value > 1 caps A<0 tokens at r = dual_clip_c (authors' code: 3.0) |
    | imbalance_metrics | - | true | log the per-step imbalance statistics actor/bapo/{neg_token_share, neg_adv_mass_share, response_length_pos, response_length_neg} |

    verl's own clip keys (actor.clip_ratio, clip_ratio_low/high, clip_ratio_c) are not used by this loss.
    rho weighs each token as the loss aggregation does (`actor.loss_agg_mode`: 1/|y_i| under
    seq-mean-token-mean), so it is the positive share of the gradient the update takes.
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
    clamp_last_step: bool = False
    rollout_is_in_rho: bool = True
    scope: str = "update"
    ratio_one_shortcut: bool = True
    dual_clip_c: Optional[float] = None
    imbalance_metrics: bool = True

    def __post_init__(self):
        if self.loss_mode != BAPO_LOSS_MODE:
            raise ValueError(
                f"BAPO config: loss_mode={self.loss_mode!r} is invalid; valid: {BAPO_LOSS_MODE!r} "
                "(BAPOPolicyLossConfig only configures the bapo loss; use verl's PolicyLossConfig for other losses)"
            )
        if self.scope not in SCOPES:
            raise ValueError(f"BAPO config: scope={self.scope!r} is invalid; valid: one of {list(SCOPES)}")
        for key in ("rollout_is_in_rho", "ratio_one_shortcut", "imbalance_metrics"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"BAPO config: {key}={getattr(self, key)!r} is invalid; valid: true or false")
        self.search_spec  # validates every search key
        require_actor_hook()
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
            clamp_last_step=self.clamp_last_step,
            dual_clip_c=self.dual_clip_c,
        )


@dataclass
class BaselinePolicyLossConfig(PolicyLossConfig):
    """verl's PolicyLossConfig (any verl loss, e.g. loss_mode "vanilla") plus BAPO's opt-in diagnostics.

    | key | default | meaning |
    |---|---|---|
    | imbalance_metrics | true | log actor/bapo/{neg_token_share, neg_adv_mass_share, response_length_pos, response_length_neg} per step (paper Fig. 4 statistics), so baselines are comparable with BAPO |

    configs/policy_loss/grpo_vanilla.yaml uses it. verl's plain PolicyLossConfig logs none of them.
    """

    imbalance_metrics: bool = True

    def __post_init__(self):
        if self.loss_mode == BAPO_LOSS_MODE:
            raise ValueError(
                f"policy_loss.loss_mode={BAPO_LOSS_MODE!r} needs _target_=recipe.bapo.config.BAPOPolicyLossConfig, "
                "not BaselinePolicyLossConfig"
            )
        if not isinstance(self.imbalance_metrics, bool):
            raise ValueError(f"policy_loss.imbalance_metrics={self.imbalance_metrics!r} is invalid; valid: true or false")
        if self.imbalance_metrics:
            require_actor_hook()


def require_actor_hook() -> None:
    """Fail at start-up (config construction, on the driver and in every worker) when verl's actor will
    not run BAPO's hook: another plugin set ActorRolloutRefWorker.actor_worker_cls first. Without the
    hook the loss would have no data-parallel group (under Megatron PP > 1 a collective over all ranks
    deadlocks, since only last-stage ranks run the loss) and scope="update" would have no bounds."""
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from .worker import BAPOTrainingWorker

    current = ActorRolloutRefWorker.actor_worker_cls
    if not (isinstance(current, type) and issubclass(current, BAPOTrainingWorker)):
        raise RuntimeError(
            f"BAPO needs its actor hook, but verl's ActorRolloutRefWorker.actor_worker_cls is {current.__module__}."
            f"{current.__qualname__} (set by another plugin, or the bapo-verl plugin was not loaded in this process). "
            "Make that class subclass recipe.bapo.worker.BAPOTrainingWorker, or run without the other plugin; "
            "without entry points set VERL_USE_EXTERNAL_MODULES=recipe.bapo.plugin."
        )
