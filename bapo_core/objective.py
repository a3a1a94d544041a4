"""The BAPO objective for one update (arXiv 2510.18927, Sec. 4) and its clipping diagnostics.

    J(theta) = E sum_t min( r_t A_t , clip(r_t, c_low, c_high) A_t )

c_low and c_high are the ratio bounds themselves (e.g. 0.6 and 1.2), not PPO epsilons. A positive
token stops carrying gradient once r > c_high, a negative one once r < c_low (and, with dual clip,
once r > dual_clip_c).
"""

from __future__ import annotations

from typing import Optional

import torch

from .clip_search import search_dtype

LOG_RATIO_CLAMP = 20.0  # as verl's vanilla loss: ratio in [e^-20, e^20]


def log_ratio_of(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamped log-ratio with non-finite entries (NaN/inf log-probs) set to 0, and the finite mask.

    The one place the ratio's dtype is decided (half precision is promoted to float32), so the
    search and the loss compare the same numbers with the bounds."""
    log_ratio = torch.clamp(search_dtype(log_prob) - search_dtype(old_log_prob), min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    finite = log_ratio == log_ratio  # the clamp already maps +-inf to +-20: only NaN is left
    return torch.nan_to_num(log_ratio, nan=0.0), finite


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
    the ratio is inside its bounds (bounds included), as in verl's vanilla loss -- except at
    r == dual_clip_c exactly, where verl's torch.min of two equal values passes half the gradient
    and this loss the full one.
    """
    with torch.no_grad():
        sign = torch.sign(advantages).to(ratio.dtype)
        positive = sign.clamp(min=0)  # 1 where A > 0, else 0
        negative = positive - sign  # 1 where A < 0, else 0
        cap = torch.finfo(ratio.dtype).max if dual_clip_c is None else dual_clip_c
        low = negative * c_low  # 0 (no floor: ratios are > 0) unless A < 0
        high = positive * c_high + (1 - positive) * cap  # exact: one of the two terms is 0
    return -advantages * torch.clamp(ratio, low, high)


LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


def aggregation_weights(mask: torch.Tensor, loss_agg_mode: str, loss_scale_factor: Optional[float] = None) -> Optional[torch.Tensor]:
    """Per-token factor (bsz, resp_len) the loss aggregation gives each token, up to one constant; None = uniform.

    verl's agg_loss sums token losses with weight 1/(global tokens) (token-mean), 1 (token-sum,
    seq-mean-token-sum), 1/loss_scale_factor (seq-mean-token-sum-norm; the padded length of the
    tensor when loss_scale_factor is None) or 1/|y_i| (seq-mean-token-mean: each response's mean).
    rho is a share, so only factors that differ between tokens matter.
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is invalid; valid: one of {list(LOSS_AGG_MODES)}")
    if loss_agg_mode == "seq-mean-token-mean":
        lengths = mask.sum(-1, keepdim=True, dtype=torch.float64).clamp(min=1)  # verl's n + 1e-8 rounds to n in float32
        return (1.0 / lengths).expand(mask.shape)
    if loss_agg_mode == "seq-mean-token-sum-norm" and loss_scale_factor is None:
        return torch.full(mask.shape, 1.0 / max(mask.shape[-1], 1), dtype=torch.float64, device=mask.device)
    return None


def clip_diagnostics(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    log_prob: torch.Tensor,
    mask: torch.Tensor,
    c_low: float,
    c_high: float,
    dual_clip_c: Optional[float] = None,
    entropy: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Token fractions (over `mask`) describing what the bounds clip; 0-dim tensors, no host sync.

    pos_token_frac: tokens with A > 0. clipfrac_pos: A > 0 and r > c_high. clipfrac_neg: A < 0 and
    r < c_low. clipfrac_dual: A < 0 and r > dual_clip_c. Entropy-Clip Rule split of all clipped tokens
    (paper Sec. 3, Table 4 / App. B.4.2): a low-probability positive or a high-probability negative
    token's update would RAISE entropy; the other two kinds would lower it. With `entropy` (bsz,
    resp_len: H_t of the current policy at each position) "low probability" is pi(y_t) < exp(-H_t),
    the paper's per-position rule: clipfrac_entropy_raising / clipfrac_entropy_lowering. Without it, a
    proxy compares the token's log-prob with the mean log-prob of the masked tokens:
    clipfrac_entropy_raising_proxy / clipfrac_entropy_lowering_proxy.
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
    if entropy is not None:
        low_prob, suffix = log_prob < -entropy, ""  # pi(y_t) < exp(-H_t)
    else:
        mean_log_prob = (torch.nan_to_num(log_prob, posinf=0.0, neginf=0.0) * mask).sum() / count
        low_prob, suffix = log_prob < mean_log_prob, "_proxy"
    raising = clipped & ((pos & low_prob) | (neg & ~low_prob))
    return {
        "pos_token_frac": frac(pos),
        "clipfrac_pos": frac(clip_pos),
        "clipfrac_neg": frac(clip_neg),
        "clipfrac_dual": frac(clip_dual),
        f"clipfrac_entropy_raising{suffix}": frac(raising),
        f"clipfrac_entropy_lowering{suffix}": frac(clipped & ~raising),
    }
