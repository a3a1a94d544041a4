"""The CPU backend (recipe/cpu_backend): opt-in registration, CPU fixes, early config errors.
The real trainer on CPU is exercised in tests/test_trainer_cpu.py.

verl resolves its platform once per process, so everything that needs VERL_PLATFORM=cpu in a fresh
``import verl`` runs in a subprocess; this pytest process never switches platform.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import verl
from recipe.cpu_backend import CPUBackendConfigError, check_trainer_config
from recipe.cpu_backend.testing import build_tiny_model
from recipe.dry_run.core import compose_config

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)


def clean_env(**extra: str) -> dict[str, str]:
    """Environment for a child verl process: no inherited platform / Ray / rank settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_ENGINE_DEVICE", "RAY_ADDRESS", "RANK")}
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", WANDB_MODE="disabled", **extra)
    return env


# ---------------------------------------------------------------------------------------- config checks
def cpu_tiny(*overrides: str):
    """The shipped CPU config (configs/cpu_tiny.yaml), which holds every setting a CPU run needs."""
    return compose_config(["actor_rollout_ref.model.path=/nonexistent", *overrides], config_name="cpu_tiny")


def test_cpu_config_without_cpu_platform_is_rejected(monkeypatch):
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    with pytest.raises(CPUBackendConfigError, match="export VERL_PLATFORM=cpu"):
        check_trainer_config(cpu_tiny(), use_critic=False)


def test_gpu_runs_are_not_checked(monkeypatch):
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    check_trainer_config(compose(["actor_rollout_ref.rollout.name=vllm"]), use_critic=False)  # no error


def test_valid_cpu_config_passes(monkeypatch):
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    check_trainer_config(cpu_tiny(), use_critic=False)


def test_cpu_config_problems_are_all_named(monkeypatch):
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    bad = cpu_tiny("trainer.device=cuda", "ray_kwargs.ray_init.num_gpus=0", "~actor_rollout_ref.model.override_config",
                   "actor_rollout_ref.actor.strategy=fsdp", "actor_rollout_ref.model.use_remove_padding=True")
    with pytest.raises(CPUBackendConfigError) as error:
        check_trainer_config(bad, use_critic=False)
    message = str(error.value)
    for fragment in (
        "trainer.device=cpu",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=False",
        "+ray_kwargs.ray_init.num_gpus=1",
    ):
        assert fragment in message


# ---------------------------------------------------------------------------------------- registration + fixes
PROBE = r"""
import json, os, sys
import torch
import verl
from torch.distributed.fsdp import CPUOffloadPolicy
from verl.plugin.platform import get_platform
report = {
    "platform": get_platform().device_name,
    "pin_memory": CPUOffloadPolicy().pin_memory,
    "engine_device": os.environ.get("VERL_ENGINE_DEVICE"),
    "logprobs_fallback": __import__("verl.utils.torch_functional", fromlist=["x"]).logprobs_from_logits_v2.__module__,
}
if report["platform"] == "cpu":
    import torch.distributed as dist
    from verl.utils.distributed import initialize_global_process_group_ray
    from verl.utils.model import load_valuehead_model
    from transformers import AutoConfig
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    initialize_global_process_group_ray()  # verl's default backend string on this platform
    tensor = torch.ones(2)
    dist.all_reduce(tensor)
    report["backend"] = dist.get_backend()
    config = AutoConfig.from_pretrained(sys.argv[1], attn_implementation="sdpa")
    config.num_labels = 1
    report["value_model"] = type(load_valuehead_model(sys.argv[1], torch.float32, config, False)).__name__
    config._attn_implementation = "flash_attention_2"
    try:
        load_valuehead_model(sys.argv[1], torch.float32, config, False)
    except ValueError as error:
        report["value_model_error"] = str(error)
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def tiny_default_model(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_default")))


def probe(model_dir: str, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, model_dir, "29517"], env=clean_env(**env), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("REPORT"))[len("REPORT") :])


@pytest.mark.slow
def test_without_verl_platform_nothing_is_registered_or_patched(tiny_default_model):
    report = probe(tiny_default_model)
    assert report["platform"] != "cpu"
    assert report["pin_memory"] is True and report["engine_device"] is None
    assert report["logprobs_fallback"] == "verl.utils.torch_functional"


@pytest.mark.slow
def test_verl_platform_cpu_registers_platform_and_fixes(tiny_default_model):
    report = probe(tiny_default_model, VERL_PLATFORM="cpu")
    assert report["platform"] == "cpu"
    assert report["pin_memory"] is False and report["engine_device"] == "cuda"
    assert report["logprobs_fallback"] == "recipe.cpu_backend.patches"
    assert report["backend"] == "gloo"
    assert report["value_model"] == "Qwen2ForTokenClassification"
    assert "attn_implementation=sdpa" in report["value_model_error"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(300, 37), (4, 9, 37)])
@pytest.mark.parametrize("chunk_elements", [1 << 24, 100])  # one chunk / chunks of 2-3 rows, uneven last one
def test_chunked_logprobs_equal_verls_row_loop_in_value_and_gradient(monkeypatch, dtype, shape, chunk_elements):
    """Fix 5 against verl's own ``logprobs_from_logits_v2`` (this process never patches verl): bitwise."""
    import torch
    from verl.utils import torch_functional as verl_F

    from recipe.cpu_backend import patches

    assert verl_F.logprobs_from_logits_v2.__module__ == "verl.utils.torch_functional"
    monkeypatch.setattr(patches, "LOGPROB_CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(*shape, generator=gen)).to(getattr(torch, dtype)).requires_grad_()
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    weights = torch.rand(shape[:-1], generator=gen).to(logits.dtype)  # a gradient that differs per token
    results = []
    for fn in (verl_F.logprobs_from_logits_v2, patches.logprobs_from_logits_chunked):
        out = fn(logits, labels)
        results.append((out, torch.autograd.grad((out * weights).sum(), logits)[0]))
    (want, want_grad), (got, got_grad) = results
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


def test_cpu_platform_is_never_auto_detected(monkeypatch):
    from verl.plugin.platform import platform_manager

    from recipe.cpu_backend.platform import PlatformCPU

    # verl's own detection, with the cpu platform registered, on a machine where no accelerator is found
    assert platform_manager.PlatformRegistry.get("cpu") is PlatformCPU
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    assert platform_manager._detect_platform_name() != "cpu"
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    assert platform_manager._detect_platform_name() == "cpu"
    platform = PlatformCPU()
    assert platform.device_name == "cpu" and platform.communication_backend_name() == "gloo"
    free, total = platform.device_module.mem_get_info()
    assert 0 < free <= total
