"""Continuous-batching generation engine over a HF causal LM (no Ray; the Ray actor wraps it).

Scheduling: ``generate()`` puts a request on a queue and awaits its future. One background asyncio task
runs *steps* in a worker thread; each step (1) prefills the queued requests in right-padded batches of
similar lengths (``prefill_groups``) and picks their first token, then (2) runs one decode step over
every active row (see ``kv_batch``). Finished rows leave the batch at once and new ones join at the
next step, so concurrent requests share forwards.

Everything that touches the active set happens while ``_guard`` (an asyncio lock) is held: the step
loop, aborts and weight updates, so an abort or update never races with a running forward.

Budget / continuation: a request stops with "length" when it has produced ``spec.max_tokens`` tokens
and returns everything so far. Calling again with ``prompt + tokens_so_far`` continues the sequence; for
greedy decoding the continuation is token-for-token the uninterrupted run (the cache is rebuilt by
prefill, which equals incremental decoding up to float rounding).

Abort / resume (verl's partial rollout, ``trainer.v1.trainer_mode=colocate_async``):
``abort_all()`` closes the admission gate and ends every queued and running request at the current step
boundary with stop reason "aborted" (tokens and log-probs so far); requests arriving while the gate is
closed wait for ``resume()`` (or are answered "aborted" at once when the abort asked to reject).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .kv_batch import BatchKV, decode_step, prefill
from .sampling import SamplingSpec, choose_tokens

logger = logging.getLogger(__name__)

# Stop reasons reported in TokenOutput.stop_reason.
COMPLETED, LENGTH, ABORTED = "completed", "length", "aborted"


# A prefill batch is right-padded to its longest prompt; pad columns cost a forward each, as real ones do.
# Continuations (prompt + tokens so far, partial rollout) have very different lengths, so admitted
# requests are prefilled in length-sorted groups whose pad columns are at most this share of the group.
PREFILL_MAX_PAD_SHARE = 0.25


def prefill_groups(lengths: list[int], max_pad_share: float = PREFILL_MAX_PAD_SHARE) -> list[list[int]]:
    """Split prompt indices into prefill batches whose padding (width x rows minus real tokens) is at most
    ``max_pad_share`` of width x rows. Longest first, so a set that meets the bound stays one batch (every
    prefix of a descending list has an average length >= the whole list's). Every index appears once."""
    groups: list[list[int]] = []
    width = real = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and real + lengths[i] >= (1 - max_pad_share) * width * (len(groups[-1]) + 1):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            width = real = lengths[i]
    return groups


@dataclass
class GenerationResult:
    """Output of one call: generated ids, their log-probs (None unless requested) and why it stopped."""

    token_ids: list[int]
    log_probs: Optional[list[float]]
    stop_reason: str
    weight_version: int


@dataclass(eq=False)  # identity comparison: requests are found in queues by `is`
class _Request:
    request_id: str
    prompt_ids: list[int]
    spec: SamplingSpec
    generator: Optional[torch.Generator]
    future: asyncio.Future
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    stop_reason: Optional[str] = None


@dataclass
class EngineStats:
    requests: int = 0
    steps: int = 0
    decode_rows: int = 0  # sum of batch sizes over decode steps (mean batch = decode_rows / steps)
    prefill_tokens: int = 0  # token columns computed by prefill forwards, pad columns included
    aborted: int = 0
    weight_updates: int = 0


class HFGenerationEngine:
    """Serve ``generate`` requests for ``model`` with continuous batching.

    Args:
        model: HF causal LM in eval mode (full-attention layers only, see ``kv_batch``).
        eos_ids: token ids that end a sequence unless the request sets ``ignore_eos``.
        pad_id: any valid token id, used for prompt padding (always masked).
        max_batch_size: most sequences decoded together (rollout.max_num_seqs).
        logprobs_mode: "processed_logprobs" or "raw_logprobs" (see ``sampling``).
        seed: seeds the per-request generators of requests that carry no ``seed``.
        decode: token ids -> text, needed only for ``stop`` strings.
    """

    def __init__(
        self,
        model,
        eos_ids: set[int],
        pad_id: int,
        max_batch_size: int,
        logprobs_mode: str = "processed_logprobs",
        seed: int = 0,
        decode: Optional[Callable[[list[int]], str]] = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.model = model
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.pad_id = int(pad_id)
        self.max_batch_size = int(max_batch_size)
        self.logprobs_mode = logprobs_mode
        self.decode = decode
        self.weight_version = 0
        self.stats = EngineStats()
        self._seed_rng = random.Random(seed)
        self._pending: collections.deque[_Request] = collections.deque()
        self._active: list[_Request] = []
        self._kv = BatchKV()
        self._by_id: dict[str, _Request] = {}  # every unresolved request: queued, being admitted or running
        self._background: set[asyncio.Task] = set()  # strong references: asyncio keeps tasks only weakly
        self._guard = asyncio.Lock()
        self._work = asyncio.Event()
        self._gate_open = asyncio.Event()
        self._gate_open.set()
        self._rejecting = False
        self._updating = False
        self._updated_params: set[int] = set()
        self._loop_task: Optional[asyncio.Task] = None
        self._fatal: Optional[BaseException] = None
        self._params_by_name = dict(model.state_dict(keep_vars=True))

    # ------------------------------------------------------------------ requests
    async def generate(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> GenerationResult:
        """Generate up to ``spec.max_tokens`` tokens after ``prompt_ids`` (see module docstring)."""
        self._ensure_loop()
        if spec.stop_strings and self.decode is None:
            raise ValueError("hf rollout: stop strings need a tokenizer (decode) in the engine")
        if not prompt_ids:
            raise ValueError(f"hf rollout: request {request_id!r} has an empty prompt")
        while not self._gate_open.is_set():
            if self._rejecting:
                return GenerationResult([], [] if spec.want_logprobs else None, ABORTED, self.weight_version)
            await self._gate_open.wait()
        if request_id in self._by_id:
            raise ValueError(f"hf rollout: request_id {request_id!r} is already in flight")
        seed = spec.seed if spec.seed is not None else self._seed_rng.getrandbits(63)
        generator = None if spec.greedy else torch.Generator().manual_seed(seed)
        request = _Request(request_id, list(prompt_ids), spec, generator, asyncio.get_running_loop().create_future())
        self._by_id[request_id] = request
        self._pending.append(request)
        self.stats.requests += 1
        self._work.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            # The caller went away (e.g. Ray task cancelled): stop spending compute on it.
            task = asyncio.get_running_loop().create_task(self.abort(request_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            raise

    async def abort_all(self, reject: bool = False) -> list[str]:
        """Close the gate and end every queued/running request now with "aborted"; return their ids.

        Args:
            reject: answer requests that arrive while the gate is closed with "aborted" at once instead of
                holding them until ``resume()``.
        """
        self._gate_open.clear()
        self._rejecting = reject
        async with self._guard:
            victims = list(self._pending) + self._active
            self._pending.clear()
            self._active = []
            self._kv = BatchKV()
            for request in victims:
                request.stop_reason = ABORTED
                self._resolve(request)
        self.stats.aborted += len(victims)
        return [r.request_id for r in victims]

    async def resume(self) -> None:
        """Re-open the gate closed by ``abort_all``; held requests proceed."""
        self._rejecting = False
        self._gate_open.set()

    async def abort(self, request_id: str) -> bool:
        """End one queued/running request with "aborted"; False when it is not in flight."""
        async with self._guard:
            request = self._by_id.get(request_id)
            if request is None:
                return False
            if request in self._pending:
                self._pending.remove(request)
            elif request in self._active:
                row = self._active.index(request)
                keep = [i for i in range(len(self._active)) if i != row]
                self._kv.keep(keep)
                self._active = [self._active[i] for i in keep]
            # else: it was being admitted by a step cancelled with the event loop; nothing to unlink
            request.stop_reason = ABORTED
            self._resolve(request)
        self.stats.aborted += 1
        return True

    async def wait_idle(self, poll_s: float = 0.01) -> None:
        """Return once nothing is queued, being admitted or running."""
        while self._by_id:
            await asyncio.sleep(poll_s)

    @property
    def in_flight(self) -> int:
        return len(self._by_id)

    # ------------------------------------------------------------------ weights
    async def begin_weight_update(self) -> None:
        """Pause scheduling for a weight update; refuse while sequences hold KV from the old weights."""
        async with self._guard:
            if self._active:
                raise RuntimeError(
                    f"hf rollout: weight update requested while {len(self._active)} requests are mid-generation "
                    "with KV caches of the old weights; abort_all_requests() or let them finish first"
                )
            self._updating = True
            self._updated_params = set()

    async def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> int:
        """Copy tensors (HF parameter names) into the model; unknown names or shapes raise. Returns count."""
        if not self._updating:
            raise RuntimeError("hf rollout: load_weights() outside begin_weight_update()/finish_weight_update()")
        return await asyncio.to_thread(self._copy_weights, named_tensors)

    async def finish_weight_update(self) -> int:
        """Check every parameter was written, bump and return the weight version, resume scheduling."""
        if not self._updating:
            raise RuntimeError("hf rollout: finish_weight_update() without begin_weight_update()")
        missing = [n for n, p in self.model.named_parameters() if id(p) not in self._updated_params]
        self._updating = False
        self._work.set()
        if missing:
            raise RuntimeError(f"hf rollout: weight update did not include {len(missing)} parameters, e.g. {missing[:5]}")
        self.weight_version += 1
        self.stats.weight_updates += 1
        return self.weight_version

    def _copy_weights(self, named_tensors: dict[str, torch.Tensor]) -> int:
        with torch.no_grad():
            for name, tensor in named_tensors.items():
                target = self._params_by_name.get(name)
                if target is None:
                    raise KeyError(f"hf rollout: weight {name!r} is not a parameter/buffer of the rollout model")
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"hf rollout: weight {name!r} has shape {tuple(tensor.shape)}, model has {tuple(target.shape)}")
                target.copy_(tensor)
                self._updated_params.add(id(target))
        return len(named_tensors)

    # ------------------------------------------------------------------ scheduling loop
    def _ensure_loop(self) -> None:
        if self._fatal is not None:
            raise RuntimeError("hf rollout: the generation loop died") from self._fatal
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                await self._work.wait()
                self._work.clear()
                while not self._updating and (self._pending or self._active):
                    async with self._guard:
                        if self._updating:
                            break
                        room = self.max_batch_size - len(self._active)
                        admit = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                        if not admit and not self._active:
                            break
                        finished = await asyncio.to_thread(self._step, admit)
                        for request in finished:
                            self._resolve(request)
        except asyncio.CancelledError as error:  # event-loop shutdown
            self._fail_waiters(error, "hf rollout: the engine was closed")
            raise
        except BaseException as error:  # a bug or OOM: fail every waiter loudly instead of hanging them
            logger.exception("hf rollout: generation loop failed")
            self._fail_waiters(error, f"hf rollout: generation loop failed: {error!r}")
            raise

    def _fail_waiters(self, error: BaseException, message: str) -> None:
        self._fatal = error
        for request in list(self._by_id.values()):
            if not request.future.done():
                request.future.set_exception(RuntimeError(message))

    def _step(self, admit: list[_Request]) -> list[_Request]:
        """One scheduling step (worker thread): prefill ``admit``, then decode all active rows once."""
        finished = []
        with torch.inference_mode():
            for group in prefill_groups([len(r.prompt_ids) for r in admit]):
                rows = [admit[i] for i in group]
                cache, mask, logits = prefill(self.model, [r.prompt_ids for r in rows], self.pad_id)
                self.stats.prefill_tokens += mask.numel()
                self._advance(rows, logits)
                keep = [i for i, r in enumerate(rows) if r.stop_reason is None]
                finished += [r for r in rows if r.stop_reason is not None]
                if keep:
                    new_kv = BatchKV()
                    new_kv.add(cache, mask)
                    new_kv.keep(keep)
                    self._kv.add(new_kv.cache, new_kv.mask)
                    self._active += [rows[i] for i in keep]
            if self._active:
                logits = decode_step(self.model, self._kv, [r.token_ids[-1] for r in self._active])
                self.stats.steps += 1
                self.stats.decode_rows += len(self._active)
                self._advance(self._active, logits)
                keep = [i for i, r in enumerate(self._active) if r.stop_reason is None]
                if len(keep) < len(self._active):
                    finished += [r for r in self._active if r.stop_reason is not None]
                    self._kv.keep(keep)
                    self._active = [self._active[i] for i in keep]
        return finished

    def _advance(self, requests: list[_Request], logits: torch.Tensor) -> None:
        """Append one chosen token (+ log-prob) to each request and set its stop reason if it is done."""
        tokens, logps = choose_tokens(
            logits, [r.spec for r in requests], [r.generator for r in requests], self.logprobs_mode
        )
        for request, token, logp in zip(requests, tokens, logps, strict=True):
            request.token_ids.append(token)
            request.log_probs.append(logp)
            request.stop_reason = self._stop_reason(request)

    def _stop_reason(self, request: _Request) -> Optional[str]:
        token, spec = request.token_ids[-1], request.spec
        if (token in self.eos_ids and not spec.ignore_eos) or token in spec.stop_token_ids:
            return COMPLETED
        if spec.stop_strings:
            # A stop string completed by the newest token lies within the last few tokens; a character is
            # at most 4 byte-level tokens, so decode only that tail instead of the whole response.
            window = 4 * max(len(s) for s in spec.stop_strings) + 4
            tail = self.decode(request.token_ids[-window:])
            if any(s in tail for s in spec.stop_strings):
                return COMPLETED
        if len(request.token_ids) >= spec.max_tokens:
            return LENGTH
        return None

    def _resolve(self, request: _Request) -> None:
        self._by_id.pop(request.request_id, None)
        if request.future.done():  # caller cancelled
            return
        log_probs = list(request.log_probs) if request.spec.want_logprobs else None
        request.future.set_result(
            GenerationResult(list(request.token_ids), log_probs, request.stop_reason, self.weight_version)
        )
