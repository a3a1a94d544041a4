"""BAPO's per-update hook inside verl 0.9.1's actor: exact `scope: update` bounds and imbalance metrics.

verl runs one optimizer step in `TrainingWorker.train_batch` (zero_grad -> forward/backward over the
micro-batches -> step) and shows the loss one micro-batch at a time. The paper searches the bounds
once per update over that update's whole batch, so before the gradient pass `BAPOTrainingWorker`
1. computes the current policy's log-probs of the whole mini-batch of the step: one no-grad forward
   through the engine, micro-batched exactly like the gradient pass (same micro-batch keys, so the
   same partition and GEMM shapes: the ratios equal the loss's bit for bit on a deterministic
   engine; the batch's per-sample non-tensor entries that no verl 0.9.1 engine forward reads are left
   out, `PROBE_PER_SAMPLE_KEYS` kept) -- or skips that forward when r = 1 provably (`_log_probs_are_current`);
2. sums the search statistics over them and over the data-parallel group (one all-reduce);
3. stores the chosen bounds where the "bapo" loss reads them (`BAPOPolicyLossConfig.update_state`),
   so every micro-batch of the step uses the same bounds; they are cleared after the step.

It is installed for every run (verl builds the actor from the class attribute
`ActorRolloutRefWorker.actor_worker_cls`, and the loss is only known later, in `set_loss_fn`), so it
is inert unless the policy loss opts in: the search only for the "bapo" loss with `scope: update`,
the imbalance metrics only with `policy_loss.imbalance_metrics` (BAPOPolicyLossConfig,
BaselinePolicyLossConfig). With verl's own PolicyLossConfig it runs verl's methods unchanged.

verl internals touched: `TrainingWorker.{set_loss_fn, infer_batch, train_mini_batch, train_batch,
load_checkpoint}` (overridden, each calling verl's), `engine.{infer_batch, train_mode,
get_data_parallel_group, is_mp_src_rank_with_outputs, module}`, `engine_config.{use_dynamic_bsz,
max_token_len_per_gpu, micro_batch_size_per_gpu, use_fused_kernels, dynamic_context_parallel}`, and
the loss-function keywords verl binds (`functools.partial(ppo_loss, config=actor_config)`).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.distributed as dist
from tensordict import NonTensorStack, TensorDict

from bapo_core import ClipSearchResult, path_contributions, reduce_and_select
from verl.utils import tensordict_utils as tu
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker
from verl.workers.utils.padding import no_padding_2_padding

from . import trace
from .config import BAPOPolicyLossConfig
from .loss import log_ratio_of, rho_weights

logger = logging.getLogger(__name__)

# Per-sample non-tensor entries a verl 0.9.1 engine forward reads (FSDP and Megatron: multi-modal inputs).
PROBE_PER_SAMPLE_KEYS = ("multi_modal_inputs",)


def actor_config_of_loss_fn(loss_fn):
    """The actor config verl binds into its loss (functools.partial(ppo_loss, config=actor_config))."""
    return getattr(loss_fn, "keywords", {}).get("config")


def padded_fields(data: TensorDict, *names: str) -> dict[str, torch.Tensor]:
    """(bsz, max_resp_len) padded copies of nested per-response fields, as verl's ppo_loss reads them."""
    present = [n for n in names if n in data.keys()]
    padded = data.select(*present).to_padded_tensor()
    return {n: padded[n] for n in present}


def row_fingerprints(log_probs: torch.Tensor, mask: torch.Tensor) -> set[tuple[int, float]]:
    """One exact key per response: (its length, the float64 sum of its log-probs). (bsz, resp_len) in."""
    mask = mask.bool()
    sums = torch.where(mask, log_probs.double(), 0.0).sum(-1)
    return set(zip(mask.sum(-1).tolist(), sums.tolist()))


