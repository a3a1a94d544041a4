"""`BAPOPolicyLossConfig`: verl's PolicyLossConfig plus BAPO's knobs (arXiv 2510.18927, Sec. 5.1).

Select it with
    actor_rollout_ref.actor.policy_loss._target_=recipe.bapo.config.BAPOPolicyLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=bapo
or compose a preset from configs/policy_loss/ (bapo_paper.yaml, bapo_authors_code.yaml).
"""

from __future__ import annotations

import dataclasses
import functools
import textwrap
import typing
from dataclasses import dataclass, field

from bapo_core import ClipSearchSpec
from bapo_core.spec import doc
from verl.workers.config import PolicyLossConfig

BAPO_LOSS_MODE = "bapo"
SCOPES = ("update", "micro_batch")


def _yaml(value) -> str:
    """A default as the YAML presets write it: null, true/false, plain numbers and strings."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def config_table(config_cls: type) -> str:
    """The markdown table of a config class's documented keys (every field with `doc` metadata), in
    declaration order: key, paper symbol, default, meaning. The README's tables are checked against it."""
    rows = ["| key | paper | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(config_cls):
        if "help" in f.metadata:
            rows.append(f"| `{f.name}` | {f.metadata['paper']} | `{_yaml(f.default)}` | {f.metadata['help']} |")
    return "\n".join(rows)


# The search keys, declared once in bapo_core's ClipSearchSpec (defaults and docs), as verl config fields.
_SEARCH_FIELDS = [
    (f.name, typing.get_type_hints(ClipSearchSpec)[f.name], field(default=f.default, metadata=f.metadata))
    for f in dataclasses.fields(ClipSearchSpec)
]
_PolicyLossConfigWithSearch = dataclasses.make_dataclass(
    "_PolicyLossConfigWithSearch", _SEARCH_FIELDS, bases=(PolicyLossConfig,), namespace={"__module__": __name__}
)


def _imbalance_metrics_field():
    return field(
        default=True,
        metadata=doc(
            "-",
            "log the per-step imbalance statistics (`actor/bapo/neg_token_share`, ...); the same key of "
            "`BaselinePolicyLossConfig` (`grpo_vanilla`) logs them for baselines, with verl's vanilla loss also the "
            "Entropy-Clip split of the tokens its window clips (`actor/bapo/clipfrac_entropy_*`)",
        ),
    )


@dataclass
class BAPOPolicyLossConfig(_PolicyLossConfigWithSearch):
    """BAPO policy loss settings. Defaults are the paper's (Sec. 5.1).

    The search keys (rho_target, c_low_*, c_high_*, search_order, accounting, rho_definition,
    clamp_last_step, dual_clip_c) are bapo_core.ClipSearchSpec's fields; the keys below are the
    recipe's. Each field's metadata documents it; `config_table(BAPOPolicyLossConfig)` renders the
    table (appended here and in the README). verl's own clip keys (actor.clip_ratio,
    clip_ratio_low/high, clip_ratio_c) are not used by this loss. rho weighs each token as the loss
    aggregation does (`actor.loss_agg_mode`: 1/|y_i| under seq-mean-token-mean), so it is the
    positive share of the gradient the update takes. Every invalid setting raises ValueError naming
    the key, the value and the valid range.
    """

    loss_mode: str = field(default=BAPO_LOSS_MODE, metadata=doc("-", "registry name of the loss"))
    rollout_is_in_rho: bool = field(
        default=True,
        metadata=doc(
            "-",
            "verl's rollout-IS weights multiply each token's contribution to rho as they multiply its loss; "
            "`false`: rho ignores them (authors' code)",
        ),
    )
    scope: str = field(
        default="update",
        metadata=doc(
            "-",
            "`update`: one search per optimizer step over all its micro-batches and DP ranks; `micro_batch`: one "
            "search per micro-batch inside the loss (authors' code)",
        ),
    )
    imbalance_metrics: bool = _imbalance_metrics_field()

    def __post_init__(self):
        if self.loss_mode != BAPO_LOSS_MODE:
            raise ValueError(
                f"BAPO config: loss_mode={self.loss_mode!r} is invalid; valid: {BAPO_LOSS_MODE!r} "
                "(BAPOPolicyLossConfig only configures the bapo loss; use verl's PolicyLossConfig for other losses)"
            )
        if self.scope not in SCOPES:
            raise ValueError(f"BAPO config: scope={self.scope!r} is invalid; valid: one of {list(SCOPES)}")
        for key in ("rollout_is_in_rho", "imbalance_metrics"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"BAPO config: {key}={getattr(self, key)!r} is invalid; valid: true or false")
        self.search_spec  # validates every search key
        require_actor_hook()

    @functools.cached_property
    def search_spec(self) -> ClipSearchSpec:
        """The bapo_core search settings (validated on construction)."""
        return ClipSearchSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ClipSearchSpec)})


@dataclass
class BaselinePolicyLossConfig(PolicyLossConfig):
    """verl's PolicyLossConfig (any verl loss, e.g. loss_mode "vanilla") plus BAPO's opt-in diagnostics
    (the paper's Fig. 4 statistics, so baselines are comparable with BAPO).

    configs/policy_loss/grpo_vanilla.yaml uses it. verl's plain PolicyLossConfig logs none of them.
    """

    imbalance_metrics: bool = _imbalance_metrics_field()

    def __post_init__(self):
        if self.loss_mode == BAPO_LOSS_MODE:
            raise ValueError(
                f"policy_loss.loss_mode={BAPO_LOSS_MODE!r} needs _target_=recipe.bapo.config.BAPOPolicyLossConfig, "
                "not BaselinePolicyLossConfig"
            )
        if not isinstance(self.imbalance_metrics, bool):
            raise ValueError(f"policy_loss.imbalance_metrics={self.imbalance_metrics!r} is invalid; valid: true or false")
        if self.imbalance_metrics:
            require_actor_hook()


for _cls in (BAPOPolicyLossConfig, BaselinePolicyLossConfig):
    _cls.__doc__ += "\n" + textwrap.indent(config_table(_cls), "    ") + "\n"


def require_actor_hook() -> None:
    """Fail at start-up (config construction, on the driver and in every worker) when verl's actor will
    not run BAPO's hook: another plugin set ActorRolloutRefWorker.actor_worker_cls first. Without the
    hook the loss would have no data-parallel group (under Megatron PP > 1 a collective over all ranks
    deadlocks, since only last-stage ranks run the loss) and scope="update" would have no bounds."""
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from .worker import BAPOTrainingWorker

    current = ActorRolloutRefWorker.actor_worker_cls
    if not (isinstance(current, type) and issubclass(current, BAPOTrainingWorker)):
        raise RuntimeError(
            f"BAPO needs its actor hook, but verl's ActorRolloutRefWorker.actor_worker_cls is {current.__module__}."
            f"{current.__qualname__} (set by another plugin, or the bapo-verl plugin was not loaded in this process). "
            "Make that class subclass recipe.bapo.worker.BAPOTrainingWorker, or run without the other plugin; "
            "without entry points set VERL_USE_EXTERNAL_MODULES=recipe.bapo.plugin."
        )


if __name__ == "__main__":  # the README's table: python -m recipe.bapo.config
    print(config_table(BAPOPolicyLossConfig))
