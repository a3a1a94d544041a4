"""Synthetic loss batches and timing helpers shared by bench_loss.py (CPU, against verl) and gpu_check.py
(no verl). Imports only torch and bapo_core."""

from __future__ import annotations

import statistics
import time

import torch

from bapo_core import search_clip_bounds


def stale_batch(bsz: int, length: int, device: str, seed: int = 0):
    """GRPO-like advantages (mostly negative: long wrong answers dominate) and stale log-probs."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(bsz, length, generator=gen) * 2
    log_prob = old + torch.randn(bsz, length, generator=gen) * 0.6
    adv = torch.randn(bsz, 1, generator=gen).expand(bsz, length).contiguous() - 0.8
    lengths = torch.randint(length // 2, length + 1, (bsz,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return [t.to(device) for t in (old, log_prob, adv, mask)]


def walking_batch(bsz: int, length: int, device: str, spec):
    """A stale batch whose search walks 20-45 steps before meeting the target (tries seeds)."""
    for seed in range(100):
        old, log_prob, adv, mask = stale_batch(bsz, length, device, seed)
        adv = adv + 0.8  # centred advantages: rho starts around 0.2-0.3
        result = search_clip_bounds((log_prob - old).exp(), adv, mask, spec)
        if result.target_met and 20 <= result.steps <= 45:
            return old, log_prob, adv, mask
    raise RuntimeError(f"no seed gives a 20-45 step search at {bsz}x{length}")


def sync(device: str):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_ms(fns: dict, reps: int) -> dict[str, float]:
    """Median ms of each callable (each returns a list of ms), alternating them so machine noise hits all alike."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name] += fn()
    return {name: statistics.median(t) for name, t in times.items()}


def fwd_bwd_ms(loss_fn, batch, reps: int, device: str) -> list[float]:
    """ms of each of `reps` forward+backward passes of loss_fn(old, log_prob, adv, mask) -> (loss, metrics)."""
    old, log_prob, adv, mask = batch
    times = []
    for _ in range(reps):
        lp = log_prob.clone().requires_grad_(True)
        sync(device)
        start = time.perf_counter()
        loss, _ = loss_fn(old, lp, adv, mask)
        loss.backward()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times
