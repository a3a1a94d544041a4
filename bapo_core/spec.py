"""What one BAPO clip-bound search is (arXiv 2510.18927, Algorithm 1 and Sec. 5.1): its settings,
their validation, the bound path they describe and the result.

`ClipSearchSpec` is the one declaration of the search settings: each field carries its
documentation (`metadata`: the paper's symbol and the meaning), recipe/bapo/config.py builds verl's
config keys from these fields and the README table is checked against them (tests/test_config_docs.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional

SEARCH_ORDERS = ("high_first", "low_first")
ACCOUNTINGS = ("gradient", "value")
RHO_DEFINITIONS = ("share", "ratio")
MAX_PATH_POINTS = 100_000
MIN_STEP = 1e-4  # finer grids would need more precision than the float32 bucketing (grid_count) gives
MAX_GRID_SCALE = 1e6  # |grid value| / step above this: float32 arithmetic could misplace a ratio by one bucket
RATIO_EPS = 1e-8  # rho_definition="ratio" is P / (N + RATIO_EPS), inf when N <= 0 (the authors' code)
_GRID_DECIMALS = 12  # start + k*step is rounded to this many decimals so 1.2 + 36*0.05 == 3.0


def doc(paper: str, help: str) -> dict:
    """Field metadata: the paper's symbol ("-" when the paper has none) and what the setting means."""
    return {"paper": paper, "help": help}


@dataclass(frozen=True)
class ClipSearchSpec:
    """What the search needs to know: the target, the two bound ranges and the variant.

    Defaults are the paper's (Sec. 5.1); each field's `metadata` documents it (paper symbol, meaning).
    Every option that is not the paper's default reproduces the authors' released code
    (bapo_core/authors_variants.py computes it).
    """

    rho_target: float = field(
        default=0.4,
        metadata=doc("rho0", "target for rho, the positive share of the gradient-carrying contribution (paper's 3B Llama run: 0.45)"),
    )
    c_low_start: float = field(default=0.6, metadata=doc("a-", "lower ratio bound at the start of every update's search"))
    c_low_max: float = field(default=0.9, metadata=doc("b-", "largest lower bound"))
    c_low_step: float = field(default=0.02, metadata=doc("delta2", "step of the lower bound: `0` (fixed bound) or >= `1e-4`"))
    c_high_start: float = field(default=1.2, metadata=doc("a+", "upper ratio bound at the start of every update's search"))
    c_high_max: float = field(default=3.0, metadata=doc("b+", "largest upper bound"))
    c_high_step: float = field(default=0.05, metadata=doc("delta1", "step of the upper bound: `0` (fixed bound) or >= `1e-4`"))
    search_order: str = field(default="high_first", metadata=doc("-", "`high_first` (Algorithm 1) or `low_first` (authors' code)"))
    accounting: str = field(
        default="gradient",
        metadata=doc("-", "`gradient`: clipped tokens count 0 in rho; `value`: at their clamped value (authors' code)"),
    )
    rho_definition: str = field(
        default="share", metadata=doc("-", "`share` = P/(P+N) (paper) or `ratio` = P/(N + 1e-8), inf when N <= 0 (authors' code)")
    )
    clamp_last_step: bool = field(
        default=False,
        metadata=doc(
            "-",
            "`false`: a bound moves while `start + k * step <= max` (Algorithm 1); `true`: a last, shorter step reaches "
            "the max even when the range is not a multiple of the step (authors' code)",
        ),
    )
    dual_clip_c: Optional[float] = field(
        default=None,
        metadata=doc(
            "-",
            "`null` = no dual clip (paper); a value > 1 caps A<0 tokens at r = `dual_clip_c` (authors' code: 3.0). "
            "Under `accounting: value` it acts in the loss only, never in rho (as in the authors' code)",
        ),
    )

    def __post_init__(self):
        validate_search_spec(self)

    @property
    def is_paper_variant(self) -> bool:
        """Algorithm 1 as the paper states it: c_high moves first, gradient-carrying tokens only, rho a
        share, steps on the exact grid, no dual clip (any target and ranges)."""
        return (self.search_order, self.accounting, self.rho_definition, self.clamp_last_step, self.dual_clip_c) == (
            "high_first",
            "gradient",
            "share",
            False,
            None,
        )


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
        if spec.search_order == "high_first":  # Algorithm 1: c_high to its max, then c_low
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


def rho_value(pos: float, neg: float, rho_definition: str) -> float:
    """rho from the positive and negative contributions: a share (0 when nothing contributes) or
    the authors' P / (N + RATIO_EPS) (inf when N <= 0)."""
    if rho_definition == "share":
        return pos / (pos + neg) if pos + neg > 0 else 0.0
    return pos / (neg + RATIO_EPS) if neg > 0 else math.inf
