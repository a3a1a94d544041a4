"""Per-run statistics of a sweep and their mean and 95% interval over seeds (Student t, no scipy).

Per run, from its merged metrics rows ({"step", "data"}):

| statistic | definition |
|---|---|
| `val_acc[SOURCE]` | last logged `val-core/SOURCE/acc/mean@K` |
| `reward_auc` | area under the train-reward curve (`critic/score/mean`, trapezoid over steps) / step span = its time average |
| `entropy_rel` | mean `actor/entropy` over the last `WINDOW` logged steps / mean over the first `WINDOW` |
| `grad_norm_peak` | max `actor/grad_norm` |
| `collapse_step` | first step of the first `COLLAPSE_K` consecutive steps whose train reward averaged over the trailing `COLLAPSE_WINDOW` logged steps is below `COLLAPSE_FRACTION` x the running peak of that average (peak > 0; averages over full windows only); None = no collapse, also for a run of fewer than `COLLAPSE_WINDOW` + `COLLAPSE_K` - 1 steps. The step is that of the average, so it lags a drop of the raw reward (by up to 4 steps for a drop to 0) |
| `clipfrac`, `clipfrac_raising`, `clipfrac_lowering` | mean over steps of `actor/pg_clipfrac` and of the Entropy-Clip Rule split `actor/bapo/clipfrac_entropy_{raising,lowering}` (the per-position rule; when verl computed no entropy in the gradient pass, the BAPO loss logs the mean-log-prob proxy `..._proxy` instead, used here with `clipfrac_split_proxy` = 1) |
| `rho`, `pos_share`, `c_low`, `c_high` | mean over steps of `actor/bapo/rho`, 1 - `actor/bapo/neg_adv_mass_share`, `actor/bapo/c_low`, `actor/bapo/c_high` (runs logged between issues 10 and 23 put the bounds of updates that took the r = 1 shortcut under `actor/bapo/ratio_one/*`, so theirs leave those updates out; `bounds_acting` = 1 for such runs) |

A statistic whose keys a run did not log is absent (None), so a report on runs without some metric has
no line for it. Means over steps skip steps without a finite value. A step in which no token has a non-zero
advantage has no update to describe: it logs the search and imbalance metrics as missing (NaN, null in verl's
file logger; `SEARCH_METRICS` in recipe/bapo/loss.py, recipe/bapo/worker.py), and `without_no_signal_values`
(applied before any statistic or curve) drops its `NO_SIGNAL_KEYS`: the made-up values runs logged before
that (rho 0, negative share 0, the start bounds), and the clip fractions, 0 by construction when no token
has a gradient (for every method alike: GRPO's `actor/pg_clipfrac` too). A step has no signal when
`critic/advantages/max` and `critic/advantages/min` are both 0. Inside a step with signal, the updates
without any count 0 in its clip fractions (verl's mean over updates), not in its search metrics.

Why the collapse rule smooths: with 8 prompts per step the per-step train reward is noisy (the demo regime's
GRPO seed 0: sd 0.13 around 0.26, single steps from 0.03 to 0.47). The rule used before (the raw reward below
0.5 x its running peak for 3 consecutive steps) flagged that healthy run at step 15 (back at 0.42 by step 19).
In a simulation of that noise (`simulated_rewards` in tests/test_report.py: 8 prompts x 8 responses,
per-prompt accuracy drawn from a Beta of the observed mean and spread; 4000 runs per case) it flags 61% of
healthy 20-step runs (82% of 30-step runs); this rule flags 0.2-0.3% (0.5-0.7%), at a mean reward of 0.2 1%
(3%), at 0.12 10% (22%; the old rule 90%, 98%). It flags every simulated run whose reward drops to 0 at a step
<= 15 of 20, on average 2.5-3 steps after the drop (at most 4; in < 0.5% of runs before it, where noise had
already crossed the line), and 89-98% of those dropping to a fifth of their level. Validation is too
sparse for a rule (every 10 steps in the CPU studies). The tests there check these cases.
"""

from __future__ import annotations

import fnmatch
import math
import re
import statistics

