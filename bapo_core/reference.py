"""Algorithm 1 written as a plain loop: the readable reference the vectorised search is tested against.

It re-evaluates rho over the whole batch after every step and syncs to the host each time, as the
authors' released code does. Correct, but O(steps) passes and syncs: use `search_clip_bounds`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .spec import ClipSearchResult, ClipSearchSpec, rho_value


def rho_at(ratio, advantages, mask, spec: ClipSearchSpec, c_low: float, c_high: float, weights=None) -> float:
    """rho for fixed bounds, evaluated token by token from its definition (one host sync)."""
    valid = mask.bool() & torch.isfinite(ratio) & torch.isfinite(advantages)
    w = torch.ones_like(advantages, dtype=torch.float64) if weights is None else weights.to(torch.float64)
    valid &= torch.isfinite(w)
    a = advantages.to(torch.float64)
    r = ratio.to(torch.float64)
    pos = valid & (advantages > 0)
    neg = valid & (advantages < 0)
    if spec.accounting == "gradient":  # only tokens that still carry gradient
        pos &= ratio <= c_high
        neg &= ratio >= c_low
        if spec.dual_clip_c is not None:
            neg &= ratio <= spec.dual_clip_c
        p = (w * a * r)[pos].sum()
        n = (w * -a * r)[neg].sum()
    else:  # every token at its (clamped) objective value; the dual clip acts in the loss only
        p = (w * a * torch.clamp(r, max=c_high))[pos].sum()
        n = (w * -a * torch.clamp(r, min=c_low))[neg].sum()
    return rho_value(p.item(), n.item(), spec.rho_definition)


def search_clip_bounds_loop(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    spec: ClipSearchSpec,
    weights: Optional[torch.Tensor] = None,
) -> ClipSearchResult:
    """Algorithm 1, step by step. Bounds are start + k * step with integer k (no float accumulation)."""
    valid = mask.bool() & torch.isfinite(ratio) & torch.isfinite(advantages)
    weighted = advantages
    if weights is not None:
        valid &= torch.isfinite(weights)
        weighted = weights * advantages
    num_signal = int((valid & (weighted != 0)).sum().item())  # tokens with a non-zero weighted advantage
    k_low = k_high = 0

    def at(start, step, stop, k):
        value = round(start + k * step, 12)
        return min(value, stop) if spec.clamp_last_step else value

    def bounds():
        return at(spec.c_low_start, spec.c_low_step, spec.c_low_max, k_low), at(spec.c_high_start, spec.c_high_step, spec.c_high_max, k_high)

    def can_move(start, step, stop, k):
        if spec.clamp_last_step:  # one more (possibly shorter) step while below the max
            return step > 0 and at(start, step, stop, k) < stop - 1e-9
        return step > 0 and start + (k + 1) * step <= stop + 1e-9

    if num_signal == 0:
        rho = rho_value(0.0, 0.0, spec.rho_definition)
        return ClipSearchResult(*bounds(), rho, rho, 0, True, 0)
    rho = rho_start = rho_at(ratio, advantages, mask, spec, *bounds(), weights)
    steps = 0
    while rho < spec.rho_target:
        high_can = can_move(spec.c_high_start, spec.c_high_step, spec.c_high_max, k_high)
        low_can = can_move(spec.c_low_start, spec.c_low_step, spec.c_low_max, k_low)
        if not (high_can or low_can):
            break
        first_is_high = spec.search_order == "high_first"
        if (high_can and first_is_high) or (high_can and not low_can):
            k_high += 1
        else:
            k_low += 1
        steps += 1
        rho = rho_at(ratio, advantages, mask, spec, *bounds(), weights)
    return ClipSearchResult(*bounds(), rho_start, rho, steps, rho >= spec.rho_target, num_signal)
