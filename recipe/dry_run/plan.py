"""The resource plan the dry run prints: layout, staleness, batch and token arithmetic, FLOPs (verl's own
`FlopsCounter`), cost, and a per-GPU memory estimate. Every number is a formula of the config and the model's
architecture; the formulas are printed with the numbers. The memory estimate is unverified on hardware.

Assumptions (environment, defaults in brackets): DRY_RUN_GPU_GIB GPU memory [80, H100], DRY_RUN_PEAK_TFLOPS
bf16 dense peak per GPU [989, H100/H200 SXM], DRY_RUN_MFU_TRAIN [0.35] and DRY_RUN_MFU_GEN [0.10] model-FLOPs
utilisation of the training passes and of generation, DRY_RUN_MEAN_RESPONSE_FRAC mean response length as a
share of max_response_length [0.7; the paper's Fig. 6: means of 4.7k-7k tokens at 8k].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from . import memory as mem
from .checks import Geometry
from .megatron import layout_of, megatron_memory
from .memory import GIB
from .model import ModelFacts


def _env(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    number = float(value)
    if number <= 0:
        raise ValueError(f"{name}={value}: must be > 0")
    return number


@dataclass
class Plan:
    gpus: int
    nodes: int
    dp: int
    sp: int
    rollout_tp: int
    replicas: int
    staleness: float
    responses_per_step: int
    seqs_per_update: int
    seqs_per_update_per_rank: int
    micro_batches_per_update: int  # per rank; dynamic bsz: at full length (upper bound)
    tokens_per_step_max: int
    tokens_per_step_mean: int
    flops: dict[str, float]  # per training step, by pass
    hours_per_step: float
    gpu_hours_per_step: float
    steps: int | None
    memory_gib: dict[str, float]
    kv_tokens_per_replica: int
    kv_concurrent_seqs: int
    gpu_gib: float
    lines: list[str] = field(default_factory=list)

    def memory_warnings(self) -> list[str]:
        """Phases whose estimated per-GPU memory exceeds the assumed GPU (an estimate: a warning, not an error)."""
        over = {"train peak": "the actor update (lower ppo_max_token_len_per_gpu, raise sp)",
                "rollout phase total": "the rollout (offload params and optimizer, or lower gpu_memory_utilization)"}
        return [f"estimated {self.memory_gib[k]:.1f} GiB per GPU in {what} > DRY_RUN_GPU_GIB={self.gpu_gib:g}"
                for k, what in over.items() if self.memory_gib[k] > self.gpu_gib]

    def text(self) -> str:
        return "\n".join(self.lines)


def _train_flops(m: ModelFacts, seqlens: list[int]) -> float:
    """Forward + backward FLOPs of these sequences: the per-architecture function behind verl's
    `FlopsCounter.estimate_flops` (TFLOP/s over delta_time), called directly because `estimate_flops` also
    queries the CUDA device's peak."""
    from verl.utils.flops_counter import ESTIMATE_FUNC

    if m.model_type not in ESTIMATE_FUNC:
        raise ValueError(f"model_type={m.model_type}: verl's FlopsCounter knows {sorted(ESTIMATE_FUNC)}")
    return ESTIMATE_FUNC[m.model_type](m.hf_config, sum(seqlens), seqlens, 1.0) * 1e12


