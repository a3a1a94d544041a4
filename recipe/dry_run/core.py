"""Compose the run's config exactly as `recipe.bapo.main_bapo` does, run verl's checks and ours, build the plan."""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from recipe.bapo.main_bapo import CONFIG_DIR

from .checks import Problem, cluster_checks, geometry, run_env
from .model import ModelFacts, is_local_path, load_model_facts
from .plan import Plan, make_plan

# what verl's checks raise on a bad config (validate_config asserts; dataclasses raise ValueError/TypeError;
# OmegaConf raises on missing mandatory values and bad interpolations; Hydra wraps _target_ failures)
VERL_CONFIG_ERRORS = (AssertionError, ValueError, TypeError, KeyError, OmegaConfBaseException, HydraException)


class DryRunError(ValueError):
    """The run would fail (or silently run something else); the message lists every problem."""

    def __init__(self, problems: list[Problem | str]):
        self.problems = problems
        super().__init__("dry run: the run would fail:\n  - " + "\n  - ".join(map(str, problems)))


@dataclass
class DryRun:
    config: DictConfig
    model: ModelFacts
    plan: Plan
    warnings: list[Problem]
    dataclasses_built: list[str]


def split_config_name(args: list[str]) -> tuple[str, list[str]]:
    """Take `--config-name X` / `--config-name=X` out of main_bapo-style arguments."""
    name, rest, it = "bapo_trainer", [], iter(args)
    for arg in it:
        if arg == "--config-name":
            name = next(it)
        elif arg.startswith("--config-name="):
            name = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return name, rest


def compose_config(overrides: list[str], config_name: str = "bapo_trainer") -> DictConfig:
    """The config main_bapo's @hydra.main would build from these overrides (same directory, same name;
    hydra.* overrides are Hydra's own settings, not the job's, and are left out)."""
    import verl  # noqa: F401  (the plugin registers the ${tiny_assets:...} resolver)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name, overrides=[o for o in overrides if not o.startswith("hydra.")])


def write_config(cfg: DictConfig, path: str | Path) -> Path:
    """The composed config, interpolations resolved, as YAML at `path` (folders created): every setting of the run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def verl_checks(cfg: DictConfig, model_local: bool) -> list[str]:
    """verl's validate_config (it builds the actor dataclass, where BAPO's range checks run, and the critic's
    when used) and the other dataclasses the trainer and workers build. Returns the names of the dataclasses built.

    HFModelConfig loads the model's config and tokenizer from model.path, so it is built only when the path is
    a local directory; for a hub id the architecture comes from the shipped file (recipe/dry_run/model.py)."""
    from recipe.bapo.main_bapo import project_checks
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    use_ref, use_critic = need_reference_policy(cfg), need_critic(cfg)
    with run_environment(cfg):
        project_checks(cfg)  # main_bapo's own checks (CPU backend, partial rollout), as the run makes them
        validate_config(cfg, use_reference_policy=use_ref, use_critic=use_critic)
    built = ["actor_rollout_ref.actor"]
    # the ones verl's trainer and workers build (trainer_base.py:381,703; engine_workers.py:553,651)
    sections = ["actor_rollout_ref.rollout", "actor_rollout_ref.rollout.checkpoint_engine"]
    sections += ["actor_rollout_ref.model"] if model_local else []
    for key in sections:
        omega_conf_to_dataclass(OmegaConf.select(cfg, key))
        built.append(key)
    if use_ref:
        omega_conf_to_dataclass(ref_as_the_worker_builds_it(cfg))
        built.append("actor_rollout_ref.ref")
    return built


@contextlib.contextmanager
def run_environment(cfg: DictConfig):
    """The environment main_bapo exports before validating (ray_kwargs.ray_init.runtime_env.env_vars, e.g.
    VERL_PLATFORM=cpu for cpu_tiny, which the CPU backend's checks read), restored after.
    main_bapo's other pre-Ray steps are not repeated: cpu_backend.register() would register the CPU platform
    for the whole process, and auto_set_device only maps trainer.device to the accelerator found."""
    saved = dict(os.environ)
    os.environ.update(run_env(cfg))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def ref_as_the_worker_builds_it(cfg: DictConfig) -> DictConfig:
    """The reference section renamed the way ActorRolloutRefWorker.init_model does before building its
    dataclass (verl/workers/engine_workers.py:544-553), on a copy."""
    arr = copy.deepcopy(cfg).actor_rollout_ref
    ref = arr.ref
    with open_dict(ref):
        ref.ppo_mini_batch_size = arr.actor.ppo_mini_batch_size
        ref.ppo_micro_batch_size = ref.pop("log_prob_micro_batch_size", None)
        ref.ppo_micro_batch_size_per_gpu = ref.pop("log_prob_micro_batch_size_per_gpu", None)
        ref.use_dynamic_bsz = ref.pop("log_prob_use_dynamic_bsz", False)
        ref.ppo_max_token_len_per_gpu = ref.pop("log_prob_max_token_len_per_gpu", None)
    return ref


def dry_run(args: list[str], save_config: str | Path | None = None) -> DryRun:
    """Everything `python -m recipe.dry_run ARGS` checks; raises DryRunError listing what would fail.
    With `save_config`, the composed config is written there first (also when a later check fails)."""
    from verl.trainer.ppo.utils import need_reference_policy

    config_name, overrides = split_config_name(args)
    try:
        cfg = compose_config(overrides, config_name)
        if save_config is not None:
            write_config(cfg, save_config)
    except Exception as e:  # Hydra's own errors (unknown key, bad override syntax) name the key
        raise DryRunError([f"composition ({config_name}): {type(e).__name__}: {e}"]) from e
    model_path = str(cfg.actor_rollout_ref.model.path)
    model_local = is_local_path(model_path) and Path(model_path).expanduser().is_dir()
    try:
        built = verl_checks(cfg, model_local)
    except VERL_CONFIG_ERRORS as e:
        raise DryRunError([f"verl config check: {type(e).__name__}: {e}"]) from e
    if is_local_path(model_path) and not model_local:
        raise DryRunError([Problem("actor_rollout_ref.model.path", model_path,
                                   "directory does not exist (a hub id is written org/name)")])
    facts = load_model_facts(model_path, dict(cfg.actor_rollout_ref.model.get("override_config") or {}))
    g = geometry(cfg, need_reference_policy(cfg))
    problems = cluster_checks(cfg, g, facts)
    errors = [p for p in problems if p.fatal]
    if errors:
        raise DryRunError(errors)
    plan = make_plan(cfg, g, facts)
    warnings = [p for p in problems if not p.fatal]
    warnings += [Problem("memory", f"{plan.gpu_gib:g} GiB GPU", w, fatal=False) for w in plan.memory_warnings()]
    return DryRun(cfg, facts, plan, warnings, built)
