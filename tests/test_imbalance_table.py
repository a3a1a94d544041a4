"""recipe/sweep/imbalance.py: the per-run precondition / mechanism table of docs/study_cpu_imbalance/."""

import json
import math

from recipe.sweep import imbalance


def _run(tmp_path, name, args, rows):
    run = tmp_path / name
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"name": name, "args": args}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "data": d}) + "\n" for i, d in enumerate(rows)))
    return run


def test_run_row_means_skip_steps_without_signal(tmp_path):
    rows = [
        {"val-core/tiny_aime/acc/mean@1": 0.5},
        {"critic/score/mean": 0.25, "actor/bapo/neg_adv_mass_share": 0.7, "actor/pg_clipfrac": 0.03,
         "actor/bapo/rho_start": 0.3, "actor/bapo/rho": 0.41, "actor/bapo/search_steps": 4.0,
         "actor/bapo/response_length_pos": 16.0, "actor/bapo/response_length_neg": 40.0},
        {"critic/score/mean": 0.0, "actor/bapo/neg_adv_mass_share": None, "actor/pg_clipfrac": 0.0,
         "actor/bapo/rho_start": float("nan"), "actor/bapo/rho": None, "actor/bapo/search_steps": None},  # no signal
        {"critic/score/mean": 0.5, "actor/bapo/neg_adv_mass_share": 0.5, "actor/pg_clipfrac": 0.01,
         "actor/bapo/rho_start": 0.5, "actor/bapo/rho": 0.5, "actor/bapo/search_steps": 0.0,
         "actor/bapo/response_length_pos": 18.0, "actor/bapo/response_length_neg": 20.0,
         "val-core/tiny_aime/acc/mean@1": 0.75},
    ]
    run = _run(tmp_path, "bapo-s8e4-seed0", ["method=bapo", "actor_rollout_ref.actor.optim.lr=2e-4"], rows)
    row = imbalance.run_row(run)
    assert row["lr"] == "2e-4" and row["steps"] == 3 and row["val"] == [0.5, 0.75]
    assert row["neg_share"] == 0.6 and row["neg_steps_060"] == 0.5  # 0.7 and 0.5; the null step skipped
    assert (row["rho_start"], row["searched"]) == (0.4, 0.5) and math.isclose(row["rho"], 0.455)
    assert (row["len_right"], row["len_wrong"]) == (17.0, 30.0)
    assert math.isclose(row["clipfrac"], 0.04 / 3)  # a real 0 (nothing to clip) stays in verl's own metric
    assert math.isnan(row["c_low"])  # never logged: "-" in the table


def test_table_has_one_row_per_run_and_as_many_cells_as_columns(tmp_path):
    _run(tmp_path, "grpo-s1-seed0", [], [{"critic/score/mean": 0.5}])
    _run(tmp_path, "grpo-s1-seed1", ["actor_rollout_ref.actor.optim.lr=3e-4"], [{"critic/score/mean": 0.25}])
    lines = imbalance.table([imbalance.run_row(r) for r in imbalance._runs([str(tmp_path)])]).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| grpo-s1-seed0", "| grpo-s1-seed1"]
    assert len({line.count("|") for line in lines}) == 1
    assert "| regime |" in lines[2] and "| 3e-4 |" in lines[3]