def make_plan(cfg, g: Geometry, m: ModelFacts) -> Plan:
    actor, ro = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    gpu_gib, peak = _env("DRY_RUN_GPU_GIB", 80), _env("DRY_RUN_PEAK_TFLOPS", 989) * 1e12
    mfu_train, mfu_gen = _env("DRY_RUN_MFU_TRAIN", 0.35), _env("DRY_RUN_MFU_GEN", 0.10)
    frac = _env("DRY_RUN_MEAN_RESPONSE_FRAC", 0.7)
    P = m.num_params
    B, M = g.train_batch * g.n, g.mini_batch * g.n
    per_rank = M // max(g.dp, 1)
    staleness = g.epochs * g.train_batch / g.mini_batch
    replica_world = ro.tensor_model_parallel_size * ro.data_parallel_size * ro.pipeline_model_parallel_size
    mean_len = g.prompt + round(frac * g.response)

    if actor.use_dynamic_bsz:
        t_gpu = actor.ppo_max_token_len_per_gpu
        micro = math.ceil(per_rank * g.seq_len / (t_gpu * g.sp))
        micro_formula = (f"ceil(seqs/rank * (P+R) / (ppo_max_token_len_per_gpu * sp)) at full length; "
                         f"{math.ceil(per_rank * mean_len / (t_gpu * g.sp))} at the mean length")
    else:
        t_gpu = actor.ppo_micro_batch_size_per_gpu * g.seq_len
        micro = per_rank // actor.ppo_micro_batch_size_per_gpu
        micro_formula = "seqs/rank / ppo_micro_batch_size_per_gpu"

    # FLOPs per training step at the mean length: update = ppo_epochs x (fwd+bwd of every response);
    # each forward-only pass = 1/3 of fwd+bwd
    one = _train_flops(m, [mean_len] * B)
    policy_loss = actor.policy_loss
    flops = {"generation (forward of every token)": one / 3, "old-log-prob pass": one / 3,
             "actor update (ppo_epochs x fwd+bwd)": g.epochs * one}
    if g.use_ref:
        flops["reference log-prob pass"] = one / 3
    if policy_loss.loss_mode == "bapo" and policy_loss.get("scope", None) == "update":
        flops["BAPO per-update probe (one forward per update)"] = g.epochs * one / 3
    gen = flops["generation (forward of every token)"]
    seconds = gen / (g.n_gpus * peak * mfu_gen) + (sum(flops.values()) - gen) / (g.n_gpus * peak * mfu_train)
    steps = cfg.trainer.total_training_steps

    # memory per GPU (bytes)
    H, L, I, V = m.hidden_size, m.num_layers, m.intermediate_size, m.vocab_size
    layout = layout_of(cfg, g)
    if layout is not None:  # Megatron: its own terms and formula lines (megatron.py)
        megatron = megatron_memory(layout, m, t_gpu, cfg.trainer.n_gpus_per_node)
        states, acts, logits, train_peak = megatron.states, megatron.activations, megatron.logits, megatron.update_peak
    else:
        engine = actor.fsdp_config
        F = engine.fsdp_size if engine.get("fsdp_size", -1) > 0 else g.n_gpus
        states = mem.fsdp_model_states(P, F)
        states_formula = f"16 B * P / FSDP group ({F})"
        offload = bool(engine.get("param_offload", False) or engine.get("optimizer_offload", False))
        policy_offload = bool(engine.get("offload_policy", False))
        gathered = mem.gathered_layers(m.largest_layer_params)
        ckpt = cfg.actor_rollout_ref.model.enable_gradient_checkpointing
        acts = mem.activations(t_gpu, H, I, L, ckpt)
        logits = mem.logits(t_gpu, V)
        train_peak = (0 if policy_offload else states) + gathered + acts + logits
    tp = ro.tensor_model_parallel_size
    vllm_weights = mem.vllm_weights(P, tp)
    kv_per_token = mem.kv_per_token(L, m.num_kv_heads, m.head_dim, tp)
    kv_room = mem.kv_room(ro.gpu_memory_utilization, gpu_gib * GIB, vllm_weights)
    kv_tokens = int(kv_room // kv_per_token)
    if layout is not None:
        resident = megatron.resident_in_rollout
    else:
        resident = 0 if (engine.get("param_offload", False) and engine.get("optimizer_offload", False)) or policy_offload \
            else states
    memory = {"model states": states / GIB, "train peak": train_peak / GIB, "activations": acts / GIB,
              "logits": logits / GIB, "vllm weights": vllm_weights / GIB, "kv cache": kv_room / GIB,
              "rollout phase total": (resident + ro.gpu_memory_utilization * gpu_gib * GIB) / GIB}

    plan = Plan(
        gpus=g.n_gpus, nodes=cfg.trainer.nnodes, dp=g.dp, sp=g.sp, rollout_tp=tp,
        replicas=g.n_gpus // replica_world if g.n_gpus % replica_world == 0 else 0,
        staleness=staleness, responses_per_step=B, seqs_per_update=M, seqs_per_update_per_rank=per_rank,
        micro_batches_per_update=micro, tokens_per_step_max=B * g.seq_len, tokens_per_step_mean=B * mean_len,
        flops=flops, hours_per_step=seconds / 3600, gpu_hours_per_step=g.n_gpus * seconds / 3600, steps=steps,
        memory_gib=memory, kv_tokens_per_replica=kv_tokens, kv_concurrent_seqs=kv_tokens // g.seq_len, gpu_gib=gpu_gib,
    )
    gib = lambda x: f"{x / GIB:.1f} GiB"  # noqa: E731
    total = sum(flops.values())
    if layout is not None:
        actor_lines = list(megatron.lines)
        host_line = megatron.host_line
    else:
        actor_lines = [
            f"  actor model states   {states_formula} = {gib(states)} (fp32 params, grads, Adam m and v; "
            + ("param/optimizer offload: on the host between phases, back on the GPU for the update)" if offload and not
               policy_offload else "offload_policy: kept on the host)" if policy_offload else "resident all run)"),
            f"  gathered layer       2 layers * 2 B * {m.largest_layer_params:,} params = {gib(gathered)}",
            f"  activations          {'L * T * H * 2 B (checkpoints) + ' if ckpt else 'L * '}T * (6H + 3I) * 2 B (one layer), "
            f"T = {t_gpu} tokens per GPU = {gib(acts)}",
            f"  logits               T * V * (2 + 4 + 4) B (bf16 logits, fp32 log-softmax and its gradient) = {gib(logits)}",
        ]
        host_line = (f"  host memory          actor model states * GPUs per node = "
                     f"{states * cfg.trainer.n_gpus_per_node / GIB:.0f} GiB per node") if offload else None
    dp_formula = (f"GPUs / (TP*PP*CP) = {g.n_gpus} / ({layout.tp}*{layout.pp}*{layout.cp})" if layout is not None
                  else f"GPUs / sp = {g.n_gpus} / {g.sp}")
    lines = [
        f"model      {m.model_type}, {P:,} parameters (from the module shapes on the meta device), "
        f"L={L} H={H} heads={m.num_heads} kv={m.num_kv_heads} head_dim={m.head_dim} V={V}; facts: {m.source}",
        f"layout     {g.n_gpus} GPUs = {cfg.trainer.nnodes} nodes x {cfg.trainer.n_gpus_per_node}; actor DP = {dp_formula} = "
        f"{g.dp}; rollout: TP {tp}, replicas = GPUs / (TP*DP*PP) = {plan.replicas}",
        f"staleness  U = ppo_epochs * train_batch_size / ppo_mini_batch_size = {g.epochs} * {g.train_batch} / "
        f"{g.mini_batch} = {staleness:g} optimizer updates per rollout batch",
        f"batch      responses per step B = train_batch_size * n = {g.train_batch} * {g.n} = {B}; per update "
        f"M = ppo_mini_batch_size * n = {M}, per DP rank M/DP = {per_rank}; micro-batches per update per rank "
        f"= {micro} ({micro_formula})",
        f"tokens     per step: max B*(P+R) = {B} * {g.seq_len} = {B * g.seq_len:,}; at mean length P + "
        f"{frac:g}*R = {mean_len}: {B * mean_len:,}",
        f"FLOPs      per step at the mean length (verl FlopsCounter, fwd+bwd = 6*N*T + attention; forward = 1/3): "
        f"{total:.3g} total",
        *[f"             {name}: {value:.3g}" for name, value in flops.items()],
        f"time       per step ~ generation / (GPUs * peak * {mfu_gen:g}) + the rest / (GPUs * peak * {mfu_train:g}), "
        f"peak {peak / 1e12:g} TFLOP/s: {seconds / 60:.1f} min, {plan.gpu_hours_per_step:.2f} GPU-hours"
        + (f"; x {steps} steps = {plan.gpu_hours_per_step * steps:,.0f} GPU-hours (estimate)" if steps else ""),
        f"memory     per GPU, estimate (formulas, unverified on hardware; GPU {gpu_gib:g} GiB assumed):",
        *actor_lines,
        f"  update peak          {gib(train_peak)}" + ("  > GPU memory" if train_peak > gpu_gib * GIB else ""),
        f"  vLLM weights         2 B * P / TP = {gib(vllm_weights)}; KV per token per GPU = 2 * L * ceil(kv/TP) * "
        f"head_dim * 2 B = {kv_per_token / 1024:.0f} KiB",
        f"  vLLM KV cache        gpu_memory_utilization * GPU - weights - 2 GiB = {gib(kv_room)} -> {kv_tokens:,} tokens "
        f"per replica, {plan.kv_concurrent_seqs} concurrent sequences of P+R = {g.seq_len}",
        f"  rollout phase        resident actor states + gpu_memory_utilization * GPU = {memory['rollout phase total']:.1f} GiB"
        + ("  > GPU memory: offload params and optimizer, or lower gpu_memory_utilization"
           if memory["rollout phase total"] > gpu_gib else ""),
    ]
    if host_line:
        lines.append(host_line)
    plan.lines = lines
    return plan
