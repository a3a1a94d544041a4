"""BAPO loss cost, measured side by side with verl's vanilla PPO loss in one run.

Prints, per batch size (bsz x response tokens):
  * BAPO fwd+bwd (search included, scope micro_batch) / verl vanilla fwd+bwd    target <= 1.3x at 32x4096
  * BAPO fwd+bwd with the bounds given (scope update: the hook searched once per optimizer step) / vanilla
  * the vectorised search vs Algorithm 1 as a loop that re-evaluates the batch and syncs every step
    (as the authors' code does), on a batch whose search walks >= 20 steps          target >= 10x
  * host syncs per search (counted as on a GPU)                                       target 1
  * peak extra tensor memory of the search, in units of one float32 (bsz x len) tensor
Usage: python benchmarks/bench_loss.py [--sizes 8x1024,32x4096,64x8192] [--reps 15] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import verl  # noqa: E402,F401  (registers the bapo loss via the plugin entry point)
from bapo_core import search_clip_bounds  # noqa: E402
from bapo_core.reference import search_clip_bounds_loop  # noqa: E402
from benchmarks.loss_batches import fwd_bwd_ms, interleaved_ms, sync, walking_batch  # noqa: E402
from benchmarks.probes import HostSyncCounter, PeakTensorMemory  # noqa: E402
from recipe.bapo.config import BAPOPolicyLossConfig  # noqa: E402
from recipe.bapo.optimizer_step import OptimizerStep, running  # noqa: E402
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8x1024,32x4096,64x8192")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = args.device
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=BAPOPolicyLossConfig(scope="micro_batch"))
    given = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=BAPOPolicyLossConfig(scope="update"))
    spec = config.policy_loss.search_spec
    bapo = get_policy_loss_fn("bapo")
    print(f"# bench_loss on {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})")
    print("| tokens | vanilla fwd+bwd ms | BAPO fwd+bwd ms | BAPO / vanilla | bounds given / vanilla | search ms | loop ms | loop / search | steps | syncs search / loop | search peak mem (x one fp32 bsz*len) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        bsz, length = (int(x) for x in size.split("x"))
        batch = walking_batch(bsz, length, device, spec)
        old, log_prob, adv, mask = batch
        ratio = (log_prob - old).exp()
        step = OptimizerStep(index=0, bounds=search_clip_bounds(ratio, adv, mask, spec), dp_group=None)  # as the actor hook gives it

        def given_loss(*b, step=step):
            with running(step):
                return bapo(*b, "token-mean", given)

        losses = {
            "vanilla": lambda *b: compute_policy_loss_vanilla(*b, "token-mean", config),
            "bapo": lambda *b: bapo(*b, "token-mean", config),
            "given": given_loss,
        }
        for name in ("bapo", "vanilla"):
            fwd_bwd_ms(losses[name], batch, 2, device)  # warm-up
        loss_ms = interleaved_ms({name: lambda fn=fn: fwd_bwd_ms(fn, batch, 1, device) for name, fn in losses.items()}, args.reps)

        def timed(fn):
            def run():
                sync(device)
                start = time.perf_counter()
                result = fn(ratio, adv, mask, spec)
                sync(device)
                run.result = result
                return [(time.perf_counter() - start) * 1e3]

            return run

        search, loop = timed(search_clip_bounds), timed(search_clip_bounds_loop)
        search_ms = interleaved_ms({"search": search, "loop": loop}, max(3, args.reps // 3))
        assert (search.result.c_low, search.result.c_high) == (loop.result.c_low, loop.result.c_high)
        with HostSyncCounter() as syncs:
            search_clip_bounds(ratio, adv, mask, spec)
        with HostSyncCounter() as loop_syncs:
            search_clip_bounds_loop(ratio, adv, mask, spec)
        with PeakTensorMemory() as memory:
            search_clip_bounds(ratio, adv, mask, spec)
        unit = bsz * length * 4
        print(
            f"| {bsz}x{length} | {loss_ms['vanilla']:.2f} | {loss_ms['bapo']:.2f} | {loss_ms['bapo'] / loss_ms['vanilla']:.2f}x "
            f"| {loss_ms['given'] / loss_ms['vanilla']:.2f}x "
            f"| {search_ms['search']:.2f} | {search_ms['loop']:.2f} | {search_ms['loop'] / search_ms['search']:.1f}x "
            f"| {search.result.steps} | {syncs.count} / {loop_syncs.count} | {memory.peak_bytes / unit:.1f} |"
        )


if __name__ == "__main__":
    main()
