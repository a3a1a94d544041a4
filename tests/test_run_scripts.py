"""The paper-run scripts (run_scripts/*.sh, run_scripts/lib/launch.sh, run_scripts/multinode/): one argument
list for the run, the dry run and the Ray job; baselines that differ from BAPO only in the loss; the staleness
grid; the GPU smoke run's refusal without a GPU; the Slurm launcher with fake cluster commands. No trainer runs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from run_scripts_helpers import CASES, ROOT, SCRIPTS, case_id, make_data_dir, printed_runs, run_script, \
    script_env

# Appends one call (one argument per line, an empty line after) to $FAKE_LOG under a mkdir lock: bash's
# printf writes line by line, so two fakes running at once (slurm.sbatch's background sruns) interleaved.
RECORD = """record() {
  until mkdir "$FAKE_LOG.lock" 2>/dev/null; do :; done
  printf '%s\\n\\n' "$(printf '%s\\n' "$@")" >> "$FAKE_LOG"
  rmdir "$FAKE_LOG.lock"
}
"""
FAKE_PYTHON = """#!/usr/bin/env bash
# records `python -m MODULE ARGS`, runs anything else for real
""" + RECORD + """if [[ "$1" == -m ]]; then record "$@"; exit 0; fi
[[ "$*" == "-c import vllm" || "$*" == "-c import flash_attn" ]] && exit 0
exec {real} "$@"
"""
FAKE_RAY = """#!/usr/bin/env bash
# `ray status` reports the GPUs FAKE_GPUS; anything else is recorded like the fake python
""" + RECORD + """if [[ "$1" == status ]]; then echo " 0.0/${FAKE_GPUS:-16}.0 GPU"; exit 0; fi
record ray "$@"
"""
NVIDIA_SMI = "#!/usr/bin/env bash\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n"


def _fake(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture()
def fakes(tmp_path):
    """A folder of fake commands (python, ray, ...) and the log they append to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir / "python", FAKE_PYTHON.replace("{real}", sys.executable))
    _fake(bin_dir / "ray", FAKE_RAY)
    _fake(bin_dir / "nvidia-smi", NVIDIA_SMI)
    make_data_dir(tmp_path / "data")
    return bin_dir, tmp_path / "calls.log"


def _calls(log: Path) -> list[list[str]]:
    return [block.split("\n") for block in log.read_text().strip("\n").split("\n\n")] if log.exists() else []


# One configuration per script: every method and size of a script reaches the launcher through the same
# `bapo_launch` call, and test_dry_run.py already checks every configuration's argument list.
LAUNCH_CASES = [case for i, case in enumerate(CASES) if all(case[0] != other[0] for other in CASES[:i])]


@pytest.mark.parametrize("case", LAUNCH_CASES, ids=case_id)
def test_run_dry_run_and_ray_job_get_the_same_arguments(case, fakes, tmp_path):
    """The script builds its list once: main_bapo (local), the dry run and `ray job submit` get exactly it.
    (Broken by making bapo_launch add an override only in the local branch: this test failed.)"""
    script, env = case
    bin_dir, log = fakes
    base = script_env(tmp_path, **env, PYTHON=str(bin_dir / "python"), FAKE_LOG=str(log), EVAL="0", GRID="run",
                      PATH=f"{bin_dir}:{script_env(tmp_path)['PATH']}")
    printed = printed_runs(script, base)
    run_script(script, base)
    local = _calls(log)
    log.unlink()
    run_script(script, {**base, "DRY_RUN": "1"})
    dry = _calls(log)
    log.unlink()
    run_script(script, {**base, "LAUNCH": "ray_job", "RAY_ADDRESS": "http://head:8265"})
    ray = _calls(log)

    assert [c[:2] for c in local] == [["-m", "recipe.bapo.main_bapo"]] * len(printed)
    # the dry run also writes the composed config into the run's log folder, $LOGS/<run name>/config.yaml
    names = [_settings(args)["trainer.experiment_name"] for args in printed]
    assert [c[:4] for c in dry] == [["-m", "recipe.dry_run", "--save-config", str(tmp_path / "logs" / n / "config.yaml")]
                                    for n in names]
    assert [c[2:] for c in local] == [c[4:] for c in dry] == printed
    for call, args in zip(ray, printed):
        cut = call.index("--")
        assert call[cut + 1:cut + 4] == [str(bin_dir / "python"), "-m", "recipe.bapo.main_bapo"]
        assert call[cut + 4:] == args
        options = dict(zip(call[1:cut:2], call[2:cut:2]))
        assert options["--address"] == "http://head:8265"
        runtime_env = json.loads(options["--runtime-env-json"])["env_vars"]
        assert runtime_env["VERL_USE_EXTERNAL_MODULES"] == "recipe.bapo.plugin"
        assert runtime_env["PYTHONPATH"] == str(ROOT)


