"""Per-run statistics of a sweep and their mean and 95% interval over seeds (Student t, no scipy).

Per run, from its merged metrics rows ({"step", "data"}):

| statistic | definition |
|---|---|
| `val_acc[SOURCE]` | last logged `val-core/SOURCE/acc/mean@K` |
| `reward_auc` | area under the train-reward curve (`critic/score/mean`, trapezoid over steps) / step span = its time average |
| `entropy_rel` | mean `actor/entropy` over the last `WINDOW` logged steps / mean over the first `WINDOW` |
| `grad_norm_peak` | max `actor/grad_norm` |
| `collapse_step` | first step of the first run of `COLLAPSE_K` consecutive steps with train reward < `COLLAPSE_FRACTION` x its running peak (peak over all steps so far, > 0); None = no collapse |
| `clipfrac`, `clipfrac_raising`, `clipfrac_lowering` | mean over steps of `actor/pg_clipfrac` and of the Entropy-Clip Rule split `actor/bapo/clipfrac_entropy_{raising,lowering}` (the per-position rule; when verl computed no entropy in the gradient pass, the BAPO loss logs the mean-log-prob proxy `..._proxy` instead, used here with `clipfrac_split_proxy` = 1) |
| `rho`, `pos_share`, `c_low`, `c_high` | mean over steps of `actor/bapo/rho`, 1 - `actor/bapo/neg_adv_mass_share`, `actor/bapo/c_low`, `actor/bapo/c_high` (runs logged between issues 10 and 23 put the bounds of updates that took the r = 1 shortcut under `actor/bapo/ratio_one/*`, so theirs leave those updates out; `bounds_acting` = 1 for such runs) |

A statistic whose keys a run did not log is absent (None), so a report on runs without some metric has
no line for it.
"""

from __future__ import annotations

import math
import re
import statistics

WINDOW = 3
COLLAPSE_FRACTION = 0.5
COLLAPSE_K = 3
VAL_KEY = re.compile(r"^val-core/(?P<source>[^/]+)/acc/mean@\d+$")
STEP_MEANS = {
    "clipfrac": "actor/pg_clipfrac",
    "rho": "actor/bapo/rho",
    "c_low": "actor/bapo/c_low",
    "c_high": "actor/bapo/c_high",
}


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


def collapse_step(steps: list[int], rewards: list[float], fraction: float = COLLAPSE_FRACTION, k: int = COLLAPSE_K) -> int | None:
    peak, streak_start, streak = 0.0, None, 0
    for step, reward in zip(steps, rewards):
        peak = max(peak, reward)
        if peak > 0 and reward < fraction * peak:
            streak_start = step if streak == 0 else streak_start
            streak += 1
            if streak >= k:
                return streak_start
        else:
            streak = 0
    return None


def run_statistics(rows: list[dict]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in sorted({k for r in rows for k in r["data"]}):
        match = VAL_KEY.match(key)
        if match:
            out[f"val_acc[{match['source']}]"] = series(rows, key)[1][-1]
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
