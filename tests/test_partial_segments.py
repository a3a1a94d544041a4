"""Budgeted segmented generation (recipe/partial/segments.py) against a scripted server and the real store.

The fake server knows one scripted response per prompt and returns its next tokens, so it checks that
every call's prompt is prompt + all tokens so far; its log-probs encode (version, position), so the
concatenation order and the version of every token are visible. The "trainer" below bumps the version
whenever no session is mid-call, as verl's colocate trainer does between sampling phases.
"""

from __future__ import annotations

import asyncio

import pytest

from recipe.partial.segments import BudgetPolicy, SegmentedGenerate, StaleTrajectoryError
from recipe.partial.store import LocalClock, PartialRolloutStore
from verl.workers.rollout.replica import TokenOutput

EOS = 1
PROMPT = [101, 102, 103]


def logp(version: int, position: int) -> float:
    return -(1000 * (version + 1) + position) / 1e5


class ScriptedServer:
    """Returns the scripted response's next tokens; ``flavour`` vllm reports a max_tokens stop as completed."""

    def __init__(self, response: list[int], flavour: str, abort_first_after: int | None = None):
        self.response, self.flavour, self.version = response, flavour, 0
        self.calls: list[dict] = []
        self.abort_first_after = abort_first_after

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        prefix = prompt_ids[len(PROMPT):]
        assert prompt_ids[: len(PROMPT)] == PROMPT and prefix == self.response[: len(prefix)], prompt_ids
        max_tokens = sampling_params["max_tokens"]
        assert max_tokens >= 1
        self.calls.append({"prompt_len": len(prompt_ids), "max_tokens": max_tokens, "version": self.version})
        limit = max_tokens
        if self.abort_first_after is not None and len(self.calls) == 1:
            limit = self.abort_first_after
        out = []
        for position in range(len(prefix), len(self.response)):
            if len(out) == limit:
                break
            out.append(self.response[position])
            if out[-1] == EOS:
                break
        if out and out[-1] == EOS:
            reason = "completed"
        elif len(out) < max_tokens and limit < max_tokens:
            reason = "aborted"
        else:
            reason = "completed" if self.flavour == "vllm" else "length"
        start = len(prefix)
        return TokenOutput(token_ids=out, log_probs=[logp(self.version, start + i) for i in range(len(out))],
                           stop_reason=reason, extra_fields={"global_steps": self.version})


async def run_session(server, policy, store=None, bump_versions=True, key=("u1", 0)):
    """Generate one session; a background 'trainer' bumps the version while nothing is mid-call."""
    store = store or PartialRolloutStore()
    clock = LocalClock(store, poll_interval_s=0.001)
    gen = SegmentedGenerate(server.generate, clock, policy, uid=key[0], session_id=key[1], stop_ids=frozenset({EOS}))
    task = asyncio.ensure_future(gen.generate("r", prompt_ids=PROMPT, sampling_params={"temperature": 1.0}))

    async def trainer():
        while not task.done():
            await asyncio.sleep(0.005)
            states = [r["status"] for r in store.records.values()]
            if bump_versions and "parked" in states and "calling" not in states:
                server.version += 1
                store.set_version(server.version)

    bumper = asyncio.ensure_future(trainer())
    try:
        return await asyncio.wait_for(task, timeout=10), store
    finally:
        bumper.cancel()


def check_segments(output: TokenOutput, budget: int):
    segments = output.extra_fields["partial_segments"]
    assert sum(s[1] for s in segments) == len(output.token_ids)
    per_version = {}
    for version, n, _ in segments:
        per_version[version] = per_version.get(version, 0) + n
    assert all(n <= budget for n in per_version.values()), segments
    # each token's log-prob came from the version of its segment, in order
    expected, position = [], 0
    for version, n, _ in segments:
        expected += [logp(version, position + i) for i in range(n)]
        position += n
    assert output.log_probs == expected
    versions = [s[0] for s in segments]
    assert output.extra_fields["min_global_steps"] == min(versions)
    assert output.extra_fields["max_global_steps"] == max(versions)
    return per_version


