"""Report of a sweep folder: per method x staleness, mean and 95% interval over seeds; plots with seed bands.

    python -m recipe.report SWEEP_DIR --out DIR     (recipe/report.py hands sweep folders to `write_sweep_report`)

Writes DIR/sweep_curves.png (one row per staleness level, one panel per quantity, a line per method: the
mean over seeds with its 95% t-interval as a band), DIR/summary.md (the table, the outcome in words,
the paper's Fig. 11 beside ours when the runs validated on AIME) and DIR/runs.csv (every run's statistics).
Statistics are defined in recipe/sweep/stats.py. "Within noise" = the two 95% intervals overlap (a
conservative reading: disjoint intervals are a clear difference, overlapping ones may still differ).
"""

from __future__ import annotations

import csv
import fnmatch
from collections import defaultdict
from pathlib import Path

from recipe.sweep.grid import parse_staleness
from recipe.sweep.runs import attempt_wall, load_metrics, read_info
from recipe.sweep.stats import (
    COLLAPSE_FRACTION, COLLAPSE_K, COLLAPSE_WINDOW, mean_interval, run_statistics, series, without_no_signal_values,
)  # fmt: skip

PANELS = [
    ("train reward", [("critic/score/mean", "")]),
    ("validation accuracy", [("val-core/*/acc/mean@*", "")]),
    ("entropy", [("actor/entropy", "")]),
    ("clip fraction", [("actor/pg_clipfrac", "all"), ("actor/bapo/clipfrac_entropy_raising*", "entropy-raising")]),
    ("grad norm", [("actor/grad_norm", "")]),
    ("positive share", [("actor/bapo/rho", "rho (BAPO)"), ("derived/pos_adv_mass_share", "1 - neg |A| share")]),
    ("clip bounds (BAPO)", [("actor/bapo/c_low", "c_low"), ("actor/bapo/c_high", "c_high")]),
]
COLUMNS = [  # (statistic, header, digits)
    ("reward_auc", "train reward (mean over steps)", 3),
    ("entropy_rel", "entropy end/start", 2),
    ("grad_norm_peak", "peak grad norm", 2),
    ("clipfrac", "clip frac", 4),
    ("clipfrac_raising", "clip frac entropy-raising", 4),
    ("clipfrac_lowering", "clip frac entropy-lowering", 4),
    ("pos_share", "1 - neg abs(A) share", 3),
    ("rho", "rho", 3),
    ("c_low", "c_low", 3),
    ("c_high", "c_high", 3),
]
COMPARED = ["reward_auc", "entropy_rel", "grad_norm_peak"]
# paper Fig. 11 (R1-Distill-Qwen-7B, 32k, AIME avg@16, percent): {(method, staleness): (AIME24, AIME25)}
PAPER_FIG11 = {
    ("grpo", "2"): (58.3, 39.4), ("grpo", "4"): (54.2, 40.2),
    ("clip_higher", "2"): (58.3, 39.7), ("clip_higher", "4"): (59.2, 40.2),
    ("bapo", "2"): (60.9, 44.2), ("bapo", "4"): (62.0, 43.3),
}  # fmt: skip


def is_sweep(path: Path) -> bool:
    return any(read_info(d).get("method") for d in Path(path).iterdir() if d.is_dir())


def load_sweep(sweep_dir: Path) -> list[dict]:
    """([{info, rows, stats}] of the finished runs (and of script runs, whose end is unknown), [names left out])."""
    runs, waiting = [], []
    for run_dir in sorted(d for d in Path(sweep_dir).iterdir() if d.is_dir()):
        info = read_info(run_dir)
        if not info.get("method"):
            continue
        rows = load_metrics(run_dir)
        if not rows or (info.get("attempts") and not info.get("finished")):  # laptop runs: finished ones only
            waiting.append(info["name"] + (f" (at step {rows[-1]['step']})" if rows else ""))
            continue
        rows = without_no_signal_values(rows)  # the curves skip what steps without signal made up (stats.py)
        for row in rows:
            neg_share = row["data"].get("actor/bapo/neg_adv_mass_share")
            if neg_share is not None:
                row["data"]["derived/pos_adv_mass_share"] = 1 - neg_share
        if info.get("attempts"):  # killed attempts count from their start to their log's last write
            info["wall_seconds"] = sum(attempt_wall(run_dir, a) for a in info["attempts"])
        runs.append({"info": info, "rows": rows, "stats": run_statistics(rows)})
    if not runs:
        raise FileNotFoundError(f"{sweep_dir}: no run folder with metrics (run.json + metrics.attempt*.jsonl)")
    return runs, waiting


