"""`bapo_authors_code` against the authors' released loop (github.com/WooooDyy/BAPO, recipe/bapo/policy_loss.py).

The reference below is a plain transcription of that loop's semantics, written here from their code
(not bapo_core/reference.py): every token counts at min(r, c_high) * A (A >= 0) or max(r, c_low) * A
(A < 0) over the response mask -- no rollout-IS weights, no dual clip; rho = P / (N + 1e-8), inf when
N <= 0; c_low moves first, each step min(cur + step, max) accumulated in floats, each loop stops as
soon as rho >= target; bounds are compared in the ratio's dtype (`ratio.new_tensor(bound)`). Their
loss: dual clip c = 3 for A < 0 (torch.min of the two), token-mean, times the rollout-IS weights.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

import verl  # noqa: F401  (plugin)
from recipe.bapo.config import BAPOPolicyLossConfig
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import ActorConfig

from test_config import PRESETS

EPS = 1e-8


def authors_rho(ratio, adv, mask, c_low, c_high):
    clip_min, clip_max = ratio.new_tensor(float(c_low)), ratio.new_tensor(float(c_high))
    effective = torch.where(adv >= 0, torch.minimum(ratio, clip_max), torch.maximum(ratio, clip_min))
    contribution = (effective * adv * mask).double()
    pos, neg = contribution.clamp(min=0).sum().item(), (-contribution.clamp(max=0)).sum().item()
    return math.inf if neg <= 0 else pos / (neg + EPS)


def authors_search(ratio, adv, mask, p):
    """Their two while loops. Returns (c_low, c_high, rho at each visited point)."""
    low, high = p["c_low_start"], p["c_high_start"]
    rhos = [authors_rho(ratio, adv, mask, low, high)]
    while rhos[-1] < p["rho_target"] and low < p["c_low_max"] and p["c_low_step"] > 0:
        low = min(low + p["c_low_step"], p["c_low_max"])
        rhos.append(authors_rho(ratio, adv, mask, low, high))
    while rhos[-1] < p["rho_target"] and high < p["c_high_max"] and p["c_high_step"] > 0:
        high = min(high + p["c_high_step"], p["c_high_max"])
        rhos.append(authors_rho(ratio, adv, mask, low, high))
    return low, high, rhos


def authors_loss(ratio, adv, mask, weights, c_low, c_high, clip_ratio_c=3.0):
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, c_low, c_high)
    clipped = torch.maximum(loss1, loss2)
    dual = torch.min(-adv * clip_ratio_c, clipped)
    losses = torch.where(adv < 0, dual, clipped) * weights
    return (losses * mask).sum() / mask.sum()


def preset(**overrides):
    config = OmegaConf.load(f"{PRESETS}/bapo_authors_code.yaml")
    return omega_conf_to_dataclass(OmegaConf.merge(config, overrides))


def random_case(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    bsz, length = int(torch.randint(1, 7, (1,), generator=gen)), int(torch.randint(1, 30, (1,), generator=gen))
    scale = float(torch.rand(1, generator=gen)) * 2.0  # up to e^(3 * 2): many ratios above 3 (the dual clip)
    log_ratio = torch.randn(bsz, length, generator=gen, dtype=torch.float64) * scale
    if seed % 3 == 0:  # some ratios exactly on grid values of the preset's ranges
        grid = torch.tensor([0.8, 0.85, 0.9, 0.95, 1.2, 1.3, 1.5, 2.0, 3.0], dtype=torch.float64)
        pick = torch.rand(bsz, length, generator=gen) < 0.3
        log_ratio = torch.where(pick, grid[torch.randint(0, len(grid), (bsz, length), generator=gen)].log(), log_ratio)
    adv = torch.randn(bsz, 1, generator=gen, dtype=torch.float64).expand(bsz, length).clone()
    if seed % 2:
        adv = adv + torch.randn(bsz, length, generator=gen, dtype=torch.float64) * 0.5
    adv = adv - float(torch.rand(1, generator=gen))  # negatives often dominate, so the loops run
    mask = torch.rand(bsz, length, generator=gen) < 0.85
    weights = torch.rand(bsz, length, generator=gen, dtype=torch.float64) * 2  # verl's rollout-IS weights
    old = -torch.rand(bsz, length, generator=gen, dtype=torch.float64) * 3
    return old.to(dtype), (old + log_ratio).to(dtype), adv.to(dtype), mask, weights.to(dtype)


def check(config: BAPOPolicyLossConfig, old, log_prob, adv, mask, weights) -> bool:
    """Our registered loss vs their loop and loss on one micro-batch; False for a near-tie (skipped)."""
    actor = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=config)
    log_prob = log_prob.clone().requires_grad_(True)
    loss, metrics = get_policy_loss_fn("bapo")(old, log_prob, adv, mask, "token-mean", actor, weights)
    ratio = torch.exp(torch.clamp(log_prob.detach() - old, -20, 20))
    params = {k: getattr(config, k) for k in ("rho_target", "c_low_start", "c_low_max", "c_low_step", "c_high_start", "c_high_max", "c_high_step")}
    c_low, c_high, rhos = authors_search(ratio, adv, mask, params)
    tolerance = 1e-6 if ratio.dtype == torch.float32 else 1e-9
    if any(math.isfinite(r) and abs(r - config.rho_target) <= tolerance * max(1.0, config.rho_target) for r in rhos):
        return False  # summation order (theirs: in the ratio's dtype) may decide a tie either way
    signal = bool(((adv * weights)[mask] != 0).any())
    assert ("actor/bapo/c_low" in metrics) == signal  # no token with w * A != 0: no search metrics (loss.SEARCH_METRICS)
    if signal:
        assert metrics["actor/bapo/c_low"] == pytest.approx(c_low, abs=1e-9), (metrics, c_low, c_high, rhos)
        assert metrics["actor/bapo/c_high"] == pytest.approx(c_high, abs=1e-9), (metrics, c_low, c_high, rhos)
        logged = rhos[-1] if math.isfinite(rhos[-1]) else 1e6  # inf (N = 0) is logged capped, metrics stay finite
        assert metrics["actor/bapo/rho"] == pytest.approx(min(logged, 1e6), rel=1e-5)
    if not mask.any():  # theirs: 0/0 = NaN; ours 0 (documented) -- nothing to compare
        return True
    expected = authors_loss(ratio, adv, mask, weights, c_low, c_high)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6 if ratio.dtype == torch.float32 else 1e-12, atol=1e-7)
    return True


def test_preset_reproduces_the_authors_loop_on_thousands_of_batches():
    config = preset()
    compared = 0
    for seed in range(2000):
        compared += check(config, *random_case(seed, torch.float32 if seed % 4 == 0 else torch.float64))
    assert compared > 1900


@settings(max_examples=300, deadline=None)
@given(
    low_start=st.sampled_from([0.6, 0.7, 0.8]),
    low_span=st.floats(0.0, 0.19),
    low_step=st.sampled_from([0.02, 0.03, 0.05, 0.07]),
    high_start=st.sampled_from([1.1, 1.2, 1.28]),
    high_span=st.floats(0.0, 1.9),
    high_step=st.sampled_from([0.05, 0.1, 0.15, 0.3]),
    target=st.floats(0.2, 2.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_ranges_that_are_not_multiples_of_the_step(low_start, low_span, low_step, high_start, high_span, high_step, target, seed):
    """Their last step is clamped to the max: the max is reached even off the step grid."""
    config = preset(
        c_low_start=low_start, c_low_max=round(low_start + low_span, 6), c_low_step=low_step if low_span > 0 else 0.0,
        c_high_start=high_start, c_high_max=round(high_start + high_span, 6), c_high_step=high_step if high_span > 0 else 0.0,
        rho_target=target,
    )  # fmt: skip
    check(config, *random_case(seed, torch.float64))
