"""BAPO's adaptive clip-bound search as the paper states it (arXiv 2510.18927, Eq. 8 and Algorithm 1).

Eq. 8 for bounds (c_low, c_high), over one update's tokens t with ratio r_t = pi_theta / pi_rollout,
advantage A_t and weight w_t (the loss aggregation's factor times the rollout-IS weight; 1 if none):

    P(c_high) = sum over w_t A_t > 0 with r_t <= c_high of r_t * w_t A_t     positives still carrying gradient
    N(c_low)  = sum over w_t A_t < 0 with r_t >= c_low  of r_t * |w_t A_t|   negatives still carrying gradient
    rho       = P / (P + N)

Algorithm 1 starts at (c_low, c_high) = (a-, a+), raises c_high by d1 up to b+, then c_low by d2 up
to b-, and stops at the first point where rho >= rho0 (if none does, the last point is used).

`paper_path_sums` evaluates P at every c_high and N at every c_low of that grid in one pass over
the tokens; the sums add over micro-batches and ranks (ONE all-reduce), and `select_bounds` walks
Algorithm 1 on the host (ONE sync). The authors' released code differs in five settings
(`search_order`, `accounting`, `rho_definition`, `clamp_last_step`, `dual_clip_c`); those are
computed by bapo_core/authors_variants.py, and `path_contributions` is the one place that dispatches.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.distributed as dist

from .spec import ClipPath, ClipSearchResult, ClipSearchSpec, rho_value

__all__ = [
    "grid_count",
    "paper_path_sums",
    "path_contributions",
    "reduce_and_select",
    "rho_along_path",
    "search_clip_bounds",
    "search_dtype",
    "select_bounds",
    "token_terms",
]


def search_dtype(ratio: torch.Tensor) -> torch.Tensor:
    """The ratio in the dtype both the search and the loss compare it in: float32 for half precision."""
    return ratio if ratio.dtype in (torch.float32, torch.float64) else ratio.float()


@functools.lru_cache(maxsize=256)
def grid_tensor(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # cached so repeated searches do no host-to-device copy (that copy would be a second sync on GPU)
    return torch.tensor(values, dtype=dtype, device=device)


def grid_count(r: torch.Tensor, grid: tuple[float, ...], step: float, strict: bool) -> torch.Tensor:
    """How many values of the uniform grid (grid[k] = grid[0] + k * step) lie below each ratio.

    r: (T,) finite ratios. Returns (T,) #{k: grid[k] < r_t} if strict, else #{k: grid[k] <= r_t}, in
    [0, len(grid)], as r's dtype (int64 arithmetic costs ~30% more on CPU): what torch.bucketize(r, grid,
    right=not strict) returns, at a fraction of its cost (a binary search per token). The nearest grid
    index comes from arithmetic (off by far less than half a step: steps >= MIN_STEP, values <=
    MAX_GRID_SCALE steps); one comparison with that grid value, in r's dtype as the loss compares its
    bounds, settles the count.
    """
    k = (r - grid[0]).mul_(1.0 / step if step > 0 else 0.0).round_().clamp_(0, len(grid) - 1)  # nearest grid index
    nearest = grid_tensor(grid, r.dtype, r.device).index_select(0, k.long())
    return k.add_(nearest.lt_(r) if strict else nearest.le_(r))  # in place: 1.0 where the grid value is below


def token_terms(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, weights: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-token inputs of Eq. 8, flattened to T tokens.

    Returns r (T,): the ratio in its own dtype (float32 or float64, as the loss compares it), set to 1
    where it is not finite; wa (T,) float64: w_t * A_t, 0 for masked tokens and where the ratio,
    advantage or weight is not finite; num_signal (1,) float64: the tokens with w_t * A_t != 0.
    """
    r = ratio.detach().reshape(-1)
    if r.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"path_contributions: ratio dtype {r.dtype}; promote it with bapo_core.search_dtype (float32 or float64)")
    counts = r.abs().lt_(math.inf).mul_(mask.reshape(-1))  # 1.0: a counted token with a finite ratio (in place, no isfinite: cheaper on CPU)
    wa = advantages.detach().reshape(-1).to(torch.float64, copy=True).mul_(counts)  # NaN * 0 is cleared below
    if weights is not None:
        wa.mul_(weights.detach().reshape(-1).to(torch.float64))
    wa.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    num_signal = torch.count_nonzero(wa).to(torch.float64).reshape(1)
    return torch.nan_to_num(r, nan=1.0, posinf=1.0, neginf=1.0), wa, num_signal


