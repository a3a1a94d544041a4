"""The real verl v1 trainer on CPU with token-budget partial rollout (trainer mode ``colocate_budget``).

Each test is one (or three) trainer runs in a subprocess on the tiny model (responses ~16 tokens, max 32).
verl's own colocate_async mode (no budget) runs end to end in test_trainer_cpu.py
(test_v1_colocate_async_bapo_in_bypass_mode).
The partial-rollout trace (``trainer.v1.colocate_budget.trace_dir``) records every fetched prompt uid,
every trained group with its sessions (segments, tokens, rollout log-probs), every eviction with its
reason, checkpointed store records and the prompt groups still in TransferQueue at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from benchmarks.bench_cpu_engines import descendants
from test_trainer_cpu import assert_succeeded, cpu_tiny, run_bapo

pytestmark = pytest.mark.trainer
BUDGET, N = 6, 2


@pytest.fixture(scope="module")
def assets():
    from recipe.data.tiny_assets import build_tiny_assets

    return build_tiny_assets()


def partial_run(assets, out: Path, *extra: str, during=None, **env):
    overrides = cpu_tiny(
        assets, out,
        "+rollout=partial",
        f"trainer.v1.colocate_budget.token_budget={BUDGET}",
        "trainer.v1.colocate_budget.max_inflight_groups=16",
        "trainer.v1.colocate_budget.poll_interval_s=0.2",
        f"trainer.v1.colocate_budget.trace_dir={out / 'ptrace'}",
        f"actor_rollout_ref.rollout.n={N}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",  # 4 prompts x 2 = 8 responses: 2 updates of 4
        "actor_rollout_ref.actor.ppo_epochs=1",
        *extra,
    )  # fmt: skip
    proc, rows, _, wall = run_bapo(out, overrides, trace=False, during=during, **env)
    return proc, rows, read_trace(out / "ptrace"), wall


def read_trace(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    return records


def sessions_of(trace):
    return [(r["step"], s) for r in trace if r["kind"] == "trained" for s in r["sessions"]]


def check_ledger(trace, steps: set[int] | None = None):
    """Every fetched uid: trained once with N responses, evicted with a reason, or still in TQ at the end."""
    fetched = [u for r in trace if r["kind"] == "fetched" for u in r["uids"]]
    assert len(fetched) == len(set(fetched)) and fetched
    trained = Counter(u for r in trace if r["kind"] == "trained" for u in r["uids"])
    assert all(c == 1 for c in trained.values()), trained
    keys = Counter(s["key"].split("_")[0] for _, s in sessions_of(trace))
    assert all(keys[u] == N for u in trained), keys
    evicted = {r["uid"]: r["reason"] for r in trace if r["kind"] == "evicted"}
    assert all(reason in ("stale", "failure") for reason in evicted.values())
    at_end = {u for r in trace if r["kind"] == "inflight_at_end" for u in r["uids"]}
    for uid in fetched:
        places = (uid in trained) + (uid in evicted) + (uid in at_end)
        assert places == 1, (uid, uid in trained, evicted.get(uid), uid in at_end)
    return trained, evicted


def check_budget(trace):
    """No version gave a trajectory more than B tokens unless forced or lifted; segments add up to the response."""
    spans = []
    for step, s in sessions_of(trace):
        per_version = Counter()
        for version, n, weight_version in s["segments"]:
            per_version[version] += n
        assert s["forced"] or all(n <= BUDGET for v, n in per_version.items() if v not in s["lifted"]), s
        assert sum(per_version.values()) == len(s["tokens"]) == len(s["log_probs"])
        versions = [v for v, _, _ in s["segments"]]
        assert versions == sorted(versions) and max(versions) <= step - 1  # generated before its training step
        engine = [w for _, _, w in s["segments"]]
        assert engine == sorted(engine)  # an engine's own weight counter (hf; vLLM reports none: -1) never goes back
        spans.append(len(set(versions)))
    return spans


def test_wait_strategy_forces_groups_at_the_cap(assets, tmp_path):
    """Also validates at step 2: validation is unbudgeted (a budgeted validation response would park until a
    version that only comes after validation: the run would hang) and logs verl's val metrics."""
    proc, rows, trace, _ = partial_run(assets, tmp_path, "trainer.total_training_steps=4",
                                       "trainer.v1.sampler.max_off_policy_threshold=2",
                                       "trainer.v1.sampler.max_off_policy_strategy=wait",
                                       "trainer.test_freq=2", "data.val_max_samples=16")
    assert_succeeded(proc)
    assert [k for k in rows[1]["data"] if k.startswith("val-core/")], sorted(rows[1]["data"])[:20]
    check_budget(trace)
    check_ledger(trace)
    forced = [s for _, s in sessions_of(trace) if s["forced"]]
    assert forced and rows[-1]["data"]["partial/sampler/forced_groups"] > 0
    for step, s in sessions_of(trace):  # every trained trajectory generated by at most 2 versions
        versions = [v for v, _, _ in s["segments"]]
        assert max(versions) - min(versions) + 1 <= 2, s
    assert not [r for r in trace if r["kind"] == "evicted"]  # wait never drops


