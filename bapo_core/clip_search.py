"""BAPO's adaptive clip-bound search (arXiv 2510.18927, Eq. 8 and Algorithm 1).

For one policy update with per-token ratios r = pi_theta / pi_rollout and advantages A, the
positive share of the gradient-carrying contribution is

    P(c_high) = sum over A>0 tokens with r <= c_high of  r * A      (positives still carrying gradient)
    N(c_low)  = sum over A<0 tokens with r >= c_low  of  r * |A|    (negatives still carrying gradient)
    rho       = P / (P + N)

Algorithm 1 starts at (c_low, c_high) = (a-, a+), raises c_high by d1 up to b+, then c_low by d2 up
to b-, and stops at the first point where rho >= rho0 (if none does, the last point is used).

Instead of re-evaluating the batch after every step, P is computed for every c_high on the grid and
N for every c_low on the grid in one pass: each token is bucketed by where its ratio falls among the
grid values (the grid is uniform, so arithmetic plus one exact comparison finds the bucket), bucket
sums are accumulated (`index_add_`) and a cumulative sum turns them into P and N on the whole grid.
That is O(tokens + grid points) memory, no tokens x points tensor. The per-point sums are additive over tokens, so micro-batches and
data-parallel ranks combine with a sum: ONE all-reduce, then ONE host sync to pick the point.

Options beyond the paper (kept to reproduce the authors' released code, see `ClipSearchSpec`):
`search_order="low_first"`, `accounting="value"` (clipped tokens count at their clamped value),
`rho_definition="ratio"` (P / (N + 1e-8) instead of a share), `clamp_last_step` (a last, shorter step
to the max), `dual_clip_c` (dual-clip for A<0).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

SEARCH_ORDERS = ("high_first", "low_first")
ACCOUNTINGS = ("gradient", "value")
RHO_DEFINITIONS = ("share", "ratio")
MAX_PATH_POINTS = 100_000
MIN_STEP = 1e-4  # finer grids would need more precision than the float32 bucketing (_grid_position) gives
MAX_GRID_SCALE = 1e6  # |grid value| / step above this: float32 arithmetic could misplace a ratio by one bucket
RATIO_EPS = 1e-8  # rho_definition="ratio" is P / (N + RATIO_EPS), inf when N <= 0 (the authors' code)
_GRID_DECIMALS = 12  # start + k*step is rounded to this many decimals so 1.2 + 36*0.05 == 3.0


@dataclass(frozen=True)
class ClipSearchSpec:
    """What the search needs to know: the target, the two bound ranges and the variant.

    Attributes (paper symbol, paper value):
        rho_target: rho0, 0.4. Target for rho (a share in (0, 1); for `rho_definition="ratio"` a P/N value > 0).
        c_low_start, c_low_max, c_low_step: a-, b-, d2 = 0.6, 0.9, 0.02. Path of the lower ratio bound.
        c_high_start, c_high_max, c_high_step: a+, b+, d1 = 1.2, 3.0, 0.05. Path of the upper ratio bound.
            A step is 0 (fixed bound) or >= MIN_STEP = 1e-4.
        search_order: "high_first" (Algorithm 1: c_high moves first) or "low_first" (authors' code).
        accounting: "gradient" (clipped tokens count 0, so rho rises with both bounds) or "value"
            (clipped tokens count at their clamped value, the literal reading of Eq. 8 / authors' code).
        rho_definition: "share" = P / (P + N) (paper) or "ratio" = P / (N + 1e-8), inf when
            N <= 0 (authors' code).
        clamp_last_step: False (Algorithm 1: a bound moves while start + k * step <= max) or True
            (authors' code: each step is min(current + step, max), so the max is reached even when
            max - start is not a multiple of the step).
        dual_clip_c: None (paper) or a value > 1: with accounting="gradient", A<0 tokens with
            r > dual_clip_c carry no gradient and do not count in rho (dual-clip PPO). With
            accounting="value" the dual clip acts in the loss only, never in rho (authors' code,
            which uses 3.0).
    """

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
    dual_clip_c: Optional[float] = None

    def __post_init__(self):
        validate_search_spec(self)


def _fail(key: str, value, valid: str):
    raise ValueError(f"BAPO config: {key}={value!r} is invalid; valid: {valid}")


def _check_number(key: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, value, "a finite number")


def _grid_size(start: float, stop: float, step: float) -> int:
    """Number of steps k >= 0 with start + k*step <= stop (0 when step == 0)."""
    if step == 0:
        return 0
    return int(math.floor((stop - start) / step + 1e-9))


def _grid(start: float, stop: float, step: float, clamp_last_step: bool) -> tuple[float, ...]:
    """start + k*step (k = 0, 1, ... while <= stop), plus stop itself when clamp_last_step and it is not on the grid."""
    values = tuple(round(start + k * step, _GRID_DECIMALS) for k in range(_grid_size(start, stop, step) + 1))
    if clamp_last_step:  # every value min(start + k*step, stop), the last one stop
        values = tuple(min(v, stop) for v in values)
        values += (stop,) if values[-1] < stop - 1e-9 else ()  # not already there up to the grid's rounding
    return values


def validate_search_spec(spec: ClipSearchSpec) -> None:
    """Raise ValueError naming the key, its value and the valid range for any invalid setting."""
    for key in ("rho_target", "c_low_start", "c_low_max", "c_low_step", "c_high_start", "c_high_max", "c_high_step"):
        _check_number(key, getattr(spec, key))
    for key, choices in (
        ("search_order", SEARCH_ORDERS),
        ("accounting", ACCOUNTINGS),
        ("rho_definition", RHO_DEFINITIONS),
    ):
        if getattr(spec, key) not in choices:
            _fail(key, getattr(spec, key), f"one of {list(choices)}")
    if spec.rho_definition == "share" and not 0 < spec.rho_target < 1:
        _fail("rho_target", spec.rho_target, "0 < rho_target < 1 when rho_definition='share'")
    if spec.rho_definition == "ratio" and not spec.rho_target > 0:
        _fail("rho_target", spec.rho_target, "rho_target > 0 when rho_definition='ratio'")
    order = "0 < c_low_start <= c_low_max < 1 < c_high_start <= c_high_max"
    got = (
        f" (got c_low_start={spec.c_low_start}, c_low_max={spec.c_low_max}, "
        f"c_high_start={spec.c_high_start}, c_high_max={spec.c_high_max})"
    )
    for key, ok in (
        ("c_low_start", 0 < spec.c_low_start < 1),
        ("c_low_max", spec.c_low_start <= spec.c_low_max < 1),
        ("c_high_start", spec.c_high_start > 1),
        ("c_high_max", spec.c_high_max >= spec.c_high_start),
    ):
        if not ok:
            _fail(key, getattr(spec, key), order + got)
    for bound in ("c_low", "c_high"):
        start, stop, step = (getattr(spec, f"{bound}_{s}") for s in ("start", "max", "step"))
        if step != 0 and not step >= MIN_STEP:
            _fail(f"{bound}_step", step, f"{bound}_step = 0 (fixed bound) or >= {MIN_STEP}")
        if step == 0 and stop > start:
            _fail(
                f"{bound}_step",
                step,
                f"{bound}_step > 0 while {bound}_start < {bound}_max (got {start} < {stop}); "
                f"for a fixed bound set {bound}_max = {bound}_start",
            )
        if step != 0 and max(abs(start), abs(stop)) / step > MAX_GRID_SCALE:
            _fail(f"{bound}_step", step, f"max(|{bound}_start|, |{bound}_max|) / {bound}_step <= {MAX_GRID_SCALE:g} (got {start}, {stop})")
    if not isinstance(spec.clamp_last_step, bool):
        _fail("clamp_last_step", spec.clamp_last_step, "true or false")
    n_points = 1 + _grid_size(spec.c_low_start, spec.c_low_max, spec.c_low_step)
    n_points += _grid_size(spec.c_high_start, spec.c_high_max, spec.c_high_step) + 2 * spec.clamp_last_step
    if n_points > MAX_PATH_POINTS:
        _fail("c_low_step/c_high_step", (spec.c_low_step, spec.c_high_step), f"a path of at most {MAX_PATH_POINTS} points (got {n_points})")
    if spec.dual_clip_c is not None:
        _check_number("dual_clip_c", spec.dual_clip_c)
        if not spec.dual_clip_c > 1:
            _fail("dual_clip_c", spec.dual_clip_c, "null (off) or a value > 1")


@dataclass(frozen=True)
class ClipPath:
    """The bound pairs Algorithm 1 may visit, in order, on an exact integer grid.

    c_high_grid[i] = c_high_start + i * c_high_step, c_low_grid[j] = c_low_start + j * c_low_step
    (with `clamp_last_step`, a last value equal to the max may follow, closer than one step);
    path point k uses (c_low_grid[low_index[k]], c_high_grid[high_index[k]]). Point 0 is the start.
    """

    c_low_grid: tuple[float, ...]
    c_high_grid: tuple[float, ...]
    low_index: tuple[int, ...]
    high_index: tuple[int, ...]
    low_off_grid_last: bool = False  # c_low_grid[-1] is the clamped max, closer than one step
    high_off_grid_last: bool = False

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def from_spec(spec: ClipSearchSpec) -> "ClipPath":
        low = _grid(spec.c_low_start, spec.c_low_max, spec.c_low_step, spec.clamp_last_step)
        high = _grid(spec.c_high_start, spec.c_high_max, spec.c_high_step, spec.clamp_last_step)
        n_low, n_high = len(low) - 1, len(high) - 1
        if spec.search_order == "high_first":
            high_index = tuple(range(n_high + 1)) + (n_high,) * n_low
            low_index = (0,) * (n_high + 1) + tuple(range(1, n_low + 1))
        else:
            low_index = tuple(range(n_low + 1)) + (n_low,) * n_high
            high_index = (0,) * (n_low + 1) + tuple(range(1, n_high + 1))
        low_extra = len(low) - 1 > _grid_size(spec.c_low_start, spec.c_low_max, spec.c_low_step)
        high_extra = len(high) - 1 > _grid_size(spec.c_high_start, spec.c_high_max, spec.c_high_step)
        return ClipPath(low, high, low_index, high_index, low_extra, high_extra)

    def __len__(self) -> int:
        return len(self.low_index)

    def bounds(self, k: int) -> tuple[float, float]:
        return self.c_low_grid[self.low_index[k]], self.c_high_grid[self.high_index[k]]

    @property
    def num_sums(self) -> int:
        """Length of the vector `path_contributions` returns: P grid, N grid, signal-token count."""
        return len(self.c_high_grid) + len(self.c_low_grid) + 1


@dataclass(frozen=True)
class ClipSearchResult:
    """The bounds one update uses and how they were found.

    rho_start / rho: rho at the start point and at the chosen point (in `rho_definition` units;
    for "ratio" with N == 0 it is inf). steps: path steps walked (0 = start bounds).
    target_met: rho >= rho_target at the chosen point, or no token had a non-zero weighted advantage.
    num_signal_tokens: tokens with a non-zero weighted advantage w * A, over all ranks in the group.
    """

    c_low: float
    c_high: float
    rho_start: float
    rho: float
    steps: int
    target_met: bool
    num_signal_tokens: int


@functools.lru_cache(maxsize=256)
def _grid_tensor(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # cached so repeated searches do no host-to-device copy (that copy would be a second sync on GPU)
    return torch.tensor(values, dtype=dtype, device=device)


def _grid_position(r: torch.Tensor, grid: tuple[float, ...], step: float, strict: bool, off_grid_last: bool) -> torch.Tensor:
    """How many values of the grid lie below each ratio: `grid < r` if strict, else `grid <= r`.

    r: (tokens,) finite ratios. Returns the counts (tokens,) in [0, len(grid)], in r's dtype.
    The grid is uniform, except for a last value closer than one step when `off_grid_last`
    (clamp_last_step), which costs one more comparison. The nearest uniform index comes from
    arithmetic (off by far less than 0.5 because steps are at least MIN_STEP and grid values at
    most MAX_GRID_SCALE steps); one comparison with that grid value, made in r's dtype as the loss
    compares its bounds, makes the count exact. Much cheaper than a binary search
    (`torch.bucketize`) per token. Works in place on its temporaries: on CPU, fresh token-sized
    buffers cost page faults.
    """
    values = _grid_tensor(grid, r.dtype, r.device)
    n_uniform = len(grid) - off_grid_last
    inv_step = 1.0 / step if step > 0 else 0.0
    nearest = torch.sub(r, grid[0]).mul_(inv_step).round_().clamp_(0, n_uniform - 1)
    index = nearest.long()
    side = values.index_select(0, index)
    side = torch.sub(r, side, out=side).sign_()  # +1 above the nearest grid value, 0 on it, -1 below
    above = side.clamp_(min=0) if strict else side.add_(1).clamp_(max=1)
    count = nearest.add_(above)
    if off_grid_last:
        count.add_(r > values[-1] if strict else r >= values[-1])
    return count


def search_dtype(ratio: torch.Tensor) -> torch.Tensor:
    """The ratio in the dtype both the search and the loss compare it in: float32 for half precision."""
    return ratio if ratio.dtype in (torch.float32, torch.float64) else ratio.float()


def _bucket_sums(bucket: torch.Tensor, values: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """float64 (n_buckets,): the sum of `values` in each bucket (index_add_: no host sync, unlike bincount on GPU)."""
    return torch.zeros(n_buckets, dtype=torch.float64, device=values.device).index_add_(0, bucket, values)


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
    path = ClipPath.from_spec(spec)
    r = ratio.detach().reshape(-1)
    if r.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"path_contributions: ratio dtype {r.dtype}; promote it with bapo_core.search_dtype (float32 or float64)")
    # signed w * A in float64, 0 for masked or non-finite tokens (adding 0 * r makes it NaN where r
    # is not finite). In place: on CPU every fresh token-sized buffer costs page faults.
    wa = advantages.detach().reshape(-1).to(torch.float64, copy=True).mul_(mask.reshape(-1))
    if weights is not None:
        wa.mul_(weights.detach().reshape(-1))
    wa.add_(r, alpha=0.0).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    num_signal = torch.count_nonzero(wa).to(torch.float64).reshape(1)
    r = torch.nan_to_num(r, nan=1.0)  # ignored tokens weigh 0: any finite ratio may bucket them

    # A positive counts in P(c_high_j) iff r <= c_high_j, i.e. iff fewer than j+1 grid values are < r;
    # a negative counts in N(c_low_j) iff r >= c_low_j, i.e. iff more than j grid values are <= r.
    # Bucket sums over those counts, then cumulative sums, give P and N on the whole grid at once.
    n_high, n_low = len(path.c_high_grid), len(path.c_low_grid)
    high_position = _grid_position(r, path.c_high_grid, spec.c_high_step, True, path.high_off_grid_last)
    low_position = _grid_position(r, path.c_low_grid, spec.c_low_step, False, path.low_off_grid_last)
    # One bucket vector: positives at their c_high position (buckets 0..n_high), negatives after them
    # at their c_low position; selected arithmetically (x + s * (y - x), s = 0 or 1), no `where` pass.
    negative = torch.sign(wa).to(r.dtype).clamp_(max=0).neg_()  # 1 where w * A < 0, else 0
    bucket = low_position.add_(n_high + 1).sub_(high_position).mul_(negative).add_(high_position).long()
    mass = wa.abs_()  # |w * A| (reuses wa's buffer)
    if spec.dual_clip_c is not None and spec.accounting == "gradient":  # dual-clipped negatives carry no gradient
        mass.masked_fill_((r > spec.dual_clip_c) & (negative > 0), 0.0)

    def cumulative(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket sums of `values`, cumulated over the positives' and over the negatives' buckets."""
        sums = _bucket_sums(bucket, values, n_high + 1 + n_low + 1)
        return sums[: n_high + 1].cumsum(0), sums[n_high + 1 :].cumsum(0)

    if spec.accounting == "value":  # clipped tokens count at the bound: A * c_high above it, |A| * c_low below it
        pos_mass, neg_mass = cumulative(mass)
    pos_cum, neg_cum = cumulative(mass.mul_(r))
    p_grid = pos_cum[:-1]  # positives with r <= c_high
    n_grid = neg_cum[-1] - neg_cum[:-1]  # negatives with r >= c_low
    if spec.accounting == "value":
        p_grid = p_grid + _grid_tensor(path.c_high_grid, torch.float64, r.device) * (pos_mass[-1] - pos_mass[:-1])
        n_grid = n_grid + _grid_tensor(path.c_low_grid, torch.float64, r.device) * neg_mass[:-1]
    return torch.cat([p_grid, n_grid, num_signal])


def rho_value(pos: float, neg: float, rho_definition: str) -> float:
    """rho from the positive and negative contributions: a share (0 when nothing contributes) or
    the authors' P / (N + RATIO_EPS) (inf when N <= 0)."""
    if rho_definition == "share":
        return pos / (pos + neg) if pos + neg > 0 else 0.0
    return pos / (neg + RATIO_EPS) if neg > 0 else math.inf


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
    sums = path_contributions(ratio, advantages, mask, spec, weights)
    return reduce_and_select(sums, spec, group)


def reduce_and_select(sums: torch.Tensor, spec: ClipSearchSpec, group: Optional[dist.ProcessGroup]) -> ClipSearchResult:
    """Sum `path_contributions` over `group` (one collective), then pick the bounds (one host sync)."""
    if group is not None:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return select_bounds(sums.tolist(), spec)
