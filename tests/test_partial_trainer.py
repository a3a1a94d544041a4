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


def last_checkpoint(trace: list) -> tuple[int, dict]:
    """(step, store records) of the last checkpoint a run wrote (a run also saves at its last step)."""
    record = max((r for r in trace if r["kind"] == "checkpoint"), key=lambda r: r["step"])
    return record["step"], record["records"]


def finished_untrained(saved: dict, trace: list, step: int) -> set[str]:
    """Groups whose sessions had all finished at the checkpoint of ``step`` but were not trained by then: the
    resumed run samples them first (restored from TransferQueue as finished, oldest segment first)."""
    statuses: dict[str, list[str]] = {}
    for key, record in saved.items():
        statuses.setdefault(key.split("_")[0], []).append(record["status"])
    trained = {u for r in trace if r["kind"] == "trained" and r["step"] <= step for u in r["uids"]}
    return {u for u, s in statuses.items() if len(s) == N and set(s) == {"finished"}} - trained


def check_resumed(parked: dict, trace_b: list, persist: bool) -> None:
    """The sessions parked at A's checkpoint as the resumed run left them: trained (a continued session), else
    in the store at its final checkpoint. persist: every one is there, holding exactly its stored tokens,
    log-probs and segments as a prefix (nothing lost), and at least one was continued and trained. Off (the
    negative control): every one seen restarted from zero under the resumed weights, and at least one was
    seen with tokens.

    Neither requirement depends on timing when the run ends at ``resume_last_step``: its steps drain the
    checkpoint's finished groups 4 at a time (they are sampled at once), so by its last step one step finds
    fewer than a batch sampleable and generates. With persistence the parked sessions are the oldest in
    flight (segments <= 2, every other group's >= 3): sampled first when they finish, forced first when all
    park. Off, they restart with no older segment than the fresh prompts, so whether one of them is forced
    and trained is uid order (typically 8 of the 16 groups in flight, 4 forced: none of the 8 in
    C(8,4)/C(16,4) ~ 4% of runs, more with fewer parked; "no parked session was trained after the resume"
    was required of C before); but the progress rule forces only once every running group has reported and
    none is mid-call, so they generate at that step's version, and the run's final checkpoint (its last
    step) records it."""
    trained = {s["key"].rsplit("_", 1)[0]: s for _, s in sessions_of(trace_b)}
    _, final = last_checkpoint(trace_b)
    seen = {}  # key -> (trained?, tokens, log-probs, segments, restored)
    for key in parked:
        if key in trained:
            s = trained[key]
            seen[key] = (True, s["tokens"], s["log_probs"], s["segments"], s["restored"])
        elif key in final:
            r = final[key]
            seen[key] = (False, r["token_ids"], r["log_probs"], r["segments"], r["restored"])
    if persist:
        assert set(seen) == set(parked), f"parked sessions lost by the resume: {sorted(set(parked) - set(seen))}"
        for key, (was_trained, tokens, log_probs, segments, restored) in seen.items():
            stored = parked[key]
            assert tokens[: len(stored["token_ids"])] == stored["token_ids"], key
            torch.testing.assert_close(torch.tensor(log_probs[: len(stored["log_probs"])]),
                                       torch.tensor(stored["log_probs"]), atol=1e-6, rtol=0)
            assert segments[: len(stored["segments"])] == stored["segments"], key  # original versions kept
            assert restored or (not was_trained and len(tokens) == len(stored["token_ids"])), key
        continued = [k for k, (was_trained, *_) in seen.items() if was_trained]
        assert continued, "no parked session was continued and trained after the resume"
        for key in continued:  # then generated under the resumed weights (versions >= 3) until it finished
            after = trained[key]["segments"][len(parked[key]["segments"]):]
            assert after and all(v >= 3 for v, _, _ in after), (key, trained[key]["segments"])
    else:
        for key, (_, tokens, _, segments, restored) in seen.items():
            assert not restored, key
            assert all(v >= 3 for v, _, _ in segments), (key, segments)  # regenerated from zero
        regenerated = [k for k, (_, tokens, *_) in seen.items() if tokens]
        assert regenerated, "no parked session was regenerated after the resume"