def _settings(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args)


def _flat(node, path=""):
    """{dotted key: value} of every leaf of a config container."""
    if not isinstance(node, dict) or not node:
        return {path: node}
    return {k: v for key, value in node.items() for k, v in _flat(value, f"{path}.{key}" if path else str(key)).items()}


@pytest.mark.parametrize("strategy", ["fsdp2", "megatron"])
def test_baselines_differ_from_bapo_only_in_the_loss(strategy, tmp_path):
    """In the composed configs (configs/method/ resolved by Hydra), GRPO, clip-higher and the fixed asymmetric
    clips change only the policy loss, verl's clip keys and the advantage-estimator name, under either engine;
    STRICT_AB=1 turns verl's dual clip off. (Broken by giving configs/method/grpo.yaml its own actor.grad_clip:
    failed; and by clip_ratio_high 0.3 in clip_higher.yaml: failed.)"""
    from omegaconf import OmegaConf

    from recipe.dry_run import compose_config

    make_data_dir(tmp_path / "data")

    def config(**env):
        args = printed_runs("r1_7b_8k_staleness8.sh", script_env(tmp_path, STRATEGY=strategy, **env))[0]
        return _flat(OmegaConf.to_container(compose_config(args), resolve=True))

    runs = {m: config(METHOD=m) for m in ("bapo", "grpo", "clip_higher", "clip_0.8_1.5", "clip_0.5_1.2")}
    naming = {"trainer.experiment_name", "actor_rollout_ref.rollout.trace.experiment_name", "trainer.default_local_dir",
              "ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH"}
    A = "actor_rollout_ref.actor."
    windows = {}
    for method, settings in runs.items():
        if method == "bapo":
            continue
        changed = {k for k in settings.keys() | runs["bapo"].keys() if settings.get(k) != runs["bapo"].get(k)}
        loss = {k for k in changed if k.startswith(A + "policy_loss.")}
        assert changed - loss - naming <= {"algorithm.adv_estimator", A + "clip_ratio_low", A + "clip_ratio_high"}, changed - loss - naming
        assert settings["algorithm.adv_estimator"] == "grpo" and settings[A + "policy_loss.loss_mode"] == "vanilla"
        assert settings[A + "clip_ratio_c"] == 3.0
        windows[method] = (round(1 - settings[A + "clip_ratio_low"], 2), round(1 + settings[A + "clip_ratio_high"], 2))
    assert runs["bapo"][A + "policy_loss.loss_mode"] == "bapo" and runs["bapo"]["algorithm.adv_estimator"] == "bapo"
    assert windows == {"grpo": (0.8, 1.2), "clip_higher": (0.8, 1.28), "clip_0.8_1.5": (0.8, 1.5),
                       "clip_0.5_1.2": (0.5, 1.2)}
    assert config(METHOD="grpo", STRICT_AB="1")[A + "clip_ratio_c"] >= 1e9


@pytest.mark.parametrize("method, message", [
    ("ppo", "METHOD=ppo: valid (configs/method/): bapo bapo_authors_code clip_0.5_1.2 clip_0.8_1.5 clip_higher grpo"),
    ("bapo_authors", "METHOD=bapo_authors is now METHOD=bapo_authors_code"),
    ("clip", "METHOD=clip is now METHOD=grpo"),
    ("../bapo_trainer", "valid (configs/method/): bapo "),
])
def test_unknown_method_is_refused_naming_the_valid_ones(method, message, tmp_path):
    """An unknown (or renamed) METHOD stops the script before anything runs, naming the valid methods or the new name."""
    make_data_dir(tmp_path / "data")
    proc = run_script("r1_7b_8k_staleness8.sh", script_env(tmp_path, METHOD=method, DRY_RUN="print"), check=False)
    assert proc.returncode == 2 and message in proc.stderr and not proc.stdout


def test_megatron_is_offered_only_where_a_script_has_a_layout(tmp_path):
    """STRATEGY=megatron swaps verl's engine group and names the run apart (its checkpoints are not FSDP's);
    scripts without a Megatron layout refuse it, naming the valid engines."""
    make_data_dir(tmp_path / "data")
    fsdp = _settings(printed_runs("r1_32b.sh", script_env(tmp_path, LENGTH="64k"))[0])
    megatron = _settings(printed_runs("r1_32b.sh", script_env(tmp_path, LENGTH="64k", STRATEGY="megatron"))[0])
    assert megatron["model_engine"] == "megatron" and "actor_rollout_ref.actor.strategy" not in megatron
    assert fsdp["actor_rollout_ref.actor.strategy"] == "fsdp2" and "model_engine" not in fsdp
    assert megatron["trainer.experiment_name"] == fsdp["trainer.experiment_name"] + "-megatron"
    assert not [k for k in megatron if "fsdp_config" in k or "ulysses" in k]
    proc = run_script("octothinker_3b.sh", script_env(tmp_path, STRATEGY="megatron"), check=False)
    assert proc.returncode == 2 and "STRATEGY=megatron: valid for octothinker_3b.sh: fsdp2" in proc.stderr