def paper_path_sums(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    spec: ClipSearchSpec,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eq. 8's P at every c_high and N at every c_low on Algorithm 1's grid, over these tokens. No host sync.

    ratio, advantages, mask (bool or 0/1), weights (optional): T tokens each, any shape.
    Grid: c_high_i = a+ + i * d1 <= b+ (i < H), c_low_j = a- + j * d2 <= b- (j < L).
    Returns float64 (H + L + 1,): [P(c_high_0 .. c_high_H-1) | N(c_low_0 .. c_low_L-1) | signal tokens],
    where signal tokens have w_t A_t != 0. Additive over tokens: sum it over micro-batches and ranks.
    """
    grid = ClipPath.from_spec(spec)
    H, L = len(grid.c_high_grid), len(grid.c_low_grid)
    r, wa, num_signal = token_terms(ratio, advantages, mask, weights)  # (T,) r_t, (T,) w_t A_t, (1,)

    # A positive carries gradient while r_t <= c_high_i, i.e. from step i = #{c_high < r_t} on (H: never).
    first_high_step = grid_count(r, grid.c_high_grid, spec.c_high_step, strict=True)  # (T,) in [0, H]
    # A negative carries gradient while r_t >= c_low_j, i.e. for steps j < #{c_low <= r_t} (0: never).
    low_steps = grid_count(r, grid.c_low_grid, spec.c_low_step, strict=False)  # (T,) in [0, L]
    # One bucket per token: a positive at its first c_high step (0..H), a negative after those at its
    # number of c_low steps (H+1 .. H+1+L); each bucket sums r_t |w_t A_t|.
    bucket = torch.where(wa > 0, first_high_step, low_steps.add_(H + 1), out=low_steps).long()
    term = wa.abs_().mul_(r.to(torch.float64))  # (T,) r_t |w_t A_t|
    sums = torch.zeros(H + 1 + L + 1, dtype=torch.float64, device=r.device).index_add_(0, bucket, term)
    p_steps, n_steps = sums[: H + 1], sums[H + 1 :]
    p = p_steps[:H].cumsum(0)  # P(c_high_i) = buckets 0..i (bucket H, r_t > b+, never counts)
    n = n_steps[1:].flip(0).cumsum(0).flip(0)  # N(c_low_j) = buckets j+1..L (bucket 0, r_t < a-, never counts)
    return torch.cat([p, n, num_signal])


def path_contributions(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    spec: ClipSearchSpec,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """This process's share of the sums that decide rho at every path point. No host sync.

    Args:
        ratio: (...) pi_theta / pi_rollout per token, float32 or float64 (any shape; compared in its
            own dtype, like the loss; promote half-precision ratios with `search_dtype` first).
        advantages: (...) same shape. mask: (...) bool or 0/1, tokens that count.
        weights: optional (...) per-token weights multiplying each contribution (verl's rollout_is_weights).
    Returns:
        float64 vector of length `ClipPath.from_spec(spec).num_sums`:
        [P at every c_high grid value | N at every c_low grid value | number of signal tokens].
        Additive over tokens: sum it over micro-batches and ranks, then call `select_bounds`.
        Tokens with a non-finite ratio, advantage or weight are ignored; signal tokens are the
        others with w * A != 0.
    """
    if spec.is_paper_variant:
        return paper_path_sums(ratio, advantages, mask, spec, weights)
    from .authors_variants import variant_path_sums

    return variant_path_sums(ratio, advantages, mask, spec, weights)


def rho_along_path(sums: list[float], spec: ClipSearchSpec) -> list[float]:
    """rho at every path point, from the (reduced) `path_contributions` sums."""
    path = ClipPath.from_spec(spec)
    n_high = len(path.c_high_grid)
    p_grid, n_grid = sums[:n_high], sums[n_high:-1]
    return [rho_value(p_grid[h], n_grid[low], spec.rho_definition) for low, h in zip(path.low_index, path.high_index)]


def select_bounds(sums: list[float], spec: ClipSearchSpec) -> ClipSearchResult:
    """Walk the path on the host: the first point with rho >= rho_target wins, else the last."""
    path = ClipPath.from_spec(spec)
    num_signal = int(round(sums[-1]))
    if num_signal == 0:  # no learning signal: nothing to balance
        rho = rho_value(0.0, 0.0, spec.rho_definition)
        return ClipSearchResult(*path.bounds(0), rho, rho, 0, True, 0)
    rhos = rho_along_path(sums, spec)
    met = next((k for k, rho in enumerate(rhos) if rho >= spec.rho_target), None)
    k = len(path) - 1 if met is None else met
    return ClipSearchResult(*path.bounds(k), rhos[0], rhos[k], k, met is not None, num_signal)


def reduce_and_select(sums: torch.Tensor, spec: ClipSearchSpec, group: Optional[dist.ProcessGroup]) -> ClipSearchResult:
    """Sum `path_contributions` over `group` (one collective), then pick the bounds (one host sync)."""
    if group is not None:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return select_bounds(sums.tolist(), spec)


def search_clip_bounds(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    spec: ClipSearchSpec,
    weights: Optional[torch.Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> ClipSearchResult:
    """Algorithm 1 for one update: choose (c_low, c_high) over these tokens (and `group`'s ranks).

    One vectorised pass, one all-reduce over `group` (skipped when None), one host sync.
    Every rank of `group` must call it and gets the same result.
    """
    return reduce_and_select(path_contributions(ratio, advantages, mask, spec, weights), spec, group)
