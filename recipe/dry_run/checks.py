"""Cluster checks verl 0.9.1's `validate_config` does not make; each would fail (or silently change the run)
only after Ray, the workers and vLLM have started.

Every check returns `Problem`s naming the key, its value and what is valid. The verl source of each
failure it anticipates is named next to it (paths relative to the installed `verl` package).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .model import ModelFacts, is_local_path

A = "actor_rollout_ref."


@dataclass(frozen=True)
class Problem:
    key: str
    value: object
    message: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{self.key}={self.value}: {self.message}"


def sel(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(cfg, key, default=default)


@dataclass(frozen=True)
class Geometry:
    """Sizes every check and the plan derive from the config. `sp` splits one micro-batch's tokens over GPUs
    (FSDP: Ulysses sp; Megatron: CP, the factor verl gives its token limit, workers/engine/megatron/
    transformer_impl.py:836); `mp` GPUs hold one model replica (FSDP: sp; Megatron: TP * PP * CP); DP = GPUs / mp."""

    n_gpus: int
    sp: int
    dp: int
    prompt: int
    response: int
    n: int
    train_batch: int
    mini_batch: int
    epochs: int
    use_ref: bool
    mp: int = 0

    @property
    def seq_len(self) -> int:
        return self.prompt + self.response


def geometry(cfg: DictConfig, use_ref: bool) -> Geometry:
    n_gpus = cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node
    actor = cfg.actor_rollout_ref.actor
    if actor.strategy == "megatron":
        m = actor.megatron
        sp = m.context_parallel_size
        mp = m.tensor_model_parallel_size * m.pipeline_model_parallel_size * sp
    else:
        sp = mp = max(actor.ulysses_sequence_parallel_size, actor.fsdp_config.get("ulysses_sequence_parallel_size", 1))
    return Geometry(
        n_gpus=n_gpus, sp=sp, mp=mp, dp=n_gpus // mp if n_gpus % mp == 0 else 0,
        prompt=cfg.data.max_prompt_length, response=cfg.data.max_response_length,
        n=cfg.actor_rollout_ref.rollout.n, train_batch=cfg.data.train_batch_size,
        mini_batch=actor.ppo_mini_batch_size, epochs=actor.ppo_epochs, use_ref=use_ref,
    )


def check_parallel_sizes(cfg, g: Geometry, m: ModelFacts) -> list[Problem]:
    """DP from sp; Ulysses heads (verl/models/transformers/monkey_patch.py:343-348)."""
    out = []
    megatron = cfg.actor_rollout_ref.actor.strategy == "megatron"
    key = A + ("actor.megatron.tensor_model_parallel_size * pipeline * context" if megatron
               else "actor.ulysses_sequence_parallel_size")
    if g.dp == 0:
        out.append(Problem(key, g.mp, f"must divide the GPU count trainer.nnodes * trainer.n_gpus_per_node = {g.n_gpus}"))
    if not megatron and g.sp > 1:
        if m.num_heads % g.sp:
            out.append(Problem(key, g.sp, f"must divide the model's {m.num_heads} attention heads (Ulysses splits heads)"))
        if m.num_kv_heads % g.sp and g.sp % m.num_kv_heads:
            out.append(Problem(key, g.sp, f"must divide the model's {m.num_kv_heads} KV heads or be a multiple of them"))
    return out


def check_batches(cfg, g: Geometry) -> list[Problem]:
    """Mini-batch split over DP (engine_workers.py:267) and batch padding (trainer/ppo/v1/trainer_base.py:1589)."""
    out = []
    if g.dp and (g.mini_batch * g.n) % g.dp:
        out.append(Problem(A + "actor.ppo_mini_batch_size", g.mini_batch,
                           f"ppo_mini_batch_size * rollout.n = {g.mini_batch * g.n} must be divisible by the data-parallel "
                           f"size {g.dp} (GPUs {g.n_gpus} / {g.mp} GPUs per model replica); verl asserts this in the first update"))
    if g.train_batch % g.mini_batch:
        out.append(Problem("data.train_batch_size", g.train_batch,
                           f"must be a multiple of actor.ppo_mini_batch_size={g.mini_batch}: otherwise verl pads the batch "
                           "and the number of updates per rollout batch (the staleness) is not ppo_epochs * "
                           "train_batch_size / ppo_mini_batch_size"))
    if cfg.algorithm.adv_estimator in ("grpo", "bapo") and g.n < 2:
        out.append(Problem(A + "rollout.n", g.n, f"group-normalised advantages ({cfg.algorithm.adv_estimator}) need "
                                                 ">= 2 responses per prompt; with 1 every advantage is 0"))
    return out


def _passes(cfg, g: Geometry) -> list[tuple]:
    """(name, dynamic-bsz key, token-limit key, micro-batch key, sequences per rank, sp) of each forward pass."""
    r = cfg.actor_rollout_ref
    passes = [("actor update (and BAPO's per-update probe, micro-batched like it)", A + "actor.use_dynamic_bsz",
               A + "actor.ppo_max_token_len_per_gpu", A + "actor.ppo_micro_batch_size_per_gpu",
               g.mini_batch * g.n // max(g.dp, 1), g.sp),
              ("old-log-prob pass", A + "rollout.log_prob_use_dynamic_bsz", A + "rollout.log_prob_max_token_len_per_gpu",
               A + "rollout.log_prob_micro_batch_size_per_gpu", g.train_batch * g.n // max(g.dp, 1), g.sp)]
    if g.use_ref:
        ref_sp = r.ref.get("ulysses_sequence_parallel_size", g.sp) or g.sp
        passes.append(("reference log-prob pass", A + "ref.log_prob_use_dynamic_bsz", A + "ref.log_prob_max_token_len_per_gpu",
                       A + "ref.log_prob_micro_batch_size_per_gpu", g.train_batch * g.n // max(g.dp, 1), ref_sp))
    return passes


def check_micro_batches(cfg, g: Geometry) -> list[Problem]:
    """Token limits (utils/seqlen_balancing.py:384) and fixed micro-batch splits (workers/engine/utils.py:125)."""
    out = []
    actor_dynamic = cfg.actor_rollout_ref.actor.use_dynamic_bsz
    if actor_dynamic != cfg.actor_rollout_ref.rollout.log_prob_use_dynamic_bsz:
        out.append(Problem(A + "rollout.log_prob_use_dynamic_bsz", cfg.actor_rollout_ref.rollout.log_prob_use_dynamic_bsz,
                           f"must equal actor.use_dynamic_bsz={actor_dynamic} (engine_workers.py asserts it)"))
    for name, dyn_key, tok_key, micro_key, per_rank, sp in _passes(cfg, g):
        if sel(cfg, dyn_key):
            limit = sel(cfg, tok_key)
            if limit is None or limit * sp < g.seq_len:
                out.append(Problem(tok_key, limit, f"{name}: token limit per GPU * sp ({sp}; Megatron: CP) must be >= max_prompt_length + "
                                                   f"max_response_length = {g.seq_len} (one full sequence per micro-batch)"))
        else:
            micro = sel(cfg, micro_key)
            if micro and g.dp and per_rank % micro:
                out.append(Problem(micro_key, micro, f"{name}: must divide the {per_rank} sequences each data-parallel "
                                                     "rank gets"))
    return out


def check_rollout(cfg, g: Geometry, m: ModelFacts) -> list[Problem]:
    """vLLM layout and lengths (engine_workers.py:658, vllm_async_server.py:1103, rollout/replica.py:107)."""
    out = []
    ro = cfg.actor_rollout_ref.rollout
    tp, key = ro.tensor_model_parallel_size, A + "rollout.tensor_model_parallel_size"
    world = tp * ro.data_parallel_size * ro.pipeline_model_parallel_size
    if g.n_gpus % world:
        out.append(Problem(key, tp, f"TP * rollout DP * PP = {world} must divide the {g.n_gpus} GPUs"))
    if m.num_heads % tp:
        out.append(Problem(key, tp, f"must divide the model's {m.num_heads} attention heads (vLLM)"))
    if m.num_kv_heads % tp and tp % m.num_kv_heads:
        out.append(Problem(key, tp, f"must divide the model's {m.num_kv_heads} KV heads or be a multiple of them (vLLM)"))
    if tp > cfg.trainer.n_gpus_per_node:
        out.append(Problem(key, tp, f"larger than trainer.n_gpus_per_node={cfg.trainer.n_gpus_per_node}: each replica spans "
                                    "nodes and its all-reduces go over the network", fatal=False))
    if g.seq_len > m.max_position_embeddings:
        out.append(Problem("data.max_response_length", g.response,
                           f"max_prompt_length + max_response_length = {g.seq_len} exceeds the model's "
                           f"max_position_embeddings={m.max_position_embeddings} ({m.source})"))
    if ro.max_model_len is not None and ro.max_model_len < g.seq_len:
        out.append(Problem(A + "rollout.max_model_len", ro.max_model_len, f"must be >= prompt + response = {g.seq_len}"))
    if not ro.enable_chunked_prefill and ro.max_num_batched_tokens < g.seq_len:
        out.append(Problem(A + "rollout.max_num_batched_tokens", ro.max_num_batched_tokens,
                           f"without chunked prefill must be >= prompt + response = {g.seq_len} (vLLM refuses to start)"))
    if not 0 < ro.gpu_memory_utilization <= 1:
        out.append(Problem(A + "rollout.gpu_memory_utilization", ro.gpu_memory_utilization, "valid: 0 < value <= 1"))
    return out


def _non_null_leaves(node, prefix: str):
    if isinstance(node, DictConfig):
        for k in node.keys():
            yield from _non_null_leaves(node._get_node(k), f"{prefix}.{k}")
    elif OmegaConf.is_list(node) or node._value() is not None:
        yield prefix, node._value() if not OmegaConf.is_list(node) else list(node)


def check_legacy_reward(cfg) -> list[Problem]:
    """verl 0.9.1 parses the old top-level reward keys and ignores them (only `reward.*` is read)."""
    out = []
    for section, new in (("reward_model", "reward.reward_manager.name / reward.reward_model.* / +reward.reward_kwargs.*"),
                         ("custom_reward_function", "reward.custom_reward_function.*")):
        for key, value in _non_null_leaves(cfg._get_node(section), section):
            out.append(Problem(key, value, f"legacy key: verl 0.9.1's trainer ignores it silently; use {new}"))
    return out


_PATH_KEYS = ("data.train_files", "data.val_files", "trainer.default_local_dir", "trainer.validation_data_dir",
              "trainer.rollout_data_dir", "trainer.resume_from_path")
_REMOTE = ("hdfs://", "s3://", "gs://", "http://", "https://", "pkg://")


def _paths(cfg, key) -> list[str]:
    value = sel(cfg, key)
    if value is None:
        return []
    return [str(v) for v in value] if OmegaConf.is_list(value) else [str(value)]


def check_paths(cfg, env: dict[str, str]) -> list[Problem]:
    """Missing data files (today they fail after Ray started); relative paths on several nodes."""
    out = []
    for key in ("data.train_files", "data.val_files"):
        for path in _paths(cfg, key):
            if not path.startswith(_REMOTE) and not Path(path).expanduser().is_file():
                out.append(Problem(key, path, "file does not exist on this machine"))
    model = str(cfg.actor_rollout_ref.model.path)  # a missing local model dir is refused earlier (core.py)
    if cfg.trainer.nnodes > 1:
        keyed = [(k, p) for k in _PATH_KEYS for p in _paths(cfg, k)]
        keyed += [(A + "model.path", model)] if is_local_path(model) else []
        keyed += [(f"env {k}", v) for k, v in env.items() if k.endswith(("_PATH", "_DIR", "_ROOT", "HF_HOME"))]
        for key, path in keyed:
            if not path.startswith(_REMOTE) and not os.path.isabs(os.path.expanduser(path)):
                out.append(Problem(key, path, f"relative path with trainer.nnodes={cfg.trainer.nnodes}: workers and the "
                                              "Ray job driver run in other directories; use an absolute path on shared storage"))
    return out


def check_misc(cfg, env: dict[str, str]) -> list[Problem]:
    """Strategy aliasing (workers/config/actor.py:325), loggers, Ray resources on a cluster."""
    out = []
    actor = cfg.actor_rollout_ref.actor
    inner = actor.get("fsdp_config", {}).get("strategy", None)
    # verl's default there is "fsdp"; any other value that differs from actor.strategy was set by hand
    if actor.strategy != "megatron" and inner not in (None, "fsdp", actor.strategy):
        out.append(Problem(A + "actor.fsdp_config.strategy", inner, f"ignored: verl copies actor.strategy={actor.strategy} "
                                                                     "over it; set actor_rollout_ref.actor.strategy"))
    loggers = list(cfg.trainer.logger) if OmegaConf.is_list(cfg.trainer.logger) else [cfg.trainer.logger]
    if "wandb" in loggers and not ({"WANDB_API_KEY", "WANDB_MODE"} & (set(env) | set(os.environ))):
        out.append(Problem("trainer.logger", loggers, "wandb without WANDB_API_KEY or WANDB_MODE: wandb.init fails in the "
                                                      "TaskRunner; set the key or drop wandb (trainer.logger=[console,file])"))
    if "file" in loggers and "VERL_FILE_LOGGER_PATH" not in env:
        out.append(Problem("trainer.logger", loggers, "file logger without VERL_FILE_LOGGER_PATH in ray_kwargs.ray_init."
                                                      "runtime_env.env_vars: metrics go to a relative path on whichever node "
                                                      "hosts the TaskRunner", fatal=cfg.trainer.nnodes > 1))
    if cfg.trainer.nnodes > 1 and sel(cfg, "ray_kwargs.ray_init.num_cpus") is not None:
        out.append(Problem("ray_kwargs.ray_init.num_cpus", sel(cfg, "ray_kwargs.ray_init.num_cpus"),
                           "set while joining a multi-node cluster: Ray ignores or refuses resources on connect; keep null",
                           fatal=False))
    if cfg.trainer.save_freq <= 0 and not cfg.trainer.val_only:
        out.append(Problem("trainer.save_freq", cfg.trainer.save_freq, "no checkpoints: a failed run cannot resume and "
                                                                        "there is no model to evaluate", fatal=False))
    return out


def run_env(cfg) -> dict[str, str]:
    env = sel(cfg, "ray_kwargs.ray_init.runtime_env.env_vars") or {}
    return {str(k): str(v) for k, v in env.items()}


def cluster_checks(cfg, g: Geometry, m: ModelFacts) -> list[Problem]:
    """Every check; a val-only run (evaluation) has no training passes, so no batch or micro-batch checks."""
    from .megatron import megatron_checks  # megatron.py builds on this module's Problem and Geometry

    env = run_env(cfg)
    training = [] if cfg.trainer.val_only else [*check_batches(cfg, g), *check_micro_batches(cfg, g)]
    return [*check_parallel_sizes(cfg, g, m), *training, *check_rollout(cfg, g, m), *check_legacy_reward(cfg),
            *check_paths(cfg, env), *check_misc(cfg, env), *megatron_checks(cfg, g, m)]