def weights_fingerprint(engine) -> Optional[tuple[int, ...]]:
    """An exact checksum of this rank's parameter values (their bits summed as integers); None when
    the engine exposes no module. Equal checksums mean the same weights up to permuted values."""
    module = getattr(engine, "module", None)
    if module is None:
        return None
    sums = []
    for chunk in module if isinstance(module, (list, tuple)) else [module]:
        for param in chunk.parameters():
            local = param.detach()
            local = local.to_local() if hasattr(local, "to_local") else local  # FSDP2 DTensor shard
            flat = local.reshape(-1)
            if flat.numel() == 0:
                continue
            bits = flat.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
            sums += [bits.sum(dtype=torch.int64), bits[1::3].sum(dtype=torch.int64)]  # the second sees order
    return tuple(torch.stack(sums).tolist()) if sums else ()


class BAPOTrainingWorker(TrainingWorker):
    """verl's TrainingWorker plus BAPO's per-update bound search (see module docstring)."""

    _bapo: Optional[BAPOPolicyLossConfig] = None  # set by set_loss_fn when the actor loss is "bapo"
    _actor_config = None  # the ActorConfig verl's loss is bound to
    _imbalance_metrics_on = False
    # the last plain log-prob pass (adapter on, no loss): its rows, its weights, optimizer steps since
    _log_prob_rows: Optional[set] = None
    _log_prob_weights: Optional[tuple] = None
    _steps_since_log_prob = 0

    def set_loss_fn(self, loss_fn):
        actor_config = self._actor_config = actor_config_of_loss_fn(loss_fn)
        policy_loss = getattr(actor_config, "policy_loss", None)
        self._bapo = policy_loss if isinstance(policy_loss, BAPOPolicyLossConfig) else None
        self._imbalance_metrics_on = bool(getattr(policy_loss, "imbalance_metrics", False))
        if self._bapo is not None:
            if getattr(self.engine_config, "dynamic_context_parallel", False):
                raise ValueError(
                    "BAPO does not support Megatron dynamic context parallel "
                    "(actor_rollout_ref.actor.megatron.dynamic_context_parallel=True): log-probs come back on one "
                    "rank only, so the ranks of one optimizer step would search different bounds. Turn it off."
                )
            self._bapo.update_state.dp_group = self.engine.get_data_parallel_group()
            loss_fn = self._capture_entropy(loss_fn, self._bapo)
        super().set_loss_fn(loss_fn)

    @staticmethod
    def _capture_entropy(loss_fn, bapo: BAPOPolicyLossConfig):
        """Wrap verl's loss so the bapo loss sees the gradient pass's per-position entropy (when verl computes it)."""

        @functools.wraps(loss_fn)
        def with_entropy(**kwargs):  # verl's engines call loss_function(model_output=..., data=..., dp_group=...)
            entropy = kwargs["model_output"].get("entropy", None)
            bapo.update_state.entropy = None if entropy is None else no_padding_2_padding(entropy, kwargs["data"]).detach()
            try:
                return loss_fn(**kwargs)
            finally:
                bapo.update_state.entropy = None

        return with_entropy

    def infer_batch(self, data: TensorDict) -> TensorDict:
        plain_log_prob_pass = not tu.get(data, key="compute_loss", default=True) and not tu.get(
            data, key="no_lora_adapter", default=False
        )  # verl's infer_batch pops no_lora_adapter: read it first
        output = super().infer_batch(data)
        if plain_log_prob_pass and self._bapo is not None:
            self._remember_log_prob_pass(data, output)
        return output

    def load_checkpoint(self, *args, **kwargs):
        self._log_prob_rows = None  # the weights change under the stored log-probs
        return super().load_checkpoint(*args, **kwargs)

    def train_mini_batch(self, data: TensorDict) -> TensorDict:
        imbalance = self._imbalance_metrics(data) if self._imbalance_metrics_on else {}
        output = super().train_mini_batch(data)
        if output is not None and imbalance:
            metrics = tu.get(output, "metrics")
            metrics.update({key: [value] for key, value in imbalance.items()})
        return output

    def train_batch(self, data: TensorDict) -> TensorDict:
        bapo = self._bapo
        if bapo is None or bapo.scope != "update":
            return self._optimizer_step(data)
        state = bapo.update_state
        state.bounds = self._search_update_bounds(data, bapo)
        state.micro_batch_index = 0
        if state.bounds is not None:
            trace.record("update", update=state.update_index + 1, ratio_assumed_one=state.ratio_assumed_one, **state.bounds.__dict__)
        try:
            return self._optimizer_step(data)
        finally:
            state.bounds = None

    def _optimizer_step(self, data: TensorDict) -> TensorDict:
        if self._bapo is not None:
            self._bapo.update_state.update_index += 1
        try:
            return super().train_batch(data)
        finally:
            self._steps_since_log_prob += 1

    # ------------------------------------------------------------------ the r = 1 shortcut
    def _remember_log_prob_pass(self, data: TensorDict, output: Optional[TensorDict]) -> None:
        """Record which log-probs this pass produced (ranks with outputs) and from which weights."""
        self._steps_since_log_prob = 0
        self._log_prob_weights = weights_fingerprint(self.engine)
        self._log_prob_rows = None
        log_probs = None if output is None else output.get("log_probs", None)
        if log_probs is not None:
            mask = padded_fields(data, "response_mask")["response_mask"]
            self._log_prob_rows = row_fingerprints(no_padding_2_padding(log_probs, data), mask)

    def _log_probs_are_current(self, fields: dict[str, torch.Tensor]) -> bool:
        """True when r = 1 exactly: the step's old log-probs are, bit for bit, rows of this worker's last
        plain log-prob pass, and the weights are, bit for bit, the ones that pass used.

        That excludes old log-probs from the rollout (bypass mode), from an adapter-disabled pass (LoRA
        reference), or computed after restoring other weights (verl's separate_async and fully_async
        trainers save, restore and re-restore weights around compute_log_prob, invisibly to this
        worker). All ranks agree (one MIN all-reduce); ranks without model outputs (Megatron pipeline
        stages before the last, tensor-parallel peers) judge the weights only.
        """
        if not self._bapo.ratio_one_shortcut or self._log_prob_weights is None or self._steps_since_log_prob > 0:
            return False  # every rank knows this alike (same calls, same steps): no collective needed
        ok = weights_fingerprint(self.engine) == self._log_prob_weights
        if self.engine.is_mp_src_rank_with_outputs():
            rows = row_fingerprints(fields["old_log_probs"], fields["response_mask"])
            ok = ok and self._log_prob_rows is not None and rows <= self._log_prob_rows
        flag = torch.tensor([float(ok)], device=fields["old_log_probs"].device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every actor rank runs this step
        return bool(flag.item())

    # ------------------------------------------------------------------ the search
    def _search_update_bounds(self, data: TensorDict, bapo: BAPOPolicyLossConfig) -> Optional[ClipSearchResult]:
        """Bounds for the optimizer step on `data` (this rank's share of the mini-batch).

        Returns None on ranks that never run the loss (Megatron pipeline stages before the last).
        """
        fields = padded_fields(data, "response_mask", "old_log_probs", "advantages", "rollout_is_weights")
        mask = fields["response_mask"].bool()
        ratio_is_one = self._log_probs_are_current(fields)
        if ratio_is_one:
            ratio = torch.ones_like(fields["old_log_probs"])
        else:
            log_prob = self._current_log_probs(data)
            if log_prob is None:
                return None
            log_ratio, finite = log_ratio_of(log_prob.to(fields["old_log_probs"].device), fields["old_log_probs"])
            ratio, mask = torch.exp(log_ratio), mask & finite
            if trace.enabled():
                trace.record("probe", tensors={"ratio": ratio, "mask": mask}, update=bapo.update_state.update_index + 1)
        weights = rho_weights(bapo, mask, fields.get("rollout_is_weights"), self._actor_config)
        sums = path_contributions(ratio, fields["advantages"], mask, bapo.search_spec, weights)
        bounds = reduce_and_select(sums, bapo.search_spec, self.engine.get_data_parallel_group())
        bapo.update_state.ratio_assumed_one = ratio_is_one
        return bounds

    def probe_batch(self, data: TensorDict) -> TensorDict:
        """`data` for the probe forward: a shallow copy with exactly the micro-batch keys verl's train_batch
        gives the gradient pass, without the per-sample non-tensor entries no engine forward reads (reward
        and rollout bookkeeping such as data_source, extra_info, raw_prompt: on a small model, splitting and
        moving them per micro-batch costs more than the forward itself)."""
        unread = [k for k in data.keys() if isinstance(data.get(k), NonTensorStack) and k not in PROBE_PER_SAMPLE_KEYS]
        probe = data.exclude(*unread)  # a new TensorDict: the forward's bookkeeping keys stay out of `data`
        engine_config = self.engine_config
        train_keys = dict(  # TrainingWorker.train_batch's defaults, for keys the caller did not set
            use_remove_padding=self.model_config.get("use_remove_padding", False),
            use_dynamic_bsz=engine_config.use_dynamic_bsz,
            max_token_len_per_gpu=engine_config.max_token_len_per_gpu,
            micro_batch_size_per_gpu=engine_config.micro_batch_size_per_gpu,
            use_fused_kernels=engine_config.use_fused_kernels,
        )
        tu.assign_non_tensor(probe, **{k: v for k, v in train_keys.items() if k not in data.keys()})
        tu.assign_non_tensor(probe, calculate_entropy=False)
        return probe

    def _current_log_probs(self, data: TensorDict) -> Optional[torch.Tensor]:
        """(bsz, max_resp_len) log-probs of the current policy for the whole mini-batch (no grad).

        Micro-batched like the gradient pass (actor.ppo_micro_batch_size_per_gpu or, with dynamic bsz,
        actor.ppo_max_token_len_per_gpu): the same partition verl would pick for train_batch, so the
        micro-batch count meets the engine's constraints (Megatron virtual pipeline) and each ratio is
        computed with the same shapes as in the loss.
        """
        probe = self.probe_batch(data)
        disable_auto_offload = tu.get(data, key="disable_auto_offload", default=False)
        with self.engine.train_mode(disable_auto_offload=disable_auto_offload):
            output = self.engine.infer_batch(probe, loss_function=None)
        log_probs = (output or {}).get("model_output", {}).get("log_probs")
        return None if log_probs is None else no_padding_2_padding(log_probs, probe)

    # ------------------------------------------------------------------ imbalance (paper finding i)
    def _imbalance_metrics(self, data: TensorDict) -> dict[str, float]:
        """Negative share of tokens and of |A| mass, and mean response length by advantage sign, per step."""
        fields = padded_fields(data, "response_mask", "advantages")
        if len(fields) < 2:
            return {}
        mask = fields["response_mask"].bool()
        adv = torch.where(mask, fields["advantages"].to(torch.float64), 0.0)
        lengths = mask.sum(-1).to(torch.float64)
        sign = torch.sign(adv.sum(-1))
        sums = torch.stack(
            [
                ((adv < 0) & mask).sum(), ((adv != 0) & mask).sum(),
                adv.clamp(max=0).abs().sum(), adv.abs().sum(),
                (lengths * (sign > 0)).sum(), (sign > 0).sum(),
                (lengths * (sign < 0)).sum(), (sign < 0).sum(),
            ]
        ).to(torch.float64)  # fmt: skip
        group = self.engine.get_data_parallel_group()
        if dist.is_initialized():
            dist.all_reduce(sums, group=group)
        neg_tokens, signal_tokens, neg_mass, mass, pos_len, pos_n, neg_len, neg_n = sums.tolist()

        def ratio(a, b):
            return a / b if b > 0 else 0.0

        return {
            "actor/bapo/neg_token_share": ratio(neg_tokens, signal_tokens),
            "actor/bapo/neg_adv_mass_share": ratio(neg_mass, mass),
            "actor/bapo/response_length_pos": ratio(pos_len, pos_n),
            "actor/bapo/response_length_neg": ratio(neg_len, neg_n),
        }


def install() -> None:
    """Make verl's actor use BAPOTrainingWorker (idempotent; refuses to replace a foreign customisation).

    With another class already installed, BAPO and the baselines' opt-in metrics cannot work: their
    configs then fail at construction (`config.require_actor_hook`), other runs are unaffected.
    """
    current = ActorRolloutRefWorker.actor_worker_cls
    if isinstance(current, type) and issubclass(current, BAPOTrainingWorker):
        return
    if current is not TrainingWorker:
        logger.error(
            "bapo: ActorRolloutRefWorker.actor_worker_cls is already %s; BAPO's actor hook is NOT installed, "
            "so BAPO runs in this environment will refuse to start",
            current,
        )
        return
    ActorRolloutRefWorker.actor_worker_cls = BAPOTrainingWorker
