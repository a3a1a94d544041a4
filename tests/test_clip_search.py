"""The vectorised clip-bound search against Algorithm 1 written as a plain loop (bapo_core.reference)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bapo_core import ClipPath, ClipSearchSpec, path_contributions, rho_along_path, search_clip_bounds
from bapo_core.reference import rho_at, search_clip_bounds_loop
from benchmarks.probes import HostSyncCounter, PeakTensorMemory

PAPER = ClipSearchSpec()
AUTHORS_CODE = ClipSearchSpec(
    rho_target=0.5,
    c_low_start=0.8,
    c_low_max=0.95,
    c_low_step=0.05,
    c_high_start=1.2,
    c_high_max=2.0,
    c_high_step=0.1,
    search_order="low_first",
    accounting="value",
    rho_definition="ratio",
    clamp_last_step=True,
    dual_clip_c=3.0,
)


def path_rhos(ratio, adv, mask, spec, weights=None):
    """rho at every path point from the vectorised sums (for tie detection and monotonicity)."""
    return rho_along_path(path_contributions(ratio, adv, mask, spec, weights).tolist(), spec)


def random_batch(gen, dtype=torch.float64, adv_kind=None):
    bsz, length = int(torch.randint(1, 6, (1,), generator=gen)), int(torch.randint(1, 24, (1,), generator=gen))
    scale = float(torch.rand(1, generator=gen)) * 1.5
    ratio = (torch.randn(bsz, length, generator=gen, dtype=torch.float64) * scale).exp().to(dtype)
    kind = adv_kind or ["sequence", "token", "positive", "negative", "sparse"][int(torch.randint(0, 5, (1,), generator=gen))]
    if kind == "sequence":  # GRPO: one advantage per response
        adv = torch.randn(bsz, 1, generator=gen, dtype=torch.float64).expand(bsz, length).clone()
    else:
        adv = torch.randn(bsz, length, generator=gen, dtype=torch.float64)
        if kind == "positive":
            adv = adv.abs()
        elif kind == "negative":
            adv = -adv.abs()
        elif kind == "sparse":
            adv = adv * (torch.rand(bsz, length, generator=gen) < 0.3)
    mask = torch.rand(bsz, length, generator=gen) < 0.85
    weights = None
    if torch.rand(1, generator=gen) < 0.3:  # rollout IS weights, some exactly 0
        weights = torch.rand(bsz, length, generator=gen, dtype=torch.float64) * 2 * (torch.rand(bsz, length, generator=gen) < 0.8)
    return ratio, adv.to(dtype), mask, weights


def assert_same(spec, ratio, adv, mask, weights=None):
    fast = search_clip_bounds(ratio, adv, mask, spec, weights=weights)
    slow = search_clip_bounds_loop(ratio, adv, mask, spec, weights=weights)
    rhos = path_rhos(ratio, adv, mask, spec, weights)
    near_tie = any(abs(r - spec.rho_target) <= 1e-9 * max(1.0, spec.rho_target) for r in rhos if math.isfinite(r))
    if near_tie:  # summation order may decide a tie either way; both are correct
        return False
    assert (fast.c_low, fast.c_high, fast.steps, fast.target_met, fast.num_signal_tokens) == (
        slow.c_low,
        slow.c_high,
        slow.steps,
        slow.target_met,
        slow.num_signal_tokens,
    ), (fast, slow)
    for a, b in ((fast.rho, slow.rho), (fast.rho_start, slow.rho_start)):
        assert a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (fast, slow)
    return True


@pytest.mark.parametrize("spec_name", ["paper", "authors_code", "value_share_dual", "ratio_high_first"])
def test_vectorised_search_equals_loop_on_random_batches(spec_name):
    spec = {
        "paper": PAPER,
        "authors_code": AUTHORS_CODE,
        "value_share_dual": ClipSearchSpec(accounting="value", dual_clip_c=2.0, rho_target=0.55),
        "ratio_high_first": ClipSearchSpec(rho_definition="ratio", rho_target=1.0, dual_clip_c=1.5),
    }[spec_name]
    gen = torch.Generator().manual_seed(hash(spec_name) % 2**31)
    compared = 0
    for i in range(600):
        ratio, adv, mask, weights = random_batch(gen, dtype=torch.float32 if i % 4 == 0 else torch.float64)
        compared += assert_same(spec, ratio, adv, mask, weights)
    assert compared > 550


@st.composite
def specs(draw):
    c_low_start = draw(st.floats(0.05, 0.95))
    c_low_max = draw(st.floats(c_low_start, 0.99))
    c_high_start = draw(st.floats(1.01, 2.0))
    c_high_max = draw(st.floats(c_high_start, 4.0))
    definition = draw(st.sampled_from(["share", "ratio"]))
    return ClipSearchSpec(
        rho_target=draw(st.floats(0.01, 0.99) if definition == "share" else st.floats(0.05, 3.0)),
        c_low_start=c_low_start,
        c_low_max=c_low_max,
        c_low_step=0.0 if c_low_max == c_low_start else draw(st.floats(0.005, 0.2)),
        c_high_start=c_high_start,
        c_high_max=c_high_max,
        c_high_step=0.0 if c_high_max == c_high_start else draw(st.floats(0.01, 0.5)),
        search_order=draw(st.sampled_from(["high_first", "low_first"])),
        accounting=draw(st.sampled_from(["gradient", "value"])),
        rho_definition=definition,
        clamp_last_step=draw(st.booleans()),
        dual_clip_c=draw(st.one_of(st.none(), st.floats(1.05, 5.0))),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), seed=st.integers(0, 2**31 - 1), use_float32=st.booleans())
def test_vectorised_search_equals_loop_property(spec, seed, use_float32):
    ratio, adv, mask, weights = random_batch(torch.Generator().manual_seed(seed), torch.float32 if use_float32 else torch.float64)
    assume(assert_same(spec, ratio, adv, mask, weights))


def edge_cases():
    grid_values = torch.tensor([[0.6, 0.9, 1.0, 1.2, 3.0, 0.62, 1.25]], dtype=torch.float64)
    ones = torch.ones(2, 5, dtype=torch.float64)
    mixed = torch.tensor([[1.0, -1.0, 2.0, -0.5, 0.0]], dtype=torch.float64)
    yield "all_zero_adv", ones, torch.zeros(2, 5, dtype=torch.float64), torch.ones(2, 5, dtype=torch.bool)
    yield "empty_mask", ones, ones, torch.zeros(2, 5, dtype=torch.bool)
    yield "all_positive", ones * 1.5, ones, torch.ones(2, 5, dtype=torch.bool)
    yield "all_negative", ones * 0.5, -ones, torch.ones(2, 5, dtype=torch.bool)
    yield "single_token", torch.tensor([[2.5]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool)
    for dtype in (torch.float64, torch.float32):
        adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0]], dtype=torch.float64)
        yield f"ratios_on_grid_{dtype}", grid_values.to(dtype), adv.to(dtype), torch.ones_like(adv, dtype=torch.bool)
    yield "extreme_ratios", torch.tensor([[math.exp(20), math.exp(-20), math.exp(20), math.exp(-20)]], dtype=torch.float64), torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64), torch.ones(1, 4, dtype=torch.bool)
    nonfinite = torch.tensor([[float("nan"), float("inf"), 1.3, 0.7]], dtype=torch.float64)
    yield "nonfinite_ratios", nonfinite, torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64), torch.ones(1, 4, dtype=torch.bool)
    yield "zero_weight_mass", ones * 1.1, mixed.expand(2, 5).clone(), torch.ones(2, 5, dtype=torch.bool)


@pytest.mark.parametrize("spec", [PAPER, AUTHORS_CODE, ClipSearchSpec(accounting="value", dual_clip_c=1.3)], ids=["paper", "authors", "value_dual"])
def test_vectorised_search_equals_loop_on_edge_cases(spec):
    for name, ratio, adv, mask in edge_cases():
        assert assert_same(spec, ratio, adv, mask), name


def test_no_signal_keeps_start_bounds_and_meets_target():
    ratio = torch.rand(3, 7, dtype=torch.float64) + 0.5
    result = search_clip_bounds(ratio, torch.zeros(3, 7), torch.ones(3, 7, dtype=torch.bool), PAPER)
    assert (result.c_low, result.c_high, result.steps, result.target_met) == (0.6, 1.2, 0, True)
    result = search_clip_bounds(ratio, torch.ones(3, 7), torch.zeros(3, 7, dtype=torch.bool), PAPER)
    assert (result.c_low, result.c_high, result.target_met, result.num_signal_tokens) == (0.6, 1.2, True, 0)
    zero_weights = torch.zeros(3, 7, dtype=torch.float64)  # advantages, but no token carries weight
    for search in (search_clip_bounds, search_clip_bounds_loop):
        result = search(ratio, torch.ones(3, 7), torch.ones(3, 7, dtype=torch.bool), PAPER, weights=zero_weights)
        assert (result.c_low, result.c_high, result.target_met, result.num_signal_tokens) == (0.6, 1.2, True, 0)


def test_unmet_target_uses_the_last_point():
    ratio = torch.full((1, 4), 5.0, dtype=torch.float64)  # every positive is above c_high even at b+
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    result = search_clip_bounds(ratio, adv, torch.ones(1, 4, dtype=torch.bool), PAPER)
    assert (result.c_low, result.c_high, result.steps, result.target_met, result.rho) == (0.9, 3.0, 51, False, 0.0)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), spec=specs())
def test_rho_is_non_decreasing_along_the_path_with_gradient_accounting(seed, spec):
    spec = ClipSearchSpec(**{**spec.__dict__, "accounting": "gradient"})
    ratio, adv, mask, weights = random_batch(torch.Generator().manual_seed(seed))
    rhos = path_rhos(ratio, adv, mask, spec, weights)
    for before, after in zip(rhos, rhos[1:]):
        assert after == before or after >= before - 1e-12 * max(1.0, abs(before)), rhos


def test_value_accounting_lowers_rho_when_c_low_rises():
    """The literal Eq. 8 reading: a larger c_low raises the clamped negative values, so rho falls."""
    gen = torch.Generator().manual_seed(3)
    ratio = (torch.randn(8, 32, generator=gen, dtype=torch.float64) * 0.4).exp()
    adv = torch.randn(8, 1, generator=gen, dtype=torch.float64).expand(8, 32)
    spec = ClipSearchSpec(accounting="value", c_high_start=1.2, c_high_max=1.2, c_high_step=0.0)
    rhos = path_rhos(ratio, adv, torch.ones(8, 32, dtype=torch.bool), spec)
    assert all(b <= a + 1e-12 for a, b in zip(rhos, rhos[1:])) and rhos[-1] < rhos[0]


def test_path_is_an_exact_grid_in_algorithm_order():
    path = ClipPath.from_spec(PAPER)
    assert len(path) == 1 + 36 + 15
    assert path.c_high_grid[-1] == 3.0 and path.c_low_grid[-1] == 0.9
    assert all(v == round(1.2 + k * 0.05, 12) for k, v in enumerate(path.c_high_grid))
    assert path.bounds(0) == (0.6, 1.2) and path.bounds(36) == (0.6, 3.0) and path.bounds(37) == (0.62, 3.0)
    low_first = ClipPath.from_spec(AUTHORS_CODE)
    assert [low_first.bounds(k) for k in range(len(low_first))][:5] == [(0.8, 1.2), (0.85, 1.2), (0.9, 1.2), (0.95, 1.2), (0.95, 1.3)]
    assert low_first.bounds(len(low_first) - 1) == (0.95, 2.0)


def test_rho_at_matches_definition_on_a_hand_example():
    ratio = torch.tensor([[0.5, 1.0, 2.0, 0.5, 1.0, 2.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones_like(adv, dtype=torch.bool)
    # gradient: P = 0.5 + 1.0 (2.0 > c_high=1.5 is clipped); N = 1.0 + 2.0 (0.5 < c_low=0.8 is clipped)
    assert rho_at(ratio, adv, mask, PAPER, 0.8, 1.5) == pytest.approx(1.5 / 4.5)
    # value: P = 0.5 + 1.0 + 1.5; N = 0.8 + 1.0 + 2.0
    value = ClipSearchSpec(accounting="value")
    assert rho_at(ratio, adv, mask, value, 0.8, 1.5) == pytest.approx(3.0 / 6.8)


def test_one_host_sync_per_search():
    gen = torch.Generator().manual_seed(0)
    ratio = (torch.randn(16, 256, generator=gen) * 0.3).exp()
    adv = torch.randn(16, 1, generator=gen).expand(16, 256) - 0.5
    mask = torch.ones(16, 256, dtype=torch.bool)
    for spec in (PAPER, AUTHORS_CODE):
        search_clip_bounds(ratio, adv, mask, spec)  # warm the grid cache
        with HostSyncCounter() as counter:
            result = search_clip_bounds(ratio, adv, mask, spec)
        assert counter.count == 1, counter.calls
        assert result.steps > 0
        with HostSyncCounter() as counter:
            search_clip_bounds_loop(ratio, adv, mask, spec)
        assert counter.count > result.steps  # the loop syncs at every step


def test_memory_is_linear_in_tokens_plus_path_points():
    tokens = 64 * 512
    ratio = (torch.randn(64, 512) * 0.3).exp()
    adv = torch.randn(64, 1).expand(64, 512)
    spec = ClipSearchSpec(c_high_step=0.001, c_low_step=0.001)  # 1 + 1800 + 300 path points
    with PeakTensorMemory() as probe:
        path_contributions(ratio, adv, torch.ones(64, 512, dtype=torch.bool), spec)
    assert probe.max_numel <= tokens + len(ClipPath.from_spec(spec)) + 8
    assert probe.peak_bytes <= 64 * tokens  # a few float64/int64 token vectors, never tokens x points


@settings(max_examples=300, deadline=None)
@given(
    start=st.floats(0.01, 5.0),
    step=st.floats(1e-4, 0.5),
    n_points=st.integers(1, 3000),
    use_float32=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    last_fraction=st.one_of(st.none(), st.floats(0.01, 0.99)),
)
def test_arithmetic_grid_position_equals_a_binary_search(start, step, n_points, use_float32, seed, last_fraction):
    """The search buckets ratios with arithmetic + one comparison; torch.bucketize is the plain way.
    `last_fraction`: a clamped last grid value (clamp_last_step) that fraction of a step after the uniform part."""
    from bapo_core.authors_variants import grid_position as _grid_position

    dtype = torch.float32 if use_float32 else torch.float64
    grid = tuple(round(start + k * step, 12) for k in range(n_points))
    if last_fraction is not None:
        grid += (round(grid[-1] + last_fraction * step, 12),)
    table = torch.tensor(grid, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    span = grid[-1] - grid[0] + 2 * step
    ratios = torch.cat(
        [
            table,  # exactly on the grid (as the loss compares: in the ratio's dtype)
            torch.nextafter(table, torch.full_like(table, math.inf)),
            torch.nextafter(table, torch.zeros_like(table)),
            (grid[0] - step + torch.rand(4000, generator=gen, dtype=torch.float64) * span).to(dtype),
            torch.tensor([0.0, 1e-30, math.exp(-20), 1.0, math.exp(20), 1e30], dtype=dtype),
        ]
    )
    for strict in (True, False):
        expected = torch.bucketize(ratios, table, right=not strict)  # grid values < r (strict) or <= r
        position = _grid_position(ratios, grid, step if n_points > 1 else 0.0, strict, last_fraction is not None)
        torch.testing.assert_close(position.long(), expected, rtol=0, atol=0)
