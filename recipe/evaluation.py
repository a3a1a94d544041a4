"""AIME-style evaluation: avg@k, pass@k, maj@k and the spread across the k sample-sets.

Generation goes through verl's own rollout: the trainer's validation pass in val-only mode
(`trainer.val_only=True`, k samples per problem via `rollout.val_kwargs.n`, dumped per sample by
`trainer.validation_data_dir`), i.e. vLLM (on GPU, or its CPU build), scored by the project's
math reward. Scoring reads those per-sample results back, so it can be re-run or checked offline.

    run_scripts/eval_aime.sh MODEL_PATH [k]                         # the user-facing wrapper
    python -m recipe.evaluation run --model PATH --data a.parquet b.parquet --k 16 --out DIR [--cpu]
    python -m recipe.evaluation score --samples DIR/generations/0.jsonl --data ... --k 16 --out DIR

Metrics per benchmark (a benchmark = a `data_source` in the parquet files):
  avg@k   mean correctness over all k samples of all problems (the paper's avg@16)
  pass@k  share of problems with at least one correct sample
  maj@k   share of problems whose most frequent answer (ties: the first seen) is correct
  std@k   sample standard deviation (ddof=1) of the k per-sample-set accuracies; sample-set j is
          every problem's j-th sample
Defaults (paper): temperature 0.6, top_p 0.95; max response length: the run script's (32k/64k on GPU;
eval_aime.sh uses 32768 on GPU and the cpu_tiny config's 32 on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import pandas as pd

from recipe.bapo.main_bapo import run_logged

DEFAULT_K = 16
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.95


def generation_overrides(model: str, data: list[str], k: int, out_dir: Path, temperature: float, top_p: float,
                         max_response_length: int | None) -> list[str]:
    """Hydra overrides that turn a training config into a val-only sampling pass with per-sample dumps."""
    files = "[" + ",".join(str(Path(f).resolve()) for f in data) + "]"
    length = [] if max_response_length is None else [f"data.max_response_length={max_response_length}"]
    return [
        f"actor_rollout_ref.model.path={model}",
        f"data.val_files={files}",
        # the trainer needs a non-empty train set; val-only mode returns before sampling it
        f"data.train_files={files}",
        "data.train_batch_size=1",
        "actor_rollout_ref.actor.ppo_mini_batch_size=1",
        *length,
        f"actor_rollout_ref.rollout.val_kwargs.n={k}",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=True",
        f"actor_rollout_ref.rollout.val_kwargs.temperature={temperature}",
        f"actor_rollout_ref.rollout.val_kwargs.top_p={top_p}",
        "trainer.val_only=True",
        "trainer.val_before_train=True",
        "data.validation_shuffle=False",
        f"trainer.validation_data_dir={out_dir / 'generations'}",
        f"trainer.default_local_dir={out_dir / 'checkpoints'}",
        "trainer.resume_mode=disable",
        "trainer.logger=[console]",
    ]


def generate(model: str, data: list[str], k: int, out_dir: Path, cpu: bool, temperature: float = DEFAULT_TEMPERATURE,
             top_p: float = DEFAULT_TOP_P, max_response_length: int | None = None,
             extra: list[str] = ()) -> Path:
    """Sample k responses per problem through verl's rollout; returns the per-sample JSONL path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = ["--config-name", "cpu_tiny"] if cpu else []
    args = [*config, *generation_overrides(model, data, k, out_dir, temperature, top_p, max_response_length), *extra]
    run_logged(args, out_dir / "generation.log")
    samples = out_dir / "generations" / "0.jsonl"
    if not samples.exists():
        raise FileNotFoundError(f"verl wrote no per-sample dump at {samples}; see {out_dir / 'generation.log'}")
    return samples


def load_problems(data: list[str]) -> pd.DataFrame:
    """The evaluated problems in verl's validation order (files concatenated, no shuffle)."""
    frames = [pd.read_parquet(f) for f in data]
    problems = pd.concat(frames, ignore_index=True)
    problems["problem_text"] = [row[-1]["content"] for row in problems["prompt"]]
    problems["ground_truth"] = [str(rm["ground_truth"]) for rm in problems["reward_model"]]
    return problems


