"""`python -m recipe.sweep`: the grid's overrides and errors, and (marked trainer) a tiny grid through the
real CPU trainer: an interrupted run resumes from its checkpoint with every step once in its merged
metrics, a finished run is skipped; seeds fix verl's data order (checked on verl's own sampler); every
configs/regime/ file at the studies' staleness levels passes verl's driver-side validate_config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipe.sweep.grid import expand, method_overrides, seed_overrides, staleness_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_staleness_is_updates_per_rollout_batch():
    for level, batch in (("1", 16), ("4", 16), ("8", 16), ("8e2", 16), ("4", 256)):
        ov = dict(o.split("=") for o in staleness_overrides(level, batch))
        epochs, mini = int(ov["actor_rollout_ref.actor.ppo_epochs"]), int(ov["actor_rollout_ref.actor.ppo_mini_batch_size"])
        assert epochs * batch // mini == int(level.split("e")[0]) and batch % mini == 0


@pytest.mark.parametrize("level, message", [("3", "valid with e1: \\[1, 2, 4, 8, 16\\]"), ("0", "E dividing U"), ("8e3", "E dividing U"), ("x", "UeE")])
def test_bad_staleness_names_the_valid_values(level, message):
    with pytest.raises(ValueError, match=message):
        staleness_overrides(level, 16)


def test_methods_and_seeds():
    """A method of the grid is an option of configs/method/ (the scripts' METHOD names): its composed config has
    the method's window; an unknown name is refused before anything runs, naming the valid ones."""
    from recipe.sweep.launch import compose

    actor = compose("cpu_tiny", method_overrides("clip_0.5_1.2")).actor_rollout_ref.actor
    assert (actor.policy_loss.loss_mode, actor.clip_ratio_low, actor.clip_ratio_high) == ("vanilla", 0.5, 0.2)
    with pytest.raises(ValueError, match=r"'ppo' is unknown; valid \(configs/method/\): bapo, bapo_authors_code, clip_0.5_1.2, "
                                         r"clip_0.8_1.5, clip_higher, grpo$"):
        method_overrides("ppo")
    with pytest.raises(ValueError, match="clip:LOW,HIGH is now clip_LOW_HIGH"):
        method_overrides("clip:0.5,1.2")
    assert len({r.name for r in expand(["bapo", "grpo"], ["1", "8"], [0, 3], 16)}) == 2 * 2 * 2


REGIMES = sorted(path.stem for path in (ROOT / "configs" / "regime").glob("*.yaml"))


@pytest.mark.parametrize("regime", REGIMES)
def test_every_regime_gives_configs_verl_accepts_at_the_study_levels(regime):
    """Each documented regime, at the studies' staleness levels, passes verl's driver-side validate_config
    (batch sizes against the ranks, mini-batch against train batch) and the dry run's micro-batch check (which
    verl's workers enforce only after Ray started), and trains the level's updates per rollout batch."""
    from verl.utils.config import validate_config

    from recipe.dry_run.checks import check_micro_batches, geometry
    from recipe.sweep.launch import compose

    extra = [f"+regime={regime}"]
    batch = int(compose("cpu_tiny", extra).data.train_batch_size)
    for spec in expand(["bapo", "grpo"], ["1", "4e2", "8e4"], [0], batch, {"": extra}):
        config = compose("cpu_tiny", list(spec.overrides))
        validate_config(config, use_reference_policy=False, use_critic=False)
        assert check_micro_batches(config, geometry(config, use_ref=False)) == []  # verl's worker would refuse these
        actor = config.actor_rollout_ref.actor
        assert actor.ppo_epochs * config.data.train_batch_size // actor.ppo_mini_batch_size == int(spec.staleness.split("e")[0])


def seed_entries(node, path=""):
    """(dotted key, value) of every key named *seed in a config subtree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from seed_entries(value, f"{path}.{key}" if path else key)
            if str(key).endswith("seed") and not isinstance(value, dict):
                yield f"{path}.{key}" if path else key, value


def test_a_seed_sets_every_seed_in_the_config():
    from omegaconf import OmegaConf

    from recipe.sweep.launch import compose

    config = compose("cpu_tiny", seed_overrides(7))
    tree = OmegaConf.to_container(config, resolve=False)
    seeds = dict(seed_entries(tree))
    assert "data.seed" in seeds and "actor_rollout_ref.rollout.seed" in seeds
    assert seeds == {key: 7 for key in seeds}


def test_a_seed_fixes_verls_data_order():
    """The seed overrides reach verl's own train sampler: the same seed gives the same prompt order."""
    from verl.trainer.ppo.utils import create_rl_sampler

    from recipe.sweep.launch import compose

    def order(seed):
        return list(create_rl_sampler(compose("cpu_tiny", seed_overrides(seed)).data, range(512)))

    assert order(3) == order(3)
    assert order(3) != order(4)


def sweep(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "recipe.sweep", "--out", str(out), "--config-name", "cpu_tiny", "--methods", "grpo",
            "--staleness", "2", "--save-freq", "1", "--jobs", "1", "--progress-every", "1", "--dump-rollouts", *args, "--",
            "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4", "trainer.val_before_train=False", "trainer.test_freq=-1"]  # fmt: skip


def env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "RAY_ADDRESS", "RANK")} | {"PYTHONUNBUFFERED": "1"}


