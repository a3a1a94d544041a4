"""`make demo`: BAPO vs the GRPO baseline through the real verl trainer on a laptop CPU, in the calibrated
off-policy regime of the multi-seed study (docs/study_cpu_g8/).

1. builds (or reuses) the tiny warm-started model and its synthetic AIME-format data;
2. trains BAPO for 20 steps (a run of the study): `python -m recipe.bapo.main_bapo --config-name cpu_tiny
   +regime=cpu_stress_g8` at staleness 8e4
   (8 optimizer updates per rollout batch: 4 epochs over 2 mini-batches, the level at which the GRPO
   baseline clips like the paper's; the exact command is in <run>/bapo-s8e4-seed0/command.sh);
3. trains the GRPO baseline at identical settings: verl's vanilla PPO loss with clip [0.8, 1.2]
   (clip_ratio_low = clip_ratio_high = 0.2) and verl's grpo advantages; side by side with BAPO
   (two trainer processes, each with its own local Ray instance) unless --sequential;
4. prints each run's step, score and elapsed time while they train, and writes a run folder:
   <run>/{bapo,grpo}-s8e4-seed0/ (sweep run folders: metrics.jsonl, train.attempt0.log, run.json,
   command.sh, config.yaml), <run>/comparison.png and <run>/summary.md.

    python -m recipe.demo [--steps 20] [--seed 0] [--out runs/demo-<time>] [--only bapo|grpo] [--sequential] [-- extra overrides]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from recipe.data.tiny_assets import build_tiny_assets
from recipe.report import write_report
from recipe.sweep.grid import expand
from recipe.sweep.launch import compose, prepare, run_folders

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["bapo", "grpo"]
# 4 epochs x 2 mini-batches: the calibrated level (docs/study_cpu_epochs/); 8 mini-batches x 1 epoch clips 2x less
STALENESS = "8e4"
# groups of 8 responses over 8 prompts, 20 steps (docs/study_cpu_g8/): GRPO clips in the paper's range here
REGIME = ["+regime=cpu_stress_g8"]
DEMO_STEPS = 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"training steps per run (default {DEMO_STEPS}, as the study's runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="run folder (default runs/demo-<time>)")
    parser.add_argument("--only", choices=METHODS, default=None, help="train one of the two runs")
    parser.add_argument("--sequential", action="store_true", help="train the runs one after the other (default: side by side)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs (after --)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps={args.steps}: must be >= 1")
    start = time.perf_counter()
    run_dir = Path(args.out or ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    assets = build_tiny_assets(verbose=True)
    print(f"[demo] tiny assets: {assets.root} (warm-start accuracy {assets.accuracy:.2f})", flush=True)
    extra = [*REGIME, f"trainer.total_training_steps={args.steps}", *args.overrides]
    batch = int(compose("cpu_tiny", extra).data.train_batch_size)
    specs = expand([args.only] if args.only else METHODS, [STALENESS], [args.seed], batch, variants={"": extra})
    folders = []
    for spec in specs:
        prepare(run_dir / spec.name, spec, "cpu_tiny", save_freq=10)
        folders.append(run_dir / spec.name)
        print(f"[demo] {spec.name}: {run_dir / spec.name}/command.sh", flush=True)
    # every Ray worker of a run is pinned to one thread and they mostly take turns, so one run keeps about
    # one core busy: on a 2-core laptop the two runs side by side take little longer than one
    failed = run_folders(folders, jobs=1 if args.sequential else len(folders), progress_every=10.0)
    if failed:
        raise SystemExit(f"[demo] failed: {', '.join(failed)} (see train.attempt*.log in their folders)")
    summary = write_report(folders, run_dir, title="BAPO vs GRPO on the tiny CPU task, calibrated off-policy regime (staleness 8e4)")
    print(f"[demo] finished in {time.perf_counter() - start:.0f}s")
    print(f"[demo] plot:    {run_dir / 'comparison.png'}")
    print(f"[demo] summary: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
