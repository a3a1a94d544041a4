"""``BudgetReplayBuffer``: verl's async replay buffer with oldest-segment staleness and a progress rule.

Overrides of ``verl.trainer.ppo.v1.replay_buffer.ReplayBufferAsync`` (private methods, verl 0.9.1):

* ``_stale_terminal_keys``: with ``drop``, a finished group is stale when ``global_steps - group_min >
  threshold``, ``group_min`` = the oldest segment's version over the group's trajectory tags
  ``min_global_steps`` (verl measures from the prompt's submission step, which a re-issue resets).
* ``_select_prompt_uids``: oldest segment first (then submission step).
* ``_has_enough_samples``: never blocks on parked groups (verl's ``wait`` blocks sampling, which
  deadlocks once sessions park themselves); instead, for partition ``train``, the **progress rule**: when
  fewer than ``target`` groups are sampleable, no prompt is pending, no session is mid-call and every
  running group has all its sessions recorded (two polls in a row), it refills ``target - sampleable``
  prompts while under ``max_inflight_groups``, else applies ``colocate_budget.at_cap``: ``force`` the
  ``target - sampleable`` groups with the oldest segments (they ignore the budget and finish under the
  current version; the step lasts as long as their longest remaining responses, with few rows busy), or
  ``lift`` the budget of the current version for every trajectory (the first groups to finish complete the
  batch; the end-of-sampling abort parks the rest and the next version has a budget again; without a
  staleness cap the longest responses can starve). With strategy ``wait`` the step also waits until no
  forced group is still running, so a group forced at the cap finishes under the version it was forced at.
* ``_evict_terminal_groups``: logs every eviction with its reason to the trace and forgets the store's
  records of evicted groups.

``configure`` is called by the trainer right after construction (store handle, n, caps, trace).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import ray
from verl.trainer.ppo.v1.replay_buffer import ReplayBufferAsync

from .store import PartialRolloutStore

logger = logging.getLogger(__name__)


class BudgetReplayBuffer(ReplayBufferAsync):
    """See module docstring."""

    def configure(self, store, rollout_n: int, max_inflight_groups: int, trace: Optional[Callable[..., None]] = None,
                  poll_interval_s: float = 0.5, at_cap: str = "force") -> None:
        self.store, self.rollout_n, self.max_inflight_groups = store, int(rollout_n), int(max_inflight_groups)
        self.at_cap = at_cap
        self.trace = trace or (lambda **record: None)
        self.poll_interval = poll_interval_s
        self._stuck_polls = 0
        self.counters = {"refills": 0, "stale_dropped": 0, "failed_dropped": 0}

    def _store(self, method: str, *args):
        """Call the store: its Ray actor in a run, or an in-process ``PartialRolloutStore``."""
        if isinstance(self.store, PartialRolloutStore):
            return getattr(self.store, method)(*args)
        return ray.get(getattr(self.store, method).remote(*args))

    # ------------------------------------------------------------------ versions of groups
    def group_min_versions(self, partition_id: str) -> dict[str, int]:
        """uid -> oldest segment version over its finished trajectories (from TransferQueue tags)."""
        oldest: dict[str, int] = {}
        for key, tag in self.partitions[partition_id].items():
            version = tag.get("min_global_steps")
            if version is None:
                continue
            uid = key.split("_")[0]
            oldest[uid] = min(int(version), oldest.get(uid, int(version)))
        return oldest

    def _stale_terminal_keys(self, global_steps: int, partition_id: str) -> set[str]:
        if partition_id == "val" or self.max_off_policy_threshold is None or self.max_off_policy_strategy != "drop":
            return set()
        oldest = self.group_min_versions(partition_id)
        return {uid for uid in self.finished_keys[partition_id]
                if uid in oldest and global_steps - oldest[uid] > self.max_off_policy_threshold}

    def _select_prompt_uids(self, partition_id, sampleable_keys, batch_size):
        selected, partition_snapshot, prompt_steps = super()._select_prompt_uids(partition_id, sampleable_keys, len(sampleable_keys))
        if partition_id == "val":
            return selected[:batch_size], partition_snapshot, prompt_steps
        oldest = self.group_min_versions(partition_id)
        ordered = sorted(sampleable_keys, key=lambda uid: (oldest.get(uid, 1 << 62), prompt_steps.get(uid, 0), uid))
        return ordered[:batch_size], partition_snapshot, prompt_steps

    def _evict_terminal_groups(self, global_steps, partition_id, eviction_reasons):
        stale, dapo, failed, _ = eviction_reasons
        if failed and (error := self._store("engine_death")):  # refilling would fail the same way, forever
            raise RuntimeError(f"partial rollout: the rollout engine died, so every group fails: {error}")
        if partition_id != "val":
            oldest = self.group_min_versions(partition_id)
            for uid in stale | dapo | failed:
                reason = "stale" if uid in stale else "failure" if uid in failed else "dapo"
                self.trace(kind="evicted", uid=uid, reason=reason, step=global_steps, oldest_version=oldest.get(uid))
            self.counters["stale_dropped"] += len(stale)
            self.counters["failed_dropped"] += len(failed - stale)
            if stale | dapo | failed:
                self._store("forget", sorted(stale | dapo | failed))
        return super()._evict_terminal_groups(global_steps, partition_id, eviction_reasons)

    # ------------------------------------------------------------------ progress rule
    def _has_enough_samples(self, global_steps, partition_id, batch_size, sampleable_keys) -> bool:
        if len(sampleable_keys) >= batch_size and not self._forced_running(partition_id):
            self._stuck_polls = 0
            return True
        if partition_id != "train" or len(sampleable_keys) >= batch_size:
            return False
        if not self._all_inflight_parked(partition_id):
            self._stuck_polls = 0
            return False
        self._stuck_polls += 1
        if self._stuck_polls < 2:  # a session may be between two calls: look once more
            return False
        self._stuck_polls = 0
        self.make_progress(partition_id, batch_size - len(sampleable_keys))
        return False

    def _forced_running(self, partition_id: str) -> bool:
        """``wait``: a group forced by the staleness cap is still generating (the step waits for it)."""
        if partition_id == "val" or self.max_off_policy_strategy != "wait" or self.max_off_policy_threshold is None:
            return False
        running = self.running_keys[partition_id]
        return bool(running) and bool(set(self._store("forced_uids")) & set(running))

    def _all_inflight_parked(self, partition_id: str) -> bool:
        if self.pending_keys[partition_id]:
            return False
        running = self.running_keys[partition_id]
        if not running:
            return True  # nothing in flight: only a refill can help
        states = self._store("session_states")
        for uid in running:
            sessions = states.get(uid, {})
            if len(sessions) < self.rollout_n or "calling" in sessions.values():
                return False
            if "parked" not in sessions.values():
                return False  # all finished: the group's terminal status is being written
        return True

    def make_progress(self, partition_id: str, deficit: int) -> None:
        """Refill ``deficit`` prompts while under the in-flight cap, else force the oldest groups or lift the
        current version's budget (``at_cap``)."""
        inflight = len(self.pending_keys[partition_id]) + len(self.running_keys[partition_id])
        room = self.max_inflight_groups - inflight
        if room > 0:
            count = min(room, deficit)
            self.refill_fn(count)
            self.counters["refills"] += count
            self.trace(kind="progress", action="refill", count=count, inflight=inflight)
            return
        if self.at_cap == "lift":
            version = self._store("lift")
            self.trace(kind="progress", action="lift", version=version, inflight=inflight)
            return
        oldest = self._store("running_min_versions")
        victims = sorted(self.running_keys[partition_id], key=lambda uid: (oldest.get(uid, 1 << 62), uid))[:deficit]
        self._store("force", victims)
        self.trace(kind="progress", action="force", uids=victims, inflight=inflight)

    def metrics(self) -> dict[str, float]:
        return {f"sampler/{k}": float(v) for k, v in self.counters.items()}
