"""python -m recipe.sweep: run (laptop) or print (cluster) a grid of methods x staleness x seeds.

    python -m recipe.sweep --methods bapo grpo clip_higher --staleness 1 4 8 --seeds 0 1 2 3 4 \\
        --out runs/study [--jobs 2] [--steps N] [-- +regime=cpu_stress ...]
    python -m recipe.sweep ... --cluster            # print one command per run instead of running it
    python -m recipe.sweep ... --cluster --script run_scripts/r1_7b_32k_staleness_sweep.sh --staleness 2 4

See recipe/sweep/__init__.py for what a run folder holds and how skipping and resuming work.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from recipe.sweep.cluster import expand_for_script, script_commands
from recipe.sweep.grid import expand, method_names
from recipe.sweep.launch import compose, prepare, run_folders

ROOT = Path(__file__).resolve().parents[2]


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name or not name.replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=override[,override...] with NAME alphanumeric")
    return name, overrides.split(",")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipe.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["bapo", "grpo", "clip_higher"], help=f"options of configs/method/: {', '.join(method_names())}")
    p.add_argument("--staleness", nargs="+", default=["1", "4", "8"], help="optimizer updates per rollout batch: U or UeE (E epochs, e.g. 8e2)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--variant", action="append", type=parse_variant, default=[], help="NAME=ov1,ov2: an extra axis of override sets (repeatable)")
    p.add_argument("--config-name", default="cpu_tiny", help="main_bapo's config (default cpu_tiny; GPU: bapo_trainer)")
    p.add_argument("--steps", type=int, default=None, help="trainer.total_training_steps (default: the config's)")
    p.add_argument("--out", required=True, help="sweep folder: one sub-folder per run")
    p.add_argument("--jobs", type=int, default=2, help="runs at the same time (laptop)")
    p.add_argument("--save-freq", type=int, default=5, help="checkpoint every N steps, for resuming (default 5)")
    p.add_argument("--retries", type=int, default=1, help="attempts after a failed one, each resuming from the last checkpoint (default 1)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep a finished run's checkpoints")
    p.add_argument("--dump-rollouts", action="store_true", help="keep verl's generations per step (<run>/rollouts/<step>.jsonl)")
    p.add_argument("--progress-every", type=float, default=20.0, help="seconds between progress lines")
    p.add_argument("--cluster", action="store_true", help="prepare the folders and print one command per run")
    p.add_argument("--script", default=None, help="with --cluster: print the runs as calls of this paper-run script (run_scripts/*.sh)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    return p


def grid(args) -> list:
    extra = [*args.overrides, *([f"trainer.total_training_steps={args.steps}"] if args.steps else [])]
    base = compose(args.config_name, extra)
    variants = {name: [*extra, *ov] for name, ov in args.variant} if args.variant else {"": extra}
    return expand(args.methods, args.staleness, args.seeds, int(base.data.train_batch_size), variants)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value, low in (("--jobs", args.jobs, 1), ("--save-freq", args.save_freq, 1), ("--steps", args.steps or 1, 1), ("--retries", args.retries, 0)):
        if value < low:
            parser.error(f"{flag}={value}: must be >= {low}")
    out = Path(args.out).resolve()
    if args.script:
        if not args.cluster:
            parser.error("--script goes with --cluster")
        try:
            for line in script_commands(Path(args.script), out, expand_for_script(args)):
                print(line)
        except ValueError as error:
            parser.error(str(error))
        return 0
    try:
        specs = grid(args)
        infos = {spec: prepare(out / spec.name, spec, args.config_name, args.save_freq, args.dump_rollouts) for spec in specs}
    except ValueError as error:
        parser.error(str(error))
    if args.cluster:
        for spec in specs:
            print(f"python -m recipe.sweep.launch {shlex.quote(str(out / spec.name))}   # {infos[spec]['command']}")
        return 0
    todo = [out / s.name for s in specs if not infos[s]["finished"]]
    for spec in specs:
        if infos[spec]["finished"]:
            print(f"[sweep] {spec.name}: finished earlier, skipped", flush=True)
        elif infos[spec]["attempts"]:
            print(f"[sweep] {spec.name}: interrupted earlier, resuming (attempt {len(infos[spec]['attempts'])})", flush=True)
    print(f"[sweep] {len(todo)} of {len(specs)} runs to do, {args.jobs} at a time -> {out}", flush=True)
    start = time.perf_counter()
    failed = run_folders(todo, args.jobs, args.keep_checkpoints, args.progress_every, args.retries)
    print(f"[sweep] {len(todo) - len(failed)} runs done, {len(failed)} failed, {time.perf_counter() - start:.0f}s; report: python -m recipe.report {out} --out {out}/report")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
