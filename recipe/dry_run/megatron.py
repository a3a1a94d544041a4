"""Megatron actors in the dry run (`model_engine=megatron`): the layout read from the config, and the checks that
verl 0.9.1 and megatron-core make only once the workers have started (or make in a way that silently changes the
run). Each returns `Problem`s naming the key, its value and what is valid; the source of the failure it anticipates
is cited next to it (verl paths relative to the installed `verl` package; megatron-core 0.16.1, the newest release
that installs on Python 3.11, paths relative to `megatron/core`). The memory arithmetic is in memory.py (pure).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from .checks import A, Geometry, Problem, sel
from .model import ModelFacts

M = A + "actor.megatron."
OVERRIDE = M + "override_transformer_config."


@dataclass(frozen=True)
class MegatronLayout:
    tp: int
    pp: int
    vpp: int  # 1 = no interleaving
    cp: int
    ep: int
    etp: int
    dp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: str  # "full", "selective" or "none" (override_transformer_config.recompute_granularity)
    recompute_num_layers: int
    microbatch_group: int  # microbatch_group_size_per_vp_stage
    dynamic_cp: bool
    param_offload: bool
    optimizer_offload: bool


def layout_of(cfg: DictConfig, g: Geometry) -> MegatronLayout | None:
    """The actor's Megatron layout; None for any other engine."""
    actor = cfg.actor_rollout_ref.actor
    if actor.strategy != "megatron":
        return None
    m = actor.megatron
    over = m.get("override_transformer_config") or {}
    pp = m.pipeline_model_parallel_size
    # megatron-core defaults the group to PP (model_parallel_config.py:447-448)
    group = over.get("microbatch_group_size_per_vp_stage", None) or pp
    return MegatronLayout(
        tp=m.tensor_model_parallel_size, pp=pp, vpp=m.virtual_pipeline_model_parallel_size or 1,
        cp=m.context_parallel_size, ep=m.expert_model_parallel_size,
        etp=m.expert_tensor_parallel_size or m.tensor_model_parallel_size, dp=g.dp,
        # verl turns sequence parallelism off at TP 1 (workers/config/engine.py:234-236)
        sequence_parallel=bool(m.sequence_parallel) and m.tensor_model_parallel_size > 1,
        distributed_optimizer=bool(m.use_distributed_optimizer),
        recompute=over.get("recompute_granularity", None) or "none",
        recompute_num_layers=over.get("recompute_num_layers", None) or 1,
        microbatch_group=group, dynamic_cp=bool(m.dynamic_context_parallel),
        param_offload=bool(m.param_offload), optimizer_offload=bool(m.optimizer_offload),
    )


