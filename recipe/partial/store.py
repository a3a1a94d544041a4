"""The store of unfinished trajectories (the paper's "replay buffer of unfinished portions") and the clock.

``PartialRolloutStore`` is plain Python (unit-testable); in a run it lives in one named Ray actor
(``STORE_ACTOR_NAME``, created by the trainer, found by every agent-loop worker). It holds

* session records ``{uid}_{session_id}`` -> ``SessionRecord`` as a dict (tokens, log-probs, segments,
  status calling/parked/finished), reported by the sessions after every call;
* the version clock: the policy version the rollout holds (the trainer's ``global_steps`` after each
  weight update);
* the forced groups (uids that ignore the budget until they finish) and the lifted version (whose budget
  the sampler's progress rule lifted for every trajectory, see ``segments``);
* counters for metrics.

Parked sessions do not wait inside the actor: they poll ``version()`` / ``is_forced()`` / ``is_lifted()`` every
``poll_interval_s`` (``ActorClock.wait_newer``), so the actor never holds thousands of pending calls.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from typing import Optional

from .segments import SessionRecord

STORE_ACTOR_NAME = "bapo_partial_rollout_store"


def uid_of(key: str) -> str:
    """``{uid}_{session}`` -> uid (verl's uids are uuid4 strings: no underscore)."""
    return key.split("_", 1)[0]


class PartialRolloutStore:
    """Session records, version clock, forced set and counters (see module docstring)."""

    def __init__(self) -> None:
        self._version = 0
        self.records: dict[str, dict] = {}
        self._keys_of: dict[str, dict[str, None]] = defaultdict(dict)  # uid -> its session keys, in report order
        self.forced: set[str] = set()
        self.wait_threshold: Optional[int] = None  # configure_cap
        self.lifted: Optional[int] = None  # the version whose budget the progress rule lifted (not checkpointed)
        self.counters: Counter = Counter()
        self._reported_calls: dict[str, int] = {}
        self.engine_error: Optional[str] = None  # report_engine_death: the rollout engine is gone

    # ------------------------------------------------------------------ faults
    def report_engine_death(self, message: str) -> None:
        """A session's server call failed because the rollout engine died (the first report is kept)."""
        self.engine_error = self.engine_error or message

    def engine_death(self) -> Optional[str]:
        return self.engine_error

    # ------------------------------------------------------------------ clock
    def configure_cap(self, threshold: Optional[int], strategy: str) -> None:
        """The staleness cap; with ``wait`` the clock forces groups as they reach it (see ``set_version``)."""
        self.wait_threshold = threshold if strategy == "wait" else None

    def set_version(self, version: int) -> None:
        """Advance the clock; with ``wait``, force every recorded group that now spans ``threshold`` versions
        (here, not only in its sessions: a parked session may sleep through a version)."""
        if version < self._version:
            raise ValueError(f"partial rollout: version clock must not go back ({self._version} -> {version})")
        self._version = int(version)
        if self.wait_threshold is not None:
            due = [uid for uid, oldest in self.running_min_versions().items()
                   if self._version - oldest + 1 >= self.wait_threshold]
            self.force(due)

    def version(self) -> int:
        return self._version

    # ------------------------------------------------------------------ sessions
    def report(self, key: str, record: dict) -> None:
        previous = self.records.get(key)
        if previous is not None:
            # counters follow the calls made since the last report
            self.counters["calls"] += record["calls"] - previous["calls"]
            self.counters["tokens_generated"] += len(record["token_ids"]) - len(previous["token_ids"])
            self.counters["budget_stops"] += record["budget_stops"] - previous["budget_stops"]
            self.counters["reprefill_tokens"] += record["reprefill_tokens"] - previous["reprefill_tokens"]
        else:
            self.counters["calls"] += record["calls"]
            self.counters["tokens_generated"] += len(record["token_ids"])
            self.counters["budget_stops"] += record["budget_stops"]
            self.counters["reprefill_tokens"] += record["reprefill_tokens"]
        self.records[key] = record
        self._keys_of[uid_of(key)][key] = None

    def restore(self, key: str) -> Optional[dict]:
        return self.records.get(key)

    def group_min_version(self, uid: str) -> Optional[int]:
        versions = [s[0] for key in self._keys_of.get(uid, ()) for s in self.records[key]["segments"]]
        return min(versions) if versions else None

    def running_min_versions(self) -> dict[str, int]:
        """uid -> oldest segment version, for every group with a recorded segment."""
        oldest = {uid: self.group_min_version(uid) for uid in self._keys_of}
        return {uid: v for uid, v in oldest.items() if v is not None}

    def group_records(self, uids: list[str]) -> dict[str, dict]:
        return {k: self.records[k] for uid in dict.fromkeys(uids) for k in self._keys_of.get(uid, ())}

    def session_states(self) -> dict[str, dict[str, str]]:
        """uid -> {key: status} for every recorded session."""
        return {uid: {k: self.records[k]["status"] for k in keys} for uid, keys in self._keys_of.items()}

    def forget(self, uids: list[str]) -> int:
        """Drop the records of trained or evicted groups; returns how many sessions were dropped."""
        wanted = set(uids)
        dropped = 0
        for uid in wanted:
            for key in self._keys_of.pop(uid, ()):
                del self.records[key]
                dropped += 1
        self.forced -= wanted
        return dropped

    # ------------------------------------------------------------------ forcing
    def force(self, uids: list[str]) -> None:
        new = set(uids) - self.forced
        self.counters["forced_groups"] += len(new)
        self.forced |= new

    def is_forced(self, uid: str) -> bool:
        return uid in self.forced

    def forced_uids(self) -> list[str]:
        return sorted(self.forced)

    def lift(self) -> int:
        """Lift the budget of the current version for every trajectory; returns that version."""
        if self.lifted != self._version:
            self.lifted = self._version
            self.counters["lifted_versions"] += 1
        return self._version

    def is_lifted(self, version: int) -> bool:
        return self.lifted == version

    # ------------------------------------------------------------------ checkpoint
    def calling_count(self) -> int:
        return sum(r["status"] == "calling" for r in self.records.values())

    def state_dict(self) -> dict:
        return {"version": self._version, "records": dict(self.records), "forced": sorted(self.forced)}

    def load_state_dict(self, state: dict, inflight_uids: list[str]) -> int:
        """Restore the records of ``inflight_uids`` (those verl re-issues); returns sessions restored."""
        keep = set(inflight_uids)
        self.records = {k: r for k, r in state["records"].items() if uid_of(k) in keep}
        self._keys_of = defaultdict(dict)
        for key in self.records:
            self._keys_of[uid_of(key)][key] = None
        for record in self.records.values():
            if record["status"] == "calling":  # a call that never returned: continue from what was stored
                record["status"] = "parked"
        self.forced = set(state["forced"]) & keep
        self.counters["restored_sessions"] += len(self.records)
        return len(self.records)

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, float]:
        parked = [r for r in self.records.values() if r["status"] != "finished"]
        versions = [s[0] for r in parked for s in r["segments"]]
        return {
            "buffer/parked_sessions": float(len(parked)),
            "buffer/parked_tokens": float(sum(len(r["token_ids"]) for r in parked)),
            "buffer/oldest_lag": float(self._version - min(versions)) if versions else 0.0,
            **{f"rollout/{k}": float(self.counters[k]) for k in ("calls", "tokens_generated", "budget_stops", "reprefill_tokens")},
            "sampler/forced_groups": float(self.counters["forced_groups"]),
            "sampler/lifted_versions": float(self.counters["lifted_versions"]),
            "checkpoint/restored_sessions": float(self.counters["restored_sessions"]),
        }