def score(samples_path: Path, data: list[str], k: int) -> dict:
    """Metrics per benchmark and per problem from verl's per-sample dump (k consecutive samples per problem)."""
    samples = [json.loads(line) for line in Path(samples_path).read_text().splitlines() if line.strip()]
    problems = load_problems(data)
    if len(samples) != k * len(problems):
        raise ValueError(f"{samples_path} has {len(samples)} samples; expected k={k} x {len(problems)} problems")
    results: dict = {"k": k, "benchmarks": {}, "problems": []}
    by_benchmark: dict[str, list[dict]] = {}
    for i, problem in problems.iterrows():
        group = samples[i * k : (i + 1) * k]
        for sample in group:  # verl keeps the dataset order; check it rather than trust it
            if problem["problem_text"].strip()[:200] not in sample["input"]:
                raise ValueError(f"sample order does not match problem {i} ({problem['data_source']}): verl's dump changed?")
        correct = [float(s["acc"]) for s in group]
        votes = Counter(s["pred"] for s in group if s["pred"])
        majority = votes.most_common(1)[0][0] if votes else None
        majority_correct = next((float(s["acc"]) for s in group if majority is not None and s["pred"] == majority), 0.0)
        entry = {
            "benchmark": problem["data_source"],
            "index": i,
            "ground_truth": problem["ground_truth"],
            "correct": correct,
            "preds": [s["pred"] for s in group],
            "avg": sum(correct) / k,
            "pass": float(any(correct)),
            "majority_pred": majority,
            "maj": majority_correct,
        }
        results["problems"].append(entry)
        by_benchmark.setdefault(problem["data_source"], []).append(entry)
    for name, entries in by_benchmark.items():
        per_set = [sum(e["correct"][j] for e in entries) / len(entries) for j in range(k)]
        results["benchmarks"][name] = {
            "problems": len(entries),
            f"avg@{k}": sum(per_set) / k,
            f"pass@{k}": sum(e["pass"] for e in entries) / len(entries),
            f"maj@{k}": sum(e["maj"] for e in entries) / len(entries),
            f"std@{k}": statistics.stdev(per_set) if k > 1 else 0.0,
        }
    return results


def markdown(results: dict) -> str:
    k = results["k"]
    lines = [f"| benchmark | problems | avg@{k} | std@{k} | pass@{k} | maj@{k} |", "|---|---|---|---|---|---|"]
    for name, m in results["benchmarks"].items():
        lines.append(
            f"| {name} | {m['problems']} | {100 * m[f'avg@{k}']:.1f} | {100 * m[f'std@{k}']:.1f} "
            f"| {100 * m[f'pass@{k}']:.1f} | {100 * m[f'maj@{k}']:.1f} |"
        )
    lines += ["", f"| benchmark | problem | ground truth | correct of {k} | majority answer |", "|---|---|---|---|---|"]
    for e in results["problems"]:
        lines.append(f"| {e['benchmark']} | {e['index']} | {e['ground_truth']} | {int(sum(e['correct']))} | {e['majority_pred']} |")
    return "\n".join(lines) + "\n"


def write(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(markdown(results))
    return out_dir / "results.json", out_dir / "results.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe.evaluation", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "score"):
        p = sub.add_parser(name)
        p.add_argument("--data", nargs="+", required=True, help="verl parquet files (e.g. data/aime2024.parquet)")
        p.add_argument("--k", type=int, default=DEFAULT_K, help=f"samples per problem (default {DEFAULT_K})")
        p.add_argument("--out", required=True, type=Path)
    run = sub.choices["run"]
    run.add_argument("--model", required=True, help="HF model directory or hub id")
    run.add_argument("--cpu", action="store_true", help="use configs/cpu_tiny.yaml (vLLM's CPU build as the rollout)")
    run.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    run.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    run.add_argument("--max-response-length", type=int, default=None,
                     help="data.max_response_length (default: the config's; set the run script's, e.g. 32768)")
    run.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    sub.choices["score"].add_argument("--samples", required=True, type=Path, help="verl's per-sample JSONL dump")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k={args.k}: must be >= 1")
    for f in args.data:
        if not Path(f).exists():
            parser.error(f"--data {f}: no such file (run run_scripts/prepare_data.sh first)")
    if args.command == "run":
        if not 0 < args.top_p <= 1 or args.temperature < 0 or (args.max_response_length or 1) < 1:
            parser.error("--temperature >= 0, 0 < --top-p <= 1 and --max-response-length >= 1 are required")
        samples = generate(args.model, args.data, args.k, args.out, args.cpu, args.temperature, args.top_p,
                           args.max_response_length, args.overrides)
    else:
        samples = args.samples
    results_json, results_md = write(score(samples, args.data, args.k), args.out)
    print(Path(results_md).read_text())
    print(f"results: {results_json} and {results_md}; per-sample outputs: {samples}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