def _check_sizes(layout: MegatronLayout, g: Geometry, m: ModelFacts, over) -> list[Problem]:
    """TP / PP / VPP / EP against the GPUs, heads and layers (megatron-core raises these at model build)."""
    out = []
    tp_key = M + "tensor_model_parallel_size"
    # the TP * PP * CP vs GPUs check is check_parallel_sizes' (parallel_state.py:740-741)
    if m.num_heads % layout.tp:  # transformer/transformer_config.py:924-928
        out.append(Problem(tp_key, layout.tp, f"must divide the model's {m.num_heads} attention heads (Megatron splits "
                                              "heads over TP)"))
    if m.num_kv_heads % layout.tp and layout.tp % m.num_kv_heads:  # transformer_config.py:939-946
        out.append(Problem(tp_key, layout.tp, f"must divide the model's {m.num_kv_heads} KV heads (query groups) or be "
                                              "a multiple of them"))
    if layout.ep > 1:
        experts = getattr(m.hf_config, "num_experts", None) or getattr(m.hf_config, "num_local_experts", None)
        if not experts:
            out.append(Problem(M + "expert_model_parallel_size", layout.ep, f"the model ({m.model_type}) has no "
                                                                            "experts; valid: 1"))
        elif g.n_gpus % (layout.etp * layout.ep * layout.pp):  # parallel_state.py:789-794
            out.append(Problem(M + "expert_model_parallel_size", layout.ep,
                               f"expert TP {layout.etp} * EP * PP {layout.pp} must divide the {g.n_gpus} GPUs"))
    # transformer_config.py:1447-1460: the layers (plus the embedding / loss when counted in the split) per stage
    layers = m.num_layers + sum(bool(over.get(k)) for k in ("account_for_embedding_in_pipeline_split",
                                                           "account_for_loss_in_pipeline_split"))
    uneven = any(over.get(k) is not None for k in ("num_layers_in_first_pipeline_stage",
                                                    "num_layers_in_last_pipeline_stage", "pipeline_model_parallel_layout"))
    if not uneven and layers % layout.pp:
        out.append(Problem(M + "pipeline_model_parallel_size", layout.pp,
                           f"must divide the model's {layers} layers (num_hidden_layers"
                           + (" plus embedding/loss counted in the split" if layers != m.num_layers else "")
                           + "; or set override_transformer_config.num_layers_in_first/last_pipeline_stage)"))
    if layout.vpp > 1:
        vpp_key = M + "virtual_pipeline_model_parallel_size"
        if layout.pp == 1:  # parallel_state.py:745-748
            out.append(Problem(vpp_key, layout.vpp, "interleaving needs pipeline_model_parallel_size > 1; valid here: null"))
        elif not uneven and not layers % layout.pp and (layers // layout.pp) % layout.vpp:  # transformer_config.py:1469-1477
            out.append(Problem(vpp_key, layout.vpp, f"must divide the {layers // layout.pp} layers of each pipeline stage "
                                                    f"({layers} layers / PP {layout.pp})"))
    return out


def _check_context_parallel(cfg, layout: MegatronLayout) -> list[Problem]:
    """CP needs packed sequences; BAPO refuses dynamic CP (recipe/bapo/worker.py: log-probs on one rank only)."""
    out = []
    if layout.cp > 1 and not cfg.actor_rollout_ref.model.use_remove_padding:
        # engine_workers.py:630 copies it into the engine; models/mcore/util.py:228 asserts packing under CP
        out.append(Problem(A + "model.use_remove_padding", False, f"context_parallel_size={layout.cp} needs packed "
                                                                  "sequences (verl: 'Context parallel size without "
                                                                  "seq_pack is not supported'); set it True"))
    if layout.dynamic_cp and cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "bapo":
        out.append(Problem(M + "dynamic_context_parallel", True, "refused by the bapo loss at actor start-up: "
                                                                  "log-probs come back on one rank only, so the ranks "
                                                                  "of one optimizer step would search different bounds; "
                                                                  "set it False (static context_parallel_size works)"))
    return out


def _micro_batch_passes(cfg, g: Geometry) -> list[tuple[str, str, str, int]]:
    """(name, dynamic-bsz key, fixed micro-batch key, sequences per rank) of each Megatron forward pass."""
    per_update, per_batch = g.mini_batch * g.n // max(g.dp, 1), g.train_batch * g.n // max(g.dp, 1)
    passes = [("actor update and BAPO's per-update probe", A + "actor.use_dynamic_bsz",
               A + "actor.ppo_micro_batch_size_per_gpu", per_update),
              ("old-log-prob pass", A + "rollout.log_prob_use_dynamic_bsz",
               A + "rollout.log_prob_micro_batch_size_per_gpu", per_batch)]
    if g.use_ref:
        passes.append(("reference log-prob pass", A + "ref.log_prob_use_dynamic_bsz",
                       A + "ref.log_prob_micro_batch_size_per_gpu", per_batch))
    return passes


def _check_virtual_pipeline(cfg, g: Geometry, layout: MegatronLayout) -> list[Problem]:
    """Under VPP verl asserts every pass's micro-batch count is a multiple of microbatch_group_size_per_vp_stage
    (workers/engine/megatron/transformer_impl.py:873-918; with dynamic bsz it rounds the count up to one,
    utils/seqlen_balancing.py:407-408), and megatron-core needs PP <= group <= micro-batches
    (pipeline_parallel/schedules.py:995-1004). The probe is micro-batched like the update, so it passes with it."""
    if layout.vpp <= 1 or not g.dp:
        return []
    out = []
    group = layout.microbatch_group
    if group < layout.pp:
        out.append(Problem(OVERRIDE + "microbatch_group_size_per_vp_stage", group,
                           f"must be >= pipeline_model_parallel_size={layout.pp} under virtual pipelining"))
    for name, dyn_key, micro_key, per_rank in _micro_batch_passes(cfg, g):
        micro = sel(cfg, micro_key)
        if sel(cfg, dyn_key) or not micro or per_rank % micro:
            continue  # dynamic bsz rounds up; a non-dividing micro-batch is check_micro_batches' problem
        count = per_rank // micro
        if count % group:
            out.append(Problem(micro_key, micro, f"{name}: {per_rank} sequences per rank / {micro} = {count} "
                                                 f"micro-batches, not a multiple of microbatch_group_size_per_vp_stage="
                                                 f"{group} (virtual pipeline; verl asserts it in the first pass)"))
    return out


def _check_recompute(cfg, layout: MegatronLayout) -> list[Problem]:
    """Megatron's engine never reads model.enable_gradient_checkpointing (FSDP's switch): a warning."""
    if layout.recompute == "none" and cfg.actor_rollout_ref.model.enable_gradient_checkpointing:
        return [Problem(OVERRIDE + "recompute_granularity", None,
                        "Megatron ignores model.enable_gradient_checkpointing: no layer is recomputed (set "
                        "recompute_granularity=full, recompute_method=uniform, recompute_num_layers=1 to match FSDP)",
                        fatal=False)]
    return []


def _check_engine(cfg) -> list[Problem]:
    """verl's Megatron engine builds through a bridge only (workers/engine/megatron/transformer_impl.py:191)."""
    use_mbridge = sel(cfg, M + "use_mbridge")
    if not use_mbridge:
        return [Problem(M + "use_mbridge", use_mbridge, "verl 0.9.1's Megatron engine asserts it is True")]
    return []


def megatron_checks(cfg: DictConfig, g: Geometry, m: ModelFacts) -> list[Problem]:
    """Every Megatron check; [] for other engines. Rollout TP has no relation to the actor layout in verl 0.9.1's
    colocated mode: the engine exports full Hugging Face tensors (transformer_impl.py:1033-1047), so rollout TP is
    checked against the GPUs and heads only (check_rollout)."""
    layout = layout_of(cfg, g)
    if layout is None:
        return []
    over = OmegaConf.to_container(cfg.actor_rollout_ref.actor.megatron.get("override_transformer_config") or {})
    training = [] if cfg.trainer.val_only else _check_virtual_pipeline(cfg, g, layout)
    return [*_check_sizes(layout, g, m, over), *_check_context_parallel(cfg, layout), *training,
            *_check_recompute(cfg, layout), *_check_engine(cfg)]


@dataclass(frozen=True)
class MegatronMemory:
    """Per-GPU bytes of a Megatron actor (busiest stage) and the plan lines stating each formula."""

    params_per_gpu: float
    params_grads: float
    optimizer: float
    activations: float
    logits: float
    resident_in_rollout: float  # what offload leaves on the GPU while vLLM runs
    lines: tuple[str, ...]  # model states, activations, logits
    host_line: str | None  # offloaded states per node

    @property
    def states(self) -> float:
        return self.params_grads + self.optimizer

    @property
    def update_peak(self) -> float:  # offloaded states come back for the update
        return self.states + self.activations + self.logits


def megatron_memory(layout: MegatronLayout, m: ModelFacts, tokens_per_gpu: int, gpus_per_node: int) -> MegatronMemory:
    """memory.py's Megatron terms for this layout, with the formulas printed beside the numbers."""
    from . import memory as mem

    gib = lambda x: f"{x / mem.GIB:.1f} GiB"  # noqa: E731
    L, H, I, V, T = m.num_layers, m.hidden_size, m.intermediate_size, m.vocab_size, tokens_per_gpu
    p_gpu = mem.megatron_params_per_gpu(m.num_params, V, H, m.tie_word_embeddings, layout.tp, layout.pp)
    dp_cp = layout.dp * layout.cp
    params_grads, optimizer = mem.megatron_model_state_parts(p_gpu, dp_cp, layout.distributed_optimizer)
    acts = mem.megatron_activations(T, H, I, L, layout.tp, layout.pp, layout.vpp, layout.recompute,
                                    layout.recompute_num_layers)
    logits = mem.megatron_logits(T, V, layout.tp)
    in_flight = mem.megatron_layers_in_flight(L, layout.pp, layout.vpp)
    resident = (0.0 if layout.param_offload else params_grads) + (0.0 if layout.optimizer_offload else optimizer)
    n = layout.recompute_num_layers
    act_formula = (f"full recompute: ceil(L_f / {n}) * T * H * 2 B + {n} * T * (6H + 3I) * 2 B" if layout.recompute == "full"
                   else f"{layout.recompute} recompute: L_f * T * (6H + 3I) * 2 B")
    where = "optimizer" if layout.distributed_optimizer else "optimizer (no distributed optimizer)"
    offloaded = [name for name, on in (("params+grads", layout.param_offload), ("optimizer", layout.optimizer_offload)) if on]
    lines = [
        f"  actor model states   params+grads (2 + 4) B * P_gpu + {where} 12 B * P_gpu / (DP*CP = {dp_cp}); "
        f"P_gpu = (P - E) / (TP*PP) + E_stage / TP = {p_gpu:,.0f} (TP {layout.tp}, PP {layout.pp}, E = embedding + "
        f"output tables) = {gib(params_grads)} + {gib(optimizer)} = {gib(params_grads + optimizer)} ("
        + (f"{' and '.join(offloaded)} on the host between phases, back on the GPU for the update)" if offloaded
           else "resident all run)"),
        f"  activations          {act_formula}, / TP ({layout.tp}); L_f = L * (1 + (PP-1)/(PP*VPP)) = {in_flight:g} "
        f"layers in flight (PP {layout.pp}, VPP {layout.vpp}), T = {T} tokens per GPU (CP {layout.cp} splits "
        f"{T * layout.cp}) = {gib(acts)}",
        f"  logits               T * V/TP * (2 + 4 + 4) B (last stage, vocab-parallel) = {gib(logits)}",
    ]
    host = params_grads * layout.param_offload + optimizer * layout.optimizer_offload
    host_line = (f"  host memory          offloaded states * GPUs per node = {host * gpus_per_node / mem.GIB:.0f} GiB "
                 "per node") if offloaded else None
    return MegatronMemory(p_gpu, params_grads, optimizer, acts, logits, resident, tuple(lines), host_line)
