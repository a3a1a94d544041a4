"""Compare training runs from verl's JSONL metrics: side-by-side plots and a markdown summary.

    python -m recipe.report RUN_DIR [RUN_DIR ...] --out DIR     # runs side by side
    python -m recipe.report SWEEP_DIR --out DIR                 # a sweep: mean and 95% interval over seeds

A run directory holds `metrics.jsonl` (verl's file logger, `trainer.logger=[...,file]` with
VERL_FILE_LOGGER_PATH) or a sweep run's `metrics.attempt<k>.jsonl` files (merged by step,
recipe/sweep/runs.py), and optionally `run.json` ({"name", "command", "wall_seconds"}). A sweep
directory (folders made by `python -m recipe.sweep`) gets the sweep report (recipe/sweep/report.py).
Missing values (absent, NaN or null) are skipped, and so are the made-up values of steps without a token of
non-zero advantage in older runs (`without_no_signal_values`, recipe/sweep/stats.py).
"""

from __future__ import annotations

import argparse
import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path

from recipe.sweep.report import is_sweep, write_sweep_report
from recipe.sweep.runs import load_metrics, read_info
from recipe.sweep.stats import without_no_signal_values

# (title, [(metric key or fnmatch pattern, label)]); a run without a key simply has no line in that panel
PANELS = [
    ("reward (train score)", [("critic/score/mean", "train score")]),
    ("validation accuracy", [("val-core/*/acc/mean@*", "val acc")]),
    ("entropy", [("actor/entropy", "entropy")]),
    ("rho (positive share)", [("actor/bapo/rho", "rho (chosen)"), ("actor/bapo/rho_start", "rho at start")]),
    ("clip bounds", [("actor/bapo/c_low", "c_low"), ("actor/bapo/c_high", "c_high")]),
    ("clip fraction", [("actor/pg_clipfrac", "all"), ("actor/bapo/clipfrac_entropy_raising", "entropy-raising")]),
    ("grad norm", [("actor/grad_norm", "grad norm")]),
    ("negative share (imbalance)", [("actor/bapo/neg_token_share", "tokens"), ("actor/bapo/neg_adv_mass_share", "|A| mass")]),
]
SUMMARY = [
    ("critic/score/mean", "train score"),
    ("val-core/*/acc/mean@*", "val acc"),
    ("actor/entropy", "entropy"),
    ("actor/grad_norm", "grad norm"),
    ("actor/pg_clipfrac", "clip frac"),
    ("actor/bapo/c_high", "c_high"),
    ("actor/bapo/c_low", "c_low"),
    ("actor/bapo/rho", "rho"),
]


@dataclass
class Run:
    name: str
    steps: list[int]
    metrics: list[dict]
    info: dict = field(default_factory=dict)

    def series(self, pattern: str) -> tuple[list[int], list[float]]:
        """Steps and values of the first logged key matching `pattern` (a key or an fnmatch pattern)."""
        keys = sorted({k for m in self.metrics for k in m if fnmatch.fnmatchcase(k, pattern)})
        if not keys:
            return [], []
        points = [(s, m[keys[0]]) for s, m in zip(self.steps, self.metrics) if _finite(m.get(keys[0]))]
        return [p[0] for p in points], [p[1] for p in points]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    run_dir = Path(run_dir)
    rows, info = without_no_signal_values(load_metrics(run_dir)), read_info(run_dir)  # recipe/sweep/stats.py
    return Run(name or info.get("name") or run_dir.name, [r["step"] for r in rows], [r["data"] for r in rows], info)


def plot(runs: list[Run], out_png: str | Path) -> Path:
    """One figure, a panel per PANELS entry, every run in every panel (solid/dashed per metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = math.ceil(len(PANELS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for r, run in enumerate(runs):
            for k, (key, label) in enumerate(keys):
                xs, ys = run.series(key)
                if xs:
                    style = "-o" if len(xs) < 6 else ["-", "--", ":"][k % 3]
                    ax.plot(xs, ys, style, color=colors[r % len(colors)], label=f"{run.name}: {label}", markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(PANELS) :]:
        ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def summary_markdown(runs: list[Run], figure: str | None = None) -> str:
    """A table: first value, mean of the last 5 steps, and wall time per run."""
    lines = ["| run | steps | wall s | " + " | ".join(f"{label} (first -> last5)" for _, label in SUMMARY) + " |"]
    lines.append("|" + "---|" * (3 + len(SUMMARY)))
    for run in runs:
        cells = []
        for key, _ in SUMMARY:
            _, ys = run.series(key)
            cells.append(f"{ys[0]:.3g} -> {sum(ys[-5:]) / len(ys[-5:]):.3g}" if ys else "-")
        wall = run.info.get("wall_seconds")
        lines.append(f"| {run.name} | {len(run.steps)} | {wall:.0f} | " if wall else f"| {run.name} | {len(run.steps)} | - | ")
        lines[-1] += " | ".join(cells) + " |"
    text = "\n".join(lines) + "\n"
    if figure:
        text += f"\n![comparison]({figure})\n"
    for run in runs:
        if run.info.get("command"):
            text += f"\n`{run.name}`: `{run.info['command']}`\n"
    return text


def write_report(run_dirs: list[str | Path], out_dir: str | Path, title: str = "Run comparison") -> Path:
    runs = [load_run(d) for d in run_dirs]
    out_dir = Path(out_dir)
    figure = plot(runs, out_dir / "comparison.png")
    summary = out_dir / "summary.md"
    summary.write_text(f"# {title}\n\n" + summary_markdown(runs, figure.name))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe.report", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl, or one sweep directory")
    parser.add_argument("--out", required=True, help="directory for the plots and summary.md")
    parser.add_argument("--title", default=None, help="heading of summary.md")
    args = parser.parse_args(argv)
    if len(args.runs) == 1 and is_sweep(Path(args.runs[0])):
        print(write_sweep_report(Path(args.runs[0]), Path(args.out), args.title or "Sweep report"))
    else:
        print(write_report(args.runs, args.out, args.title or "Run comparison"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
