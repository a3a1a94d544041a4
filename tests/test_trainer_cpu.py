"""The real verl 0.9.1 trainer on CPU with BAPO: `python -m recipe.bapo.main_bapo --config-name cpu_tiny`.

Ray, verl's FSDP2 actor on gloo, verl's own vLLM server on vLLM's CPU build (the rollout every GPU user runs),
the math reward and the registered BAPO loss with its per-update hook, on the tiny warm-started model. Each test is one trainer run in a
subprocess (they run one after another). The per-update trace (BAPO_TRACE_DIR, with tensors) shows
what verl's averaged metrics cannot: the bounds of every update and of every micro-batch.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from bapo_core import ClipSearchSpec, path_contributions, select_bounds
from recipe.data.tiny_assets import build_tiny_assets

pytestmark = pytest.mark.trainer
ROOT = Path(__file__).resolve().parents[1]
# the paper's search, with a higher target so that stale updates walk the path more often in short runs
SPEC = ClipSearchSpec(rho_target=0.5)


@pytest.fixture(scope="module")
def assets():
    return build_tiny_assets()


def run_bapo(out_dir: Path, overrides: list[str], entry: str = "recipe.bapo.main_bapo", trace: bool = True,
             during=None, **env):
    """One trainer run; returns (process, metrics rows, trace records, wall seconds). ``during(proc, metrics_path)``
    runs in a thread while the trainer runs (fault injection)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics, trace_dir = out_dir / "metrics.jsonl", out_dir / "trace"
    child_env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "RAY_ADDRESS", "RANK")}
    child_env.update(VERL_FILE_LOGGER_PATH=str(metrics), PYTHONUNBUFFERED="1", **env)
    if trace:
        child_env.update(BAPO_TRACE_DIR=str(trace_dir), BAPO_TRACE_TENSORS="1")
    start = time.perf_counter()
    popen = subprocess.Popen([sys.executable, "-m", entry, *overrides], cwd=out_dir, env=child_env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if during is not None:
        threading.Thread(target=during, args=(popen, metrics), daemon=True).start()
    try:
        stdout, stderr = popen.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        popen.kill()
        stdout, stderr = popen.communicate()
        raise AssertionError(f"trainer run timed out after 900 s:\n{stdout[-3000:]}\n{stderr[-5000:]}") from None
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    records = []
    for path in sorted(trace_dir.glob("*.jsonl")) if trace else []:
        records += [{**json.loads(line), "file": path.name} for line in path.read_text().splitlines()]
    print(f"\n[{out_dir.name}] wall {wall:.1f}s, step times {[round(r['data']['timing_s/step'], 2) for r in rows]}")
    return proc, rows, records, wall


def cpu_tiny(assets, out_dir: Path, *extra: str) -> list[str]:
    return [
        "--config-name", "cpu_tiny",  # rollout: verl's vLLM server on vLLM's CPU build, as on a GPU
        f"actor_rollout_ref.model.path={assets.model_dir}",
        f"data.train_files={assets.train_file}",
        f"data.val_files={assets.test_file}",
        "data.train_batch_size=4",  # 4 prompts x 4 = 16 responses per step
        "actor_rollout_ref.actor.ppo_mini_batch_size=1",  # 4 responses per update, 2 micro-batches of 2
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.ppo_epochs=2",  # 4 mini-batches x 2 epochs = 8 updates per step
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",  # divides a rank's 16 (or 8) responses
        f"actor_rollout_ref.actor.policy_loss.rho_target={SPEC.rho_target}",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        f"trainer.default_local_dir={out_dir / 'ckpt'}",
        *extra,
    ]  # fmt: skip


def assert_succeeded(proc):
    """The tail alone can hide the cause: Ray forwards each process's log, and the first failure (a vLLM
    worker's, say) scrolls out under the tracebacks of those that died of it. Its error lines come first."""
    if proc.returncode != 0:
        errors = dict.fromkeys(re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in proc.stderr.splitlines()
                               if re.search(r"\b\w*(Error|Exception)\b: ", line))
        causes = "\n".join(list(errors)[:15])
        raise AssertionError(f"exit {proc.returncode}; error lines, first 15:\n{causes}\n--- stdout tail:\n"
                             f"{proc.stdout[-3000:]}\n--- stderr tail:\n{proc.stderr[-8000:]}")


def on_grid(value: float, start: float, step: float, stop: float) -> bool:
    k = round((value - start) / step)
    return 0 <= k and abs(start + k * step - value) < 1e-9 and value <= stop + 1e-9


def check_updates(records, trace_dir: Path, world_size: int = 1):
    """Every update: one bound pair for all micro-batches of all ranks, equal to a search over their union."""
    updates = [r for r in records if r["kind"] == "update"]
    losses = [r for r in records if r["kind"] == "loss"]
    assert updates and losses
    stale_moved = 0
    for index in sorted({u["update"] for u in updates}):
        mine = [u for u in updates if u["update"] == index]
        assert len(mine) == world_size, mine  # every rank searched this update
        assert len({(u["c_low"], u["c_high"], u["steps"]) for u in mine}) == 1, mine  # ... and agreed
        bounds = (mine[0]["c_low"], mine[0]["c_high"])
        assert on_grid(bounds[0], 0.6, 0.02, 0.9) and on_grid(bounds[1], 1.2, 0.05, 3.0), bounds
        calls = [r for r in losses if r["update"] == index]
        assert len({r["file"] for r in calls}) == world_size and len(calls) >= world_size
        assert {(r["c_low"], r["c_high"]) for r in calls} == {bounds}  # every micro-batch of the step
        saved = [torch.load(trace_dir / r["tensors"]) for r in calls]
        union = {k: torch.cat([s[k].reshape(-1) for s in saved]) for k in ("ratio", "advantages", "mask")}
        sums = path_contributions(union["ratio"], union["advantages"], union["mask"], SPEC)
        again = select_bounds(sums.tolist(), SPEC)
        # the hook's forward is micro-batched exactly like the gradient pass: the loss's own ratios give
        # the same decision (first updates after the old-log-prob pass: ratios within float rounding of 1)
        assert (again.c_low, again.c_high, again.steps) == (*bounds, mine[0]["steps"]), (index, again, mine[0])
        stale = (union["ratio"][union["mask"]] - 1).abs().max() > 1e-4
        stale_moved += bool(stale and mine[0]["steps"] > 0)
    assert stale_moved >= 1  # at least one stale update (ratio != 1) where the bounds moved
    return updates


def check_metrics(rows, steps, rollout_probs_checked: bool = True):
    assert [r["step"] for r in rows] == steps
    for row in rows:
        data = row["data"]
        for key in ("c_low", "c_high", "rho", "rho_start", "search_steps", "target_met", "clipfrac_pos", "clipfrac_neg", "neg_token_share"):
            assert f"actor/bapo/{key}" in data, key
        if data.get("critic/advantages/max") == data.get("critic/advantages/min") == 0:  # no signal: missing, not made up
            assert all(data[f"actor/bapo/{key}"] is None for key in ("c_low", "c_high", "rho", "rho_start", "neg_token_share"))
        else:
            assert 0.6 <= data["actor/bapo/c_low"] <= 0.9 and 1.2 <= data["actor/bapo/c_high"] <= 3.0
        assert data["actor/bapo/bounds_from_update"] == 1.0
        if rollout_probs_checked:  # verl compares rollout and old log-probs only when it recomputes the latter
            assert data["training/rollout_probs_diff_max"] < 1e-5  # the rollout has the actor's weights (fp32)


def test_two_ranks_with_staleness_pick_identical_bounds_checkpoint_and_resume(assets, tmp_path):
    """v0 trainer, 2 ranks: 2 steps x 8 optimizer updates (staleness 8), every update's bounds equal on both
    ranks and to a search over the union of their loss ratios; a checkpoint at step 2, from which a second run
    resumes. (One test, not a shared fixture and two tests: under pytest-xdist two workers each ran the 2-rank run.)"""
    out = tmp_path / "two_ranks"
    overrides = cpu_tiny(assets, out, "trainer.n_gpus_per_node=2", "trainer.total_training_steps=2", "trainer.save_freq=2")
    proc, rows, records, _ = run_bapo(out, overrides)
    assert_succeeded(proc)
    check_metrics(rows, [1, 2])
    updates = check_updates(records, out / "trace", world_size=2)
    assert len({u["update"] for u in updates}) == len(updates) // 2 == 2 * 8  # 2 steps x 8 updates, on both ranks
    probes = sorted((r["file"], r["update"]) for r in records if r["kind"] == "probe")
    assert probes == sorted((u["file"], u["update"]) for u in updates)  # every rank probed every update
    assert (out / "ckpt" / "global_step_2").is_dir()
    # the two ranks trained on different data: all their loss calls' ratios and advantages (one update's alone can
    # match: at the first update after the old-log-prob pass every ratio is 1, and equal padded shapes are common)
    by_rank = {}
    for r in records:
        if r["kind"] == "loss":
            saved = torch.load(out / "trace" / r["tensors"])
            by_rank.setdefault(r["file"], []).append(torch.cat([saved["ratio"].reshape(-1), saved["advantages"].reshape(-1)]))
    a, b = (torch.cat(calls) for calls in by_rank.values())
    assert len(by_rank) == 2 and (a.shape != b.shape or not torch.equal(a, b))

    # the v0 trainer resumes from that checkpoint
    resumed = tmp_path / "two_ranks_resumed"
    overrides = cpu_tiny(assets, out, "trainer.n_gpus_per_node=2", "trainer.total_training_steps=3", "trainer.resume_mode=auto")
    proc, rows, _, _ = run_bapo(resumed, overrides, trace=False)
    assert_succeeded(proc)
    assert [r["step"] for r in rows] == [3]  # continued at the next step, not from scratch
    assert "global_step_2" in proc.stdout + proc.stderr


def test_v1_colocate_async_bapo_in_bypass_mode(assets, tmp_path_factory):
    """v1 trainer in verl's colocate_async mode (partial rollout by abort/resume, no token budget) with rollout
    correction in bypass mode: old_log_probs are the rollout's, never recomputed, so the ratio is never 1 by
    construction."""
    out = tmp_path_factory.getbasetemp() / "v1_bypass"
    overrides = cpu_tiny(assets, out, "trainer.use_v1=True", "trainer.v1.trainer_mode=colocate_async",
                         "trainer.total_training_steps=2", "algorithm.rollout_correction.bypass_mode=True",
                         "actor_rollout_ref.rollout.calculate_log_probs=True")
    proc, rows, records, _ = run_bapo(out, overrides)
    assert_succeeded(proc)
    check_metrics(rows, [1, 2], rollout_probs_checked=False)
    updates = check_updates(records, out / "trace")
    assert len(updates) == 2 * 8


def test_cpu_config_without_cpu_platform_fails_before_ray(assets, tmp_path):
    """Without VERL_PLATFORM=cpu the CPU backend registers nothing (verl would turn trainer.device=cpu into
    cuda); main_bapo's own check must say what to set, before Ray starts."""
    overrides = cpu_tiny(assets, tmp_path, "trainer.total_training_steps=1", "~ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM")
    proc, _, _, wall = run_bapo(tmp_path, overrides, trace=False)
    assert proc.returncode != 0
    assert "export VERL_PLATFORM=cpu" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_authors_code_preset_with_two_ranks(assets, tmp_path_factory):
    """scope: micro_batch through the real v1 trainer (sync mode): every micro-batch searches its own bounds over both ranks."""
    out = tmp_path_factory.getbasetemp() / "authors_two_ranks"
    overrides = cpu_tiny(assets, out, "trainer.use_v1=True", "trainer.n_gpus_per_node=2", "trainer.total_training_steps=1",
                         "policy_loss@actor_rollout_ref.actor.policy_loss=bapo_authors_code")
    proc, rows, records, _ = run_bapo(out, overrides)
    assert_succeeded(proc)
    data = rows[0]["data"]
    assert data["actor/bapo/bounds_from_update"] == 0.0 and data["actor/bapo/rho"] > 0
    losses = [r for r in records if r["kind"] == "loss"]
    assert not [r for r in records if r["kind"] == "update"]  # no per-update search in this scope
    for rank in ("rank0", "rank1"):
        assert [r for r in losses if r["file"].startswith(rank)], rank
    # the i-th loss call of each rank is one collective search: both ranks used the same bounds
    by_rank = {rank: [(r["c_low"], r["c_high"]) for r in losses if r["file"].startswith(rank)] for rank in ("rank0", "rank1")}
    assert by_rank["rank0"] == by_rank["rank1"]
    for c_low, c_high in by_rank["rank0"]:
        assert on_grid(c_low, 0.8, 0.05, 0.95) and on_grid(c_high, 1.2, 0.1, 2.0), (c_low, c_high)


VANILLA = ["policy_loss@actor_rollout_ref.actor.policy_loss=verl_vanilla", "algorithm.adv_estimator=grpo"]


def test_plugin_changes_nothing_for_a_vanilla_verl_run(assets, tmp_path_factory):
    """verl's own entry point, verl's vanilla loss and grpo: with the bapo-verl plugin loaded vs with only
    the CPU backend (VERL_USE_EXTERNAL_PLUGINS=none): the same metric keys, none of them actor/bapo/*."""
    keys = {}
    for name, env in {
        "with_plugin": {},
        "cpu_backend_only": {"VERL_USE_EXTERNAL_PLUGINS": "none", "VERL_USE_EXTERNAL_MODULES": "recipe.cpu_backend.plugin"},
    }.items():
        out = tmp_path_factory.getbasetemp() / f"vanilla_{name}"
        overrides = cpu_tiny(assets, out, "trainer.total_training_steps=1", *VANILLA)
        overrides[:2] = ["--config-path", str(ROOT / "configs"), "--config-name", "cpu_tiny"]
        overrides.remove(f"actor_rollout_ref.actor.policy_loss.rho_target={SPEC.rho_target}")
        env_vars = {"VERL_PLATFORM": "cpu", "PYTHONPATH": str(ROOT), **env}
        overrides += [f"+ray_kwargs.ray_init.runtime_env.env_vars.{k}={v}" for k, v in env.items()]
        proc, rows, records, _ = run_bapo(out, overrides, entry="verl.trainer.main_ppo", **env_vars)
        assert_succeeded(proc)
        assert not records  # no BAPO trace: neither the hook nor the loss ran
        keys[name] = set(rows[0]["data"])
    assert not [k for k in keys["with_plugin"] if k.startswith("actor/bapo")]
    assert keys["with_plugin"] == keys["cpu_backend_only"]
