"""BAPO's per-update hook inside verl 0.9.1's actor: exact `scope: update` bounds and imbalance metrics.

verl runs one optimizer step in `TrainingWorker.train_batch` (zero_grad -> forward/backward over the
micro-batches -> step) and shows the loss one micro-batch at a time. The paper searches the bounds
once per update over that update's whole batch, so before the gradient pass `BAPOTrainingWorker`
1. computes the current policy's log-probs of the whole mini-batch of the step (the probe): one no-grad
   forward through the engine, micro-batched exactly like the gradient pass (same micro-batch keys, so the
   same partition and GEMM shapes: the ratios equal the loss's bit for bit on a deterministic engine; the
   batch's per-sample non-tensor entries that no verl 0.9.1 engine forward reads are left out,
   `PROBE_PER_SAMPLE_KEYS` kept);
2. sums the search statistics over them and over the data-parallel group (one all-reduce);
3. runs verl's step inside `optimizer_step.running(...)` (recipe/bapo/optimizer_step.py), the channel the
   "bapo" loss reads the step's bounds from, so every micro-batch of the step uses the same bounds.

The probe runs for every update, also the first one after verl recomputed the old log-probs (r = 1 up to
rounding there); docs/ratio_one_shortcut.md measures what skipping it saved and why it was removed.

It is installed for every run (verl builds the actor from the class attribute
`ActorRolloutRefWorker.actor_worker_cls`, and the loss is only known later, in `set_loss_fn`), so it
is inert unless the policy loss opts in: the search only for the "bapo" loss with `scope: update`,
the imbalance metrics only with `policy_loss.imbalance_metrics` (BAPOPolicyLossConfig,
BaselinePolicyLossConfig). With verl's own PolicyLossConfig it runs verl's methods unchanged.

With BaselinePolicyLossConfig and verl's "vanilla" loss, the imbalance metrics also include the Entropy-Clip
split of the tokens verl's window clips (`actor/bapo/clipfrac_entropy_{raising,lowering}`, per micro-batch as the
bapo loss logs it; `_proxy` without verl's entropy): verl's loss is wrapped, its loss and metrics unchanged, and
the split is computed from the same inputs (`_with_entropy_clip_split`), so GRPO's split is comparable with BAPO's.

verl internals touched: `TrainingWorker.{set_loss_fn, train_mini_batch, train_batch}` (overridden, each
calling verl's), `engine.{infer_batch, train_mode, get_data_parallel_group}`, `engine_config.{use_dynamic_bsz,
max_token_len_per_gpu, micro_batch_size_per_gpu, use_fused_kernels, dynamic_context_parallel}`, and the
loss-function keywords verl binds (`functools.partial(ppo_loss, config=actor_config)`) and passes
(`loss_function(model_output=..., data=...)`).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Optional

import torch
import torch.distributed as dist
from tensordict import NonTensorStack, TensorDict

from bapo_core import ClipSearchResult, clip_diagnostics, path_contributions, reduce_and_select
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker
from verl.workers.utils.padding import no_padding_2_padding

from . import optimizer_step, trace
from .config import BAPOPolicyLossConfig
from .loss import SEARCH_METRICS, log_ratio_of, rho_weights
from .optimizer_step import OptimizerStep

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


class BAPOTrainingWorker(TrainingWorker):
    """verl's TrainingWorker plus BAPO's per-update bound search (see module docstring)."""

    _bapo: Optional[BAPOPolicyLossConfig] = None  # set by set_loss_fn when the actor loss is "bapo"
    _actor_config = None  # the ActorConfig verl's loss is bound to
    _dp_group = None  # the engine's data-parallel group (bapo loss only)
    _imbalance_metrics_on = False
    _steps_taken = 0  # optimizer steps of this worker so far (bapo loss only): the next step's index

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
            self._dp_group = self.engine.get_data_parallel_group()
            loss_fn = self._in_loss_call(loss_fn)
        elif self._imbalance_metrics_on and getattr(policy_loss, "loss_mode", None) == "vanilla":
            loss_fn = _with_entropy_clip_split(loss_fn, actor_config)
        super().set_loss_fn(loss_fn)

    @staticmethod
    def _in_loss_call(loss_fn):
        """Wrap verl's loss so each call runs as a loss call of the optimizer step in progress, with the
        gradient pass's per-position entropy (when verl computes it) for the bapo loss."""

        @functools.wraps(loss_fn)
        def in_loss_call(**kwargs):  # verl's engines call loss_function(model_output=..., data=..., dp_group=...)
            entropy = kwargs["model_output"].get("entropy", None)
            entropy = None if entropy is None else no_padding_2_padding(entropy, kwargs["data"]).detach()
            with optimizer_step.current().loss_call(entropy):  # verl runs the actor's loss in train_batch only
                return loss_fn(**kwargs)

        return in_loss_call

    def train_mini_batch(self, data: TensorDict) -> TensorDict:
        """verl's training step, plus the step's imbalance metrics, and NaN for the search metrics of a step in
        which no update had a token with non-zero advantage (each such update logged none; loss.SEARCH_METRICS):
        the key stays in every step's record, its value missing (null in verl's file logger), not made up."""
        imbalance = self._imbalance_metrics(data) if self._imbalance_metrics_on else {}
        output = super().train_mini_batch(data)
        if output is not None:
            metrics = tu.get(output, "metrics")
            metrics.update({key: [value] for key, value in imbalance.items()})
            if self._bapo is not None:
                for key in SEARCH_METRICS:
                    metrics.setdefault(key, [math.nan])
        return output

    def train_batch(self, data: TensorDict) -> TensorDict:
        bapo = self._bapo
        if bapo is None:
            return super().train_batch(data)
        bounds = self._search_update_bounds(data, bapo) if bapo.scope == "update" else None
        step = OptimizerStep(index=self._steps_taken, bounds=bounds, dp_group=self._dp_group)
        self._steps_taken += 1
        if bounds is not None:
            trace.record("update", update=step.index, **bounds.__dict__)
        with optimizer_step.running(step):
            return super().train_batch(data)

    # ------------------------------------------------------------------ the search
    def _search_update_bounds(self, data: TensorDict, bapo: BAPOPolicyLossConfig) -> Optional[ClipSearchResult]:
        """Bounds for the next optimizer step, on `data` (this rank's share of the mini-batch).

        Returns None on ranks that never run the loss (Megatron pipeline stages before the last).
        """
        fields = padded_fields(data, "response_mask", "old_log_probs", "advantages", "rollout_is_weights")
        log_prob = self._current_log_probs(data)
        if log_prob is None:
            return None
        log_ratio, finite = log_ratio_of(log_prob.to(fields["old_log_probs"].device), fields["old_log_probs"])
        ratio, mask = torch.exp(log_ratio), fields["response_mask"].bool() & finite
        if trace.enabled():
            trace.record("probe", tensors={"ratio": ratio, "mask": mask}, update=self._steps_taken)
        weights = rho_weights(bapo, mask, fields.get("rollout_is_weights"), self._actor_config)
        sums = path_contributions(ratio, fields["advantages"], mask, bapo.search_spec, weights)
        return reduce_and_select(sums, bapo.search_spec, self.engine.get_data_parallel_group())

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
        """Negative share of tokens and of |A| mass, and mean response length by advantage sign, per step.

        NaN where the statistic is undefined (a mean over nothing): both shares when no token has a non-zero
        advantage, a sign's response length when no response has that sign."""
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
            return a / b if b > 0 else math.nan

        return {
            "actor/bapo/neg_token_share": ratio(neg_tokens, signal_tokens),
            "actor/bapo/neg_adv_mass_share": ratio(neg_mass, mass),
            "actor/bapo/response_length_pos": ratio(pos_len, pos_n),
            "actor/bapo/response_length_neg": ratio(neg_len, neg_n),
        }