def prompts(run: Path, step: int) -> list[str]:
    return sorted(json.loads(line)["input"] for line in (run / "rollouts" / f"{step}.jsonl").read_text().splitlines())


@pytest.mark.trainer
def test_sweep_resumes_an_interrupted_run_and_skips_finished_ones(tmp_path):
    out = tmp_path / "sweep"
    first = out / "grpo-s2-seed0"
    tracker = first / "checkpoints" / "latest_checkpointed_iteration.txt"
    proc = subprocess.Popen(sweep(out, "--seeds", "0", "--steps", "3"), cwd=ROOT, env=env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 600
    logged = first / "metrics.attempt0.jsonl"
    # killed right after its step-1 checkpoint and the step-1 row (verl saves the checkpoint before it logs the step)
    while not (tracker.exists() and tracker.read_text().strip() == "1" and logged.exists() and logged.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    info = json.loads((first / "run.json").read_text())
    assert not info["finished"] and len(info["attempts"]) == 1

    again = subprocess.run(sweep(out, "--seeds", "0", "--steps", "3"), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "grpo-s2-seed0: interrupted earlier, resuming" in again.stdout
    assert "grpo-s2-seed0: step " in again.stdout  # progress lines
    info = json.loads((first / "run.json").read_text())
    assert info["finished"] and [a["resumed_from"] for a in info["attempts"]] == [0, 1]
    merged = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in merged] == [1, 2, 3]
    resumed = [json.loads(line)["step"] for line in (first / "metrics.attempt1.jsonl").read_text().splitlines()]
    assert resumed[0] == 2  # the second attempt continued from the checkpoint instead of starting over
    assert not (first / "checkpoints").exists()  # removed once finished

    third = subprocess.run(sweep(out, "--seeds", "0", "--steps", "3"), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and third.stdout.count("finished earlier, skipped") == 1, third.stdout + third.stderr
    assert len(json.loads((first / "run.json").read_text())["attempts"]) == 2

    assert len(prompts(first, 1)) == 4 * 4  # --dump-rollouts: step 1's 4 prompts x 4 responses


def test_cluster_mode_calls_the_paper_run_script_with_the_grid(tmp_path, capsys):
    """Each printed line, run through the script's own DRY_RUN=print, carries the cell's seed, staleness and method."""
    from recipe.sweep.__main__ import main

    script = ROOT / "run_scripts" / "r1_7b_32k_staleness_sweep.sh"
    assert main(["--cluster", "--script", str(script), "--methods", "bapo", "clip_higher", "--staleness", "2", "4",
                 "--seeds", "3", "--out", str(tmp_path)]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    cells = set()
    for line in lines:
        args = subprocess.run(["bash", "-c", f"DRY_RUN=print {line}"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert args.returncode == 0, args.stderr
        got = dict(a.split("=", 1) for a in args.stdout.split() if "=" in a)
        assert got["data.seed"] == got["actor_rollout_ref.rollout.seed"] == "3"
        run = Path(got["+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH"]).parents[1]
        assert run.parent == tmp_path and (run / "run.json").exists()
        staleness = int(got["data.train_batch_size"]) // int(got["actor_rollout_ref.actor.ppo_mini_batch_size"])
        method = got["method"]  # the script's METHOD is the grid's name (configs/method/)
        assert run.name == f"{method}-s{staleness}-seed3"  # the folder the report reads is the cell that ran
        cells.add((method, staleness))
    assert cells == {("bapo", 2), ("bapo", 4), ("clip_higher", 2), ("clip_higher", 4)}
    with pytest.raises(SystemExit):
        main(["--cluster", "--script", str(ROOT / "run_scripts" / "r1_7b_8k_staleness8.sh"), "--staleness", "2", "4", "--out", str(tmp_path / "b")])
