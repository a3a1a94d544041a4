"""The BAPO objective for one update (arXiv 2510.18927, Sec. 4) and its clipping diagnostics.

    J(theta) = E sum_t min( r_t A_t , clip(r_t, c_low, c_high) A_t )

c_low and c_high are the ratio bounds themselves (e.g. 0.6 and 1.2), not PPO epsilons. A positive
token stops carrying gradient once r > c_high, a negative one once r < c_low (and, with dual clip,
once r > dual_clip_c).
"""

from __future__ import annotations

from typing import Optional

import torch


def ppo_clip_loss(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    c_low: float,
    c_high: float,
    dual_clip_c: Optional[float] = None,
) -> torch.Tensor:
    """Per-token loss -min(r A, clip(r, c_low, c_high) A); shapes (bsz, resp_len) in and out.

    The min clamps each token's ratio on one side only: an A>0 token's at c_high, an A<0 token's at
    c_low from below (and at `dual_clip_c` from above: dual-clip PPO caps an A<0 token's loss at
    |A| * dual_clip_c). So the loss is -A * clamp(r, low_t, high_t) with per-token bounds: one clamp
    in the autograd graph instead of verl's two products, maximum and where. Gradient flows where
    the ratio is inside its bounds (bounds included), exactly as in verl's vanilla loss.
    """
    with torch.no_grad():
        sign = torch.sign(advantages).to(ratio.dtype)
        positive = sign.clamp(min=0)  # 1 where A > 0, else 0
        negative = positive - sign  # 1 where A < 0, else 0
        cap = torch.finfo(ratio.dtype).max if dual_clip_c is None else dual_clip_c
        low = negative * c_low  # 0 (no floor: ratios are > 0) unless A < 0
        high = positive * c_high + (1 - positive) * cap  # exact: one of the two terms is 0
    return -advantages * torch.clamp(ratio, low, high)


def clip_diagnostics(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    log_prob: torch.Tensor,
    mask: torch.Tensor,
    c_low: float,
    c_high: float,
    dual_clip_c: Optional[float] = None,
) -> dict[str, torch.Tensor]:
    """Token fractions (over `mask`) describing what the bounds clip; 0-dim tensors, no host sync.

    pos_token_frac: tokens with A > 0. clipfrac_pos: A > 0 and r > c_high. clipfrac_neg: A < 0 and
    r < c_low. clipfrac_dual: A < 0 and r > dual_clip_c. Entropy-Clip Rule split of all clipped tokens
    (paper Sec. 3): a low-probability positive or a high-probability negative token's update would
    RAISE entropy (clipfrac_entropy_raising); the other two kinds would lower it
    (clipfrac_entropy_lowering). "Low probability" means the current log-prob is below the mean
    current log-prob of the masked tokens (a sampled token's expected log-prob is -entropy).
    """
    mask = mask.bool() & torch.isfinite(log_prob)
    count = torch.count_nonzero(mask).clamp(min=1)

    def frac(selected: torch.Tensor) -> torch.Tensor:
        return torch.count_nonzero(selected & mask) / count

    pos, neg = advantages > 0, advantages < 0
    clip_pos = pos & (ratio > c_high)
    clip_neg = neg & (ratio < c_low)
    clip_dual = neg & (ratio > dual_clip_c) if dual_clip_c is not None else torch.zeros_like(mask)
    clipped = clip_pos | clip_neg | clip_dual
    mean_log_prob = (torch.nan_to_num(log_prob, posinf=0.0, neginf=0.0) * mask).sum() / count
    low_prob = log_prob < mean_log_prob
    raising = clipped & ((pos & low_prob) | (neg & ~low_prob))
    return {
        "pos_token_frac": frac(pos),
        "clipfrac_pos": frac(clip_pos),
        "clipfrac_neg": frac(clip_neg),
        "clipfrac_dual": frac(clip_dual),
        "clipfrac_entropy_raising": frac(raising),
        "clipfrac_entropy_lowering": frac(clipped & ~raising),
    }
