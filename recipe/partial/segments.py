"""Budgeted, segmented generation of one trajectory (no Ray, no verl trainer: unit-testable).

A training trajectory generates at most ``B = token_budget`` new tokens under any one policy version.
``SegmentedGenerate.generate`` is a loop of plain server calls (no hidden resume loop), each with
``max_tokens = min(B - used_at_version, response_length - total)``; a call never asks for 0 tokens
(vLLM clamps ``max_tokens`` up to 1). Every call's prompt is ``prompt + all tokens so far``; the tokens
and per-token log-probs of all calls are concatenated in order, and each call with >= 1 token becomes a
*segment* ``[version, n_tokens, engine_weight_version]`` where ``version`` is the server's
``extra_fields["global_steps"]`` stamp (the policy version that produced those tokens: weights only
change while every request is aborted, so one call = one version).

After a call the trajectory is
* finished: the last token is an EOS / stop id (also exactly at the budget), the response length is
  used up, or the server stopped for another reason with fewer than ``max_tokens`` tokens;
* parked: ``max_tokens`` tokens and no EOS (a budget hit: vLLM says "completed", other servers "length"),
  or "aborted" (verl's batch-full abort). A parked trajectory waits until the clock shows a version newer
  than the one that produced its last segment, or until it is forced, or (after a budget hit) until the
  sampler's progress rule lifts the budget of the current version.

Lifted version (the progress rule when the in-flight cap is reached, ``sampler.make_progress``): every
trajectory may generate past ``B`` under that one version, until the trainer's batch is complete and the
end-of-sampling abort parks it; the next version has a budget again. The session records such versions in
``lifted_versions`` (their tokens are the only ones, besides forced groups', beyond ``B`` per version).

Staleness cap (``threshold`` = the number of policy versions a group may span, counted from the oldest
segment of the group, verl's ``max_off_policy_threshold``): before a call at version ``v`` the span is
``v - group_min_version + 1``. ``drop``: a span above the threshold raises ``StaleTrajectoryError`` (verl
marks the group failed, evicts and refills it). ``wait``: at span == threshold the group is forced (by
its session before a call, and by the store's clock at ``set_version`` for sessions parked through the
version change), i.e. it ignores ``B`` from then on; the sampler ends no step while a forced group still
runs, so it finishes under that version. ``threshold=None``: no cap (paper).

The record of a session (``SessionRecord``) is reported to a store after every call, so a restarted run
continues a parked session from exactly its stored tokens and returns a finished one without a call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Protocol

from verl.workers.rollout.replica import TokenOutput

ABORTED_REASONS = ("aborted", "abort")
STATUSES = ("calling", "parked", "finished")


class StaleTrajectoryError(RuntimeError):
    """A trajectory would span more policy versions than ``max_off_policy_threshold`` (strategy drop)."""


@dataclass
class SessionRecord:
    """Everything generated so far for one session ``{uid}_{session_id}`` (JSON/torch.save friendly)."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    segments: list[list[int]] = field(default_factory=list)  # [version, n_tokens, engine weight_version or -1]
    status: str = "calling"
    stop_reason: Optional[str] = None
    forced: bool = False
    calls: int = 0
    budget_stops: int = 0
    aborts: int = 0
    reprefill_tokens: int = 0  # prompt + prefix tokens prefilled again by continuation calls
    restored: bool = False
    lifted_versions: list[int] = field(default_factory=list)  # versions whose budget the progress rule lifted
    last_version: Optional[int] = None  # stamp of the latest call (also of calls with 0 tokens)

    @property
    def min_version(self) -> Optional[int]:
        return min(s[0] for s in self.segments) if self.segments else None

    def tokens_at(self, version: int) -> int:
        return sum(s[1] for s in self.segments if s[0] == version)

    def to_dict(self) -> dict:
        """A copy that shares no list with the record (``dataclasses.asdict`` deep-copies every element: it
        was the in-process store's largest cost, two reports per call)."""
        return _copy_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def from_dict(cls, data: dict) -> "SessionRecord":
        return cls(**_copy_fields(data))


def _copy_fields(data: dict) -> dict:
    out = dict(data)
    for name in ("prompt_ids", "token_ids", "log_probs"):
        out[name] = list(out[name])
    out["segments"] = [list(s) for s in out["segments"]]
    out["lifted_versions"] = list(out.get("lifted_versions", ()))
    return out