def test_drop_cap_below_the_budget_minimum_is_rejected_before_ray(assets, tmp_path):
    overrides = cpu_tiny(assets, tmp_path, "+rollout=partial", f"trainer.v1.colocate_budget.token_budget={BUDGET}",
                         "trainer.v1.sampler.max_off_policy_threshold=3", "trainer.total_training_steps=1")
    proc, _, _, wall = run_bapo(tmp_path, overrides, trace=False)
    assert proc.returncode != 0
    assert "max_off_policy_threshold=3 is invalid" in proc.stderr and "= 7" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def check_resumed(parked: dict, trace_b: list, persist: bool) -> None:
    """Sessions parked at the checkpoint and trained after the resume: continued (persist) or regenerated."""
    continued = {s["key"].rsplit("_", 1)[0]: s for _, s in sessions_of(trace_b)}
    resumed = [k for k in parked if k in continued]
    assert resumed, "no parked session was trained after the resume"
    for key in resumed:
        stored, s = parked[key], continued[key]
        if persist:
            assert s["tokens"][: len(stored["token_ids"])] == stored["token_ids"]
            torch.testing.assert_close(torch.tensor(s["log_probs"][: len(stored["log_probs"])]),
                                       torch.tensor(stored["log_probs"]), atol=1e-6, rtol=0)
            assert s["segments"][: len(stored["segments"])] == stored["segments"]  # original versions kept
            assert s["restored"]
        else:
            assert min(v for v, _, _ in s["segments"]) >= 3  # regenerated from zero under the resumed weights
            assert not s["restored"]


def check_budgeted_run(rows, trace, threshold: int):
    """A budgeted drop run: trajectories span versions within B per version, the cap holds, metrics logged."""
    spans = check_budget(trace)
    assert max(spans) >= 2  # some trained trajectories were generated by >= 2 policy versions
    assert any(not s["forced"] and len({v for v, _, _ in s["segments"]}) >= 2 for _, s in sessions_of(trace))
    for step, s in sessions_of(trace):  # cap: threshold versions, measured on the oldest segment
        assert step - min(v for v, _, _ in s["segments"]) <= threshold
    for row in rows:
        data = row["data"]
        for key in ("actor/bapo/c_high", "actor/bapo/rho", "partial/trained/resumed_share",
                    "partial/trained/token_staleness/mean", "partial/buffer/parked_sessions",
                    "partial/rollout/reprefill_tokens", "partial/sampler/refills"):
            assert key in data, key
    assert max(r["data"]["partial/trained/resumed_share"] for r in rows) > 0
    last = rows[-1]["data"]  # B < the typical length: every session parks, only the progress rule moves on
    assert last["partial/sampler/refills"] + last["partial/sampler/forced_groups"] > 0


