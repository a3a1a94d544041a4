"""recipe.dry_run: every shipped run script passes it; broken cluster configs are rejected naming the key; the
plan's arithmetic equals hand computations; shipped model facts give the published parameter counts; every
command in the README composes and passes verl's validate_config. In-process (one Python), no Ray, no GPU."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from recipe.dry_run import DryRunError, dry_run
from recipe.dry_run.core import compose_config, split_config_name, verl_checks
from recipe.dry_run.model import is_local_path, load_model_facts
from run_scripts_helpers import CASES, ROOT, case_id, make_data_dir, printed_runs, script_env

GIB = 1024**3


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry_run")
    make_data_dir(root / "data")
    return root


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_script_passes_its_dry_run(case, tmp):
    """Each run of each script (every method and size) composes, passes verl's checks and ours, and plans the
    staleness its own batch keys define."""
    script, env = case
    for args in printed_runs(script, script_env(tmp, **env)):
        result = dry_run(args)
        actor = result.config.actor_rollout_ref.actor
        assert result.plan.staleness == actor.ppo_epochs * result.config.data.train_batch_size / actor.ppo_mini_batch_size


# what each method must put in the run's config (paper Sec. 5.1, Fig. 7; DAPO's clip-higher; the authors' script):
# {method: (policy_loss.loss_mode, algorithm.adv_estimator, {more actor keys})}
METHOD_SETTINGS = {
    "bapo": ("bapo", "bapo", {"policy_loss.rho_target": 0.4, "policy_loss.dual_clip_c": None}),
    "bapo_authors_code": ("bapo", "bapo", {"policy_loss.dual_clip_c": 3.0}),
    "grpo": ("vanilla", "grpo", {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0}),
    "clip_higher": ("vanilla", "grpo", {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}),
    "clip_0.8_1.5": ("vanilla", "grpo", {"clip_ratio_low": 0.2, "clip_ratio_high": 0.5}),
    "clip_0.5_1.2": ("vanilla", "grpo", {"clip_ratio_low": 0.5, "clip_ratio_high": 0.2}),
}


def test_every_method_is_checked_here():
    from recipe.sweep.grid import method_names

    assert sorted(METHOD_SETTINGS) == method_names()


@pytest.mark.parametrize("method", METHOD_SETTINGS)
def test_dry_run_writes_the_composed_config_with_the_method(method, tmp, tmp_path, capsys):
    """The script's DRY_RUN=1 command (`python -m recipe.dry_run --save-config $LOGS/<run>/config.yaml ARGS`)
    writes the whole config; it holds the method's loss, advantage estimator and clip keys. (Broken by writing
    the config before the script's overrides were applied (compose_config([])): every method failed.)"""
    import yaml

    from recipe.dry_run.__main__ import main

    args = printed_runs("r1_7b_8k_staleness8.sh", script_env(tmp, METHOD=method))[0]
    path = tmp_path / "logs" / "run" / "config.yaml"
    assert main(["--save-config", str(path), *args]) == 0
    assert f"composed config: {path}" in capsys.readouterr().err
    actor = yaml.safe_load(path.read_text())["actor_rollout_ref"]["actor"]
    loss_mode, estimator, keys = METHOD_SETTINGS[method]
    assert actor["policy_loss"]["loss_mode"] == loss_mode
    assert yaml.safe_load(path.read_text())["algorithm"]["adv_estimator"] == estimator
    for key, value in keys.items():
        node = actor
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    assert actor["optim"]["lr"] == 2e-6  # the script's own settings are there too


@pytest.fixture(scope="module")
def runs_32b(tmp):
    """The 32B x 4-node BAPO run's argument list, and the 7B 8k one."""
    return (printed_runs("r1_32b.sh", script_env(tmp, LENGTH="32k", METHOD="bapo"))[0],
            printed_runs("r1_7b_8k_staleness8.sh", script_env(tmp, METHOD="bapo"))[0])