class LocalClock:
    """``segments.Clock`` over an in-process store (tests, benchmark without Ray)."""

    def __init__(self, store: PartialRolloutStore, poll_interval_s: float = 0.01) -> None:
        self.store, self.poll_interval_s = store, poll_interval_s
        self._changed: Optional[asyncio.Event] = None

    def notify(self) -> None:
        """Wake parked sessions now (in-process runs call it after ``set_version`` / ``force``)."""
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _ask(self, method: str, *args):
        return getattr(self.store, method)(*args)

    async def version(self) -> int:
        return await self._ask("version")

    async def group_min_version(self, uid: str) -> Optional[int]:
        return await self._ask("group_min_version", uid)

    async def is_forced(self, uid: str) -> bool:
        return await self._ask("is_forced", uid)

    async def force(self, uid: str) -> None:
        await self._ask("force", [uid])

    async def is_lifted(self, version: int) -> bool:
        return await self._ask("is_lifted", version)

    async def wait_newer(self, uid: str, version: int, lifted_ok: bool = True) -> None:
        while (await self.version() <= version and not await self.is_forced(uid)
               and not (lifted_ok and await self.is_lifted(version))):
            if self._changed is None:
                self._changed = asyncio.Event()
            try:  # woken by notify(), else polls
                await asyncio.wait_for(self._changed.wait(), self.poll_interval_s)
            except asyncio.TimeoutError:
                pass

    async def report(self, key: str, record: SessionRecord) -> None:
        await self._ask("report", key, record.to_dict())

    async def report_engine_death(self, message: str) -> None:
        await self._ask("report_engine_death", message)

    async def restore(self, key: str) -> Optional[SessionRecord]:
        data = await self._ask("restore", key)
        return None if data is None else SessionRecord.from_dict(dict(data))


class ActorClock(LocalClock):
    """``segments.Clock`` over the store's Ray actor handle."""

    def __init__(self, handle, poll_interval_s: float = 0.5) -> None:
        super().__init__(store=None, poll_interval_s=poll_interval_s)
        self.handle = handle

    async def _ask(self, method: str, *args):
        return await getattr(self.handle, method).remote(*args)