@pytest.mark.parametrize("flavour", ["vllm", "hf"])
@pytest.mark.parametrize("budget,response,length", [
    (3, [5, 6, 7, 8, 9, 10, EOS], 32),       # EOS inside the third segment
    (5, [5] * 9 + [EOS], 32),                 # EOS exactly at 2 * B
    (4, [7] * 20, 10),                        # truncated at the response length, never EOS
])  # fmt: skip
def test_budget_per_version_and_concatenation(flavour, budget, response, length):
    server = ScriptedServer(response, flavour)
    output, _ = asyncio.run(run_session(server, BudgetPolicy(token_budget=budget, response_length=length)))
    expected = response[:length]
    assert output.token_ids == expected
    per_version = check_segments(output, budget)
    assert len(per_version) == -(-len(expected) // budget)  # one new version per B tokens
    # every call's prompt = prompt + all previous tokens (the server asserts the content)
    assert [c["prompt_len"] for c in server.calls] == [len(PROMPT) + budget * i for i in range(len(server.calls))]
    assert all(c["max_tokens"] <= min(budget, length) for c in server.calls)


@pytest.mark.parametrize("flavour", ["vllm", "hf"])
def test_eos_exactly_at_the_budget_is_finished(flavour):
    server = ScriptedServer([5, 6, EOS, 9, 9], flavour)
    output, store = asyncio.run(run_session(server, BudgetPolicy(token_budget=3, response_length=32), bump_versions=False))
    assert output.token_ids == [5, 6, EOS] and len(server.calls) == 1
    assert store.records["u1_0"]["status"] == "finished" and store.records["u1_0"]["budget_stops"] == 0


def test_abort_parks_until_the_next_version_and_gets_a_fresh_budget():
    server = ScriptedServer([5] * 8 + [EOS], "hf", abort_first_after=2)
    output, store = asyncio.run(run_session(server, BudgetPolicy(token_budget=4, response_length=32)))
    assert output.token_ids == [5] * 8 + [EOS]
    assert [s[:2] for s in output.extra_fields["partial_segments"]] == [[0, 2], [1, 4], [2, 3]]
    assert [c["version"] for c in server.calls] == [0, 1, 2]
    assert store.records["u1_0"]["aborts"] == 1


def test_drop_raises_at_the_cap():
    server = ScriptedServer([5] * 10 + [EOS], "vllm")
    policy = BudgetPolicy(token_budget=3, response_length=32, threshold=2, strategy="drop")
    with pytest.raises(StaleTrajectoryError, match="span 3 policy versions"):
        asyncio.run(run_session(server, policy))
    assert [c["version"] for c in server.calls] == [0, 1]  # versions 0 and 1 generated, 2 would exceed


def test_wait_forces_the_group_to_finish_at_the_last_allowed_version():
    server = ScriptedServer([5] * 10 + [EOS], "vllm")
    policy = BudgetPolicy(token_budget=3, response_length=32, threshold=2, strategy="wait")
    output, store = asyncio.run(run_session(server, policy))
    assert output.token_ids == [5] * 10 + [EOS]
    assert [s[:2] for s in output.extra_fields["partial_segments"]] == [[0, 3], [1, 8]]  # forced at span 2
    assert output.extra_fields["partial_forced"] and store.counters["forced_groups"] == 1


def test_group_minimum_counts_for_the_cap():
    """A sibling's segment from version 0 puts this group at the cap as soon as this session starts at 1."""
    store = PartialRolloutStore()
    store.report("u1_1", {"token_ids": [5], "segments": [[0, 1, -1]], "calls": 1, "budget_stops": 0,
                          "reprefill_tokens": 0, "status": "finished"})
    store.set_version(1)
    server = ScriptedServer([5] * 10 + [EOS], "vllm")
    server.version = 1
    policy = BudgetPolicy(token_budget=3, response_length=32, threshold=2, strategy="wait")
    output, _ = asyncio.run(run_session(server, policy, store=store))
    assert [s[:2] for s in output.extra_fields["partial_segments"]] == [[1, 11]]


def test_a_restored_record_continues_and_a_finished_one_makes_no_call():
    response = [5, 6, 7, 8, 9, 10, 11, EOS]
    policy = BudgetPolicy(token_budget=3, response_length=32)
    store = PartialRolloutStore()

    async def first_segment_then_kill():
        server = ScriptedServer(response, "hf")
        clock = LocalClock(store, poll_interval_s=0.001)
        gen = SegmentedGenerate(server.generate, clock, policy, "u1", 0, frozenset({EOS}))
        task = asyncio.ensure_future(gen.generate("r", prompt_ids=PROMPT, sampling_params={}))
        while store.records.get("u1_0", {}).get("status") != "parked":
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(first_segment_then_kill())
    saved = PartialRolloutStore.state_dict(store)
    restored = PartialRolloutStore()
    restored.load_state_dict(saved, inflight_uids=["u1"])
    restored.set_version(5)
    server = ScriptedServer(response, "hf")
    server.version = 5
    output, _ = asyncio.run(run_session(server, policy, store=restored))
    assert output.token_ids == response
    assert output.log_probs[:3] == [logp(0, i) for i in range(3)]  # the stored segment, from version 0
    assert server.calls[0]["prompt_len"] == len(PROMPT) + 3  # continued, not regenerated
    assert output.extra_fields["min_global_steps"] == 0 and output.extra_fields["partial_restored"]

    again = ScriptedServer(response, "hf")
    output2, _ = asyncio.run(run_session(again, policy, store=restored))
    assert again.calls == [] and output2.token_ids == response


def test_policy_rejects_invalid_values():
    with pytest.raises(ValueError, match="token_budget=0"):
        BudgetPolicy(token_budget=0, response_length=8)
    with pytest.raises(ValueError, match="max_off_policy_strategy='skip'"):
        BudgetPolicy(token_budget=2, response_length=8, strategy="skip")


class AbortingServer(ScriptedServer):
    """Aborts call number ``abort_call`` (1-based) after ``after`` tokens (the end-of-sampling abort)."""

    def __init__(self, response, abort_call: int, after: int):
        super().__init__(response, "vllm")
        self.abort_call, self.after = abort_call, after

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        if len(self.calls) + 1 != self.abort_call:
            return await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)
        output = await super().generate(request_id, prompt_ids=prompt_ids,
                                        sampling_params={**sampling_params, "max_tokens": self.after})
        self.calls[-1]["max_tokens"] = sampling_params["max_tokens"]
        return TokenOutput(token_ids=output.token_ids, log_probs=output.log_probs, stop_reason="aborted",
                           extra_fields=output.extra_fields)


