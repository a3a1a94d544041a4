"""The "bapo" policy loss, registered in verl 0.9.1's policy-loss registry.

verl calls it from `verl.workers.utils.losses.ppo_loss` once per micro-batch with padded
(bsz, resp_len) tensors. Bounds come from the update-scope hook when it has searched the whole
optimizer step (`scope: update`, recipe/bapo/worker.py), read from the step in progress
(recipe/bapo/optimizer_step.py); otherwise they are searched here over this micro-batch and the
data-parallel group (`scope: micro_batch`, as the authors' code does).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.distributed as dist

from bapo_core import (
    ClipSearchResult,
    aggregation_weights,
    clip_diagnostics,
    log_ratio_of,
    ppo_clip_loss,
    search_clip_bounds,
)
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss

from . import optimizer_step, trace
from .config import BAPO_LOSS_MODE, BAPOPolicyLossConfig
from .optimizer_step import OptimizerStep

logger = logging.getLogger(__name__)
RHO_LOG_CAP = 1e6  # rho_definition="ratio" is inf when N = 0; metrics must stay finite (JSON, wandb, means)
# What the search found. An update without a token of non-zero weighted advantage (w * A) has nothing to balance:
# its rho would be 0 (or inf), its bounds the start bounds, made up, not measured. Such an update logs none of
# these keys, so verl's per-step mean is over the updates that had signal; a step with none gets NaN
# (BAPOTrainingWorker.train_mini_batch), which verl's file logger writes as null.
SEARCH_METRICS = (
    "actor/bapo/c_low",
    "actor/bapo/c_high",
    "actor/bapo/rho",
    "actor/bapo/rho_start",
    "actor/bapo/search_steps",
    "actor/bapo/target_met",
)
_warned_missing_update_bounds = False


def bapo_config_of(actor_config: Any) -> BAPOPolicyLossConfig:
    """The actor config's policy_loss, checked to be a BAPOPolicyLossConfig (clear error otherwise)."""
    policy_loss = getattr(actor_config, "policy_loss", None)
    if not isinstance(policy_loss, BAPOPolicyLossConfig):
        raise TypeError(
            f"policy_loss.loss_mode={BAPO_LOSS_MODE!r} needs actor_rollout_ref.actor.policy_loss._target_="
            f"recipe.bapo.config.BAPOPolicyLossConfig (got {type(policy_loss).__name__}); "
            "compose configs/policy_loss/bapo_paper.yaml or set the _target_ on the command line"
        )
    return policy_loss


def dp_group_of(step: Optional[OptimizerStep]) -> Optional[dist.ProcessGroup]:
    """The group searches reduce over: the actor's DP group (the step in progress); outside verl's actor
    (the loss called directly, e.g. in a script or test) the default group, else none. Inside verl's actor
    the hook is always there: BAPO configs refuse to build without it (config.require_actor_hook)."""
    if step is not None and step.dp_group is not None:
        return step.dp_group
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def _update_bounds(bapo: BAPOPolicyLossConfig, step: Optional[OptimizerStep]) -> Optional[ClipSearchResult]:
    global _warned_missing_update_bounds
    if bapo.scope != "update":
        return None
    bounds = None if step is None else step.bounds
    if bounds is None and not _warned_missing_update_bounds:
        _warned_missing_update_bounds = True
        logger.warning(
            "bapo: scope='update' but no per-update bounds were provided (the loss ran outside "
            "recipe.bapo.worker's optimizer step); searching this micro-batch instead. "
            "Metric actor/bapo/bounds_from_update shows 0 for such calls."
        )
    return bounds


def rho_weights(
    bapo: BAPOPolicyLossConfig, mask: torch.Tensor, rollout_is_weights: Optional[torch.Tensor], actor_config: Any
) -> Optional[torch.Tensor]:
    """(bsz, resp_len) weight of each token in rho: its factor in the loss aggregation
    (actor.loss_agg_mode) times its rollout-IS weight (unless rollout_is_in_rho is false); None = 1."""
    weights = aggregation_weights(mask, actor_config.loss_agg_mode, getattr(actor_config, "loss_scale_factor", None))
    if rollout_is_weights is None or not bapo.rollout_is_in_rho:
        return weights
    return rollout_is_weights if weights is None else weights * rollout_is_weights