class Clock(Protocol):
    """What a session needs from the run: the version clock, the store and the forced set."""

    async def version(self) -> int: ...

    async def group_min_version(self, uid: str) -> Optional[int]: ...

    async def is_forced(self, uid: str) -> bool: ...

    async def is_lifted(self, version: int) -> bool:
        """Whether the progress rule lifted the budget of ``version``."""

    async def wait_newer(self, uid: str, version: int, lifted_ok: bool = True) -> None:
        """Return once the clock is > ``version``, the group ``uid`` is forced, or (``lifted_ok``) the budget
        of ``version`` is lifted."""

    async def force(self, uid: str) -> None: ...

    async def report(self, key: str, record: SessionRecord) -> None: ...

    async def restore(self, key: str) -> Optional[SessionRecord]: ...


@dataclass(frozen=True)
class BudgetPolicy:
    """Budget and staleness cap of training trajectories (see module docstring)."""

    token_budget: int
    response_length: int
    threshold: Optional[int] = None
    strategy: str = "drop"

    def __post_init__(self):
        if not 1 <= self.token_budget:
            raise ValueError(f"token_budget={self.token_budget} is invalid; valid: 1 <= token_budget")
        if self.strategy not in ("drop", "wait"):
            raise ValueError(f"max_off_policy_strategy={self.strategy!r} is invalid; valid: drop, wait")
        if self.threshold is not None and self.threshold < 1:
            raise ValueError(f"max_off_policy_threshold={self.threshold} is invalid; valid: null or >= 1")


def classify(n: int, last_token: Optional[int], stop_reason: Optional[str], max_tokens: int, total: int,
             response_length: int, stop_ids: frozenset) -> str:
    """'finished', 'budget' or 'aborted' for a call that returned ``n`` tokens (see module docstring)."""
    if n and last_token in stop_ids:
        return "finished"  # EOS, also exactly at the budget
    if total >= response_length:
        return "finished"  # truncated at the response length: a normal finish
    if stop_reason in ABORTED_REASONS:
        return "aborted"
    if n >= max_tokens:
        return "budget"  # vLLM reports "completed", other servers "length": detected by count
    return "finished"  # stop string or another server-side stop before the budget


GenerateCall = Callable[..., Awaitable[TokenOutput]]


