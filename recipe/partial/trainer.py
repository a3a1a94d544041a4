"""Trainer mode ``colocate_budget``: verl's ``colocate_async`` plus token-budget partial rollout.

``PPOTrainerColocateBudget(PPOTrainerColocateAsync)`` keeps every ``trainer_mode != "sync"`` branch of
verl's v1 trainer (prompt persistence, TransferQueue checkpoint and re-issue, exact refills, abort at the
end of sampling, resume after the weight update) and adds:

* ``__init__``: checks the config (``config.parse``), creates the store actor, swaps in
  ``BudgetReplayBuffer`` (verl's ``_build_replay_buffer`` is overridden);
* ``_fetch_one_gen_batch``: tags training prompts ``agent_name=bapo_partial`` (persisted with the prompt,
  so re-issued prompts keep it; validation prompts never carry it);
* ``on_init_end`` / ``on_step_end``: after verl's weight update, ``store.set_version(global_steps)``;
* ``on_sample_end`` / ``on_step_end``: verl's calls into the rollout engines (the end-of-sampling abort,
  the weight update and resume) run under ``while_rollout_alive``: with vLLM, a dead engine fails the run
  with what died instead of hanging it (verl and vLLM wait for a killed engine forever);
* ``on_train_begin``: warm-up from ``colocate_budget.num_warmup_batches``;
* ``_save_checkpoint``: waits (<= 5 s) for calls cut by the abort to report, writes
  ``global_step_N/partial_rollout.pt`` (the last reported, consistent state of every session), then verl's
  checkpoint (which writes ``latest_checkpointed_iteration.txt`` last);
* ``_load_checkpoint``: verl's (restores TransferQueue), then the store records of the groups verl will
  re-issue (``persist_partial``);
* ``_compute_metrics``: verl's, then ``partial/*`` metrics of the trained trajectories, the store and the
  sampler; the trace; the store forgets trained groups.

Private verl 0.9.1 methods overridden or called: ``PPOTrainer._build_replay_buffer``,
``_fetch_one_gen_batch``, ``_save_checkpoint``, ``_load_checkpoint``, ``_compute_metrics``,
``_add_async_warmup_batches``, ``_reissue_inflight_prompts`` (relied on: it re-issues pending/running
prompts with their persisted fields after ``_load_checkpoint``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request

import ray
import torch
import transfer_queue as tq
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.utils import tensordict_utils as tu
from verl.trainer.ppo.v1.trainer_colocate_async import PPOTrainerColocateAsync

from . import config as partial_config
from .agent_loop import AGENT_NAME
from .metrics import trained_metrics
from .sampler import BudgetReplayBuffer
from .store import STORE_ACTOR_NAME, PartialRolloutStore

logger = logging.getLogger(__name__)
STORE_FILE = "partial_rollout.pt"
QUIESCE_S = 5.0  # how long a checkpoint waits for aborted calls to report
HEALTH_TIMEOUT_S = 30.0  # how long a rollout server may take to answer its /health
HEALTH_POLL_S = 2.0  # how often /health is asked while verl's calls into the rollout engines run


def dead_rollout_servers(addresses: list[str], timeout_s: float = HEALTH_TIMEOUT_S) -> list[tuple[str, object]]:
    """(url, HTTP status or error) of every vLLM server (``host:port``) whose ``/health`` says its engine is
    dead (vLLM answers 503 on ``EngineDeadError``) or that refuses the connection (the server is gone). A
    server that does not answer in ``timeout_s`` is only logged: busy is not dead."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the servers' own addresses
    dead = []
    for address in addresses:
        url = f"http://{address}/health"
        try:
            with opener.open(url, timeout=timeout_s) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        except OSError as error:  # URLError wraps the socket's error in .reason
            reason = getattr(error, "reason", error)
            if isinstance(reason, TimeoutError):
                logger.warning("partial rollout: %s did not answer in %.0f s", url, timeout_s)
                continue
            status = f"{type(reason).__name__}: {reason}"
        if status != 200:
            dead.append((url, status))
    return dead


class TraceWriter:
    """JSONL records of fetched / trained / evicted groups (``trace_dir``); a no-op without it."""

    def __init__(self, trace_dir: str | None):
        self.path = None
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)
            self.path = os.path.join(trace_dir, f"partial_trace_{os.getpid()}_{int(time.time() * 1000)}.jsonl")

    def __call__(self, **record) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


