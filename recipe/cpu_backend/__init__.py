"""CPU backend for verl 0.9.1: run the real trainer (``python -m verl.trainer.main_ppo``) without a GPU.

Enable with ``export VERL_PLATFORM=cpu`` (before the driver starts Ray, so every worker inherits it) and
``actor_rollout_ref.rollout.name=hf``. ``register()`` (called from the project's verl plugin entry point
in every process) then adds, through verl's own registries:

* the ``cpu`` platform (``platform.py``): gloo, host memory, never auto-detected;
* the ``hf`` rollout backend: ``RolloutReplicaRegistry["hf"]`` -> ``server.HFReplica`` (a Ray actor per
  replica serving batched token-in/token-out generation with HF transformers, ``engine.py``) and
  ``_ROLLOUT_REGISTRY[("hf", "async")]`` -> ``adapter.HFServerAdapter`` (weight sync from the actor);
* the CPU fixes verl 0.9.1 needs (``patches.py``).

With VERL_PLATFORM=cpu it also wraps verl's driver-side ``validate_config`` with the CPU config checks
(``config_check.py``). Without VERL_PLATFORM=cpu nothing is registered or wrapped: verl is unchanged.
``recipe.bapo.main_bapo`` runs the same checks itself, so ``rollout.name=hf`` without the cpu platform
fails there before Ray starts. The full set of trainer overrides for a CPU run is ``cpu_trainer_overrides()``.
"""

from __future__ import annotations

from .config_check import CPUBackendConfigError, check_trainer_config, cpu_platform_requested

__all__ = [
    "CPUBackendConfigError",
    "check_trainer_config",
    "cpu_platform_requested",
    "cpu_trainer_overrides",
    "register",
]

HF_ROLLOUT_NAME = "hf"
ADAPTER_FQN = "recipe.cpu_backend.adapter.HFServerAdapter"
_registered_cpu = False


def register() -> None:
    """Install the config check; on VERL_PLATFORM=cpu also register platform, rollout and CPU fixes.

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
    from verl.workers.rollout import base as rollout_base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register(HF_ROLLOUT_NAME, _load_hf_replica)
    rollout_base._ROLLOUT_REGISTRY[(HF_ROLLOUT_NAME, "async")] = ADAPTER_FQN
    _registered_cpu = True


def _load_hf_replica():
    from .server import HFReplica

    return HFReplica


def cpu_trainer_overrides(n_ranks: int = 1) -> list[str]:
    """Hydra overrides every CPU run of ``verl.trainer.main_ppo`` needs (add model/data/algorithm keys).

    Why each is needed: fsdp2 (FSDP1 needs CUDA), sdpa attention (flash-attn is CUDA-only), fp32 mixed
    precision (bf16 is slow on CPU and the rollout/actor log-prob check is exact only in fp32),
    no remove-padding (its unpad kernels come from flash-attn), no torch.compile, dataloader in-process
    (worker processes cost ~1 GiB each), Ray 'GPU' slots declared for the cpu platform, no dashboard.
    """
    fp32 = "{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}"
    return [
        "trainer.device=cpu",
        f"trainer.n_gpus_per_node={n_ranks}",
        "trainer.nnodes=1",
        f"+ray_kwargs.ray_init.num_gpus={n_ranks}",
        "+ray_kwargs.ray_init.include_dashboard=False",
        "data.dataloader_num_workers=0",
        "actor_rollout_ref.model.use_remove_padding=False",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.actor.strategy=fsdp2",
        f"+actor_rollout_ref.actor.fsdp_config.mixed_precision={fp32}",
        f"+actor_rollout_ref.ref.fsdp_config.mixed_precision={fp32}",
        "actor_rollout_ref.actor.use_torch_compile=False",
        f"actor_rollout_ref.rollout.name={HF_ROLLOUT_NAME}",
        "actor_rollout_ref.rollout.dtype=float32",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
    ]
