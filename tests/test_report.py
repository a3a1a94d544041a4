"""The sweep report's statistics against direct computations on synthetic metrics files written here."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest

from recipe.report import main as report_main
from recipe.sweep.runs import load_metrics, merge_attempts, read_jsonl
from recipe.report import load_run, summary_markdown
from recipe.sweep.report import load_sweep
from recipe.sweep.stats import (
    COLLAPSE_FRACTION, COLLAPSE_K, COLLAPSE_WINDOW, collapse_step, mean_interval, run_statistics, series, t_quantile,
)  # fmt: skip

# two-sided 95% / 99% Student t quantiles from printed tables (df: t_0.975, t_0.995)
T_TABLE = {1: (12.706, 63.657), 2: (4.303, 9.925), 3: (3.182, 5.841), 4: (2.776, 4.604), 7: (2.365, 3.499),
           10: (2.228, 3.169), 20: (2.086, 2.845), 30: (2.042, 2.750), 120: (1.980, 2.617)}  # fmt: skip


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_printed_tables(df):
    assert t_quantile(0.95, df) == pytest.approx(T_TABLE[df][0], abs=1.5e-3)
    assert t_quantile(0.99, df) == pytest.approx(T_TABLE[df][1], abs=1.5e-3)


def test_mean_interval_is_the_t_interval():
    values = [0.31, 0.42, 0.38, 0.29, 0.45]
    mean = sum(values) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    got = mean_interval(values)
    assert got[0] == pytest.approx(mean) and got[3] == 5
    assert got[2] - mean == pytest.approx(T_TABLE[4][0] * sd / math.sqrt(5), rel=1e-3)
    assert mean - got[1] == pytest.approx(got[2] - mean)
    assert mean_interval([0.5]) == (0.5, 0.5, 0.5, 1)
    assert mean_interval([]) is None


# train reward per step of the demo's two runs (2026-12-05, configs/regime/cpu_stress_g8.yaml, seed 0, 8 prompts x 8)
DEMO_GRPO = [0.281, 0.328, 0.266, 0.438, 0.219, 0.328, 0.078, 0.469, 0.406, 0.109,
             0.406, 0.234, 0.234, 0.281, 0.203, 0.031, 0.078, 0.219, 0.422, 0.219]  # fmt: skip
DEMO_BAPO = [0.172, 0.312, 0.016, 0.344, 0.109, 0.125, 0.141, 0.312, 0.391, 0.0,
             0.344, 0.234, 0.125, 0.047, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # fmt: skip


def old_collapse_step(steps, rewards):
    """The rule before issue 22: raw reward < 0.5 x its running peak for 3 consecutive steps (a window of 1)."""
    return collapse_step(steps, rewards, window=1, fraction=0.5, k=3)


def test_collapse_rule():
    steps = list(range(1, 21))
    # the demo's GRPO run: noisy but healthy (back at 0.42 at step 19); the old rule called it collapsed at step 15
    assert collapse_step(steps, DEMO_GRPO) is None and old_collapse_step(steps, DEMO_GRPO) == 15
    # the demo's BAPO run: reward 0 from step 15 on (a single-step 0 at step 10); its 5-step mean falls below
    # 0.3 x its peak (0.256, steps 8-12) at step 17 (0.034) and stays there
    assert collapse_step(steps, DEMO_BAPO) == 17
    # single-step dips to 0 in a healthy run, even two a few steps apart: no collapse
    dips = [0.3] * 20
    dips[5] = dips[9] = dips[14] = 0.0
    assert collapse_step(steps, dips) is None
    assert old_collapse_step(steps, [0.3, 0.3, 0.3, 0.1, 0.3, 0.1, 0.1, 0.1, 0.3] + [0.3] * 11) == 6  # the old rule did
    # a sustained collapse to 0 from step 11: 5-step means 0.24, 0.18, 0.12, 0.06, 0 from step 11; the first two
    # below 0.3 x 0.3 = 0.09 are steps 14 and 15 -> step 14
    assert collapse_step(steps, [0.3] * 10 + [0.0] * 10) == 14
    # one 5-step mean below the line (step 14: 0.06), then a recovery (step 15: 0.12): no collapse (it takes
    # COLLAPSE_K = 2); one more step at 0 makes it one
    assert collapse_step(steps, [0.3] * 10 + [0.0] * 4 + [0.6] + [0.3] * 5) is None
    assert collapse_step(steps, [0.3] * 10 + [0.0] * 5 + [0.6] + [0.3] * 4) == 14
    # a reward that never rises above 0 has no peak to fall from
    assert collapse_step(steps, [0.0] * 20) is None
    # the running peak, not the final one: a later higher peak does not move an earlier collapse (5-step means
    # 0.32, 0.24, 0.16, 0.08, 0 from step 6; below 0.3 x 0.4 = 0.12 from step 9)
    assert collapse_step(steps, [0.4] * 5 + [0.0] * 5 + [0.9] * 10) == 9
    # too few steps for 2 full 5-step means
    assert collapse_step(steps[:5], [0.3, 0.3, 0.0, 0.0, 0.0]) is None
    assert (COLLAPSE_WINDOW, COLLAPSE_FRACTION, COLLAPSE_K) == (5, 0.3, 2)  # the numbers the tests and stats.py state


def simulated_rewards(rng, steps=20, mean=0.26, drop_at=None, drop_to=0.0):
    """Train reward per step of a GRPO-like run on 8 prompts x 8 responses: each prompt's accuracy is drawn from a
    Beta of mean `mean` and concentration 0.51 (per-step sd 0.13 at mean 0.26, as the demo's GRPO run); from step
    `drop_at` on the mean is `drop_to` x `mean` (a collapse)."""
    rewards = []
    for step in range(1, steps + 1):
        m = mean * (drop_to if drop_at is not None and step >= drop_at else 1.0)
        p = rng.beta(m * 0.51, (1 - m) * 0.51, 8) if m > 0 else np.zeros(8)
        rewards.append(float(rng.binomial(8, p).sum() / 64))
    return rewards


def test_collapse_rule_on_simulated_noise():
    """The noise of 8 prompts per step (stats.py gives the rates on 4000 runs). Healthy runs: the old rule flags
    most, this one about none. Runs whose reward drops to 0: all flagged, at most 4 steps after the drop (and, in
    these runs, not before it)."""
    rng = np.random.default_rng(0)
    steps = list(range(1, 21))
    healthy = [simulated_rewards(rng) for _ in range(400)]
    assert np.std([r for run in healthy for r in run]) == pytest.approx(0.13, abs=0.015)
    assert sum(collapse_step(steps, r) is not None for r in healthy) <= 6  # <= 1.5% (0.3% on 4000 runs)
    assert sum(old_collapse_step(steps, r) is not None for r in healthy) >= 200  # >= 50% (61% on 4000 runs)
    for drop_at in (6, 10, 15):
        found = [collapse_step(steps, simulated_rewards(rng, drop_at=drop_at)) for _ in range(100)]
        assert all(f is not None and 0 <= f - drop_at <= 4 for f in found), (drop_at, found)


def test_steps_without_signal_do_not_skew_the_run_means(tmp_path):
    """Steps with no token of non-zero advantage: logged as null (now) or with made-up values (before issue 22:
    rho 0, share 0, the start bound 1.2, clip fraction 0); neither counts in the means over steps, nor in the
    comparison report's curves and summary. The reward's 0 counts: it is what the policy scored."""
    signal = {"critic/advantages/max": 1.0, "critic/advantages/min": -1.0}
    none = {"critic/advantages/max": 0.0, "critic/advantages/min": 0.0, "critic/score/mean": 0.0, "actor/pg_clipfrac": 0.0}
    keys = ("actor/bapo/rho", "actor/bapo/c_high", "actor/bapo/neg_adv_mass_share")
    rows = [
        {"step": 1, "data": {**signal, "critic/score/mean": 0.5, "actor/pg_clipfrac": 0.02, **dict(zip(keys, (0.4, 2.0, 0.6)))}},
        {"step": 2, "data": {**none, **dict.fromkeys(keys)}},  # logged now: null
        {"step": 3, "data": {**none, **dict(zip(keys, (0.0, 1.2, 0.0)))}},  # logged before: made up
        {"step": 4, "data": {**signal, "critic/score/mean": 0.3, "actor/pg_clipfrac": 0.04, **dict(zip(keys, (0.5, 3.0, 0.7)))}},
        {"step": 5, "data": {**signal, "critic/score/mean": 0.2, "actor/pg_clipfrac": float("nan"), **dict.fromkeys(keys, float("nan"))}},
    ]
    stats = run_statistics(rows)
    assert stats["rho"] == pytest.approx(0.45) and stats["c_high"] == pytest.approx(2.5)
    assert stats["pos_share"] == pytest.approx(0.35) and stats["clipfrac"] == pytest.approx(0.03)
    assert stats["reward_auc"] == pytest.approx((0.25 + 0 + 0.15 + 0.25) / 4)
    assert rows[2]["data"]["actor/bapo/rho"] == 0.0  # the caller's rows are left as they were

    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", [(r["step"], r["data"]) for r in rows])
    loaded = load_run(run)
    assert loaded.series("actor/bapo/rho") == ([1, 4], [0.4, 0.5])
    assert loaded.series("critic/score/mean")[0] == [1, 2, 3, 4, 5]
    assert "| 0.4 -> 0.45 |" in summary_markdown([loaded])


def write_jsonl(path, rows, cut_last: bool = False):
    text = "".join(json.dumps({"step": s, "data": d}) + "\n" for s, d in rows)
    path.write_text(text[:-7] if cut_last else text)  # a killed attempt can leave a cut-off last line


def test_merge_keeps_every_step_once_and_the_resumed_values():
    first = [(0, {"val": 0.1}), *[(s, {"score": 1.0, "x": 1.0}) for s in range(1, 8)]]
    second = [(5, {"val": 0.5}), *[(s, {"score": 2.0}) for s in range(6, 11)]]  # resumed from the step-5 checkpoint
    merged = merge_attempts([(0, [{"step": s, "data": d} for s, d in first]), (5, [{"step": s, "data": d} for s, d in second])])
    assert [r["step"] for r in merged] == list(range(11))
    by_step = {r["step"]: r["data"] for r in merged}
    assert by_step[5] == {"score": 1.0, "x": 1.0, "val": 0.5}  # the resumed attempt's validation joins step 5
    assert by_step[6] == {"score": 2.0} and by_step[7] == {"score": 2.0}  # attempt 0's steps 6, 7 are replaced


def test_cut_last_line_is_dropped_but_a_broken_middle_line_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    write_jsonl(path, [(1, {"a": 1.0}), (2, {"a": 2.0})], cut_last=True)
    assert [r["step"] for r in read_jsonl(path)] == [1]
    path.write_text('{"step": 1, "data": {}}\n{"step": 2, "da\n{"step": 3, "data": {}}\n')
    with pytest.raises(ValueError, match="m.jsonl:2"):
        read_jsonl(path)


def synthetic_run(root, method, seed, rng, resumed: bool = False, no_signal=(), legacy: bool = False):
    """A sweep run folder with random curves; returns the rows the report must see (after merging).

    Steps in `no_signal` had no token with a non-zero advantage (reward 0, advantages max = min = 0): they log the
    search and imbalance metrics as null (`legacy`: as the made-up values logged before issue 22, rho 0, share 0,
    start bounds) and clip fractions of 0."""
    run = root / f"{method}-s8-seed{seed}"
    run.mkdir(parents=True)
    steps = list(range(1, 13))
    rows = {0: {"val-core/tiny/acc/mean@1": float(rng.uniform(0.3, 0.5))}}
    for s in steps:
        rows[s] = {"critic/score/mean": float(rng.uniform(0, 1)), "actor/entropy": float(rng.uniform(0.05, 0.2)),
                   "actor/grad_norm": float(rng.uniform(0.1, 3)), "actor/pg_clipfrac": float(rng.uniform(0, 0.05)),
                   "critic/advantages/max": 1.5, "critic/advantages/min": -1.5,
                   "actor/bapo/neg_adv_mass_share": float(rng.uniform(0.4, 0.7))}  # fmt: skip
        if method == "bapo":
            rows[s].update({"actor/bapo/rho": float(rng.uniform(0.3, 0.5)), "actor/bapo/c_high": float(rng.uniform(1.2, 3)),
                            "actor/bapo/clipfrac_entropy_raising": float(rng.uniform(0, 0.01))})  # fmt: skip
        if s in no_signal:
            missing = 0.0 if legacy else None
            rows[s].update({"critic/score/mean": 0.0, "critic/advantages/max": 0.0, "critic/advantages/min": 0.0,
                            "actor/pg_clipfrac": 0.0, "actor/bapo/neg_adv_mass_share": missing})  # fmt: skip
            if method == "bapo":
                rows[s].update({"actor/bapo/rho": missing, "actor/bapo/c_high": 1.2 if legacy else None,
                                "actor/bapo/clipfrac_entropy_raising": 0.0})  # fmt: skip
    rows[12]["val-core/tiny/acc/mean@1"] = float(rng.uniform(0.3, 0.5))
    attempts = [{"attempt": 0, "resumed_from": 0}]
    if resumed:  # attempt 0 got to step 8 (checkpoint at 5, stale values after it); attempt 1 resumed from 5
        write_jsonl(run / "metrics.attempt0.jsonl", [(s, rows[s] if s <= 5 else {**rows[s], "critic/score/mean": 99.0}) for s in range(9)], cut_last=True)
        write_jsonl(run / "metrics.attempt1.jsonl", [(5, {"val-core/tiny/acc/mean@1": 0.4}), *[(s, rows[s]) for s in range(6, 13)]])
        rows[5]["val-core/tiny/acc/mean@1"] = 0.4
        attempts.append({"attempt": 1, "resumed_from": 5})
    else:
        write_jsonl(run / "metrics.attempt0.jsonl", sorted(rows.items()))
    info = {"name": run.name, "method": method, "staleness": "8", "seed": seed, "variant": "", "command": "python -m ...",
            "total_steps": 12, "attempts": attempts, "finished": True, "wall_seconds": 100.0 + seed}  # fmt: skip
    (run / "run.json").write_text(json.dumps(info))
    return [rows[s] for s in range(13)]


def direct(rows, no_signal=()):
    """The statistics computed the long way (numpy), independent of recipe/sweep/stats.py. Steps without signal
    count in the reward (0 is what the policy scored) and nowhere else."""
    steps = np.arange(1, 13)
    score = np.array([rows[s]["critic/score/mean"] for s in steps])
    entropy = np.array([rows[s]["actor/entropy"] for s in steps])
    smoothed = np.convolve(score, np.ones(5) / 5, mode="valid")  # the 5-step mean at steps 5..12
    below = smoothed < 0.3 * np.maximum.accumulate(smoothed)
    collapse = next((int(steps[4 + i]) for i in range(len(below) - 1) if below[i] and below[i + 1]), None)
    signal = [s for s in steps if s not in no_signal]
    bapo = "actor/bapo/rho" in rows[1]
    return {
        "val_acc[tiny]": rows[12]["val-core/tiny/acc/mean@1"],
        "reward_auc": float(np.trapezoid(score, steps) / (steps[-1] - steps[0])),
        "entropy_rel": float(entropy[-3:].mean() / entropy[:3].mean()),
        "grad_norm_peak": max(rows[s]["actor/grad_norm"] for s in steps),
        "clipfrac": float(np.mean([rows[s]["actor/pg_clipfrac"] for s in signal])),
        "pos_share": 1 - float(np.mean([rows[s]["actor/bapo/neg_adv_mass_share"] for s in signal])),
        "rho": float(np.mean([rows[s]["actor/bapo/rho"] for s in signal])) if bapo else None,
        "c_high": float(np.mean([rows[s]["actor/bapo/c_high"] for s in signal])) if bapo else None,
        "clipfrac_raising": float(np.mean([rows[s]["actor/bapo/clipfrac_entropy_raising"] for s in signal])) if bapo else None,
        "collapse_step": collapse,
    }


# (method, seed): (steps without signal, logged the old way); bapo 2 and grpo 3 collapse to reward 0
NO_SIGNAL = {("bapo", 0): ({4}, False), ("bapo", 2): (set(range(7, 13)), True), ("bapo", 3): ({6, 9}, True),
             ("grpo", 3): (set(range(8, 13)), False)}  # fmt: skip


def test_sweep_report_against_direct_computation(tmp_path):
    rng = np.random.default_rng(7)
    sweep = tmp_path / "sweep"
    truth = {}
    for m in ("bapo", "grpo"):
        for s in range(4):
            no_signal, legacy = NO_SIGNAL.get((m, s), ((), False))
            rows = synthetic_run(sweep, m, s, rng, resumed=(m, s) == ("bapo", 1), no_signal=no_signal, legacy=legacy)
            truth[(m, s)] = direct(rows, no_signal)
    assert truth[("bapo", 2)]["collapse_step"] is not None and truth[("grpo", 3)]["collapse_step"] is not None
    synthetic_run(sweep, "grpo", 9, rng)  # still training: left out of the statistics, named in the summary
    info = json.loads((sweep / "grpo-s8-seed9" / "run.json").read_text())
    (sweep / "grpo-s8-seed9" / "run.json").write_text(json.dumps({**info, "finished": False}))
    merged = load_metrics(sweep / "bapo-s8-seed1")
    assert [r["step"] for r in merged] == list(range(13))  # every step once
    assert all(r["data"]["critic/score/mean"] != 99.0 for r in merged if "critic/score/mean" in r["data"])

    out = tmp_path / "report"
    assert report_main([str(sweep), "--out", str(out)]) == 0
    with open(out / "runs.csv") as f:
        table = {(r["method"], int(r["seed"])): r for r in csv.DictReader(f)}
    for key, expected in truth.items():
        for name, value in expected.items():
            got = table[key][name]
            assert (got == "") if value is None else float(got) == pytest.approx(value, rel=1e-9), (key, name)
    assert set(table) == set(truth)
    assert table[("grpo", 0)]["rho"] == "" and table[("bapo", 0)]["rho"] != ""  # a key a run never logged: no value

    summary = (out / "summary.md").read_text()
    for method in ("bapo", "grpo"):
        values = np.array([truth[(method, s)]["reward_auc"] for s in range(4)])
        half = T_TABLE[3][0] * values.std(ddof=1) / 2  # the printed t has 3 decimals: the bounds may differ by 0.001
        low, high = re.search(rf"\| {values.mean():.3f} \[([0-9.-]+), ([0-9.-]+)\] \|", summary).groups()
        assert (float(low), float(high)) == pytest.approx((values.mean() - half, values.mean() + half), abs=1.5e-3)
        collapsed = sum(truth[(method, s)]["collapse_step"] is not None for s in range(4))
        assert f"| {collapsed}/4" in summary
    assert "not finished): grpo-s8-seed9 (at step 12)" in summary
    assert "bapo vs grpo" in summary and (out / "sweep_curves.png").stat().st_size > 10_000
    # the curves skip the made-up values of steps without signal too (bapo seed 3 logged them at steps 6 and 9)
    run = next(r for r in load_sweep(sweep)[0] if r["info"]["name"] == "bapo-s8-seed3")
    for key in ("actor/bapo/rho", "derived/pos_adv_mass_share", "actor/pg_clipfrac"):
        assert series(run["rows"], key)[0] == [1, 2, 3, 4, 5, 7, 8, 10, 11, 12], key


def test_script_attempts_merge_with_inferred_resume_points(tmp_path):
    """Paper-run script runs: <run>/<name>/metrics-<time>.jsonl per attempt, resume step inferred."""
    run = tmp_path / "bapo-s4-seed0"
    (run / "r1-7b").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"name": run.name, "method": "bapo", "staleness": "4", "seed": 0, "attempts": []}))
    write_jsonl(run / "r1-7b" / "metrics-20260101T000000Z.jsonl", [(0, {"val-core/a/acc/mean@16": 0.1}), *[(s, {"score": 1.0}) for s in range(1, 8)]])
    # resumed from the step-5 checkpoint: validation first (val_before_train), then steps 6..10
    write_jsonl(run / "r1-7b" / "metrics-20260101T010000Z.jsonl",
                [(5, {"val-core/a/acc/mean@16": 0.5}), *[(s, {"score": 2.0}) for s in range(6, 11)], (11, {"score": 2.0, "stale": 1.0})])
    # resumed from the step-10 checkpoint without validating first: starts at step 11
    write_jsonl(run / "r1-7b" / "metrics-20260101T020000Z.jsonl", [(s, {"score": 3.0}) for s in range(11, 13)])
    merged = {r["step"]: r["data"] for r in load_metrics(run)}
    assert sorted(merged) == list(range(13))
    assert merged[5] == {"score": 1.0, "val-core/a/acc/mean@16": 0.5}
    assert [merged[s]["score"] for s in (6, 7, 10)] == [2.0, 2.0, 2.0]
    assert merged[11] == {"score": 3.0}  # the killed attempt's step 11 is replaced whole, not merged
