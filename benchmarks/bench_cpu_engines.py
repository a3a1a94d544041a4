"""CPU rollout engines side by side on the demo's run. Written to compare the project's former `hf` engine with
verl's vLLM server on vLLM's CPU build (docs/cpu_engines/: vLLM won, and the `hf` engine was deleted after commit
30fede2; check that commit out to rerun the comparison); today it measures the vLLM rollout.

Each run is the demo's BAPO run (`configs/regime/cpu_stress_g8.yaml`, staleness 8e4, seed 0, 20 steps) with
`actor_rollout_ref.rollout.name=<engine>`, one at a time, engines alternating, `--repeats` times each. Per run:
wall time (launch to exit), start-up (launch to the end of step 1 minus step 1's own time), the mean step time
of steps 2.., the peak memory of the whole run (the sum of PSS, proportional set size, over the trainer's process
tree: Ray, every worker, vLLM's engine processes; shared libraries counted once), and verl's rollout-vs-actor
log-prob difference (`training/rollout_probs_diff_max`, `_mean`). Same-seed repeatability: whether two runs of
one engine log identical metrics (train reward per step, val accuracy, rollout responses' lengths).

    python benchmarks/bench_cpu_engines.py [--steps 20] [--repeats 2] [--engines vllm] [--out runs/bench_engines]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def descendants(root_pid: int) -> list[int]:
    """The process and all its descendants (Linux /proc): a local Ray cluster, its workers and vLLM's
    engine processes all descend from the trainer's driver."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # the process ended while we read
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def tree_pss_bytes(root_pid: int) -> int:
    """Sum of PSS (shared pages split between their users) over a process tree."""
    total = 0
    for pid in descendants(root_pid):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except OSError:
            continue
    return total


def run_once(engine: str, steps: int, out: Path) -> dict:
    from recipe.demo import REGIME, STALENESS
    from recipe.sweep.grid import expand
    from recipe.sweep.launch import compose, run_overrides

    extra = [*REGIME, f"trainer.total_training_steps={steps}", f"actor_rollout_ref.rollout.name={engine}", "trainer.test_freq=10"]
    batch = int(compose("cpu_tiny", extra).data.train_batch_size)
    (spec,) = expand(["bapo"], [STALENESS], [0], batch, variants={"": extra})
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    args = ["--config-name", "cpu_tiny", *run_overrides(out, spec, save_freq=-1)]
    env = {**os.environ, "VERL_FILE_LOGGER_PATH": str(metrics), "PYTHONUNBUFFERED": "1"}
    env.pop("VERL_PLATFORM", None)
    start = time.perf_counter()
    with open(out / "train.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "recipe.bapo.main_bapo", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak, done = 0, threading.Event()

        def sample():
            nonlocal peak
            while not done.wait(1.0):
                peak = max(peak, tree_pss_bytes(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{engine} run failed ({code}): {out / 'train.log'}")
    logged = [json.loads(line)["data"] for line in metrics.read_text().splitlines()]
    rows = [r for r in logged if "timing_s/step" in r]  # training steps (a final validation logs a row of its own)
    step_times = [r["timing_s/step"] for r in rows]
    return {
        "engine": engine, "wall_s": wall, "peak_pss_gib": peak / 2**30, "step_s_mean": statistics.mean(step_times[1:]),
        "startup_s": wall - sum(step_times) - sum(r.get("timing_s/testing", 0.0) for r in logged),
        "first_step_s": step_times[0],
        "logprob_diff_max": max(r["training/rollout_probs_diff_max"] for r in rows),
        "logprob_diff_mean": statistics.mean(r["training/rollout_probs_diff_mean"] for r in rows),
        "reward": [round(r["critic/score/mean"], 6) for r in rows],
        "response_length": [round(r["response_length/mean"], 6) for r in rows],
        "val": [round(v, 6) for r in logged for k, v in r.items() if k.startswith("val-core/")],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engines", default="vllm", help="comma-separated rollout names (hf: at commit 30fede2 or before)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_engines"))
    args = parser.parse_args(argv)
    engines = args.engines.split(",")
    results = []
    for repeat in range(args.repeats):
        for engine in engines:
            r = run_once(engine, args.steps, Path(args.out) / f"{engine}-{repeat}")
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("reward", "response_length")}), flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n| engine | wall (s) | start-up (s) | step 1 (s) | step 2.. mean (s) | peak PSS (GiB) | log-prob diff max (mean) | same-seed repeat |")
    print("|---|---|---|---|---|---|---|---|")
    for engine in engines:
        mine = [r for r in results if r["engine"] == engine]
        same = all(m["reward"] == mine[0]["reward"] and m["response_length"] == mine[0]["response_length"] and m["val"] == mine[0]["val"] for m in mine[1:])
        mean = {k: statistics.mean(m[k] for m in mine) for k in ("wall_s", "startup_s", "first_step_s", "step_s_mean", "peak_pss_gib")}
        print(f"| {engine} | {mean['wall_s']:.0f} | {mean['startup_s']:.0f} | {mean['first_step_s']:.1f} | {mean['step_s_mean']:.2f} | "
              f"{max(m['peak_pss_gib'] for m in mine):.1f} | {max(m['logprob_diff_max'] for m in mine):.1e} "
              f"({statistics.mean(m['logprob_diff_mean'] for m in mine):.1e}) | {'yes' if same and len(mine) > 1 else 'no' if len(mine) > 1 else 'n/a'} |")
    if len(engines) == 2:
        a, b = ([r["wall_s"] for r in results if r["engine"] == e] for e in engines)
        print(f"\nwall ratio {engines[1]}/{engines[0]}: {statistics.mean(b) / statistics.mean(a):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