class SegmentedGenerate:
    """Drop-in for ``server_manager.generate`` of one session of a training trajectory.

    Args:
        call: the plain (single-call) generate: ``await call(request_id=, prompt_ids=, sampling_params=, **kw)``.
        clock: see ``Clock``.
        policy: budget and cap.
        uid, session_id: identify the session (key ``{uid}_{session_id}``) and its group.
        stop_ids: token ids that end a response (EOS ids + ``stop_token_ids``).
    """

    def __init__(self, call: GenerateCall, clock: Clock, policy: BudgetPolicy, uid: str, session_id: int,
                 stop_ids: frozenset):
        self.call, self.clock, self.policy = call, clock, policy
        self.uid, self.key = uid, f"{uid}_{session_id}"
        self.stop_ids = frozenset(int(t) for t in stop_ids)

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **kwargs) -> TokenOutput:
        prompt_ids = [int(t) for t in prompt_ids]
        record = await self.clock.restore(self.key)
        if record is None:
            record = SessionRecord(prompt_ids=prompt_ids)
        else:
            if record.prompt_ids != prompt_ids:
                raise RuntimeError(f"partial rollout: stored record of {self.key} has a different prompt")
            record.restored = True
        eos = frozenset() if sampling_params.get("ignore_eos") else self.stop_ids
        stop_ids = eos | frozenset(int(t) for t in sampling_params.get("stop_token_ids") or ())
        length = self.policy.response_length
        while record.status != "finished":
            # the next call runs at the clock's version or later (the clock may lag the servers' stamp)
            version = max(await self.clock.version(), record.last_version if record.last_version is not None else -1)
            left = await self._tokens_left(record, version)
            if left == 0:  # budget of this version used up
                record.status = "parked"
                await self.clock.report(self.key, record)
                await self.clock.wait_newer(self.uid, version)
                continue
            record.status = "calling"
            await self.clock.report(self.key, record)
            if record.calls:
                record.reprefill_tokens += len(prompt_ids) + len(record.token_ids)
            output = await self.call(request_id=request_id, prompt_ids=prompt_ids + record.token_ids,
                                     sampling_params={**sampling_params, "max_tokens": left}, **kwargs)
            record.calls += 1
            stamp = self._append(record, output, left)
            outcome = classify(len(output.token_ids), output.token_ids[-1] if output.token_ids else None,
                               output.stop_reason, left, len(record.token_ids), length, stop_ids)
            if outcome == "finished":
                record.status, record.stop_reason = "finished", output.stop_reason
                await self.clock.report(self.key, record)
                break
            record.status = "parked"
            record.budget_stops += outcome == "budget"
            record.aborts += outcome == "aborted"
            await self.clock.report(self.key, record)
            if outcome == "aborted":  # the rollout stops for a weight update: a lift of `stamp` no longer helps
                await self.clock.wait_newer(self.uid, stamp, lifted_ok=False)
            elif record.tokens_at(stamp) >= self.policy.token_budget:
                await self.clock.wait_newer(self.uid, stamp)
        return self._output(record)

    async def _tokens_left(self, record: SessionRecord, version: int) -> int:
        """Tokens the next call may generate at ``version``; applies the staleness cap first."""
        remaining = self.policy.response_length - len(record.token_ids)
        policy = self.policy
        if not record.forced and await self.clock.is_forced(self.uid):  # e.g. by the clock at the wait cap
            record.forced = True
        oldest = None
        if policy.threshold is not None and not record.forced:
            mine, group = record.min_version, await self.clock.group_min_version(self.uid)
            oldest = min((v for v in (mine, group) if v is not None), default=None)
        if oldest is not None:
            span = version - oldest + 1
            if span > policy.threshold:
                raise StaleTrajectoryError(
                    f"partial rollout: {self.key} would span {span} policy versions (oldest segment {oldest}, "
                    f"now {version}) > max_off_policy_threshold={policy.threshold} (strategy {policy.strategy})"
                )
            if span == policy.threshold and policy.strategy == "wait":
                await self.clock.force(self.uid)
                record.forced = True
        if record.forced:
            return remaining
        if await self.clock.is_lifted(version):
            if version not in record.lifted_versions:
                record.lifted_versions.append(version)
            return remaining
        return max(0, min(policy.token_budget - record.tokens_at(version), remaining))

    @staticmethod
    def _append(record: SessionRecord, output: TokenOutput, max_tokens: int) -> int:
        """Append a call's tokens/log-probs as a segment; return its version stamp."""
        n = len(output.token_ids)
        stamp = output.extra_fields.get("global_steps")
        if stamp is None:
            raise RuntimeError("partial rollout: the rollout server did not stamp extra_fields['global_steps']")
        record.last_version = int(stamp)
        if n > max_tokens:
            raise RuntimeError(f"partial rollout: server returned {n} tokens for max_tokens={max_tokens}")
        if n:
            if output.log_probs is None or len(output.log_probs) != n:
                raise RuntimeError("partial rollout needs per-token log-probs: set rollout.calculate_log_probs=True")
            record.token_ids += [int(t) for t in output.token_ids]
            record.log_probs += [float(x) for x in output.log_probs]
            weight_version = output.extra_fields.get("weight_version")
            record.segments.append([int(stamp), n, -1 if weight_version is None else int(weight_version)])
        return int(stamp)

    @staticmethod
    def _output(record: SessionRecord) -> TokenOutput:
        versions = [s[0] for s in record.segments] or [record.last_version]  # never None: verl casts to int
        return TokenOutput(
            token_ids=list(record.token_ids),
            log_probs=list(record.log_probs),
            stop_reason=record.stop_reason,
            num_preempted=0,
            extra_fields={
                "global_steps": versions[-1],
                "min_global_steps": min(versions),
                "max_global_steps": max(versions),
                "partial_segments": [list(s) for s in record.segments],
                "partial_forced": record.forced,
                "partial_lifted_versions": list(record.lifted_versions),
                "partial_restored": record.restored,
            },
        )