ENTROPY_CLIP_SPLIT = ("clipfrac_entropy_raising", "clipfrac_entropy_lowering")


def vanilla_clip_window(actor_config) -> tuple[float, float, float]:
    """(c_low, c_high, dual-clip c) of verl's vanilla PPO loss, read as compute_policy_loss_vanilla reads them."""
    eps = actor_config.clip_ratio
    eps_low = eps if actor_config.clip_ratio_low is None else actor_config.clip_ratio_low
    eps_high = eps if actor_config.clip_ratio_high is None else actor_config.clip_ratio_high
    return 1 - eps_low, 1 + eps_high, actor_config.get("clip_ratio_c", 3.0)


def _with_entropy_clip_split(loss_fn, actor_config):
    """verl's ppo_loss with the "vanilla" policy loss, unchanged, plus the Entropy-Clip split of the tokens its
    window clips (bapo_core.clip_diagnostics: the bapo loss's own definition), from the same log-probs,
    old log-probs, advantages and mask, and verl's per-position entropy when it computed one."""
    c_low, c_high, dual_c = vanilla_clip_window(actor_config)

    @functools.wraps(loss_fn)
    def loss_with_split(**kwargs):
        loss, metrics = loss_fn(**kwargs)
        output, data = kwargs["model_output"], kwargs["data"]
        with torch.no_grad():
            log_prob = no_padding_2_padding(output["log_probs"], data)
            entropy = output.get("entropy", None)
            entropy = None if entropy is None else no_padding_2_padding(entropy, data)
            fields = padded_fields(data, "response_mask", "old_log_probs", "advantages")
            ratio = torch.exp((log_prob - fields["old_log_probs"]).clamp(-20.0, 20.0))  # as verl's vanilla loss
            split = clip_diagnostics(ratio, fields["advantages"], log_prob, fields["response_mask"], c_low, c_high,
                                     dual_c, entropy=entropy)
        names = [name for name in split if name.startswith(ENTROPY_CLIP_SPLIT)]
        values = torch.stack([split[name] for name in names]).tolist()  # one host sync
        for name, value in zip(names, values):
            metrics[f"actor/bapo/{name}"] = Metric(value=value, aggregation=AggregationType.MEAN)
        return loss, metrics

    return loss_with_split


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
