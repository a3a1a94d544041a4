"""One-call GPU check: the BAPO loss and search on the device, and the dry run's memory formulas against
measured peaks. Writes one markdown report.

    python benchmarks/gpu_check.py                       # GPU machine: docs/gpu_check_<date>.md
    python benchmarks/gpu_check.py --device cpu --smoke  # small shapes, same report structure (runs/)

Imports only torch, transformers and this repository's plain-PyTorch code (bapo_core/, benchmarks/, and
recipe/dry_run/memory.py loaded by file path), never verl, Ray, vLLM, hydra or omegaconf: a bare machine with
the git-tracked working tree runs it. The report is rewritten after each section, so a run cut short keeps
what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bapo_core import ClipSearchSpec, clip_diagnostics, log_ratio_of, ppo_clip_loss, search_clip_bounds  # noqa: E402
from benchmarks.gpu_memory import memory_section, seven_b_shapes, smoke_shapes  # noqa: E402
from benchmarks.loss_batches import fwd_bwd_ms, interleaved_ms, sync, walking_batch  # noqa: E402

FULL_SIZES, SMOKE_SIZES = "8x1024,32x4096,64x8192,256x8192", "8x512,8x1024"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_memory_formulas():
    """recipe/dry_run/memory.py by file path: importing the recipe.dry_run package would import omegaconf and verl."""
    spec = importlib.util.spec_from_file_location("dry_run_memory", ROOT / "recipe/dry_run/memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_bandwidth(device_name: str) -> tuple[float | None, str]:
    """(bytes/s, label) of the device's memory by name; None where this table does not know the part."""
    if "H200" in device_name:
        return 4.8e12, "H200, 4.8 TB/s"
    if "H100" in device_name and "PCIe" in device_name:
        return 2.0e12, "H100 PCIe, 2.0 TB/s"
    if "H100" in device_name and "HBM3" in device_name:  # the SXM part's name ("NVIDIA H100 80GB HBM3")
        return 3.35e12, "H100 SXM, 3.35 TB/s"
    return None, "unknown"


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl.utils.torch_functional.masked_sum: NaNs outside the mask must not reach the sum."""
    return (torch.where(mask.bool(), values, 0.0) * mask).sum()


def vanilla_ppo_loss(old_log_prob, log_prob, advantages, response_mask, clip_low=0.2, clip_high=0.2, clip_c=3.0):
    """verl 0.9.1's compute_policy_loss_vanilla (trainer/ppo/core_algos.py), token-mean on one process without
    rollout-IS weights, transcribed op for op so its cost is verl's. tests/test_gpu_check.py checks it equals verl's."""
    count = response_mask.sum()
    log_ratio = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    ppo_kl = masked_sum(-log_ratio, response_mask) / (count + 1e-8)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped1 = torch.maximum(loss1, loss2)
    clipfrac = masked_sum(torch.gt(loss2, loss1).float(), response_mask) / (count + 1e-8)
    loss3 = -advantages * clip_c
    clipped2 = torch.min(loss3, clipped1)
    clipfrac_lower = masked_sum(torch.gt(clipped1, loss3) * (advantages < 0).float(), response_mask) / (count + 1e-8)
    losses = torch.where(advantages < 0, clipped2, clipped1)
    loss = masked_sum(losses, response_mask) / count
    metrics = {"actor/pg_clipfrac": clipfrac.detach().item(), "actor/ppo_kl": ppo_kl.detach().item(),
               "actor/pg_clipfrac_lower": clipfrac_lower.detach().item()}
    return loss, metrics


def bapo_loss(old_log_prob, log_prob, advantages, response_mask, spec: ClipSearchSpec = ClipSearchSpec()):
    """recipe/bapo/loss.py's loss at scope micro_batch (search inside), token-mean, one process, no rollout-IS
    weights: the same bapo_core calls without verl's glue, ending in one host sync as there."""
    log_ratio, finite = log_ratio_of(log_prob, old_log_prob)
    ratio = torch.exp(log_ratio)
    mask = response_mask.bool()
    valid = mask & finite
    bounds = search_clip_bounds(ratio, advantages, valid, spec)
    losses = ppo_clip_loss(ratio, advantages, bounds.c_low, bounds.c_high, spec.dual_clip_c)
    loss = masked_sum(losses, valid) / mask.sum().clamp(min=1)
    diagnostics = clip_diagnostics(ratio, advantages, log_prob.detach(), valid, bounds.c_low, bounds.c_high, spec.dual_clip_c)
    diagnostics["ppo_kl"] = -(log_ratio.detach() * valid).sum() / torch.count_nonzero(valid).clamp(min=1)
    diagnostics["nonfinite_token_frac"] = torch.count_nonzero(mask & ~finite) / torch.count_nonzero(mask).clamp(min=1)
    values = dict(zip(diagnostics, torch.stack(list(diagnostics.values())).tolist()))
    return loss, {**values, "c_low": bounds.c_low, "c_high": bounds.c_high, "steps": bounds.steps}


