"""The grid of a sweep: methods x staleness levels x seeds (x extra overrides), as Hydra overrides.

A *method* is a policy loss with its advantage estimator: an option of the Hydra group configs/method/ (one
file per method, saying what it is), selected with the override `method=NAME`. The paper-run scripts take the
same names (METHOD=NAME). Another fixed clip window is one more file there (like clip_higher.yaml).

*Staleness* U = optimizer updates per rollout batch = ppo_epochs * train_batch_size / ppo_mini_batch_size
(verl's worker loop, engine_workers.py `train_mini_batch`). A level is `U` (ppo_epochs=1,
ppo_mini_batch_size = train_batch_size / U) or `UeE` (E epochs over U / E mini-batches, e.g. `8e2`: the
authors' 8x, 2 epochs of 4 mini-batches); the rollout data per step stays the same, only how often it is
reused changes. E must divide U and U / E the train batch size.

*Seed* s sets every seed verl 0.9.1 reads in these runs: `data.seed` (train data order; null in verl's
config = torch's default generator seed), `actor_rollout_ref.rollout.seed` (sampling: vLLM seeds its engine
with seed + replica rank), `actor_rollout_ref.actor.data_loader_seed`
(mini-batch shuffle when `actor.shuffle` is on), the actor/ref engine seeds `fsdp_config.seed` (used
with full determinism) and the critic's and reward model's seeds (unused here). The model itself is loaded
from a checkpoint, so no seed enters its weights. Not reproducible bit for bit: vLLM draws every request's tokens
from its one seeded generator in scheduling order, and requests arrive concurrently (two same-seed runs
differ from step 1, docs/cpu_engines/).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from recipe.bapo.main_bapo import CONFIG_DIR

METHOD_DIR = Path(CONFIG_DIR) / "method"
SEED_KEYS = (
    "data.seed",
    "actor_rollout_ref.rollout.seed",
    "actor_rollout_ref.actor.data_loader_seed",
    "actor_rollout_ref.actor.fsdp_config.seed",
    "actor_rollout_ref.ref.fsdp_config.seed",
    "critic.data_loader_seed",  # unused without a critic (GRPO, BAPO), set so a GAE sweep varies it too
    "critic.fsdp.seed",
    "reward.reward_model.rollout.seed",
)


def method_names() -> list[str]:
    """The methods: the options of configs/method/."""
    return sorted(p.stem for p in METHOD_DIR.glob("*.yaml"))


def check_method(method: str) -> str:
    """`method` if it is an option of configs/method/, else ValueError naming it and the valid ones."""
    if method not in method_names():
        hint = " (clip:LOW,HIGH is now clip_LOW_HIGH, a file in configs/method/)" if method.startswith("clip:") else ""
        raise ValueError(f"method {method!r} is unknown{hint}; valid (configs/method/): {', '.join(method_names())}")
    return method


def method_overrides(method: str) -> list[str]:
    """The Hydra override selecting `method`; ValueError naming the valid methods."""
    return [f"method={check_method(method)}"]


def parse_staleness(level: str) -> tuple[int, int]:
    """`U` or `UeE` -> (updates U, epochs E)."""
    match = re.fullmatch(r"([0-9]+)(?:e([0-9]+))?", str(level))
    updates, epochs = (int(match[1]), int(match[2] or 1)) if match else (0, 0)
    if updates < 1 or epochs < 1 or updates % epochs:
        raise ValueError(f"staleness {level!r} is invalid; valid: U or UeE with integers U, E >= 1 and E dividing U (e.g. 8, 8e2)")
    return updates, epochs


def staleness_overrides(level: str, train_batch_size: int) -> list[str]:
    """ppo_epochs / ppo_mini_batch_size giving the level's updates per rollout batch of `train_batch_size` prompts."""
    updates, epochs = parse_staleness(level)
    per_epoch = updates // epochs
    if train_batch_size % per_epoch:
        valid = [d * epochs for d in range(1, train_batch_size + 1) if train_batch_size % d == 0]
        raise ValueError(f"staleness {level!r}: {per_epoch} mini-batches per epoch do not divide "
                         f"data.train_batch_size={train_batch_size}; valid with e{epochs}: {valid}")
    return [f"actor_rollout_ref.actor.ppo_epochs={epochs}", f"actor_rollout_ref.actor.ppo_mini_batch_size={train_batch_size // per_epoch}"]


def seed_overrides(seed: int) -> list[str]:
    if seed < 0:
        raise ValueError(f"seed={seed} is invalid; valid: an integer >= 0")
    return [f"{key}={seed}" for key in SEED_KEYS]


def method_slug(method: str) -> str:
    return method.replace(":", "").replace(",", "-")


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: its folder name and the overrides that make it."""

    method: str
    staleness: str
    seed: int
    variant: str = ""  # name of an extra override set ("" = none)
    overrides: tuple[str, ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        tail = f"-{self.variant}" if self.variant else ""
        return f"{method_slug(self.method)}-s{self.staleness}-seed{self.seed}{tail}"


def expand(methods, staleness, seeds, train_batch_size: int, variants: dict[str, list[str]] | None = None) -> list[RunSpec]:
    """Every combination, validated before anything runs (ValueError on the first bad value)."""
    variants = variants or {"": []}
    runs = []
    for variant, extra in variants.items():  # in run order: a partial sweep has every method at its first levels and seeds
        for level in map(str, staleness):
            for seed in seeds:
                for method in methods:
                    overrides = (*method_overrides(method), *staleness_overrides(level, train_batch_size), *seed_overrides(seed), *extra)
                    runs.append(RunSpec(method, level, seed, variant, tuple(overrides)))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"the grid names two runs alike: {sorted({n for n in names if names.count(n) > 1})}")
    return runs
