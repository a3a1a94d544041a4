"""Prepare a run folder and run one attempt of it through `python -m recipe.bapo.main_bapo`.

`prepare` composes the run's config with Hydra (so a bad override fails before anything runs) and
writes run.json, command.sh and config.yaml; `run_attempt` starts the next attempt: with
trainer.resume_mode=auto verl continues from the run's last checkpoint, and the attempt's metrics go to
their own file (VERL_FILE_LOGGER_PATH), merged afterwards (recipe/sweep/runs.py).
"""

from __future__ import annotations

import shlex
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from recipe.bapo.main_bapo import run_logged
from recipe.dry_run.core import compose_config, write_config
from recipe.sweep.grid import RunSpec
from recipe.sweep.runs import attempt_metrics, attempt_wall, checkpoint_step, read_info, read_jsonl, write_info, write_merged


def run_overrides(run_dir: Path, spec: RunSpec, save_freq: int, dump_rollouts: bool = False) -> list[str]:
    """The spec's overrides plus what every sweep run needs: its name, checkpoints for resuming, Hydra's folder
    (and with `dump_rollouts` verl's per-step generations, <run>/rollouts/<step>.jsonl)."""
    return [
        *spec.overrides,
        f"trainer.experiment_name={spec.name}",
        f"trainer.default_local_dir={run_dir / 'checkpoints'}",
        "trainer.resume_mode=auto",
        f"trainer.save_freq={save_freq}",
        "trainer.max_actor_ckpt_to_keep=1",
        f"hydra.run.dir={run_dir / 'hydra'}",
        *([f"trainer.rollout_data_dir={run_dir / 'rollouts'}"] if dump_rollouts else []),
    ]


def compose(config_name: str, overrides: list[str]):
    """The config main_bapo would run with (recipe.dry_run.compose_config)."""
    return compose_config(overrides, config_name)


def prepare(run_dir: Path, spec: RunSpec, config_name: str, save_freq: int, dump_rollouts: bool = False) -> dict:
    """Write (or check) the run folder; returns its run.json. Raises if the folder holds a different run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    args = ["--config-name", config_name, *run_overrides(run_dir, spec, save_freq, dump_rollouts)]
    info = read_info(run_dir)
    if info and info.get("args") != args:
        raise ValueError(f"{run_dir} holds a run made with other arguments; use another --out or remove it.\n"
                         f"  there: {info.get('args')}\n  now:   {args}")
    if not info:
        config = compose(config_name, args[2:])
        env = {"VERL_FILE_LOGGER_PATH": str(attempt_metrics(run_dir, 0)).replace("attempt0", "attempt<k>")}
        command = " ".join(shlex.quote(c) for c in ["python", "-m", "recipe.bapo.main_bapo", *args])
        info = {
            "name": spec.name, "method": spec.method, "staleness": spec.staleness, "seed": spec.seed,
            "variant": spec.variant, "args": args, "command": command,
            "total_steps": int(config.trainer.total_training_steps), "attempts": [], "finished": False,
        }  # fmt: skip
        write_config(config, run_dir / "config.yaml")
        (run_dir / "command.sh").write_text(
            "# one attempt of this run (the sweep sets k = the attempt number; resume_mode=auto continues)\n"
            + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + command + "\n"
        )
        write_info(run_dir, info)
    return info


def run_attempt(run_dir: Path, keep_checkpoints: bool = False) -> dict:
    """Run the next attempt of a prepared, unfinished run; returns run.json (finished or with the failure)."""
    info = read_info(run_dir)
    attempt = len(info["attempts"])
    metrics = attempt_metrics(run_dir, attempt)
    record = {"attempt": attempt, "resumed_from": checkpoint_step(run_dir / "checkpoints"), "started": time.time()}
    info["attempts"].append(record)
    write_info(run_dir, info)
    start = time.perf_counter()
    try:
        run_logged(info["args"], run_dir / f"train.attempt{attempt}.log", env={"VERL_FILE_LOGGER_PATH": str(metrics)})
        record["returncode"] = 0
    except RuntimeError as error:
        record["returncode"] = 1
        record["error"] = str(error).splitlines()[0]
    record["wall_seconds"] = time.perf_counter() - start
    rows = write_merged(run_dir)
    steps = {r["step"] for r in rows}
    info["finished"] = record["returncode"] == 0 and info["total_steps"] in steps
    if record["returncode"] == 0 and not info["finished"]:
        record["error"] = f"trainer exited 0 but step {info['total_steps']} is not in {metrics}"
    info["wall_seconds"] = sum(attempt_wall(run_dir, a) for a in info["attempts"])
    write_info(run_dir, info)
    if info["finished"] and not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return info


def progress_line(run_dir: Path) -> str | None:
    """`name: step k/N score x val y elapsed s` of the attempt in progress (None before its first step)."""
    info = read_info(run_dir)
    if not info.get("attempts"):
        return None
    current = info["attempts"][-1]
    path = attempt_metrics(run_dir, current["attempt"])
    rows = read_jsonl(path) if path.exists() else []
    if not rows:
        return None
    step = rows[-1]["step"]
    score = next((r["data"]["critic/score/mean"] for r in reversed(rows) if "critic/score/mean" in r["data"]), None)
    vals = [v for r in rows for k, v in r["data"].items() if k.startswith("val-core/") and "/acc/mean@" in k]
    text = f"{info['name']}: step {step}/{info['total_steps']}"
    text += f" score {score:.3f}" if score is not None else ""
    text += f" val {vals[-1]:.3f}" if vals else ""
    return text + f" elapsed {time.time() - current['started']:.0f}s"


def watch(run_dirs: list[Path], stop: threading.Event, every: float) -> None:
    """Print one progress line per run whose step moved since the last look, every `every` seconds."""
    last: dict[Path, str] = {}
    while not stop.wait(every):
        for run_dir in run_dirs:
            line = progress_line(run_dir)
            head = line.rsplit(" elapsed", 1)[0] if line else None
            if line and last.get(run_dir) != head:
                last[run_dir] = head
                print(f"[sweep] {line}", flush=True)


def run_folders(run_dirs: list[Path], jobs: int, keep_checkpoints: bool = False, progress_every: float = 20.0,
                retries: int = 0) -> list[str]:
    """Run every folder to its end, `jobs` at a time, with progress lines: the next attempt, and after a failed
    one up to `retries` more (each resumes from the last checkpoint). Returns the names of runs still failed."""
    failed: list[str] = []
    stop = threading.Event()
    threading.Thread(target=watch, args=(run_dirs, stop, progress_every), daemon=True).start()

    def one(run_dir: Path) -> None:
        for _ in range(retries + 1):
            info = run_attempt(run_dir, keep_checkpoints)
            if info["finished"]:
                break
            last = info["attempts"][-1]
            print(f"[sweep] {info['name']}: attempt {last['attempt']} failed: {last.get('error')}", flush=True)
        last = info["attempts"][-1]
        status = "done" if info["finished"] else f"FAILED: {last.get('error')} (log: {run_dir}/train.attempt{last['attempt']}.log)"
        print(f"[sweep] {info['name']}: {status} in {last['wall_seconds']:.0f}s", flush=True)
        if not info["finished"]:
            failed.append(info["name"])

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(one, run_dirs))
    finally:
        stop.set()
    return failed


if __name__ == "__main__":  # one attempt of a prepared folder (what cluster jobs run): python -m recipe.sweep.launch RUN_DIR
    done = run_attempt(Path(sys.argv[1]).resolve())
    raise SystemExit(0 if done["finished"] else 1)