def search_launches(fn, device: str) -> str:
    """Device kernels (and copies) one call of `fn` launches, from torch.profiler; on CPU the top-level aten ops."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            fn()
            sync(device)
    except Exception as err:  # e.g. no CUPTI on the machine: the report says so instead of losing the section
        return f"n/a ({str(err)[:60]})".replace("|", "/")
    events = prof.events()
    if cuda:
        count = sum(e.device_type == DeviceType.CUDA for e in events)
        return str(count) if count else "n/a (no device events)"
    return f"{sum(e.name.startswith('aten::') and e.cpu_parent is None for e in events)} ops"


def loss_section(sizes: str, reps: int, device: str, bandwidth: float | None) -> list[str]:
    spec = ClipSearchSpec()
    lines = [
        "| tokens | log-probs | vanilla ms | BAPO ms | BAPO / vanilla | search ms | search steps | search launches "
        "| vanilla GB/s (% peak) | BAPO GB/s (% peak) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes.split(","):
        try:
            lines += _loss_rows(size, reps, device, bandwidth, spec)
        except Exception as err:  # e.g. out of memory at one size: keep the other sizes
            lines.append(f"| {size} | failed | {type(err).__name__}: {str(err)[:150]} |".replace("\n", " "))
    return lines


def _loss_rows(size: str, reps: int, device: str, bandwidth: float | None, spec: ClipSearchSpec) -> list[str]:
    """Two table rows (fp32, bf16 log-probs) for one bsz x length batch."""
    lines = []
    bsz, length = (int(x) for x in size.split("x"))
    old32, lp32, adv, mask = walking_batch(bsz, length, device, spec)
    for name, dtype in DTYPES.items():
        batch = [old32.to(dtype), lp32.to(dtype), adv, mask]
        losses = {"vanilla": vanilla_ppo_loss, "bapo": functools.partial(bapo_loss, spec=spec)}
        for fn in losses.values():
            fwd_bwd_ms(fn, batch, 2, device)  # warm-up (allocator, kernels)
        ms = interleaved_ms({k: lambda fn=fn: fwd_bwd_ms(fn, batch, 1, device) for k, fn in losses.items()}, reps)
        ratio = torch.exp(log_ratio_of(batch[1], batch[0])[0])
        search = functools.partial(search_clip_bounds, ratio, adv, mask, spec)
        steps = search().steps  # also the search's warm-up
        search_ms = interleaved_ms({"search": functools.partial(_timed_ms, search, device)}, reps)["search"]
        # compulsory traffic: read old and new log-probs, advantages, mask; write the log-prob gradient
        nbytes = mask.numel() * (3 * batch[1].element_size() + adv.element_size() + mask.element_size())

        def rate(t_ms: float) -> str:
            gbs = nbytes / (t_ms / 1e3) / 1e9
            return f"{gbs:.0f} ({100 * gbs * 1e9 / bandwidth:.1f}%)" if bandwidth else f"{gbs:.3g} (peak unknown)"

        lines.append(
            f"| {size} | {name} | {ms['vanilla']:.3f} | {ms['bapo']:.3f} | {ms['bapo'] / ms['vanilla']:.2f}x "
            f"| {search_ms:.3f} | {steps} | {search_launches(search, device)} | {rate(ms['vanilla'])} "
            f"| {rate(ms['bapo'])} |"
        )
    return lines


def _timed_ms(fn, device: str) -> list[float]:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return [(time.perf_counter() - start) * 1e3]


LOSS_NOTES = (
    "Median of interleaved repeats, fwd+bwd of the loss over (bsz x length) log-probs. BAPO: recipe/bapo/loss.py's "
    "computation at scope micro_batch (the search inside every call; under the default scope update the loss runs "
    "with given bounds and the search once per optimizer step), paper preset, on a stale batch whose search walks "
    "20-45 grid steps. Vanilla: verl's compute_policy_loss_vanilla, transcribed. GB/s counts compulsory bytes only "
    "(old and new log-probs, advantages, mask read once, the log-prob gradient written once). Search launches: "
    "device kernels and copies in one search call (torch.profiler); on CPU, top-level aten ops."
)


def environment(device: str) -> tuple[list[str], str]:
    import transformers

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        name = props.name
        where = f"{name} ({device}, {props.total_memory / 1024**3:.1f} GiB, sm_{props.major}{props.minor})"
    else:
        name = where = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows = [("device", where), ("torch", torch.__version__), ("CUDA (torch.version.cuda)", torch.version.cuda or "n/a"),
            ("transformers", transformers.__version__), ("python", platform.python_version())]
    return [f"| {k} | {v} |" for k, v in rows], name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--device", default=None, help="cuda (default when available) or cpu")
    add("--smoke", action="store_true", help="small shapes and repeats: checks the script, measures nothing useful")
    add("--out", type=Path, default=None, help="report path (docs/gpu_check_<date>.md; --smoke: runs/)")
    add("--sizes", default=None, help=f"loss batches bsz x length (default {FULL_SIZES}; --smoke {SMOKE_SIZES})")
    add("--tokens", type=int, default=None, help="memory check's T (default: the 7B 8k script's ppo_max_token_len_per_gpu)")
    add("--reps", type=int, default=None, help="timed repeats per loss (default 30; --smoke 3)")
    args = parser.parse_args(argv)
    args.command = " ".join(sys.argv[1:] if argv is None else argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        parser.error("no CUDA device here; on a laptop run --device cpu --smoke")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch {torch.__version__} sees no CUDA device")
    started, now = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc)
    out = args.out or ROOT / (("runs/gpu_check_smoke_" if args.smoke else "docs/gpu_check_") + f"{now:%Y-%m-%d}.md")
    sizes = args.sizes or (SMOKE_SIZES if args.smoke else FULL_SIZES)
    reps = args.reps or (3 if args.smoke else 30)
    env_rows, device_name = environment(device)
    bandwidth, bandwidth_label = peak_bandwidth(device_name)
    shapes = seven_b_shapes()
    shapes = smoke_shapes(shapes) if args.smoke else shapes
    shapes = dataclasses.replace(shapes, tokens=args.tokens) if args.tokens else shapes
    mem = load_memory_formulas()

    sections = {
        "Loss: BAPO (search included) vs vanilla PPO, fwd+bwd": lambda: [
            f"Peak memory bandwidth: {bandwidth_label}.", "", *loss_section(sizes, reps, device, bandwidth), "", LOSS_NOTES],
        "Memory: measured vs the dry run's formulas (recipe/dry_run/memory.py)": lambda: memory_section(shapes, device, mem),
    }
    body, failed = [], []
    for title, run in sections.items():
        try:
            body += [f"## {title}", "", *run(), ""]
        except Exception:  # keep the other section: a GPU machine is rare
            failed.append(title)
            body += [f"## {title}", "", "**failed**:", "", "```", traceback.format_exc().strip()[-3000:], "```", ""]
        _write(out, now, args, env_rows, body, time.perf_counter() - started, done=title == list(sections)[-1])
    print(out.read_text())
    print(f"report: {out}")
    return 1 if failed else 0


def _write(out: Path, now, args, env_rows: list[str], body: list[str], wall: float, done: bool):
    header = [
        "# GPU check (`benchmarks/gpu_check.py`)", "",
        "| | |", "|---|---|",
        f"| date | {now:%Y-%m-%d %H:%M} UTC |", *env_rows,
        f"| mode | {'smoke (small shapes: structure only, not measurements)' if args.smoke else 'full'} |",
        f"| command | `python benchmarks/gpu_check.py {args.command}` |",
        f"| wall | {wall:.0f} s{'' if done else ' (so far: the run stopped or is still running)'} |", "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header + body))


if __name__ == "__main__":
    sys.exit(main())
