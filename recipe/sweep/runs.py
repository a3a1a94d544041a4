"""One folder per run: its command, config, attempts and merged metrics.

    <run>/run.json                 spec, command, total steps, attempts [{attempt, resumed_from, returncode, wall_seconds}], finished
    <run>/command.sh               the exact trainer command (env + python -m recipe.bapo.main_bapo ...)
    <run>/config.yaml              the composed config (Hydra, resolved)
    <run>/metrics.attempt<k>.jsonl verl's file-logger output of attempt k (VERL_FILE_LOGGER_PATH)
    <run>/train.attempt<k>.log     its stdout/stderr
    <run>/metrics.jsonl            all attempts merged by step (written after every attempt)
    <run>/checkpoints/             verl's checkpoints (trainer.default_local_dir), removed once finished

verl's file logger opens its file with "wb", so every attempt writes its own file. Merge rule: attempt k
resumed from checkpoint step c (verl's `latest_checkpointed_iteration.txt` when it started, 0 = from
scratch) replaces every row of earlier attempts with step > c; rows at step c (a resumed run validates
before training at step c) are merged key by key, the later attempt winning. A killed attempt's last
line may be cut short: an unparsable last line is dropped, an unparsable line elsewhere is an error.
verl saves a step's checkpoint before it logs that step's metrics: a run killed in between resumes after
the step and its row is lost (that step is then missing from metrics.jsonl).

Runs launched by the paper-run scripts (`python -m recipe.sweep --cluster --script ...`) write
`<run>/<script's run name>/metrics-<UTC time>.jsonl`, one per attempt, with no record of c: the files are
taken in name (= time) order and c is inferred: the first row's step when that row holds only validation
keys (verl validates before training when it resumes, val_before_train), else the first step - 1.
"""

from __future__ import annotations

import json
from pathlib import Path

CHECKPOINT_TRACKER = "latest_checkpointed_iteration.txt"


def read_jsonl(path: Path) -> list[dict]:
    lines = Path(path).read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # cut short by a kill
                break
            raise ValueError(f"{path}:{number}: not a JSON line: {line[:80]!r}") from None
    return rows


def merge_attempts(attempts: list[tuple[int, list[dict]]]) -> list[dict]:
    """[(resumed_from, rows)] in attempt order -> rows {"step", "data"} sorted by step, every step once."""
    merged: dict[int, dict] = {}
    for resumed_from, rows in attempts:
        for step in [s for s in merged if s > resumed_from]:
            del merged[step]
        fresh: dict[int, dict] = {}
        for row in rows:
            fresh.setdefault(row["step"], {}).update(row["data"])
        for step, data in fresh.items():
            merged[step] = {**merged.get(step, {}), **data}
    return [{"step": s, "data": merged[s]} for s in sorted(merged)]


def attempt_metrics(run_dir: Path, attempt: int) -> Path:
    return Path(run_dir) / f"metrics.attempt{attempt}.jsonl"


def read_info(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_info(run_dir: Path, info: dict) -> None:
    path = Path(run_dir) / "run.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)


def inferred_resume_step(rows: list[dict]) -> int:
    if not rows:
        return 0
    first = rows[0]
    only_validation = all(k.startswith(("val-core/", "val-aux/")) for k in first["data"])
    return first["step"] if only_validation else first["step"] - 1


def load_metrics(run_dir: Path) -> list[dict]:
    """The run's rows: its attempts merged (a sweep folder, also while running), else its metrics.jsonl."""
    run_dir = Path(run_dir)
    info = read_info(run_dir)
    attempts = info.get("attempts", [])
    script_files = sorted(run_dir.glob("*/metrics-*.jsonl"), key=lambda p: p.name)
    if not attempts and script_files:
        return merge_attempts([(inferred_resume_step(rows), rows) for rows in map(read_jsonl, script_files)])
    if attempts:
        pairs = []
        for a in attempts:
            path = attempt_metrics(run_dir, a["attempt"])
            pairs.append((a["resumed_from"], read_jsonl(path) if path.exists() else []))
        return merge_attempts(pairs)
    path = run_dir / "metrics.jsonl"
    if "attempts" in info and not path.exists():  # a prepared sweep folder that has not started
        return []
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run with trainer.logger=[console,file] and VERL_FILE_LOGGER_PATH={path}")
    return read_jsonl(path)


def write_merged(run_dir: Path) -> list[dict]:
    rows = load_metrics(run_dir)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (Path(run_dir) / "metrics.jsonl").write_text(text)
    return rows


def attempt_wall(run_dir: Path, attempt: dict) -> float:
    """Seconds an attempt ran: measured, or for a killed one (no record) its start to its log's last write."""
    if "wall_seconds" in attempt:
        return attempt["wall_seconds"]
    log = Path(run_dir) / f"train.attempt{attempt['attempt']}.log"
    return max(0.0, log.stat().st_mtime - attempt["started"]) if log.exists() and "started" in attempt else 0.0


def checkpoint_step(checkpoint_dir: Path) -> int:
    """The step verl resumes from with resume_mode=auto (0: none, training starts from scratch)."""
    tracker = Path(checkpoint_dir) / CHECKPOINT_TRACKER
    return int(tracker.read_text().strip()) if tracker.exists() else 0