def test_staleness_sweep_covers_figure_11(tmp_path):
    """Six runs: staleness 2 and 4 (from the runs' own batch keys) x grpo, clip_higher, bapo; the default
    prints one command per cell. (Broken by a sweep mini-batch of 96: failed.)"""
    make_data_dir(tmp_path / "data")
    env = script_env(tmp_path)
    cells = set()
    for args in printed_runs("r1_7b_32k_staleness_sweep.sh", env):
        s = _settings(args)
        staleness = int(s["actor_rollout_ref.actor.ppo_epochs"]) * int(s["data.train_batch_size"]) / int(
            s["actor_rollout_ref.actor.ppo_mini_batch_size"])
        cells.add((staleness, s["method"]))
        assert int(s["data.max_prompt_length"]) + int(s["data.max_response_length"]) == 32768
    assert cells == {(st, method) for st in (2.0, 4.0) for method in ("grpo", "clip_higher", "bapo")}
    listed = run_script("r1_7b_32k_staleness_sweep.sh", env).stdout.strip().splitlines()
    assert {tuple(line.split()[:2]) for line in listed} == {
        (f"STALENESS={st}", f"METHOD={m}") for st in (2, 4) for m in ("grpo", "clip_higher", "bapo")}


def test_smoke_gpu_refuses_without_gpu_or_vllm(tmp_path):
    """No nvidia-smi: a clear error; a GPU but no vLLM: a clear error (both before any work)."""
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    proc = run_script("smoke_gpu.sh", script_env(tmp_path), check=False)
    assert proc.returncode == 2 and "needs an NVIDIA GPU" in proc.stderr
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir / "nvidia-smi", NVIDIA_SMI)
    env = script_env(tmp_path)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    proc = run_script("smoke_gpu.sh", env, check=False)
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        assert proc.returncode == 2 and "needs vLLM" in proc.stderr


def test_slurm_launcher_starts_ray_and_submits_the_run(fakes, tmp_path):
    """slurm.sbatch with fake scontrol/srun/ray: head + one worker started, the run submitted as a Ray job with
    NNODES from the allocation and the head's dashboard address. (Broken by submitting before the cluster
    has all GPUs: the GPU-wait failed it.)"""
    bin_dir, log = fakes
    _fake(bin_dir / "scontrol", "#!/usr/bin/env bash\nprintf 'node-a\\nnode-b\\n'\n")
    _fake(bin_dir / "srun", '#!/usr/bin/env bash\n' + RECORD + '[[ " $* " == *" hostname "* ]] && { echo 10.1.2.3; exit 0; }\n'
                            'record srun "$@"\n')
    env = script_env(tmp_path, PYTHON=str(bin_dir / "python"), FAKE_LOG=str(log), EVAL="0", SCRIPT="run_scripts/r1_32b.sh",
                     SLURM_JOB_NODELIST="node-[a-b]", SLURM_SUBMIT_DIR=str(ROOT), FAKE_GPUS="16")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    proc = run_script("multinode/slurm.sbatch", env)
    calls = _calls(log)
    starts = [c for c in calls if c[0] == "srun"]
    assert {c[c.index("-w") + 1] for c in starts} == {"node-a", "node-b"}
    assert any(c[-1] == "head" for c in starts) and any(c[-2:] == ["worker", "10.1.2.3"] for c in starts)
    (job,) = [c for c in calls if c[:3] == ["ray", "job", "submit"]]
    assert job[job.index("--address") + 1] == "http://10.1.2.3:8265"
    assert "trainer.nnodes=2" in job and "trainer.n_gpus_per_node=8" in job
    env["FAKE_GPUS"] = "8"  # one node never joins
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    _fake(bin_dir / "sleep", "#!/usr/bin/env bash\nexit 0\n")
    proc = run_script("multinode/slurm.sbatch", env, check=False)
    assert proc.returncode == 1 and "8 of 16 GPUs" in proc.stderr