def resume_last_step(finished: set[str], step: int) -> int:
    """Last step of a run resumed from the checkpoint of ``step``: at least two steps, and one more step than
    the checkpoint's finished groups fill (each fills a batch at once, generating nothing)."""
    return max(step + 2, step + 1 + len(finished) // 4)


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


def kill_the_vllm_engine_at(step: int, fault: dict):
    """Fault injection for ``run_bapo(during=...)`` of a ``partial_run``: once ``step`` has begun (its first
    prompts are fetched, the trace says), SIGKILL the run's vLLM engine processes (``VLLM::EngineCore``: the
    scheduler and model of verl's vLLM server). Wherever the step then stands, the run must fail: sessions'
    calls fail while it samples; once its sample is complete (at once, with enough finished groups),
    ``while_rollout_alive`` around verl's abort and weight update finds the engine dead. The old trigger,
    1 s after the previous step's metrics line, also landed in training or after the step."""

    def begun(folder: Path) -> bool:
        for path in folder.glob("*.jsonl"):
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the line being written
                    continue
                if record["kind"] == "fetched" and record["step"] >= step:
                    return True
        return False

    def during(proc, metrics: Path):
        while proc.poll() is None:
            if begun(metrics.parent / "ptrace"):
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
            time.sleep(0.05)

    return during


def test_a_dead_rollout_engine_fails_verls_engine_calls_instead_of_hanging(monkeypatch):
    """``while_rollout_alive`` (around verl's abort and weight update) on local servers standing in for vLLM's
    ``/health`` (200 alive, 503 once the engine is dead): a call that never returns fails once a server turns
    dead, naming it; a refused connection counts as dead; healthy calls return and raise as they would."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from recipe.partial import trainer as partial_trainer
    from recipe.partial.store import PartialRolloutStore

    status = {}

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status[self.server.server_port])
            self.end_headers()

        def log_message(self, *args):
            pass

    servers = [HTTPServer(("127.0.0.1", 0), Health) for _ in range(2)]
    for server in servers:
        status[server.server_port] = 200
        threading.Thread(target=server.serve_forever, daemon=True).start()
    alive, turning = (f"127.0.0.1:{server.server_port}" for server in servers)
    with socket.socket() as s:  # a port nobody listens on: the server process is gone
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    never = threading.Event()
    try:
        dead = partial_trainer.dead_rollout_servers([alive, closed], timeout_s=10)
        assert [url for url, _ in dead] == [f"http://{closed}/health"] and "Refused" in str(dead[0][1]), dead

        monkeypatch.setattr(partial_trainer, "HEALTH_POLL_S", 0.1)
        trainer = partial_trainer.PPOTrainerColocateBudget.__new__(partial_trainer.PPOTrainerColocateBudget)
        trainer.config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"name": "vllm"}}})
        trainer.global_steps, trainer.store = 5, PartialRolloutStore()
        trainer.llm_server_manager = SimpleNamespace(server_addresses=[alive, turning])
        assert trainer.while_rollout_alive("the weight update", lambda: 42) == 42

        def fails():
            raise ValueError("verl's own error")

        with pytest.raises(ValueError, match="verl's own error"):
            trainer.while_rollout_alive("the weight update", fails)

        threading.Timer(0.5, status.__setitem__, (servers[1].server_port, 503)).start()
        start = time.perf_counter()
        with pytest.raises(RuntimeError, match="rollout engine died") as raised:
            trainer.while_rollout_alive("the end-of-sampling abort", lambda: never.wait(120))
        assert time.perf_counter() - start < 30
        message = str(raised.value)
        assert f"http://{turning}/health -> 503" in message and "EngineDeadError" in message and alive not in message
        assert "step 5, the end-of-sampling abort" in message
        with pytest.raises(RuntimeError, match="rollout engine died"):  # checked before the call, too
            trainer.while_rollout_alive("the weight update", lambda: pytest.fail("called on a dead engine"))
        trainer.store.report_engine_death("EngineDeadError: EngineCore encountered an issue")
        with pytest.raises(RuntimeError, match="a session's call failed with EngineDeadError"):
            trainer.check_rollout_alive("the weight update")
        trainer.config.actor_rollout_ref.rollout.name = "sglang"  # /health is vLLM's: not asked
        assert trainer.while_rollout_alive("the weight update", lambda: 7) == 7
    finally:
        never.set()
        for server in servers:
            server.shutdown()


def test_engine_death_fails_the_run_and_resume_continues_parked_sessions(assets, tmp_path):
    """Run A (budget B, drop at 7 versions) trains steps 1-4 (the budgeted-run checks), saves at step 3; its
    vLLM engine is killed as step 5 begins: the run fails within a bounded time saying the engine died
    (wherever step 5 stands: ``kill_the_vllm_engine_at``). B resumes from step 3: the sessions parked at the
    checkpoint continue from exactly their stored tokens (at least one is trained, none is lost), and the
    ledger over A and B loses nothing and trains nothing twice. Negative control C (a copy of A's
    checkpoint, persistence off): they restart from zero tokens. B and C run until one step past the
    finished groups of the checkpoint (``resume_last_step``), so that they generate whatever the timing."""
    ckpt = ["trainer.save_freq=3", "trainer.total_training_steps=6", "trainer.v1.sampler.max_off_policy_threshold=7"]
    a, fault = tmp_path / "a", {}
    proc_a, rows_a, trace_a, _ = partial_run(assets, a, *ckpt, during=kill_the_vllm_engine_at(5, fault))
    ended = time.perf_counter()
    assert fault.get("pids"), f"no vLLM engine was found to kill\n{proc_a.stdout[-2000:]}\n{proc_a.stderr[-3000:]}"
    assert proc_a.returncode != 0, proc_a.stdout[-2000:]
    assert ended - fault["at"] < 240, f"the run took {ended - fault['at']:.0f} s to fail after its engine died"
    output = proc_a.stdout + proc_a.stderr
    (a / "run.log").write_text(output)
    # the run's own error (the sampler's, or while_rollout_alive's around verl's engine calls) names what died
    assert "partial rollout: the rollout engine died" in output and "EngineDeadError" in output, output[-3000:]
    assert [r["step"] for r in rows_a] == [1, 2, 3, 4]  # step 5 never reaches its weight update
    check_budgeted_run(rows_a[:4], trace_a, threshold=7)
    saved = next(r for r in trace_a if r["kind"] == "checkpoint" and r["step"] == 3)["records"]
    parked = {k: r for k, r in saved.items() if r["status"] != "finished" and r["token_ids"]}
    assert parked, "nothing was parked at the checkpoint: the test would prove nothing"
    assert all(max(s[0] for s in r["segments"]) <= 2 for r in parked.values())
    last = resume_last_step(finished_untrained(saved, trace_a, 3), 3)
    assert last <= 7, f"{last}: past step 7 the staleness cap (7) could evict parked groups before they train"
    shutil.copytree(a / "ckpt", tmp_path / "ckpt_copy")
    runs = {}
    for name, persist, folder in (("b", True, a / "ckpt"), ("c", False, tmp_path / "ckpt_copy")):
        proc, rows, trace, _ = partial_run(assets, tmp_path / name, ckpt[0], f"trainer.total_training_steps={last}",
                                           ckpt[2], f"trainer.default_local_dir={folder}", "trainer.resume_mode=auto",
                                           f"trainer.v1.colocate_budget.persist_partial={persist}")
        assert_succeeded(proc)
        assert [r["step"] for r in rows] == list(range(4, last + 1))
        assert last_checkpoint(trace)[0] == last
        check_resumed(parked, trace, persist)
        runs[name] = trace
    # ledger over A (up to its checkpoint) and B: nothing lost, nothing trained twice
    trained_a = {u for r in trace_a if r["kind"] == "trained" and r["step"] <= 3 for u in r["uids"]}
    trained_b = {u for r in runs["b"] if r["kind"] == "trained" for u in r["uids"]}
    assert not trained_a & trained_b  # nothing trained before the checkpoint is trained again
    up_to_checkpoint = [r for r in trace_a if r["kind"] in ("fetched", "trained", "evicted") and r["step"] <= 3]
    check_ledger(up_to_checkpoint + runs["b"])
