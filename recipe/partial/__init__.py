"""Token-budget partial rollout (paper Sec. 5.3) for verl 0.9.1's v1 trainer: ``trainer_mode=colocate_budget``.

A training trajectory generates at most ``token_budget`` new tokens under one policy version; an
unfinished one is parked in a store and continued with prompt + tokens so far under a newer version, its
per-token behaviour log-probs kept per segment. A GRPO group is trained once all its n sessions are
finished. Staleness is capped on the oldest segment of a group (verl's ``max_off_policy_threshold`` /
``max_off_policy_strategy``), parked sessions are checkpointed and resumed. Enable: ``+rollout=partial``
(``configs/rollout/partial.yaml``) and ``trainer.v1.colocate_budget.token_budget=B``.

What this package owns:
* ``segments``: budgeted, segmented generation of one session (no Ray; the semantics live here);
* ``store``: the store of session records + version clock (a named Ray actor in a run);
* ``agent_loop``: the ``bapo_partial`` agent loop (verl's single-turn loop + segmented generation);
* ``sampler``: ``BudgetReplayBuffer`` (oldest-segment staleness, progress rule, eviction log);
* ``trainer``: the ``colocate_budget`` trainer mode (clock, tagging, checkpoint, metrics, trace);
* ``config``: the ``trainer.v1.colocate_budget`` section and its start-up checks;
* ``metrics``: ``partial/trained/*`` metrics.

verl 0.9.1 internals it touches (each covered by tests/test_partial_*.py):
* public: ``register_trainer``, ``PPOTrainerColocateAsync``, agent loop ``register``,
  ``SingleTurnAgentLoop.run``, ``LLMServerClient.generate`` (called on a ``FullyAsyncLLMServerClient`` to
  bypass its resume loop), ``ReplayBufferAsync``, TransferQueue ``kv_list`` / ``kv_batch_get``;
* private ``PPOTrainer`` methods: ``_build_replay_buffer``, ``_fetch_one_gen_batch``, ``_save_checkpoint``,
  ``_load_checkpoint``, ``_compute_metrics``, ``_add_async_warmup_batches``, ``_add_prompts_to_generate``
  (as the sampler's refill), ``_reissue_inflight_prompts`` (relied on, not overridden);
* private ``ReplayBufferAsync`` methods / state: ``_stale_terminal_keys``, ``_select_prompt_uids``,
  ``_has_enough_samples``, ``_evict_terminal_groups``, ``partitions``, ``pending_keys``, ``running_keys``,
  ``finished_keys``, ``poll_interval``;
* the agent-loop worker's ``_agent_loop_postprocess`` writes ``extra_fields`` and the
  ``min/max_global_steps`` tags that the sampler and verl's off-policy metrics read.
"""


def register() -> None:
    """Register the ``bapo_partial`` agent loop and the ``colocate_budget`` trainer mode (names only).

    Only where they are looked up: Ray worker processes (the TaskRunner, the agent-loop workers) or a
    process whose platform is already chosen (``VERL_PLATFORM`` set). Not in a driver that imports verl
    before it exports ``VERL_PLATFORM=cpu`` (``recipe.bapo.main_bapo`` under Hydra): importing verl's v1
    trainer resolves verl's platform, which must wait for the CPU backend.
    """
    import os

    import ray

    if not (ray.is_initialized() or os.environ.get("VERL_PLATFORM")):
        return
    from . import agent_loop  # noqa: F401  registers the agent loop by name
    from . import trainer  # noqa: F401  registers the trainer mode by name


def check_trainer_config(config) -> None:
    """Start-up check of a ``colocate_budget`` run (``config.parse``); a no-op for every other run.

    ``recipe.bapo.main_bapo`` and the dry run call it before Ray starts; the trainer mode parses the config
    again on construction (verl's own ``main_ppo``), before any worker starts. Nothing of verl is wrapped.
    """
    v1 = config.trainer.get("v1") if config.trainer.get("use_v1", False) else None
    if v1 is not None and v1.get("trainer_mode") == "colocate_budget":
        from .config import parse

        parse(config)


# Load verl (and with it this plugin's registrations) before any submodule of this package runs. A fresh Ray
# worker may import a submodule first (unpickling a SessionRecord or the sampler): without this line that
# submodule's own `from verl...` would start verl's plugin loading halfway through it, and the plugin's
# `register()` above would re-import the half-initialised submodule (ImportError: partially initialized
# module). Here `register` is already defined, and no submodule has started yet.
import verl  # noqa: E402,F401
