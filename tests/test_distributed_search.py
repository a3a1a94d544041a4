"""Two gloo processes with different data choose identical bounds, equal to one search over the union."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bapo_core import ClipSearchSpec, search_clip_bounds

SPECS = [ClipSearchSpec(), ClipSearchSpec(search_order="low_first", accounting="value", rho_definition="ratio", rho_target=0.5, dual_clip_c=3.0)]


def shard(rank: int):
    """Rank-specific data: different sizes, rank 0 mostly negative, rank 1 mostly positive."""
    gen = torch.Generator().manual_seed(100 + rank)
    bsz, length = (6, 40) if rank == 0 else (3, 17)
    ratio = (torch.randn(bsz, length, generator=gen, dtype=torch.float64) * 0.5).exp()
    adv = torch.randn(bsz, 1, generator=gen, dtype=torch.float64).expand(bsz, length) + (-0.9 if rank == 0 else 0.4)
    mask = torch.rand(bsz, length, generator=gen) < 0.9
    weights = torch.rand(bsz, length, generator=gen, dtype=torch.float64) + 0.5
    return ratio, adv, mask, weights


def _worker(rank: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ratio, adv, mask, weights = shard(rank)
        results = [search_clip_bounds(ratio, adv, mask, spec, weights=weights, group=dist.group.WORLD) for spec in SPECS]
        # the registered loss in micro_batch scope reduces over the default group by itself
        import verl  # noqa: F401
        from recipe.bapo.config import BAPOPolicyLossConfig
        from verl.trainer.ppo.core_algos import get_policy_loss_fn
        from verl.workers.config import ActorConfig

        config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=BAPOPolicyLossConfig(scope="micro_batch"))
        old = torch.zeros_like(ratio)
        _, metrics = get_policy_loss_fn("bapo")(old, ratio.log(), adv, mask, "token-mean", config, weights)
        torch.save({"results": results, "loss_bounds": (metrics["actor/bapo/c_low"], metrics["actor/bapo/c_high"])}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_choose_the_bounds_of_the_union():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        outs = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(2)]
    shards = [shard(r) for r in range(2)]
    union = [torch.cat([s[i].reshape(-1) for s in shards]) for i in range(4)]
    for i, spec in enumerate(SPECS):
        single = search_clip_bounds(*union[:3], spec, weights=union[3])
        local = [search_clip_bounds(*s[:3], spec, weights=s[3]) for s in shards]
        assert outs[0]["results"][i] == outs[1]["results"][i]
        got = outs[0]["results"][i]
        assert (got.c_low, got.c_high, got.steps, got.num_signal_tokens) == (single.c_low, single.c_high, single.steps, single.num_signal_tokens)
        assert abs(got.rho - single.rho) < 1e-12
        assert (local[0].c_low, local[0].c_high) != (local[1].c_low, local[1].c_high)  # alone, the ranks disagree
    assert outs[0]["loss_bounds"] == outs[1]["loss_bounds"] == (outs[0]["results"][0].c_low, outs[0]["results"][0].c_high)