def kill_the_vllm_engine_after(step: int, fault: dict):
    """Fault injection for ``run_bapo(during=...)``: once ``step`` is logged, SIGKILL the run's vLLM engine
    processes (``VLLM::EngineCore``: the scheduler and model of verl's vLLM server) in the middle of the next step."""

    def during(proc, metrics: Path):
        while proc.poll() is None:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if any(json.loads(line)["step"] >= step for line in lines):
                time.sleep(1.0)  # into the next step's generation
                for pid in descendants(proc.pid):
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            if f.read().startswith(b"VLLM::EngineCore"):
                                os.kill(pid, signal.SIGKILL)
                                fault.setdefault("pids", []).append(pid)
                    except (OSError, ProcessLookupError):
                        continue
                fault["at"] = time.perf_counter()
                return
            time.sleep(0.2)

    return during


def test_engine_death_fails_the_run_and_resume_continues_parked_sessions(assets, tmp_path):
    """Run A (budget B, drop at 7 versions) trains steps 1-4 (the budgeted-run checks), saves at step 3; then its
    vLLM engine is killed: the run fails within a bounded time saying the engine died. B resumes from step 3:
    the sessions parked at the checkpoint continue from exactly their stored tokens, and the ledger over A and
    B loses nothing and trains nothing twice. Negative control C (a copy of A's checkpoint, persistence off):
    they restart from zero tokens."""
    ckpt = ["trainer.save_freq=3", "trainer.total_training_steps=6", "trainer.v1.sampler.max_off_policy_threshold=7"]
    a, fault = tmp_path / "a", {}
    proc_a, rows_a, trace_a, _ = partial_run(assets, a, *ckpt, during=kill_the_vllm_engine_after(4, fault))
    ended = time.perf_counter()
    assert fault.get("pids"), "no vLLM engine process was found to kill"
    assert proc_a.returncode != 0, proc_a.stdout[-2000:]
    assert ended - fault["at"] < 240, f"the run took {ended - fault['at']:.0f} s to fail after its engine died"
    assert "EngineDeadError" in proc_a.stdout + proc_a.stderr  # the error names what died
    assert [r["step"] for r in rows_a][:4] == [1, 2, 3, 4] and len(rows_a) <= 5
    check_budgeted_run(rows_a[:4], trace_a, threshold=7)
    saved = next(r for r in trace_a if r["kind"] == "checkpoint" and r["step"] == 3)["records"]
    parked = {k: r for k, r in saved.items() if r["status"] != "finished" and r["token_ids"]}
    assert parked, "nothing was parked at the checkpoint: the test would prove nothing"
    assert all(max(s[0] for s in r["segments"]) <= 2 for r in parked.values())
    shutil.copytree(a / "ckpt", tmp_path / "ckpt_copy")
    runs = {}
    for name, persist, folder in (("b", True, a / "ckpt"), ("c", False, tmp_path / "ckpt_copy")):
        proc, rows, trace, _ = partial_run(assets, tmp_path / name, ckpt[0], "trainer.total_training_steps=5",
                                           ckpt[2], f"trainer.default_local_dir={folder}", "trainer.resume_mode=auto",
                                           f"trainer.v1.colocate_budget.persist_partial={persist}")
        assert_succeeded(proc)
        assert [r["step"] for r in rows] == [4, 5]
        check_resumed(parked, trace, persist)
        runs[name] = trace
    # ledger over A (up to its checkpoint) and B: nothing lost, nothing trained twice
    trained_a = {u for r in trace_a if r["kind"] == "trained" and r["step"] <= 3 for u in r["uids"]}
    trained_b = {u for r in runs["b"] if r["kind"] == "trained" for u in r["uids"]}
    assert not trained_a & trained_b  # nothing trained before the checkpoint is trained again
    up_to_checkpoint = [r for r in trace_a if r["kind"] in ("fetched", "trained", "evicted") and r["step"] <= 3]
    check_ledger(up_to_checkpoint + runs["b"])