A = "actor_rollout_ref."
# (what is broken, base run, overrides, key the message must name, words it must contain)
BROKEN = [
    ("mini-batch x n not divisible by DP", "32b", ["trainer.n_gpus_per_node=6"], A + "actor.ppo_mini_batch_size", "data-parallel"),
    ("train batch not a multiple of mini-batch (verl pads)", "32b", ["data.train_batch_size=200"], "data.train_batch_size", "staleness"),
    ("actor token limit x sp below prompt + response", "32b", [A + "actor.ppo_max_token_len_per_gpu=4096"], A + "actor.ppo_max_token_len_per_gpu", "32768"),
    ("log-prob token limit below prompt + response", "32b", [A + "rollout.log_prob_max_token_len_per_gpu=4096"], A + "rollout.log_prob_max_token_len_per_gpu", "old-log-prob"),
    ("reference token limit below prompt + response", "32b", [A + "actor.use_kl_loss=True", A + "ref.log_prob_max_token_len_per_gpu=4096"], A + "ref.log_prob_max_token_len_per_gpu", "reference"),
    ("dynamic bsz differs between actor and log-prob pass", "32b", [A + "rollout.log_prob_use_dynamic_bsz=False"], A + "rollout.log_prob_use_dynamic_bsz", "actor.use_dynamic_bsz"),
    ("fixed micro-batch does not divide the update", "32b", [A + "actor.use_dynamic_bsz=False", A + "rollout.log_prob_use_dynamic_bsz=False", A + "actor.ppo_micro_batch_size_per_gpu=3", A + "rollout.log_prob_micro_batch_size_per_gpu=4"], A + "actor.ppo_micro_batch_size_per_gpu", "128 sequences"),
    ("fixed log-prob micro-batch does not divide the batch", "32b", [A + "actor.use_dynamic_bsz=False", A + "rollout.log_prob_use_dynamic_bsz=False", A + "actor.ppo_micro_batch_size_per_gpu=4", A + "rollout.log_prob_micro_batch_size_per_gpu=3"], A + "rollout.log_prob_micro_batch_size_per_gpu", "512 sequences"),
    ("Ulysses sp does not divide the GPUs", "32b", [A + "actor.ulysses_sequence_parallel_size=16", "trainer.nnodes=3"], A + "actor.ulysses_sequence_parallel_size", "GPU count"),
    ("Ulysses sp does not divide the attention heads", "32b", [A + "actor.ulysses_sequence_parallel_size=3", "trainer.nnodes=3"], A + "actor.ulysses_sequence_parallel_size", "40 attention heads"),
    ("Ulysses sp vs KV heads", "32b", [A + "actor.ulysses_sequence_parallel_size=5", "trainer.nnodes=5"], A + "actor.ulysses_sequence_parallel_size", "8 KV heads"),
    ("rollout TP 3 for 28 heads", "7b", [A + "rollout.tensor_model_parallel_size=3"], A + "rollout.tensor_model_parallel_size", "28 attention heads"),
    ("rollout TP vs KV heads", "7b", [A + "rollout.tensor_model_parallel_size=7", "trainer.n_gpus_per_node=7", A + "actor.ppo_mini_batch_size=112", "data.train_batch_size=224"], A + "rollout.tensor_model_parallel_size", "4 KV heads"),
    ("rollout replicas do not tile the GPUs", "32b", [A + "rollout.data_parallel_size=3"], A + "rollout.tensor_model_parallel_size", "must divide the 32 GPUs"),
    ("prompt + response beyond max_position_embeddings", "32b", ["data.max_response_length=140000", A + "actor.ppo_max_token_len_per_gpu=65536", A + "rollout.log_prob_max_token_len_per_gpu=65536", A + "rollout.max_model_len=null"], "data.max_response_length", "max_position_embeddings=131072"),
    ("vLLM max_model_len below prompt + response", "32b", [A + "rollout.max_model_len=16384"], A + "rollout.max_model_len", "32768"),
    ("no chunked prefill and a small token budget", "32b", [A + "rollout.enable_chunked_prefill=False"], A + "rollout.max_num_batched_tokens", "chunked prefill"),
    ("GRPO-style advantages with one response per prompt", "32b", [A + "rollout.n=1"], A + "rollout.n", ">= 2"),
    ("legacy reward_model.reward_manager", "32b", ["reward_model.reward_manager=dapo"], "reward_model.reward_manager", "ignores it"),
    ("legacy top-level custom_reward_function", "32b", ["custom_reward_function.path=/x/reward.py"], "custom_reward_function.path", "reward.custom_reward_function"),
    ("relative checkpoint path on 4 nodes", "32b", ["trainer.default_local_dir=checkpoints/run"], "trainer.default_local_dir", "relative path"),
    ("missing local data file", "32b", ["data.train_files=/nonexistent/train.parquet"], "data.train_files", "does not exist"),
    ("missing local model dir", "32b", [A + "model.path=/nonexistent/model"], A + "model.path", "does not exist"),
    ("rollout.mode=sync (removed)", "32b", [A + "rollout.mode=sync"], A + "rollout.mode", "async"),
    ("fsdp_config.strategy alone (silently FSDP1)", "7b", [A + "actor.strategy=fsdp", A + "actor.fsdp_config.strategy=fsdp2"], A + "actor.fsdp_config.strategy", "ignored"),
    ("wandb without a key", "32b", ["trainer.logger=[console,wandb]"], "trainer.logger", "WANDB_API_KEY"),
    ("invalid gpu_memory_utilization", "32b", [A + "rollout.gpu_memory_utilization=1.5"], A + "rollout.gpu_memory_utilization", "0 < value <= 1"),
    ("BAPO bounds out of range (our dataclass check)", "32b", [A + "actor.policy_loss.c_high_start=0.9"], "c_high_start=0.9", "valid"),
    ("unknown key (composition)", "32b", [A + "actor.ppo_mini_batchsize=64"], "ppo_mini_batchsize", "composition"),
]


