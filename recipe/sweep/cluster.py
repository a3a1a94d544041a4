"""Cluster sweeps through the paper-run scripts (run_scripts/*.sh, run_scripts/lib/launch.sh).

Each run becomes one call of the script: `STALENESS=U METHOD=M LOGS=<out>/<run> CKPT=<out>/<run>/checkpoints
SCRIPT -- <seed overrides> <extra overrides>` (STALENESS only for scripts that read it; the others fix their
own staleness, so exactly one level must be asked for). A run.json per run records the grid cell, so
`python -m recipe.report <out>` reads the script's per-attempt metrics (`<run>/<name>/metrics-<time>.jsonl`).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from recipe.sweep.grid import RunSpec, check_method, parse_staleness, seed_overrides
from recipe.sweep.runs import read_info, write_info


def expand_for_script(args) -> list[RunSpec]:
    """The grid without composing a config (the scripts choose the batch geometry from STALENESS)."""
    for method in args.methods:
        check_method(method)  # the scripts take the same names (configs/method/)
    for level in args.staleness:
        if parse_staleness(level)[1] != 1:
            raise ValueError(f"staleness {level!r}: the scripts take STALENESS=U only (no epochs)")
    extra = [*args.overrides, *([f"trainer.total_training_steps={args.steps}"] if args.steps else [])]
    variants = {name: [*extra, *ov] for name, ov in args.variant} if args.variant else {"": extra}
    return [RunSpec(m, str(level), seed, variant, tuple([*seed_overrides(seed), *ov]))
            for variant, ov in variants.items() for level in args.staleness for seed in args.seeds for m in args.methods]  # fmt: skip


def script_commands(script: Path, out: Path, specs: list[RunSpec]) -> list[str]:
    if not script.is_file():
        raise ValueError(f"--script {script}: no such file; the paper-run scripts are run_scripts/*.sh")
    reads_staleness = "STALENESS" in script.read_text()
    if not reads_staleness and len({s.staleness for s in specs}) > 1:
        raise ValueError(f"--script {script} fixes its own staleness (it does not read STALENESS): ask for one --staleness level")
    lines = []
    for spec in specs:
        run = out / spec.name
        env = {**({"STALENESS": spec.staleness} if reads_staleness else {}), "METHOD": spec.method,
               "LOGS": str(run), "CKPT": str(run / "checkpoints")}  # fmt: skip
        command = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.quote(str(script)), "--", *map(shlex.quote, spec.overrides)])
        info = {"name": spec.name, "method": spec.method, "staleness": spec.staleness, "seed": spec.seed, "variant": spec.variant,
                "command": command, "script": str(script), "attempts": [], "finished": False}  # fmt: skip
        if read_info(run) and read_info(run).get("command") != command:
            raise ValueError(f"{run} holds a run made with another command; use another --out or remove it")
        run.mkdir(parents=True, exist_ok=True)
        write_info(run, info)
        lines.append(command)
    return lines