@register_trainer("colocate_budget")
class PPOTrainerColocateBudget(PPOTrainerColocateAsync):
    """See module docstring."""

    def __init__(self, config):
        self.partial = partial_config.parse(config)  # before any worker starts
        self.trace = TraceWriter(self.partial.trace_dir)
        self.store = ray.remote(PartialRolloutStore).options(name=STORE_ACTOR_NAME, num_cpus=0).remote()
        ray.get(self.store.configure_cap.remote(self.partial.threshold, self.partial.strategy))
        super().__init__(config)

    def _build_replay_buffer(self):
        sampler = self.config.trainer.v1.sampler
        if (sampler.get("custom_sampler") or {}).get("path"):
            raise ValueError("trainer.v1.sampler.custom_sampler is invalid with colocate_budget; valid: unset "
                             "(the mode uses recipe.partial.sampler.BudgetReplayBuffer)")
        buffer = BudgetReplayBuffer(
            trainer_mode=self.trainer_mode,
            trainer_config=self.config.trainer.v1.colocate_budget,
            max_off_policy_threshold=sampler.max_off_policy_threshold,
            max_off_policy_strategy=sampler.max_off_policy_strategy,
            sampler_kwargs=sampler.sampler_kwargs,
            refill_fn=self._add_prompts_to_generate,
        )
        buffer.configure(self.store, self.config.actor_rollout_ref.rollout.n, self.partial.max_inflight_groups,
                         trace=self.trace, poll_interval_s=self.partial.poll_interval_s, at_cap=self.partial.at_cap)
        return buffer

    # ------------------------------------------------------------------ prompts
    def _fetch_one_gen_batch(self):
        batch = super()._fetch_one_gen_batch()
        uids = list(batch["uid"])
        # a per-row NonTensorStack: persisted with the prompt (re-issued prompts keep it), one string per row
        tu.assign_non_tensor_stack(batch, "agent_name", [AGENT_NAME] * len(uids))
        self.trace(kind="fetched", uids=[str(u) for u in uids], step=self.global_steps)
        return batch

    # ------------------------------------------------------------------ clock
    def on_init_end(self):
        super().on_init_end()
        ray.get(self.store.set_version.remote(self.global_steps))

    def on_train_begin(self):
        self._add_async_warmup_batches(self.partial.num_warmup_batches)

    def on_step_end(self):
        self.while_rollout_alive("the weight update", super().on_step_end)
        ray.get(self.store.set_version.remote(self.global_steps))

    def on_sample_end(self):
        self.while_rollout_alive("the end-of-sampling abort", super().on_sample_end)

    # ------------------------------------------------------------------ engine death
    def check_rollout_alive(self, before: str) -> None:
        """Raise, saying what died, if a vLLM rollout server's engine is dead (other rollouts: no check)."""
        if self.config.actor_rollout_ref.rollout.name != "vllm":
            return
        manager = getattr(self, "llm_server_manager", None)
        dead = dead_rollout_servers(getattr(manager, "server_addresses", None) or [])
        if dead:
            store = self.store
            local = isinstance(store, PartialRolloutStore)
            reported = store.engine_death() if local else ray.get(store.engine_death.remote())
            raise RuntimeError(
                f"partial rollout: the rollout engine died (step {self.global_steps}, {before}): "
                + "; ".join(f"GET {url} -> {status}" for url, status in dead)
                + " (vLLM answers 503 once its engine process is gone: EngineDeadError)"
                + (f"; a session's call failed with {reported}" if reported else "")
            )

    def while_rollout_alive(self, what: str, call):
        """``call()`` (verl's calls into the rollout engines), checking the engines' health before it and every
        ``HEALTH_POLL_S`` while it runs; a dead engine raises here (the call is left behind in its thread).

        A session's failed call reports an engine death while sampling runs, and the sampler fails the run.
        An engine that dies at another moment was only met by these calls, and they wait forever: vLLM does
        not fail a utility call (``pause_generation``, verl's abort) pending on a dead engine, and verl's
        weight update streams the weights to the engine's workers with no timeout. Test runs whose engine
        was killed after sampling hung until killed (one seen waiting in the abort, its sample complete)."""
        self.check_rollout_alive(what)
        if self.config.actor_rollout_ref.rollout.name != "vllm":
            return call()
        outcome = {}

        def run():
            try:
                outcome["result"] = call()
            except BaseException as error:  # re-raised in the trainer's thread
                outcome["error"] = error

        worker = threading.Thread(target=run, name=f"partial rollout: {what}", daemon=True)
        worker.start()
        while True:
            worker.join(HEALTH_POLL_S)
            if not worker.is_alive():
                break
            self.check_rollout_alive(what)
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("result")

    # ------------------------------------------------------------------ checkpoint
    def _save_checkpoint(self):
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        os.makedirs(folder, exist_ok=True)
        # Every record is a consistent prefix (reported before each call with all tokens so far), so any
        # snapshot can be continued. Calls cut by the end-of-sampling abort report within moments: wait a
        # little for them so the snapshot holds their tokens. Calls sent after the abort are held at the
        # servers' closed gate and generate nothing until resume: they are saved as parked.
        deadline = time.time() + QUIESCE_S
        while (calling := ray.get(self.store.calling_count.remote())) > 0 and time.time() < deadline:
            time.sleep(0.05)
        state = ray.get(self.store.state_dict.remote())
        torch.save(state, os.path.join(folder, STORE_FILE))
        if calling:
            logger.info("partial rollout: %d sessions mid-call at the checkpoint (held at the closed gate) are saved "
                        "with their tokens so far", calling)
        self.trace(kind="checkpoint", step=self.global_steps, records=state["records"], mid_call=calling)
        super()._save_checkpoint()

    def _load_checkpoint(self):
        super()._load_checkpoint()
        if self.global_steps == 0:
            return
        path = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}", STORE_FILE)
        if not self.partial.persist_partial:
            logger.info("partial rollout: persist_partial=False; parked sessions restart from scratch")
            return
        if not os.path.exists(path):
            raise FileNotFoundError(f"partial rollout: {path} is missing; set {partial_config.SECTION}.persist_partial=False "
                                    "to resume this checkpoint by regenerating unfinished responses")
        data = tq.kv_list("train") or {}
        inflight = [k for k, t in data.get("train", {}).items()
                    if t.get("is_prompt", False) and t.get("status") in ("pending", "running")]
        restored = ray.get(self.store.load_state_dict.remote(torch.load(path, weights_only=False), inflight))
        self.trace(kind="restored", step=self.global_steps, sessions=restored, inflight=inflight)

    # ------------------------------------------------------------------ metrics + trace
    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        super()._compute_metrics(batch, metrics, timing_raw, global_steps=global_steps, epoch=epoch)
        keys = [k for k, tag in zip(batch.keys, batch.tags, strict=True) if not tag.get("is_padding", False)]
        data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id,
                               select_fields=["extra_fields", "responses", "rollout_log_probs"])
        extras = [getattr(e, "data", e) for e in data["extra_fields"]]
        metrics.update(trained_metrics(keys, extras, global_steps))
        metrics.update({f"partial/{k}": v for k, v in ray.get(self.store.metrics.remote()).items()})
        metrics.update({f"partial/{k}": v for k, v in self.replay_buffer.metrics().items()})
        uids = sorted({k.split("_")[0] for k in keys})
        responses = [r.tolist() for r in data["responses"].unbind(0)] if hasattr(data["responses"], "unbind") else []
        log_probs = [r.tolist() for r in data["rollout_log_probs"].unbind(0)] if "rollout_log_probs" in data else []
        self.trace(kind="trained", step=global_steps, uids=uids, keys=keys,
                   sessions=[{"key": k, "segments": e.get("partial_segments"), "forced": e.get("partial_forced"),
                              "lifted": e.get("partial_lifted_versions"),
                              "restored": e.get("partial_restored"), "tokens": resp, "log_probs": lp}
                             for k, e, resp, lp in zip(keys, extras, responses, log_probs, strict=True)])
        ray.get(self.store.forget.remote(uids))
        if global_steps >= self.total_training_steps:
            listed = (tq.kv_list("train") or {}).get("train", {})
            self.trace(kind="inflight_at_end", step=global_steps,
                       uids=sorted(k for k, t in listed.items() if t.get("is_prompt", False)))