async def drive(server, policy, store, steps):
    """Run one session; ``steps(store, server)`` is awaited once the session first parks (the 'trainer')."""
    clock = LocalClock(store, poll_interval_s=0.001)
    gen = SegmentedGenerate(server.generate, clock, policy, uid="u1", session_id=0, stop_ids=frozenset({EOS}))
    task = asyncio.ensure_future(gen.generate("r", prompt_ids=PROMPT, sampling_params={}))
    while store.records.get("u1_0", {}).get("status") != "parked":
        await asyncio.sleep(0.001)
    await steps(store, server, task)
    return await asyncio.wait_for(task, timeout=10)


def test_a_lifted_version_lets_every_session_run_past_the_budget_under_that_version_only():
    async def lift_then_abort_then_next_version(store, server, task):
        store.lift()  # the progress rule at the in-flight cap, version 0
        while len(server.calls) < 2 or store.records["u1_0"]["status"] != "parked":
            await asyncio.sleep(0.001)  # call 2 (lifted) is cut by the end-of-sampling abort after 2 tokens
        await asyncio.sleep(0.02)
        assert not task.done() and len(server.calls) == 2  # the abort parks it until a newer version: no lift reuse
        for version in (1, 2, 3):
            server.version = version
            store.set_version(version)
            while store.records["u1_0"]["status"] != "parked" and not task.done():
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.005)

    server = AbortingServer([5] * 12 + [EOS], abort_call=2, after=2)
    store = PartialRolloutStore()
    output = asyncio.run(drive(server, BudgetPolicy(token_budget=3, response_length=32), store,
                               lift_then_abort_then_next_version))
    assert output.token_ids == [5] * 12 + [EOS]
    assert [s[:2] for s in output.extra_fields["partial_segments"]] == [[0, 3], [0, 2], [1, 3], [2, 3], [3, 2]]
    assert [c["max_tokens"] for c in server.calls] == [3, 29, 3, 3, 3]  # lifted: the whole remaining length
    assert output.extra_fields["partial_lifted_versions"] == [0] and not output.extra_fields["partial_forced"]
    assert store.counters["lifted_versions"] == 1 and not store.is_lifted(1)


def test_wait_cap_forces_groups_at_the_clock_so_a_session_asleep_through_it_does_not_fail():
    """The clock forces a group when a version change brings it to the cap, even if its sessions are asleep;
    a session woken only after two version changes continues forced (before: StaleTrajectoryError)."""
    async def two_versions_while_asleep(store, server, task):
        for version in (1, 2):
            server.version = version
            store.set_version(version)
        assert store.forced == {"u1"}  # forced at version 1 (span 2 = threshold) by the clock

    store = PartialRolloutStore()
    store.configure_cap(threshold=2, strategy="wait")
    server = ScriptedServer([5] * 10 + [EOS], "vllm")
    output = asyncio.run(drive(server, BudgetPolicy(token_budget=3, response_length=32, threshold=2, strategy="wait"),
                               store, two_versions_while_asleep))
    assert output.token_ids == [5] * 10 + [EOS] and output.extra_fields["partial_forced"]
    assert [s[:2] for s in output.extra_fields["partial_segments"]] == [[0, 3], [2, 8]]


def test_drop_cap_is_not_forced_by_the_clock():
    store = PartialRolloutStore()
    store.configure_cap(threshold=2, strategy="drop")
    store.report("u1_0", {"token_ids": [5], "segments": [[0, 1, -1]], "calls": 1, "budget_stops": 1,
                          "reprefill_tokens": 0, "status": "parked"})
    store.set_version(5)
    assert store.forced == set()
