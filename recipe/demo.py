"""`make demo`: BAPO vs the GRPO baseline through the real verl trainer on a laptop CPU.

1. builds (or reuses) the tiny warm-started model and its synthetic AIME-format data;
2. trains BAPO: `python -m recipe.bapo.main_bapo --config-name cpu_tiny` (8 optimizer updates per
   rollout batch, i.e. staleness 8);
3. trains the GRPO baseline at identical settings: verl's vanilla PPO loss with clip [0.8, 1.2]
   (clip_ratio_low = clip_ratio_high = 0.2) and verl's grpo advantages; side by side with BAPO
   (two trainer processes, each with its own local Ray instance) unless --sequential;
4. writes a run folder: <run>/{bapo,grpo}/metrics.jsonl (verl's JSONL), train.log, run.json,
   <run>/comparison.png and <run>/summary.md.

    python -m recipe.demo [--steps 20] [--out runs/demo-<time>] [--only bapo|grpo] [--sequential] [-- extra overrides]
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from recipe.bapo.main_bapo import run_logged
from recipe.data.tiny_assets import build_tiny_assets
from recipe.report import write_report

ROOT = Path(__file__).resolve().parents[1]
BASELINE = [
    "policy_loss@actor_rollout_ref.actor.policy_loss=grpo_vanilla",
    "algorithm.adv_estimator=grpo",
    "actor_rollout_ref.actor.clip_ratio_low=0.2",
    "actor_rollout_ref.actor.clip_ratio_high=0.2",
]
RUNS = {"bapo": [], "grpo": BASELINE}


def train(name: str, run_dir: Path, assets, steps: int, extra: list[str]) -> float:
    """One trainer run in a subprocess; returns its wall seconds. Raises with the log tail on failure."""
    out = run_dir / name
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "--config-name", "cpu_tiny",
        f"actor_rollout_ref.model.path={assets.model_dir}",
        f"data.train_files={assets.train_file}",
        f"data.val_files={assets.test_file}",
        f"trainer.total_training_steps={steps}",
        f"trainer.experiment_name={name}",
        f"trainer.default_local_dir={out / 'checkpoints'}",
        *RUNS[name], *extra,
    ]  # fmt: skip
    (out / "metrics.jsonl").unlink(missing_ok=True)
    print(f"[demo] training {name} ({steps} steps) -> {out}/train.log", flush=True)
    start = time.perf_counter()
    try:
        command = run_logged(args, out / "train.log", env={"VERL_FILE_LOGGER_PATH": str(out / "metrics.jsonl")})
    except RuntimeError as error:
        raise RuntimeError(f"{name} training failed: {error}") from None
    wall = time.perf_counter() - start
    shown = " ".join(shlex.quote(c) for c in ["python", *command[1:]])
    (out / "run.json").write_text(json.dumps({"name": name, "command": shown, "wall_seconds": wall}, indent=2))
    print(f"[demo] {name} done in {wall:.0f}s", flush=True)
    return wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    parser.add_argument("--out", default=None, help="run folder (default runs/demo-<time>)")
    parser.add_argument("--only", choices=sorted(RUNS), default=None, help="train one of the two runs")
    parser.add_argument("--sequential", action="store_true", help="train the runs one after the other (default: side by side)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs (after --)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps={args.steps}: must be >= 1")
    start = time.perf_counter()
    run_dir = Path(args.out or ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    assets = build_tiny_assets(verbose=True)
    print(f"[demo] tiny assets: {assets.root} (warm-start accuracy {assets.accuracy:.2f})", flush=True)
    names = [args.only] if args.only else list(RUNS)
    # every Ray worker of a run is pinned to one thread and they mostly take turns, so one run keeps about
    # one core busy: on a 2-core laptop the two runs side by side take little longer than one
    with ThreadPoolExecutor(max_workers=1 if args.sequential else len(names)) as pool:
        list(pool.map(lambda name: train(name, run_dir, assets, args.steps, args.overrides), names))
    summary = write_report([run_dir / n for n in names], run_dir, title="BAPO vs GRPO on the tiny CPU task")
    print(f"[demo] finished in {time.perf_counter() - start:.0f}s")
    print(f"[demo] metrics: {', '.join(str(run_dir / n / 'metrics.jsonl') for n in names)}")
    print(f"[demo] plot:    {run_dir / 'comparison.png'}")
    print(f"[demo] summary: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