def cells(runs: list[dict]) -> dict[tuple, list[dict]]:
    """{(variant, staleness, method): runs}, ordered by variant, staleness (updates, epochs), method."""
    groups = defaultdict(list)
    for run in runs:
        i = run["info"]
        groups[(i.get("variant", ""), str(i["staleness"]), i["method"])].append(run)
    order = {m: k for k, m in enumerate(dict.fromkeys(r["info"]["method"] for r in runs))}
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], parse_staleness(kv[0][1]), order[kv[0][2]])))


def fmt(interval, digits: int) -> str:
    if interval is None:
        return "-"
    mean, low, high, n = interval
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def collapse_cell(group: list[dict]) -> str:
    steps = [r["stats"]["collapse_step"] for r in group if r["stats"]["collapse_step"] is not None]
    if not steps:
        return f"0/{len(group)}"
    return f"{len(steps)}/{len(group)} (step {fmt(mean_interval(steps), 1)})"


def val_sources(runs: list[dict]) -> list[str]:
    return sorted({k[len("val_acc[") : -1] for r in runs for k in r["stats"] if k.startswith("val_acc[")})


def table(groups: dict, sources: list[str]) -> str:
    head = ["staleness", "method", "seeds", *[f"final val acc {s}" for s in sources], *[c[1] for c in COLUMNS],
            f"collapsed ({COLLAPSE_WINDOW}-step mean reward < {COLLAPSE_FRACTION:g} x its peak for {COLLAPSE_K} steps)",
            "wall s per run"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (variant, level, method), group in groups.items():
        stat = lambda name: mean_interval([r["stats"].get(name) for r in group])  # noqa: E731
        row = [level + (f" ({variant})" if variant else ""), method, str(len(group))]
        row += [fmt(stat(f"val_acc[{s}]"), 3) for s in sources]
        row += [fmt(stat(name), digits) for name, _, digits in COLUMNS]
        row += [collapse_cell(group), fmt(mean_interval([r["info"].get("wall_seconds") for r in group]), 0)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def notes(runs: list[dict]) -> str:
    """What the table's BAPO columns mean for these runs (which metric versions they logged)."""
    flags = lambda name: {r["stats"].get(name) for r in runs} - {None}  # noqa: E731
    lines = []
    if 1.0 in flags("clipfrac_split_proxy"):
        lines.append("the entropy-raising / -lowering split is the mean-log-prob proxy (no per-position entropy in the gradient pass)")
    if 0.0 in flags("bounds_acting"):
        lines.append("c_low / c_high average all updates, including the first of each rollout batch (r = 1 in decoupled mode: no bound can act)")
    if 1.0 in flags("bounds_acting"):
        lines.append("c_low / c_high of runs logged between issues 10 and 23 leave out the updates that took the r = 1 shortcut")
    return "".join(f"\nNote: {line}.\n" for line in lines)


def compare(a, b) -> str:
    if a is None or b is None or a[3] < 2 or b[3] < 2:
        return "not comparable (fewer than 2 seeds)"
    if a[2] < b[1]:
        return "lower (95% intervals disjoint)"
    if a[1] > b[2]:
        return "higher (95% intervals disjoint)"
    return "within noise (95% intervals overlap)"


def outcome(groups: dict, sources: list[str]) -> str:
    """Sentences: each BAPO variant against each baseline per staleness, and each method's staleness effect."""
    names = [*(f"val_acc[{s}]" for s in sources), *COMPARED]
    label = {**{f"val_acc[{s}]": f"final val acc ({s})" for s in sources}, **{c[0]: c[1] for c in COLUMNS}}
    stat = {key: {n: mean_interval([r["stats"].get(n) for r in g]) for n in names} for key, g in groups.items()}
    lines = []
    for (variant, level, method), values in stat.items():
        if not method.startswith("bapo"):
            continue
        for (v2, l2, other), theirs in stat.items():
            if (v2, l2) != (variant, level) or other.startswith("bapo"):
                continue
            parts = [f"{label[n]} {compare(values[n], theirs[n]).split(' (')[0]}" for n in names if values[n] and theirs[n]]
            lines.append(f"- staleness {level}{' ' + variant if variant else ''}: {method} vs {other}: " + "; ".join(parts) + ".")
    for (variant, method) in dict.fromkeys((k[0], k[2]) for k in stat):
        # the method's highest staleness against its lowest, else against the sweep's lowest-staleness cell
        # (at staleness 1 every method is the same algorithm: r = 1, nothing can be clipped)
        high = [k for k in stat if (k[0], k[2]) == (variant, method)][-1]
        low = min((k for k in stat if k[0] == variant), key=lambda k: (parse_staleness(k[1]), k[2] != method))
        if parse_staleness(low[1]) >= parse_staleness(high[1]):
            continue
        parts = [f"{label[n]} {compare(stat[high][n], stat[low][n]).split(' (')[0]}" for n in names if stat[high][n] and stat[low][n]]
        against = f"{low[2]} at staleness {low[1]}" if low[2] != method else f"staleness {low[1]}"
        lines.append(f"- {method}{' ' + variant if variant else ''}: staleness {high[1]} vs {against}: " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n" if lines else "- (one cell only: nothing to compare)\n"


def fig11_table(groups: dict, sources: list[str]) -> str:
    if not {"aime2024", "aime2025"} <= set(sources):
        return ""
    lines = ["| method | staleness | AIME24 ours | AIME24 paper | AIME25 ours | AIME25 paper |", "|---|---|---|---|---|---|"]
    for (variant, level, method), group in groups.items():
        paper = PAPER_FIG11.get((method, level))
        ours = [mean_interval([100 * r["stats"][f"val_acc[{s}]"] for r in group if r["stats"].get(f"val_acc[{s}]") is not None]) for s in ("aime2024", "aime2025")]
        if paper:
            lines.append(f"| {method} | {level} | {fmt(ours[0], 1)} | {paper[0]} | {fmt(ours[1], 1)} | {paper[1]} |")
    return "\n## Beside the paper's Fig. 11 (R1-Distill-Qwen-7B, 32k, avg@16, %)\n\n" + "\n".join(lines) + "\n"


def band(group: list[dict], pattern: str) -> tuple[list[int], list[tuple]]:
    by_step = defaultdict(list)
    for run in group:
        keys = sorted({k for r in run["rows"] for k in r["data"] if fnmatch.fnmatchcase(k, pattern)})
        if keys:
            for step, value in zip(*series(run["rows"], keys[0])):
                by_step[step].append(value)
    steps = sorted(by_step)
    return steps, [mean_interval(by_step[s]) for s in steps]


def plot(groups: dict, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(dict.fromkeys((k[0], k[1]) for k in groups))
    methods = list(dict.fromkeys(k[2] for k in groups))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(levels), len(PANELS), figsize=(3.3 * len(PANELS), 2.8 * len(levels)), squeeze=False)
    for row, level in enumerate(levels):
        for col, (title, keys) in enumerate(PANELS):
            ax = axes[row][col]
            for (variant, lv, method), group in groups.items():
                if (variant, lv) != level:
                    continue
                color = colors[methods.index(method) % len(colors)]
                for k, (key, label) in enumerate(keys):
                    steps, stats = band(group, key)
                    if not steps:
                        continue
                    ax.plot(steps, [s[0] for s in stats], ["-", "--"][k % 2], color=color, lw=1.2,
                            label=f"{method} {label}".strip() + f" (n={len(group)})")
                    ax.fill_between(steps, [s[1] for s in stats], [s[2] for s in stats], color=color, alpha=0.18, lw=0)
            ax.set_title(f"{title} | staleness {level[1]}{' ' + level[0] if level[0] else ''}", fontsize=8)
            ax.tick_params(labelsize=7)
            if ax.lines and col in (0, 3, 5, 6):
                ax.legend(fontsize=6)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def write_csv(runs: list[dict], path: Path) -> None:
    names = sorted({k for r in runs for k in r["stats"]})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "method", "staleness", "seed", "variant", "steps", "wall_seconds", *names])
        for r in runs:
            i = r["info"]
            cells_ = ["" if r["stats"].get(n) is None else r["stats"][n] for n in names]
            writer.writerow([i["name"], i["method"], i["staleness"], i["seed"], i.get("variant", ""), len(r["rows"]), i.get("wall_seconds", ""), *cells_])


def write_sweep_report(sweep_dir: Path, out_dir: Path, title: str = "Sweep report") -> Path:
    runs, waiting = load_sweep(Path(sweep_dir))
    groups, sources = cells(runs), val_sources(runs)
    out_dir = Path(out_dir)
    figure = plot(groups, out_dir / "sweep_curves.png")
    write_csv(runs, out_dir / "runs.csv")
    unknown = [r["info"]["name"] for r in runs if not r["info"].get("finished")]
    text = f"# {title}\n\n{len(runs)} finished runs from `{sweep_dir}`.\n"
    text += f"\n**Not in the table** (not started or not finished): {', '.join(waiting)}\n" if waiting else ""
    text += f"\nRuns launched by a script (finished or not, their metrics so far): {', '.join(unknown)}\n" if unknown else ""
    text += "\nMean over seeds with the 95% t-interval in brackets (recipe/sweep/stats.py defines every column).\n\n"
    text += table(groups, sources) + notes(runs) + "\n## Outcome (95% intervals: disjoint = a difference, overlapping = within noise)\n\n"
    text += outcome(groups, sources) + fig11_table(groups, sources)
    text += f"\n![curves]({figure.name})\n\nExample command (run `{runs[0]['info']['name']}`): `{runs[0]['info']['command']}`\n"
    summary = out_dir / "summary.md"
    summary.write_text(text)
    return summary