WINDOW = 3
COLLAPSE_WINDOW = 5
COLLAPSE_FRACTION = 0.3
COLLAPSE_K = 2
VAL_KEY = re.compile(r"^val-core/(?P<source>[^/]+)/acc/mean@\d+$")
STEP_MEANS = {
    "clipfrac": "actor/pg_clipfrac",
    "rho": "actor/bapo/rho",
    "c_low": "actor/bapo/c_low",
    "c_high": "actor/bapo/c_high",
}
# what a step without signal logged as made-up values in runs from before the search and imbalance metrics
# were logged as missing, and the clip fractions (fnmatch patterns)
NO_SIGNAL_KEYS = (
    "actor/bapo/c_low", "actor/bapo/c_high", "actor/bapo/rho", "actor/bapo/rho_start", "actor/bapo/search_steps",
    "actor/bapo/target_met", "actor/bapo/neg_token_share", "actor/bapo/neg_adv_mass_share",
    "actor/bapo/response_length_pos", "actor/bapo/response_length_neg",
    "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/bapo/clipfrac_*",
)  # fmt: skip


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r["data"][key])) for r in rows if _finite(r["data"].get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def area_per_step(steps: list[int], values: list[float]) -> float | None:
    if len(steps) < 2:
        return values[0] if values else None
    area = sum((steps[i + 1] - steps[i]) * (values[i + 1] + values[i]) / 2 for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def has_no_signal(data: dict) -> bool:
    """True for a step in which no token had a non-zero advantage (verl's advantage max and min both 0)."""
    return data.get("critic/advantages/max") == 0 and data.get("critic/advantages/min") == 0


def without_no_signal_values(rows: list[dict]) -> list[dict]:
    """The rows, with the `NO_SIGNAL_KEYS` of steps without signal left out (new rows; `rows` is not changed)."""
    out = []
    for row in rows:
        if has_no_signal(row["data"]):
            data = {k: v for k, v in row["data"].items() if not any(fnmatch.fnmatchcase(k, p) for p in NO_SIGNAL_KEYS)}
            row = {**row, "data": data}
        out.append(row)
    return out


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Entry i: the mean of values[i - window + 1 .. i] (full windows only: len(values) - window + 1 entries)."""
    return [statistics.fmean(values[i - window + 1 : i + 1]) for i in range(window - 1, len(values))]


def collapse_step(
    steps: list[int],
    rewards: list[float],
    window: int = COLLAPSE_WINDOW,
    fraction: float = COLLAPSE_FRACTION,
    k: int = COLLAPSE_K,
) -> int | None:
    """The module docstring's `collapse_step`: the first of `k` consecutive steps whose trailing `window`-step
    mean reward is below `fraction` x the running peak of that mean."""
    peak, streak_start, streak = 0.0, None, 0
    for step, smoothed in zip(steps[window - 1 :], trailing_mean(rewards, window)):
        peak = max(peak, smoothed)
        if peak > 0 and smoothed < fraction * peak:
            streak_start = step if streak == 0 else streak_start
            streak += 1
            if streak >= k:
                return streak_start
        else:
            streak = 0
    return None


def run_statistics(rows: list[dict]) -> dict[str, float | None]:
    rows = without_no_signal_values(rows)
    out: dict[str, float | None] = {}
    for key in sorted({k for r in rows for k in r["data"]}):
        match = VAL_KEY.match(key)
        if match:
            values = series(rows, key)[1]
            out[f"val_acc[{match['source']}]"] = values[-1] if values else None
    steps, rewards = series(rows, "critic/score/mean")
    out["reward_auc"] = area_per_step(steps, rewards)
    out["collapse_step"] = collapse_step(steps, rewards) if rewards else None
    _, entropy = series(rows, "actor/entropy")
    start = statistics.fmean(entropy[:WINDOW]) if entropy else 0.0
    out["entropy_rel"] = statistics.fmean(entropy[-WINDOW:]) / start if start > 0 else None
    _, grad = series(rows, "actor/grad_norm")
    out["grad_norm_peak"] = max(grad) if grad else None
    for name, key in STEP_MEANS.items():
        values = series(rows, key)[1]
        out[name] = statistics.fmean(values) if values else None
    keys = {k for r in rows for k in r["data"]}
    proxy = "actor/bapo/clipfrac_entropy_raising" not in keys and "actor/bapo/clipfrac_entropy_raising_proxy" in keys
    for name, side in (("clipfrac_raising", "raising"), ("clipfrac_lowering", "lowering")):
        values = series(rows, f"actor/bapo/clipfrac_entropy_{side}" + ("_proxy" if proxy else ""))[1]
        out[name] = statistics.fmean(values) if values else None
    out["clipfrac_split_proxy"] = float(proxy) if out["clipfrac_raising"] is not None else None
    out["bounds_acting"] = float(any(k.startswith("actor/bapo/ratio_one/") for k in keys)) if out["c_low"] is not None else None
    _, neg_mass = series(rows, "actor/bapo/neg_adv_mass_share")
    out["pos_share"] = 1 - statistics.fmean(neg_mass) if neg_mass else None
    return out


def t_two_sided_coverage(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df (the closed-form finite series)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:
        total, term = 1.0, 1.0
        for j in range(1, (df - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    total, term = 1.0, 1.0
    for j in range(1, df // 2):
        term *= c2 * (2 * j - 1) / (2 * j)
        total += term
    return math.sin(theta) * total


def t_quantile(coverage: float, df: int) -> float:
    """t with P(|T| <= t) = coverage (bisection to 1e-10), e.g. t_quantile(0.95, 4) = 2.776."""
    if not 0 < coverage < 1 or df < 1:
        raise ValueError(f"t_quantile: coverage={coverage} must be in (0, 1) and df={df} >= 1")
    low, high = 0.0, 1.0
    while t_two_sided_coverage(high, df) < coverage:
        high *= 2
    while high - low > 1e-10:
        mid = (low + high) / 2
        low, high = (mid, high) if t_two_sided_coverage(mid, df) < coverage else (low, mid)
    return (low + high) / 2


def mean_interval(values: list[float], coverage: float = 0.95) -> tuple[float, float, float, int] | None:
    """(mean, low, high, n) of the finite values: the t-interval of the mean; low = high = mean for n = 1."""
    values = [v for v in values if _finite(v)]
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) == 1:
        return mean, mean, mean, 1
    half = t_quantile(coverage, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half, len(values)
