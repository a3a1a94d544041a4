"""The ``trainer.v1.colocate_budget`` config section and its start-up checks.

Keys (defaults in ``configs/rollout/partial.yaml``):

| key | meaning |
|---|---|
| ``token_budget`` | B: most new tokens a training trajectory generates under one policy version (1 <= B < max_response_length) |
| ``num_warmup_batches`` | prompt batches dispatched before the first step (as ``colocate_async``) |
| ``max_inflight_groups`` | cap on prompt groups pending/running; null = ``train_batch_size * (1 + ceil(L / B))`` |
| ``at_cap`` | progress rule when every in-flight trajectory is parked at the cap: ``force`` the oldest groups to finish, or ``lift`` the version's budget for all (see ``sampler``) |
| ``persist_partial`` | save/restore parked sessions with the checkpoint (false = verl's regenerate-from-scratch) |
| ``trace_dir`` | JSONL trace of fetched / trained / evicted groups and trained sessions (tests, debugging) |
| ``poll_interval_s`` | how often parked sessions and the sampler poll the clock |

The staleness cap reuses ``trainer.v1.sampler.max_off_policy_threshold`` (policy versions a group may span,
oldest segment first) and ``max_off_policy_strategy`` (drop / wait), see ``segments``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from .segments import BudgetPolicy

SECTION = "trainer.v1.colocate_budget"
ROLLOUT_NAMES = ("vllm", "sglang")
AT_CAP_RULES = ("force", "lift")


@dataclass(frozen=True)
class PartialConfig:
    token_budget: int
    response_length: int
    threshold: Optional[int]
    strategy: str
    num_warmup_batches: float
    max_inflight_groups: int
    persist_partial: bool
    trace_dir: Optional[str]
    poll_interval_s: float
    at_cap: str = "force"

    def policy(self) -> BudgetPolicy:
        return BudgetPolicy(self.token_budget, self.response_length, self.threshold, self.strategy)


def min_threshold(response_length: int, token_budget: int) -> int:
    """Versions a response of the full length needs, + 1 for a session that waits across a version."""
    return math.ceil(response_length / token_budget) + 1


def parse(config: DictConfig) -> PartialConfig:
    """Read and check the section; raises ValueError naming key, value and valid range."""
    section = config.trainer.v1.get("colocate_budget")
    if section is None:
        raise ValueError(f"trainer_mode=colocate_budget needs the {SECTION} section: add +rollout=partial")
    length = int(config.actor_rollout_ref.rollout.response_length)
    if OmegaConf.is_missing(section, "token_budget"):
        raise ValueError(f"{SECTION}.token_budget is required; valid: 1 <= token_budget < rollout.response_length={length}")
    budget = section.get("token_budget")
    if not isinstance(budget, int) or not 1 <= budget < length:
        raise ValueError(f"{SECTION}.token_budget={budget!r} is invalid; valid: 1 <= token_budget < "
                         f"rollout.response_length={length}")
    rollout = config.actor_rollout_ref.rollout
    if not rollout.calculate_log_probs:
        raise ValueError("actor_rollout_ref.rollout.calculate_log_probs=False is invalid for colocate_budget; "
                         "valid: True (every segment keeps its behaviour log-probs)")
    if rollout.name not in ROLLOUT_NAMES:
        raise ValueError(f"actor_rollout_ref.rollout.name={rollout.name!r} is invalid for colocate_budget; valid: {ROLLOUT_NAMES}")
    sampler = config.trainer.v1.sampler
    threshold, strategy = sampler.max_off_policy_threshold, sampler.max_off_policy_strategy
    needed = min_threshold(length, budget)
    if threshold is not None and strategy == "drop" and threshold < needed:
        raise ValueError(
            f"trainer.v1.sampler.max_off_policy_threshold={threshold} is invalid with strategy drop, "
            f"token_budget={budget} and response_length={length}; valid: null or >= ceil({length}/{budget}) + 1 "
            f"= {needed} (below it every response longer than ~{(threshold - 1) * budget} tokens is dropped)"
        )
    inflight = section.get("max_inflight_groups")
    train_batch_size = int(config.data.train_batch_size)
    if inflight is None:
        inflight = train_batch_size * (1 + math.ceil(length / budget))
    if int(inflight) < train_batch_size:
        raise ValueError(f"{SECTION}.max_inflight_groups={inflight} is invalid; valid: null or >= "
                         f"data.train_batch_size={train_batch_size}")
    at_cap = section.get("at_cap", "force")
    if at_cap not in AT_CAP_RULES:
        raise ValueError(f"{SECTION}.at_cap={at_cap!r} is invalid; valid: {', '.join(AT_CAP_RULES)}")
    poll = float(section.get("poll_interval_s", 0.5))
    if not poll > 0:
        raise ValueError(f"{SECTION}.poll_interval_s={poll} is invalid; valid: > 0")
    return PartialConfig(
        token_budget=budget,
        response_length=length,
        threshold=threshold,
        strategy=str(strategy),
        num_warmup_batches=float(section.get("num_warmup_batches", 1)),
        max_inflight_groups=int(inflight),
        persist_partial=bool(section.get("persist_partial", True)),
        trace_dir=section.get("trace_dir"),
        poll_interval_s=poll,
        at_cap=str(at_cap),
    )