def test_scripts_have_usage_and_strict_mode(tmp_path):
    """Every script starts with its usage and runs under `set -euo pipefail`; the paper-run scripts print the
    usage for -h and refuse stray arguments (settings go in the environment, overrides after --)."""
    scripts = sorted(SCRIPTS.glob("*.sh")) + sorted((SCRIPTS / "multinode").glob("*"))
    for script in scripts:
        text = script.read_text()
        assert "set -euo pipefail" in text, script
        assert text.splitlines()[1].startswith("# "), script
        if "lib/launch.sh" in text:
            usage = run_script(script.name, script_env(tmp_path), "-h")
            assert f"run_scripts/{script.name}" in usage.stdout and "set -euo" not in usage.stdout
            stray = run_script(script.name, script_env(tmp_path), "METHOD=grpo", check=False)
            assert stray.returncode == 2 and "after --" in stray.stderr


def test_run_ends_with_avg16_on_the_merged_last_checkpoint(fakes, tmp_path):
    """After training, the script merges the latest checkpoint (verl.model_merger) and runs eval_aime.sh on it:
    k = 16, the run's response length and rollout TP, its validation files. (Broken by evaluating at the
    default 32k instead of the run's length: failed.)"""
    bin_dir, log = fakes
    env = script_env(tmp_path, PYTHON=str(bin_dir / "python"), FAKE_LOG=str(log), LENGTH="64k", METHOD="grpo")
    ckpt = tmp_path / "ckpt" / "r1-32b-64k-grpo"
    (ckpt / "global_step_250" / "actor").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("250")
    run_script("r1_32b.sh", env)
    train, merge, evaluation = _calls(log)
    assert train[:2] == ["-m", "recipe.bapo.main_bapo"]
    actor = ckpt / "global_step_250" / "actor"
    assert merge[:3] == ["-m", "verl.model_merger", "merge"]
    assert merge[merge.index("--local_dir") + 1] == str(actor)
    merged = merge[merge.index("--target_dir") + 1]
    options = evaluation[:evaluation.index("--")]
    assert options[:3] == ["-m", "recipe.evaluation", "run"]
    assert options[options.index("--model") + 1] == merged and options[options.index("--k") + 1] == "16"
    assert options[options.index("--max-response-length") + 1] == _settings(train[2:])["data.max_response_length"]
    data = options[options.index("--data") + 1:options.index("--out")]
    assert data == [str(tmp_path / "data" / f) for f in ("aime2024.parquet", "aime2025.parquet")]
    assert "actor_rollout_ref.rollout.tensor_model_parallel_size=8" in evaluation


def test_ray_job_waits_unless_told_not_to(fakes, tmp_path):
    """By default `ray job submit` waits (then the evaluation runs); RAY_NO_WAIT=1 submits in the background and
    skips the evaluation, printing how to run it later."""
    bin_dir, log = fakes
    env = script_env(tmp_path, PYTHON=str(bin_dir / "python"), FAKE_LOG=str(log), LAUNCH="ray_job", EVAL="0",
                     PATH=f"{bin_dir}:{script_env(tmp_path)['PATH']}")
    run_script("authors_example.sh", env)
    assert "--no-wait" not in _calls(log)[0]
    log.unlink()
    proc = run_script("authors_example.sh", {**env, "RAY_NO_WAIT": "1", "EVAL": "1"})
    (job,) = _calls(log)
    assert "--no-wait" in job[:job.index("--")] and "EVAL_ONLY=1" in proc.stderr


def test_ray_cluster_starts_ray_with_the_plugin_in_its_environment(tmp_path):
    """ray_cluster.sh head/worker: `ray start` sees VERL_USE_EXTERNAL_MODULES and the checkout on PYTHONPATH
    (every process Ray starts inherits them), GLOO follows NCCL's interface; a worker needs the head address."""
    log = tmp_path / "ray.log"
    fake = _fake(tmp_path / "ray", f'#!/usr/bin/env bash\necho "$* | $VERL_USE_EXTERNAL_MODULES | $PYTHONPATH | '
                                   f'$GLOO_SOCKET_IFNAME" >> {log}\n')
    env = script_env(tmp_path, RAY=str(fake), NCCL_SOCKET_IFNAME="ib0")
    env.pop("GLOO_SOCKET_IFNAME", None)
    run_script("multinode/ray_cluster.sh", env, "head")
    run_script("multinode/ray_cluster.sh", env, "worker", "10.0.0.1")
    head, worker = log.read_text().splitlines()
    assert head.startswith("start --head --port=6379") and worker.startswith("start --address=10.0.0.1:6379")
    for line in (head, worker):
        _, plugin, path, gloo = line.split(" | ")
        assert plugin == "recipe.bapo.plugin" and path.split(":")[0] == str(ROOT) and gloo == "ib0"
    assert run_script("multinode/ray_cluster.sh", env, "worker", check=False).returncode == 2