@pytest.mark.parametrize("what, base, overrides, key, words", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_cluster_config_is_rejected_naming_the_key(what, base, overrides, key, words, runs_32b):
    """Each config would fail (or silently change) on the cluster; the dry run refuses it, naming the key.
    (Each check was disabled once by returning [] from its function: its rows failed.)"""
    assert_rejected([*(runs_32b[0] if base == "32b" else runs_32b[1]), *overrides], key, words)


def assert_rejected(args: list[str], key: str, words: str) -> None:
    """The dry run refuses these arguments with a line naming `key` that contains `words`."""
    with pytest.raises(DryRunError) as err:
        dry_run(args)
    matching = [line for line in str(err.value).splitlines() if key in line]
    assert matching, f"{key} not named in:\n{err.value}"
    assert any(words in line for line in matching), f"{words!r} not in: {matching}"


def test_file_logger_without_path_on_several_nodes(runs_32b):
    """The run scripts give verl's file logger an absolute path; without it a multi-node run is refused."""
    args = [a for a in runs_32b[0] if "VERL_FILE_LOGGER_PATH" not in a]
    with pytest.raises(DryRunError, match="VERL_FILE_LOGGER_PATH"):
        dry_run(args)


def test_valid_32b_4node_plan_matches_hand_computation(runs_32b):
    """32B, 4 nodes x 8 GPUs, sp 4, TP 4, 256 x 16, mini 64, 2 epochs, 1024 + 31744 tokens, 16k tokens/GPU."""
    result = dry_run(runs_32b[0])
    p, m = result.plan, result.model
    assert (p.gpus, p.dp, p.replicas) == (32, 32 // 4, 32 // 4)
    assert p.staleness == 2 * 256 / 64 == 8
    assert p.responses_per_step == 256 * 16
    assert p.seqs_per_update_per_rank == 64 * 16 // 8 == 128
    assert p.micro_batches_per_update == -(-128 * 32768 // (16384 * 4))  # ceil(seqs x len / (limit x sp)) = 64
    assert p.tokens_per_step_max == 4096 * 32768
    assert p.memory_gib["model states"] == pytest.approx(16 * 32_763_876_352 / 32 / GIB)
    assert p.memory_gib["vllm weights"] == pytest.approx(2 * 32_763_876_352 / 4 / GIB)
    # KV: 2 (K and V) x 64 layers x 8/4 KV heads per GPU x 128 x 2 bytes = 64 KiB per token and GPU
    kv_room = (0.8 * 80 * GIB - 2 * 32_763_876_352 / 4 - 2 * GIB)
    assert p.kv_tokens_per_replica == int(kv_room // (2 * 64 * 2 * 128 * 2))
    # FLOPs: the update is ~ ppo_epochs x 6 x params x tokens (plus attention, < 40% more at 23k tokens)
    update = p.flops["actor update (ppo_epochs x fwd+bwd)"]
    assert 1.0 < update / (2 * 6 * m.num_params * p.tokens_per_step_mean) < 1.4
    assert sum(p.flops.values()) / update == pytest.approx(1 + (1 / 3 + 1 / 3 + 2 / 3) / 2)  # gen, old-lp, probe
    assert p.gpu_hours_per_step > 0 and result.warnings == []


@pytest.mark.parametrize("model_id, published", [
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 7_615_616_512),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 32_763_876_352),
    ("OctoThinker/OctoThinker-3B-Long-Zero", 3_212_749_824),  # Llama-3.2-3B's published count
])
def test_shipped_model_facts_give_the_published_parameter_count(model_id, published):
    assert load_model_facts(model_id).num_params == published


def test_local_config_json_wins_and_unknown_hub_ids_fail_offline(tmp_path):
    """A local model dir's config.json is used (not the shipped file); an unshipped hub id offline is an error."""
    shipped = json.loads((ROOT / "configs/models/deepseek-ai--DeepSeek-R1-Distill-Qwen-7B.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**shipped, "num_hidden_layers": 2}))
    facts = load_model_facts(str(tmp_path))
    assert facts.num_layers == 2 and facts.source == str(tmp_path / "config.json")
    assert is_local_path(str(tmp_path)) and not is_local_path("org/name")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_model_facts("someone/not-shipped")


# ---------------------------------------------------------------------------------------------- README commands

def _readme_commands() -> list[str]:
    """Every README command that starts a trainer: main_bapo lines, run scripts, and sweeps through a run script
    (continuations joined; lines with a `...` placeholder are skipped). Not covered here: the laptop sweep (`python -m recipe.sweep` without --script, which
    builds cpu_tiny configs inside recipe/sweep)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if "..." in line.split():  # an elided command (a placeholder), not one to run as written
                continue
            if "recipe.bapo.main_bapo" in line or re.search(r"run_scripts/(?!prepare_data|eval_aime|multinode)\w+\.sh", line):
                commands.append(line)
    # inline commands with arguments (a bare `python -m recipe.bapo.main_bapo` names the entry point)
    commands += re.findall(r"`(python -m recipe\.bapo\.main_bapo [^`]+)`", text)
    return commands


def _argument_lists(command: str, tmp: Path) -> list[list[str]]:
    words = shlex.split(command)
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[0].endswith(".sh"):
        extra = words[words.index("--") + 1:] if "--" in words else []
        return printed_runs(Path(words[0]).name, script_env(tmp, **{k: v for k, v in env.items() if k != "DRY_RUN"}),
                            *(["--", *extra] if extra else []))
    if words[0] == "sbatch":  # the Slurm launcher runs SCRIPT with the exported variables
        exported = dict(kv.split("=", 1) for kv in next(w for w in words if w.startswith("--export="))[9:].split(",")[1:])
        nodes = next(w for w in words if w.startswith("--nodes="))[8:]
        return printed_runs(Path(exported.pop("SCRIPT")).name, script_env(tmp, **exported, NNODES=nodes))
    if words[:3] == ["python", "-m", "recipe.sweep"]:  # --cluster --script: one script call per run, printed
        words[words.index("--out") + 1] = str(tmp / "sweep")
        out = subprocess.run([str(ROOT / ".venv/bin/python"), *words[1:]], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=300).stdout
        return [args for line in out.splitlines() for args in _argument_lists(line, tmp)]
    assert words[:3] == ["python", "-m", "recipe.bapo.main_bapo"], command
    return [words[3:]]


def test_readme_has_trainer_commands():
    assert any("run_scripts/" in c for c in _readme_commands())
    assert any("main_bapo" in c and "cpu_tiny" not in c for c in _readme_commands())


@pytest.mark.parametrize("command", [  # a sweep command prints its runs from a fresh Python
    pytest.param(c, marks=pytest.mark.slow) if c.startswith("python -m recipe.sweep") else c for c in _readme_commands()])
def test_readme_command_composes_and_passes_validate_config(command, tmp):
    """Composition + verl's validate_config (and the dataclasses the trainer builds) for each README command.
    (The README's old GPU example, without rollout.name and micro-batch settings, failed here.)"""
    for args in _argument_lists(command, tmp):
        config_name, overrides = split_config_name(args)
        cfg = compose_config(overrides, config_name)
        path = str(cfg.actor_rollout_ref.model.path)
        verl_checks(cfg, model_local=is_local_path(path) and Path(path).is_dir())


@pytest.mark.slow
def test_dry_run_script_end_to_end_subprocess(tmp):
    """`DRY_RUN=1 run_scripts/r1_32b.sh` as a user runs it: exit 0, the plan, the composed config in the run's log
    folder; a broken override: exit 1 naming the key."""
    env = script_env(tmp, LENGTH="32k", METHOD="bapo", DRY_RUN="1")
    proc = subprocess.run(["bash", str(ROOT / "run_scripts/r1_32b.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "actor DP = GPUs / sp = 32 / 4 = 8" in proc.stdout and "= 8 optimizer updates per rollout batch" in proc.stdout
    # docs/dry_run.md shows this output for the same script: it must still be what the dry run prints
    readme = (ROOT / "docs" / "dry_run.md").read_text()
    shown = re.search(r"```text\n\$ DRY_RUN=1 LENGTH=32k METHOD=bapo .*?run_scripts/r1_32b.sh\n(.*?)```", readme, re.S)
    printed = [line for line in proc.stdout.splitlines() if not line.startswith("[validate_config]")]
    assert shown and shown.group(1).splitlines() == printed
    written = tmp / "logs" / "r1-32b-32k-bapo" / "config.yaml"  # the run's log folder, $LOGS/<run name>
    assert f"composed config: {written}" in proc.stderr
    assert "loss_mode: bapo" in written.read_text()
    bad = subprocess.run(["bash", str(ROOT / "run_scripts/r1_32b.sh"), "--", A + "actor.ppo_max_token_len_per_gpu=4096"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and A + "actor.ppo_max_token_len_per_gpu=4096" in bad.stderr


def test_eval_aime_gpu_command_passes_the_dry_run(tmp, tmp_path):
    """`run_scripts/eval_aime.sh MODEL 16` on GPU (what every run script ends with): the overrides
    recipe.evaluation builds from its arguments pass the dry run. (Before eval_aime.sh set rollout.name=vllm
    and dynamic bsz, verl's validate_config refused them.)"""
    from recipe.evaluation import generation_overrides

    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {log}\n')
    fake.chmod(0o755)
    data = f"{tmp}/data/aime2024.parquet {tmp}/data/aime2025.parquet"
    env = script_env(tmp, PYTHON=str(fake), DEVICE="gpu", DATA=data, MAX_RESPONSE_LENGTH="31744", N_GPUS="8")
    subprocess.run(["bash", str(ROOT / "run_scripts/eval_aime.sh"), "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "16",
                    "--", A + "rollout.tensor_model_parallel_size=4"], env=env, check=True, timeout=60)
    argv = log.read_text().splitlines()
    assert argv[:3] == ["-m", "recipe.evaluation", "run"]
    cut = argv.index("--")
    options, extra = argv[3:cut], argv[cut + 1:]
    value = lambda flag: options[options.index(flag) + 1]  # noqa: E731
    files = options[options.index("--data") + 1:options.index("--out")]
    overrides = generation_overrides(value("--model"), files, int(value("--k")), Path(value("--out")),
                                     float(value("--temperature")), float(value("--top-p")),
                                     int(value("--max-response-length")))
    result = dry_run([*overrides, *extra])
    assert result.config.actor_rollout_ref.rollout.val_kwargs.n == 16 and result.plan.rollout_tp == 4


# ---------------------------------------------------------------------------------------------- Megatron

@pytest.fixture(scope="module")
def runs_megatron(tmp):
    """STRATEGY=megatron: the 7B 8k BAPO run (TP 2, PP 2, VPP 2) and the 32B 32k one (TP 8, CP 2)."""
    return {"7bm": printed_runs("r1_7b_8k_staleness8.sh", script_env(tmp, METHOD="bapo", STRATEGY="megatron"))[0],
            "32bm": printed_runs("r1_32b.sh", script_env(tmp, LENGTH="32k", METHOD="bapo", STRATEGY="megatron"))[0]}


M = A + "actor.megatron."
FIXED_7B = [A + "actor.use_dynamic_bsz=False", A + "rollout.log_prob_use_dynamic_bsz=False"]
# (what is broken, base run, overrides, key the message must name, words it must contain); each fails only after
# the cluster started (megatron-core or verl's Megatron engine), see recipe/dry_run/megatron.py for the sources
BROKEN_MEGATRON = [
    ("TP x PP x CP does not divide the GPUs", "32bm", ["trainer.nnodes=3"], M + "tensor_model_parallel_size * pipeline * context", "GPU count"),
    ("TP does not divide the attention heads", "32bm", [M + "tensor_model_parallel_size=16"], M + "tensor_model_parallel_size", "40 attention heads"),
    ("TP vs the KV heads (query groups)", "7bm", [M + "tensor_model_parallel_size=7", "trainer.n_gpus_per_node=14"], M + "tensor_model_parallel_size", "4 KV heads"),
    ("PP does not divide the layers", "7bm", [M + "pipeline_model_parallel_size=3", "trainer.n_gpus_per_node=6"], M + "pipeline_model_parallel_size", "28 layers"),
    ("VPP does not divide a stage's layers", "7bm", [M + "virtual_pipeline_model_parallel_size=3"], M + "virtual_pipeline_model_parallel_size", "14 layers of each pipeline stage"),
    ("VPP without PP", "32bm", [M + "virtual_pipeline_model_parallel_size=2"], M + "virtual_pipeline_model_parallel_size", "pipeline_model_parallel_size > 1"),
    ("EP on a dense model", "32bm", [M + "expert_model_parallel_size=2"], M + "expert_model_parallel_size", "no experts"),
    ("CP without packed sequences", "32bm", [A + "model.use_remove_padding=False"], A + "model.use_remove_padding", "packed"),
    ("token limit x CP below prompt + response", "32bm", [A + "actor.ppo_max_token_len_per_gpu=8192"], A + "actor.ppo_max_token_len_per_gpu", "CP) must be >= max_prompt_length + max_response_length = 32768"),
    ("VPP: update micro-batches not a multiple of the group", "7bm", [*FIXED_7B, A + "actor.ppo_micro_batch_size_per_gpu=512", A + "rollout.log_prob_micro_batch_size_per_gpu=16"], A + "actor.ppo_micro_batch_size_per_gpu", "= 1 micro-batches, not a multiple of microbatch_group_size_per_vp_stage=2"),
    ("VPP: log-prob micro-batches not a multiple of the group", "7bm", [*FIXED_7B, A + "actor.ppo_micro_batch_size_per_gpu=16", A + "rollout.log_prob_micro_batch_size_per_gpu=2048"], A + "rollout.log_prob_micro_batch_size_per_gpu", "old-log-prob pass"),
    ("VPP: micro-batch group below PP", "7bm", [f"+{M}override_transformer_config.microbatch_group_size_per_vp_stage=1"], M + "override_transformer_config.microbatch_group_size_per_vp_stage", ">= pipeline_model_parallel_size=2"),
    ("BAPO with dynamic context parallel", "32bm", [M + "dynamic_context_parallel=True", M + "max_seqlen_per_dp_cp_rank=32768"], M + "dynamic_context_parallel", "bapo loss"),
    ("no bridge (verl's engine asserts use_mbridge)", "7bm", [M + "use_mbridge=False"], M + "use_mbridge", "asserts"),
]


@pytest.mark.parametrize("what, base, overrides, key, words", BROKEN_MEGATRON, ids=[b[0] for b in BROKEN_MEGATRON])
def test_broken_megatron_config_is_rejected_naming_the_key(what, base, overrides, key, words, runs_megatron):
    """Each Megatron layout would fail after the cluster started; the dry run refuses it, naming the key.
    (Each check was disabled once by returning [] from its function in megatron.py: its rows failed.)"""
    assert_rejected([*runs_megatron[base], *overrides], key, words)


def test_dynamic_context_parallel_is_refused_for_bapo_only(tmp, runs_megatron):
    """The refusal is BAPO's (its per-update search needs every rank's log-probs), not the baseline's."""
    grpo = printed_runs("r1_32b.sh", script_env(tmp, LENGTH="32k", METHOD="grpo", STRATEGY="megatron"))[0]
    dry_run([*grpo, M + "dynamic_context_parallel=True", M + "max_seqlen_per_dp_cp_rank=32768"])


def test_megatron_32b_plan_matches_hand_computation(runs_megatron):
    """32B, 4 x 8 GPUs, TP 8, PP 1, CP 2, distributed optimizer, params and optimizer offloaded, full recompute,
    16384 tokens per GPU: every Megatron memory term by hand (bytes, then GiB)."""
    result = dry_run(runs_megatron["32bm"])
    p = result.plan
    P, V, H, I, L, T = 32_763_876_352, 152_064, 5_120, 27_648, 64, 16_384
    assert (p.dp, p.sp) == (32 // (8 * 1 * 2), 2)
    assert p.seqs_per_update_per_rank == 64 * 16 // 2 == 512
    assert p.micro_batches_per_update == 512 * 32_768 // (16_384 * 2)  # CP 2 carries 2 x 16384 tokens per micro-batch
    p_gpu = P / 8  # PP 1: every layer and both embedding tables, split by TP 8
    params_grads, optimizer = (2 + 4) * p_gpu, 12 * p_gpu / (2 * 2)  # Adam states over DP 2 x CP 2
    acts = (L * T * H * 2 + T * (6 * H + 3 * I) * 2) / 8  # a checkpoint per layer + one layer recomputed, / TP
    logits = T * V / 8 * (2 + 4 + 4)
    assert p.memory_gib["model states"] == pytest.approx((params_grads + optimizer) / GIB)
    assert p.memory_gib["activations"] == pytest.approx(acts / GIB)
    assert p.memory_gib["logits"] == pytest.approx(logits / GIB)
    assert p.memory_gib["train peak"] == pytest.approx((params_grads + optimizer + acts + logits) / GIB)
    assert p.memory_gib["rollout phase total"] == pytest.approx(0.8 * 80)  # both offloaded: nothing resident
    text = p.text()
    assert "actor DP = GPUs / (TP*PP*CP) = 32 / (8*1*2) = 2" in text and "(DP*CP = 4)" in text
    assert f"{params_grads * 8 / GIB + optimizer * 8 / GIB:.0f} GiB per node" in text
    assert result.warnings == []


def test_megatron_7b_pipeline_plan_matches_hand_computation(runs_megatron):
    """7B, 8 GPUs, TP 2, PP 2, VPP 2: the busiest stage holds half the layers and one embedding table, and 1F1B
    with interleaving keeps 28 * (1 + 1/4) = 35 layers' checkpoints in flight; optimizer offloaded only."""
    p = dry_run(runs_megatron["7bm"]).plan
    P, V, H, I, T = 7_615_616_512, 152_064, 3_584, 18_944, 18_432
    p_gpu = (P - 2 * V * H) / (2 * 2) + V * H / 2
    params_grads, optimizer = 6 * p_gpu, 12 * p_gpu / 2  # DP 2 x CP 1
    acts = (35 * T * H * 2 + T * (6 * H + 3 * I) * 2) / 2
    assert p.dp == 2
    assert p.memory_gib["model states"] == pytest.approx((params_grads + optimizer) / GIB)
    assert p.memory_gib["activations"] == pytest.approx(acts / GIB)
    assert p.memory_gib["rollout phase total"] == pytest.approx(params_grads / GIB + 0.6 * 80)  # params+grads resident


def test_megatron_without_recompute_warns(runs_megatron):
    """FSDP's enable_gradient_checkpointing means nothing to Megatron: without a recompute setting, a warning."""
    args = [a for a in runs_megatron["7bm"] if "recompute" not in a]
    result = dry_run(args)
    assert any("recompute_granularity" in w.key for w in result.warnings)
    assert result.plan.memory_gib["activations"] > 10  # every layer's working set in flight


def test_memory_over_the_gpu_is_a_warning(runs_32b, monkeypatch):
    """The memory estimate is unverified, so exceeding the assumed GPU warns (naming the phase) but passes."""
    monkeypatch.setenv("DRY_RUN_GPU_GIB", "40")
    result = dry_run(runs_32b[0])
    assert result.plan.memory_gib["train peak"] > 40
    assert any("actor update" in w.message for w in result.warnings)
