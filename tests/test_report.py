"""The sweep report's statistics against direct computations on synthetic metrics files written here."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from recipe.report import main as report_main
from recipe.sweep.runs import load_metrics, merge_attempts, read_jsonl
from recipe.sweep.stats import collapse_step, mean_interval, t_quantile

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


def test_collapse_rule():
    steps = list(range(1, 11))
    # peak 0.5 at step 3; below 0.25 at steps 5, 6, 7 (three in a row) -> collapse at step 5
    assert collapse_step(steps, [0.2, 0.4, 0.5, 0.3, 0.2, 0.2, 0.1, 0.3, 0.3, 0.3]) == 5
    # dips of two steps only, each broken by a recovery: no collapse
    assert collapse_step(steps, [0.2, 0.5, 0.2, 0.2, 0.4, 0.1, 0.1, 0.5, 0.4, 0.4]) is None
    # a reward that never rises above 0 has no peak to fall from
    assert collapse_step(steps, [0.0] * 10) is None
    # the running peak, not the final one: a later higher peak does not move an earlier collapse
    assert collapse_step(steps, [0.4, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]) == 2


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


def synthetic_run(root, method, seed, rng, resumed: bool = False):
    """A sweep run folder with random curves; returns the rows the report must see (after merging)."""
    run = root / f"{method}-s8-seed{seed}"
    run.mkdir(parents=True)
    steps = list(range(1, 13))
    rows = {0: {"val-core/tiny/acc/mean@1": float(rng.uniform(0.3, 0.5))}}
    for s in steps:
        rows[s] = {"critic/score/mean": float(rng.uniform(0, 1)), "actor/entropy": float(rng.uniform(0.05, 0.2)),
                   "actor/grad_norm": float(rng.uniform(0.1, 3)), "actor/pg_clipfrac": float(rng.uniform(0, 0.05))}  # fmt: skip
        if method == "bapo":
            rows[s].update({"actor/bapo/rho": float(rng.uniform(0.3, 0.5)), "actor/bapo/clipfrac_entropy_raising": float(rng.uniform(0, 0.01))})
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


def direct(rows):
    """The statistics computed the long way (numpy), independent of recipe/sweep/stats.py."""
    steps = np.arange(1, 13)
    score = np.array([rows[s]["critic/score/mean"] for s in steps])
    entropy = np.array([rows[s]["actor/entropy"] for s in steps])
    peak, below, collapse = np.maximum.accumulate(score), 0, None
    for s, (r, p) in zip(steps, zip(score, peak)):
        below = below + 1 if r < 0.5 * p else 0
        if below == 3 and collapse is None:
            collapse = int(s) - 2
    return {
        "val_acc[tiny]": rows[12]["val-core/tiny/acc/mean@1"],
        "reward_auc": float(np.trapezoid(score, steps) / (steps[-1] - steps[0])),
        "entropy_rel": float(entropy[-3:].mean() / entropy[:3].mean()),
        "grad_norm_peak": max(rows[s]["actor/grad_norm"] for s in steps),
        "clipfrac": float(np.mean([rows[s]["actor/pg_clipfrac"] for s in steps])),
        "collapse_step": collapse,
    }


def test_sweep_report_against_direct_computation(tmp_path):
    rng = np.random.default_rng(7)
    sweep = tmp_path / "sweep"
    truth = {(m, s): direct(synthetic_run(sweep, m, s, rng, resumed=(m, s) == ("bapo", 1))) for m in ("bapo", "grpo") for s in range(4)}
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
        half = T_TABLE[3][0] * values.std(ddof=1) / 2
        assert f"{values.mean():.3f} [{values.mean() - half:.3f}, {values.mean() + half:.3f}]" in summary
        collapsed = sum(truth[(method, s)]["collapse_step"] is not None for s in range(4))
        assert f"| {collapsed}/4" in summary
    assert "not finished): grpo-s8-seed9 (at step 12)" in summary
    assert "bapo vs grpo" in summary and (out / "sweep_curves.png").stat().st_size > 10_000


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
