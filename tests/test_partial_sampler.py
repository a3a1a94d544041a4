"""``BudgetReplayBuffer`` (recipe/partial/sampler.py) and the store on a stubbed TransferQueue listing.

The listing has verl's layout: prompt keys ``{uid}`` with ``is_prompt``/``status``/``global_steps`` tags and
trajectory keys ``{uid}_{session}_0`` with ``min_global_steps`` tags (what the agent-loop worker writes).
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

import verl.trainer.ppo.v1.replay_buffer as rb
from recipe.partial.sampler import BudgetReplayBuffer
from recipe.partial.store import PartialRolloutStore


class FakeTQ:
    def __init__(self):
        self.items: dict[str, dict] = {}
        self.cleared: list[str] = []

    def kv_list(self, partition_id=None):
        return {"train": dict(self.items)}

    def kv_clear(self, keys, partition_id):
        for key in keys:
            self.items.pop(key, None)
        self.cleared += list(keys)

    def prompt(self, uid, status, step):
        self.items[uid] = {"is_prompt": True, "status": status, "global_steps": step}

    def trajectory(self, uid, session, min_version):
        self.items[f"{uid}_{session}_0"] = {"status": "success", "min_global_steps": min_version, "global_steps": 0}


@pytest.fixture
def tq(monkeypatch):
    fake = FakeTQ()
    monkeypatch.setattr(rb, "tq", fake)
    return fake


def make(cls=BudgetReplayBuffer, threshold=3, strategy="drop", inflight=4, store=None, at_cap="force"):
    refills = []
    buffer = cls(trainer_mode="colocate_budget", trainer_config=OmegaConf.create({}), max_off_policy_threshold=threshold,
                 max_off_policy_strategy=strategy, sampler_kwargs=OmegaConf.create({}), refill_fn=refills.append)
    if cls is BudgetReplayBuffer:
        buffer.configure(store or PartialRolloutStore(), rollout_n=2, max_inflight_groups=inflight, poll_interval_s=0.01,
                         at_cap=at_cap)
    return buffer, refills


def test_staleness_is_measured_on_the_oldest_segment_not_the_reissued_prompt_tag(tq):
    # both prompts re-issued at step 5 (verl resets the tag), but A's oldest segment is from version 0
    for uid, oldest in (("A", 0), ("B", 3)):
        tq.prompt(uid, "finished", 5)
        tq.trajectory(uid, 0, oldest + 1)
        tq.trajectory(uid, 1, oldest)
    buffer, _ = make()
    buffer._sync_metadata_from_transfer_queue()
    assert buffer._stale_terminal_keys(5, "train") == {"A"}  # 5 - 0 > 3; 5 - 3 <= 3
    verl_buffer, _ = make(cls=rb.ReplayBufferAsync)  # negative control: verl's rule sees span 1 for both
    verl_buffer._sync_metadata_from_transfer_queue()
    assert verl_buffer._stale_terminal_keys(5, "train") == set()


def test_selection_is_oldest_segment_first(tq):
    tq.prompt("late", "finished", 2)  # submitted earlier, but its oldest segment is newer
    tq.trajectory("late", 0, 2)
    tq.prompt("old", "finished", 4)
    tq.trajectory("old", 0, 1)
    buffer, _ = make(threshold=None)
    buffer._sync_metadata_from_transfer_queue()
    selected, _, _ = buffer._select_prompt_uids("train", {"late", "old"}, 1)
    assert selected == ["old"]


def parked_group(store, uid, version=0):
    for session in range(2):
        store.report(f"{uid}_{session}", {"token_ids": [1] * 3, "segments": [[version, 3, -1]], "calls": 1,
                                          "budget_stops": 1, "reprefill_tokens": 0, "status": "parked"})


def test_all_parked_refills_under_the_cap_then_forces_at_it(tq):
    store = PartialRolloutStore()
    buffer, refills = make(store=store, inflight=2)
    tq.prompt("R", "running", 1)
    parked_group(store, "R", version=0)
    buffer._sync_metadata_from_transfer_queue()
    assert not buffer._has_enough_samples(1, "train", 2, set())  # first poll: look again
    assert refills == []
    assert not buffer._has_enough_samples(1, "train", 2, set())
    assert refills == [1]  # room for 1 more group under max_inflight_groups=2
    tq.prompt("S", "running", 1)
    parked_group(store, "S", version=1)
    buffer._sync_metadata_from_transfer_queue()
    for _ in range(2):
        buffer._has_enough_samples(1, "train", 1, set())  # deficit 1
    assert refills == [1] and store.forced == {"R"}  # at the cap: force the group with the oldest segment
    assert store.counters["forced_groups"] == 1


def test_lift_at_the_cap_lifts_the_current_version_for_everyone(tq):
    store = PartialRolloutStore()
    store.set_version(4)
    buffer, refills = make(store=store, inflight=1, at_cap="lift")
    tq.prompt("R", "running", 1)
    parked_group(store, "R", version=3)
    buffer._sync_metadata_from_transfer_queue()
    for _ in range(2):
        buffer._has_enough_samples(4, "train", 2, set())
    assert refills == [] and store.forced == set()
    assert store.is_lifted(4) and not store.is_lifted(3) and store.counters["lifted_versions"] == 1


@pytest.mark.parametrize("strategy", ["wait", "drop"])
def test_wait_holds_the_step_until_no_forced_group_is_running(tq, strategy):
    store = PartialRolloutStore()
    buffer, _ = make(store=store, threshold=2, strategy=strategy)
    for uid in ("A", "B"):
        tq.prompt(uid, "finished", 1)
    tq.prompt("F", "running", 1)
    store.force(["F"])
    buffer._sync_metadata_from_transfer_queue()
    # a full batch is sampleable, but with wait the forced group F must finish under this version first
    assert buffer._has_enough_samples(2, "train", 2, {"A", "B"}) == (strategy == "drop")
    tq.prompt("F", "finished", 1)
    buffer._sync_metadata_from_transfer_queue()
    assert buffer._has_enough_samples(2, "train", 2, {"A", "B"})


def test_no_progress_action_while_a_session_is_mid_call_or_unrecorded(tq):
    store = PartialRolloutStore()
    buffer, refills = make(store=store)
    tq.prompt("R", "running", 1)
    store.report("R_0", {"token_ids": [], "segments": [], "calls": 0, "budget_stops": 0, "reprefill_tokens": 0,
                         "status": "parked"})  # R_1 not recorded yet
    buffer._sync_metadata_from_transfer_queue()
    for _ in range(3):
        assert not buffer._has_enough_samples(1, "train", 1, set())
    parked_group(store, "R")
    store.records["R_1"]["status"] = "calling"
    for _ in range(3):
        buffer._has_enough_samples(1, "train", 1, set())
    assert refills == [] and store.forced == set()


def test_validation_partition_never_triggers_progress(tq):
    store = PartialRolloutStore()
    buffer, refills = make(store=store)
    for _ in range(3):
        assert not buffer._has_enough_samples(1, "val", 1, set())
    assert refills == []


def test_eviction_forgets_the_store_records_and_logs_the_reason(tq):
    store = PartialRolloutStore()
    traced = []
    buffer, _ = make(store=store)
    buffer.trace = lambda **r: traced.append(r)
    tq.prompt("A", "finished", 5)
    tq.trajectory("A", 0, 0)
    parked_group(store, "A")
    buffer._sync_metadata_from_transfer_queue()
    reasons = buffer._terminal_eviction_reasons(5, "train")
    buffer._evict_terminal_groups(5, "train", reasons)
    assert traced == [{"kind": "evicted", "uid": "A", "reason": "stale", "step": 5, "oldest_version": 0}]
    assert store.records == {} and "A" in tq.cleared


def test_failed_groups_after_an_engine_death_fail_the_step_instead_of_refilling(tq):
    """verl marks a group whose sessions raised as failed and refills it; with the engine dead every refill fails
    too, so once an agent loop reported the death (as it does for vLLM's EngineDeadError) the sampler raises."""
    store = PartialRolloutStore()
    buffer, _ = make(store=store)
    reasons = (set(), set(), {"A"}, {})  # stale, dapo, failed, dapo counts
    buffer._evict_terminal_groups(5, "train", reasons)  # a failure without an engine death: dropped as before
    assert buffer.counters["failed_dropped"] == 1
    store.report_engine_death("EngineDeadError: EngineCore encountered an issue")
    with pytest.raises(RuntimeError, match="rollout engine died.*EngineDeadError"):
        buffer._evict_terminal_groups(6, "train", (set(), set(), {"B"}, {}))


def test_engine_death_is_recognised_through_rays_wrapper():
    from ray.exceptions import RayTaskError
    from vllm.v1.engine.exceptions import EngineDeadError

    from recipe.partial.agent_loop import engine_died

    dead = EngineDeadError()
    wrapped = RayTaskError("generate", "traceback", dead)  # as Ray raises it when it cannot subclass the cause
    assert engine_died(dead) and engine_died(wrapped) and engine_died(wrapped.as_instanceof_cause())
    assert not engine_died(RuntimeError("a sampling error")) and not engine_died(RayTaskError("generate", "tb", ValueError()))


def test_store_checkpoint_round_trip_keeps_only_inflight_groups():
    store = PartialRolloutStore()
    parked_group(store, "A")
    parked_group(store, "B")
    store.records["B_1"]["status"] = "calling"
    store.force(["B"])
    state = store.state_dict()
    restored = PartialRolloutStore()
    assert restored.load_state_dict(state, inflight_uids=["B"]) == 2
    assert set(restored.records) == {"B_0", "B_1"} and restored.forced == {"B"}
    assert restored.records["B_1"]["status"] == "parked"  # a call that never returned is continued
    with pytest.raises(ValueError, match="must not go back"):
        store.set_version(3) or store.set_version(2)
