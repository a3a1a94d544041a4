"""Per-run table of the imbalance precondition and of BAPO's mechanism (docs/study_cpu_imbalance/).

    python -m recipe.sweep.imbalance RUN_DIR [RUN_DIR ...]     # sweep folders or run folders; prints markdown

One row per run (mean over its steps with signal; steps without any non-zero advantage log NaN / null and are
skipped, see recipe/sweep/stats.py):

| column | from |
|---|---|
| `lr` | the run's `actor_rollout_ref.actor.optim.lr` override (else the regime's) |
| `len right / wrong` | `actor/bapo/response_length_pos` / `_neg`: mean tokens of responses with positive / negative advantage |
| `neg share`, `steps >= 0.6` | `actor/bapo/neg_adv_mass_share`: the negative share of the |A| mass, its mean and the fraction of steps at >= 0.6 |
| `clip frac` | `actor/pg_clipfrac` |
| `rho start -> chosen` | `actor/bapo/rho_start` -> `actor/bapo/rho` (BAPO only): the positive share at the start bounds and at the chosen ones |
| `steps searched` | fraction of steps whose mean `actor/bapo/search_steps` > 0: the bounds moved in at least one update |
| `c_low / c_high` | `actor/bapo/c_low` / `c_high`, mean over updates with signal |
| `raising / lowering clipped` | `actor/bapo/clipfrac_entropy_raising` / `_lowering`: the Entropy-Clip split of the clipped tokens |
| `val acc` | `val-core/*/acc/mean@1` at each validation (step 0, 10, 20) |
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from recipe.sweep.stats import series


def _runs(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        out += [p] if (p / "run.json").is_file() else sorted(d for d in p.iterdir() if (d / "run.json").is_file())
    return out


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        path = max(run.glob("metrics.attempt*.jsonl"), default=None)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path else []


def _values(rows: list[dict], key: str) -> list[float]:
    return series(rows, key)[1]  # the finite values: steps without signal (NaN / null) are skipped


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def run_row(run: Path) -> dict:
    info = json.loads((run / "run.json").read_text())
    rows = _rows(run)
    lr = next((a.split("=", 1)[1] for a in info["args"] if a.startswith("actor_rollout_ref.actor.optim.lr=")), "regime")
    neg = _values(rows, "actor/bapo/neg_adv_mass_share")
    val_key = next((k for r in rows for k in r["data"] if k.startswith("val-core/") and k.endswith("/acc/mean@1")), None)
    return {
        "run": info["name"], "lr": lr, "steps": len(_values(rows, "critic/score/mean")),
        "len_right": _mean(_values(rows, "actor/bapo/response_length_pos")),
        "len_wrong": _mean(_values(rows, "actor/bapo/response_length_neg")),
        "neg_share": _mean(neg), "neg_steps_060": _mean([float(v >= 0.6) for v in neg]),
        "clipfrac": _mean(_values(rows, "actor/pg_clipfrac")),
        "rho_start": _mean(_values(rows, "actor/bapo/rho_start")), "rho": _mean(_values(rows, "actor/bapo/rho")),
        "searched": _mean([float(v > 0) for v in _values(rows, "actor/bapo/search_steps")]),
        "c_low": _mean(_values(rows, "actor/bapo/c_low")), "c_high": _mean(_values(rows, "actor/bapo/c_high")),
        "raising": _mean(_values(rows, "actor/bapo/clipfrac_entropy_raising")),
        "lowering": _mean(_values(rows, "actor/bapo/clipfrac_entropy_lowering")),
        "reward": _mean(_values(rows, "critic/score/mean")),
        "val": _values(rows, val_key) if val_key else [],
    }


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if not math.isfinite(x) else f"{x:.{digits}f}"


def table(rows: list[dict]) -> str:
    head = ("| run | lr | steps | len right / wrong | neg share | steps >= 0.6 | clip frac | rho start -> chosen | "
            "steps searched | c_low / c_high | raising / lowering clipped | train reward | val acc |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['lr']} | {r['steps']} | {_fmt(r['len_right'], 1)} / {_fmt(r['len_wrong'], 1)} | "
            f"{_fmt(r['neg_share'])} | {_fmt(r['neg_steps_060'], 2)} | {_fmt(r['clipfrac'], 4)} | "
            f"{_fmt(r['rho_start'])} -> {_fmt(r['rho'])} | {_fmt(r['searched'], 2)} | {_fmt(r['c_low'], 2)} / {_fmt(r['c_high'], 2)} | "
            f"{_fmt(r['raising'], 4)} / {_fmt(r['lowering'], 4)} | {_fmt(r['reward'])} | "
            f"{' -> '.join(f'{v:.3f}' for v in r['val']) or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipe.sweep.imbalance", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="sweep folders or run folders")
    print(table([run_row(run) for run in _runs(parser.parse_args(argv).runs)]))


if __name__ == "__main__":
    main()