def _aggregation_info(config: Any, mask: torch.Tensor) -> dict:
    """verl's global batch info; outside a trainer step (no info, one process) the same local counts
    agg_loss would use, kept >= 1 so an empty micro-batch gives 0 instead of 0/0."""
    info = dict(config.global_batch_info)
    if info.get("dp_size", 1) == 1:
        if info.get("batch_num_tokens") is None:
            info["batch_num_tokens"] = mask.sum().clamp(min=1)
        if info.get("global_batch_size") is None:
            info["global_batch_size"] = (mask.sum(-1) > 0).sum().clamp(min=1)
    return info


@register_policy_loss(BAPO_LOSS_MODE)
def compute_policy_loss_bapo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """BAPO clipped objective with adaptive bounds. Tensors are (bsz, resp_len); returns (loss, metrics).

    Tokens whose log-ratio is NaN (NaN or inf - inf log-probs) are masked out of the loss like padding
    (verl's global token counts, made before, still include them) and counted in
    actor/bapo/nonfinite_token_frac.
    """
    bapo = bapo_config_of(config)
    step = optimizer_step.current() if optimizer_step.is_running() else None  # None: called directly
    log_ratio, finite = log_ratio_of(log_prob, old_log_prob)
    ratio = torch.exp(log_ratio)
    mask = response_mask.bool()
    valid = mask & finite

    bounds = _update_bounds(bapo, step)
    from_update = bounds is not None
    if bounds is None:
        weights = rho_weights(bapo, valid, rollout_is_weights, config)
        bounds = search_clip_bounds(ratio, advantages, valid, bapo.search_spec, weights=weights, group=dp_group_of(step))

    if trace.enabled():
        trace.record(
            "loss",
            tensors={"ratio": ratio, "advantages": advantages, "mask": valid, "weights": rollout_is_weights},
            update=step.index if from_update else None,
            micro_batch=None if step is None else step.loss_calls,
            c_low=bounds.c_low,
            c_high=bounds.c_high,
        )

    pg_losses = ppo_clip_loss(ratio, advantages, bounds.c_low, bounds.c_high, bapo.dual_clip_c)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(
        loss_mat=pg_losses, loss_mask=valid, loss_agg_mode=loss_agg_mode, **_aggregation_info(config, mask)
    )

    entropy = None if step is None else step.entropy  # per-position entropy of this micro-batch, when verl computed it
    if entropy is not None and entropy.shape != log_prob.shape:
        raise RuntimeError(f"bapo: entropy {tuple(entropy.shape)} does not match log_prob {tuple(log_prob.shape)}")
    diagnostics = clip_diagnostics(
        ratio, advantages, log_prob.detach(), valid, bounds.c_low, bounds.c_high, bapo.dual_clip_c, entropy=entropy
    )
    extra = {
        "ppo_kl": -(log_ratio.detach() * valid).sum() / torch.count_nonzero(valid).clamp(min=1),
        "nonfinite_token_frac": torch.count_nonzero(mask & ~finite) / torch.count_nonzero(mask).clamp(min=1),
    }
    names = list(diagnostics) + list(extra)
    values = dict(zip(names, torch.stack([*diagnostics.values(), *extra.values()]).tolist()))  # one host sync

    metrics = {f"actor/bapo/{name}": values[name] for name in diagnostics}
    if bounds.num_signal_tokens > 0:  # else nothing was searched: SEARCH_METRICS stay out (see there)
        metrics.update(
            {
                "actor/bapo/c_low": bounds.c_low,
                "actor/bapo/c_high": bounds.c_high,
                "actor/bapo/rho": min(bounds.rho, RHO_LOG_CAP),
                "actor/bapo/rho_start": min(bounds.rho_start, RHO_LOG_CAP),
                "actor/bapo/search_steps": float(bounds.steps),
                "actor/bapo/target_met": float(bounds.target_met),
            }
        )
    metrics.update(
        {
            "actor/bapo/bounds_from_update": float(from_update),
            "actor/bapo/nonfinite_token_frac": values["nonfinite_token_frac"],
            # verl's standard names, same meaning as its vanilla loss
            "actor/pg_clipfrac": values["clipfrac_pos"] + values["clipfrac_neg"],
            "actor/ppo_kl": values["ppo_kl"],
            "actor/pg_clipfrac_lower": values["clipfrac_dual"],
        }
    )
    return pg_loss, metrics
