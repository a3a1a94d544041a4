"""BAPO training entry point: verl 0.9.1's PPO trainer with configs/bapo_trainer.yaml.

    python -m recipe.bapo.main_bapo [hydra overrides]                       # GPU cluster
    python -m recipe.bapo.main_bapo --config-name cpu_tiny [overrides]      # laptop CPU (tiny model)

The same verl trainers run (v1 by default, v0 with trainer.use_v1=False); BAPO enters through the
config (policy loss, advantage estimator, reward) and the plugin (recipe/bapo/plugin.py).
Environment variables the run needs in every process are declared in the config under
`ray_kwargs.ray_init.runtime_env.env_vars`: Ray passes them to the workers, and this entry point
exports them in the driver too, so driver and workers agree (e.g. the CPU platform, VERL_PLATFORM=cpu).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(ROOT / "configs")


def export_run_env(config: DictConfig) -> dict[str, str]:
    """Export ray_kwargs.ray_init.runtime_env.env_vars into this process; returns what was set."""
    env = OmegaConf.select(config, "ray_kwargs.ray_init.runtime_env.env_vars", default=None) or {}
    env = {str(k): str(v) for k, v in env.items()}
    os.environ.update(env)
    return env


def run_logged(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> list[str]:
    """`python -m recipe.bapo.main_bapo *args` in a subprocess, output to `log_path`; returns the command.

    Raises RuntimeError with the end of the log when the run fails.
    """
    command = [sys.executable, "-m", "recipe.bapo.main_bapo", *args]
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = Path(log_path).read_text()[-4000:]
        raise RuntimeError(f"recipe.bapo.main_bapo failed (exit {proc.returncode}); end of {log_path}:\n{tail}")
    return command


def project_checks(config: DictConfig) -> None:
    """The project's driver-side checks, before verl's validate_config and before Ray starts (the dry run
    makes them too): the CPU backend's (trainer.device=cpu without the cpu platform, CPU misconfigurations)
    and a partial-rollout run's (trainer_mode=colocate_budget)."""
    from recipe import cpu_backend, partial
    from verl.trainer.ppo.utils import need_critic

    cpu_backend.check_trainer_config(config, use_critic=need_critic(config))
    partial.check_trainer_config(config)


def run(config: DictConfig) -> None:
    """Validate the config, then run verl's trainer (Ray is started by verl's run_ppo)."""
    export_run_env(config)
    # Hydra already imported verl (to find pkg://verl.trainer.config), i.e. ran the plugin before the
    # run's environment existed: register what depends on it (VERL_PLATFORM=cpu) now.
    from recipe import cpu_backend

    cpu_backend.register()
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    project_checks(config)  # first: auto_set_device turns trainer.device=cpu into cuda off the cpu platform
    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    if config.trainer.use_v1:
        runner = TaskRunnerV1
    else:
        from verl.trainer.main_ppo_v0 import TaskRunner as runner
    run_ppo(config, task_runner_class=runner)


@hydra.main(config_path=CONFIG_DIR, config_name="bapo_trainer", version_base=None)
def main(config: DictConfig) -> None:
    run(config)


if __name__ == "__main__":
    main()
