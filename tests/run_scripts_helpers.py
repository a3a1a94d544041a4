"""Shared by tests/test_run_scripts.py and tests/test_dry_run.py: every shipped run-script configuration
(script x method x size) and how to get the argument list a script hands to main_bapo / the dry run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "run_scripts"

# (script, environment): every method and size each script offers
CASES = [
    *[("r1_7b_8k_staleness8.sh", {"METHOD": m}) for m in ("bapo", "grpo", "clip_higher", "clip_0.8_1.5", "clip_0.5_1.2")],
    ("r1_7b_32k_staleness_sweep.sh", {}),  # the whole grid (six runs)
    *[("r1_32b.sh", {"LENGTH": length, "METHOD": m}) for length in ("32k", "64k") for m in ("bapo", "grpo")],
    # the Megatron layouts (STRATEGY=megatron): BAPO and its GRPO baseline at each size
    *[("r1_7b_8k_staleness8.sh", {"METHOD": m, "STRATEGY": "megatron"}) for m in ("bapo", "grpo")],
    *[("r1_32b.sh", {"LENGTH": length, "METHOD": m, "STRATEGY": "megatron"}) for length in ("32k", "64k")
      for m in ("bapo", "grpo")],
    *[("octothinker_3b.sh", {"METHOD": m}) for m in ("bapo", "grpo")],
    ("authors_example.sh", {}),
    ("smoke_gpu.sh", {}),  # BAPO and GRPO
    *[("partial_rollout_7b.sh", {"BUDGET": b, "METHOD": m}) for b in ("2048", "4096") for m in ("bapo", "grpo")],
]

DATA_FILES = ("skywork_or1_math_train.parquet", "aime2024.parquet", "aime2025.parquet")


def case_id(case) -> str:
    script, env = case
    return script.removesuffix(".sh") + "".join(f"-{v}" for v in env.values())


def make_data_dir(root: Path) -> Path:
    """Empty stand-ins for the parquet files of run_scripts/prepare_data.sh (the dry run checks they exist)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in DATA_FILES:
        (root / name).touch()
    return root


def script_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "DRY_RUN", "LAUNCH", "METHOD", "LENGTH", "STRATEGY"))}
    env.update(DATA=str(tmp / "data"), CKPT=str(tmp / "ckpt"), LOGS=str(tmp / "logs"), RUN_ID="test",
               PYTHON=str(ROOT / ".venv" / "bin" / "python"), HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def run_script(script: str, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def printed_runs(script: str, env: dict[str, str], *args: str) -> list[list[str]]:
    """The argument list of each run the script would start (DRY_RUN=print: one per line, empty line after each)."""
    out = run_script(script, {**env, "DRY_RUN": "print"}, *args).stdout
    return [block.split("\n") for block in out.strip("\n").split("\n\n") if block]
