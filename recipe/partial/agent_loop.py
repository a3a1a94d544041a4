"""Agent loop ``bapo_partial``: verl's single-turn loop with budgeted, segmented generation.

``BudgetedSingleTurnAgentLoop.run`` swaps ``self.server_manager`` for a ``SegmentedGenerate`` proxy and
calls ``SingleTurnAgentLoop.run`` unchanged (prompt building, ``ct_merge_assistant_token``, truncation,
``AgentLoopOutput``). The proxy calls the *base* ``LLMServerClient.generate`` (one server call, its
return always visible) instead of ``FullyAsyncLLMServerClient.generate``'s hidden abort/resume loop.
The trainer ``colocate_budget`` tags training prompts with ``agent_name=bapo_partial``; validation
prompts carry no tag and use ``single_turn_agent`` (never budgeted).

The extra fields of the output (``partial_segments`` = ``[[version, n_tokens, engine_weight_version], ...]``,
``min/max_global_steps`` over segments, ``partial_forced``, ``partial_restored``) travel into
TransferQueue with the trajectory (``agent_loop_tq.AgentLoopWorkerTQ._agent_loop_postprocess``).
"""

from __future__ import annotations

import functools
from typing import Any

import ray
from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, register
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
from verl.workers.rollout.llm_server import LLMServerClient

from . import config as partial_config
from .segments import SegmentedGenerate
from .store import STORE_ACTOR_NAME, ActorClock

AGENT_NAME = "bapo_partial"


@functools.lru_cache(maxsize=8)
def stop_ids_of(model_path: str, tokenizer_eos: int | None) -> frozenset:
    """EOS ids the rollout stops on: the tokenizer's plus the generation config's (as vLLM does)."""
    from transformers import GenerationConfig

    ids = set() if tokenizer_eos is None else {int(tokenizer_eos)}
    try:
        generation = GenerationConfig.from_pretrained(model_path)
    except OSError:  # the model ships no generation_config.json: the tokenizer's EOS is all there is
        generation = None
    eos = getattr(generation, "eos_token_id", None)
    if eos is not None:
        ids.update([int(eos)] if isinstance(eos, int) else [int(t) for t in eos])
    if not ids:
        raise ValueError(f"partial rollout: no EOS id in the tokenizer or generation config of {model_path}")
    return frozenset(ids)


def engine_died(error: BaseException) -> bool:
    """vLLM's ``EngineDeadError`` (its engine process is gone), also as Ray delivers it from the server actor
    (``RayTaskError(EngineDeadError)`` subclasses the cause's type)."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # another rollout backend: nothing to recognise
        return False
    return isinstance(error, EngineDeadError) or isinstance(getattr(error, "cause", None), EngineDeadError)


@functools.lru_cache(maxsize=1)
def store_clock(poll_interval_s: float) -> ActorClock:
    return ActorClock(ray.get_actor(STORE_ACTOR_NAME), poll_interval_s=poll_interval_s)


class _Proxy:
    """Stands in for ``server_manager`` during one ``run``: ``generate`` is segmented, the rest delegated."""

    def __init__(self, client: LLMServerClient, segmented: SegmentedGenerate):
        self._client, self._segmented = client, segmented

    async def generate(self, request_id, **kwargs):
        return await self._segmented.generate(request_id, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


@register(AGENT_NAME)
class BudgetedSingleTurnAgentLoop(SingleTurnAgentLoop):
    """Single-turn agent loop whose generation obeys the token budget (see module docstring)."""

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        settings = partial_config.parse(self.config)
        client = self.server_manager

        clock = store_clock(settings.poll_interval_s)

        async def one_call(**call_kwargs):
            try:
                return await LLMServerClient.generate(client, **call_kwargs)
            except Exception as error:
                if engine_died(error):  # verl would mark the group failed and refill it, forever
                    await clock.report_engine_death(f"{type(error).__name__}: {error}"[:2000])
                raise

        model_path = self.config.actor_rollout_ref.model.path
        segmented = SegmentedGenerate(
            call=one_call,
            clock=clock,
            policy=settings.policy(),
            uid=str(kwargs["uid"]),
            session_id=int(kwargs["session_id"]),
            stop_ids=stop_ids_of(model_path, self.tokenizer.eos_token_id),
        )
        self.server_manager = _Proxy(client, segmented)
        try:
            return await super().run(sampling_params, **kwargs)
        finally:
            self.server_manager = client
