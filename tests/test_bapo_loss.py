"""The registered "bapo" policy loss against verl's own vanilla PPO loss and through verl's ppo_loss."""

import math
import os

import pytest
import torch
from hydra import compose, initialize_config_dir

import verl  # noqa: F401  (loads the bapo plugin through the verl.plugins entry point)
from recipe.bapo.config import BAPOPolicyLossConfig
from recipe.bapo.loss import SEARCH_METRICS
from recipe.bapo.optimizer_step import OptimizerStep, running
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, get_policy_loss_fn
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.utils.losses import ppo_loss

from bapo_core import search_clip_bounds
from verl_batches import model_log_probs, ppo_batch

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
bapo_loss = get_policy_loss_fn("bapo")


def actor_config(policy_loss=None, **kw) -> ActorConfig:
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        policy_loss=policy_loss or BAPOPolicyLossConfig(),
        **kw,
    )


def make_batch(seed=0, bsz=6, length=12, dtype=torch.float64, scale=0.4):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(bsz, length, generator=gen, dtype=dtype) * 3
    log_prob = (old + torch.randn(bsz, length, generator=gen, dtype=dtype) * scale).requires_grad_(True)
    adv = torch.randn(bsz, 1, generator=gen, dtype=dtype).expand(bsz, length).clone()
    lengths = torch.randint(1, length + 1, (bsz,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    weights = torch.rand(bsz, length, generator=gen, dtype=dtype) * 2
    return old, log_prob, adv, mask, weights


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("dual", [None, 3.0])
@pytest.mark.parametrize("use_weights", [False, True])
def test_fixed_window_equals_verl_vanilla(agg, dual, use_weights):
    """c_low_start == c_low_max and c_high_start == c_high_max: BAPO is PPO with those bounds."""
    eps_low, eps_high = 0.2, 0.28
    bapo_cfg = BAPOPolicyLossConfig(
        c_low_start=1 - eps_low, c_low_max=1 - eps_low, c_low_step=0.0,
        c_high_start=1 + eps_high, c_high_max=1 + eps_high, c_high_step=0.0,
        dual_clip_c=dual, scope="micro_batch",
    )  # fmt: skip
    config = actor_config(bapo_cfg, clip_ratio_low=eps_low, clip_ratio_high=eps_high, clip_ratio_c=dual or 1e30)
    old, log_prob, adv, mask, weights = make_batch(scale=0.5)
    w = weights if use_weights else None
    loss_b, metrics_b = bapo_loss(old, log_prob, adv, mask, agg, config, w)
    (grad_b,) = torch.autograd.grad(loss_b, log_prob)
    loss_v, metrics_v = compute_policy_loss_vanilla(old, log_prob, adv, mask, agg, config, w)
    (grad_v,) = torch.autograd.grad(loss_v, log_prob)
    torch.testing.assert_close(loss_b, loss_v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_b, grad_v, rtol=1e-12, atol=1e-12)
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert metrics_b[key] == pytest.approx(metrics_v[key], abs=1e-12), key
    assert metrics_v["actor/pg_clipfrac"] > 0


@pytest.mark.parametrize("dual", [None, 3.0])
def test_clip_loss_equals_the_textbook_min_form_including_ratios_on_the_bounds(dual):
    """ppo_clip_loss clamps each token on one side; -min(rA, clip(r)A) written out is the reference."""
    from bapo_core import ppo_clip_loss

    c_low, c_high = 0.8, 1.25
    gen = torch.Generator().manual_seed(11)
    ratio = torch.cat([(torch.randn(400, generator=gen, dtype=torch.float64) * 0.5).exp(), torch.tensor([c_low, c_high, 1.0] * 4, dtype=torch.float64)])
    adv = torch.randn(ratio.shape, generator=gen, dtype=torch.float64)
    adv[-12:] = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 2.0, -2.0, 0.5], dtype=torch.float64)
    adv[::17] = 0.0

    def textbook(r):
        loss = torch.maximum(-adv * r, -adv * torch.clamp(r, c_low, c_high))
        return loss if dual is None else torch.where(adv < 0, torch.minimum(loss, -adv * dual), loss)

    ours_r, ref_r = ratio.clone().requires_grad_(True), ratio.clone().requires_grad_(True)
    ours, ref = ppo_clip_loss(ours_r, adv, c_low, c_high, dual), textbook(ref_r)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(ours_r.grad, ref_r.grad, rtol=0, atol=0)  # also at r == c_low / c_high exactly


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batch_split_gives_the_same_total_gradient(agg):
    """With update-scope bounds, per-micro-batch losses aggregated with global_batch_info add up."""
    old, log_prob, adv, mask, weights = make_batch(seed=1, bsz=8, scale=0.6)
    config = actor_config()
    bapo_cfg = config.policy_loss
    ratio = (log_prob - old).detach().exp()
    bounds = search_clip_bounds(ratio, adv, mask, bapo_cfg.search_spec, weights=weights)  # what the actor hook searches
    assert bounds.steps > 0
    config.global_batch_info.update(
        dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=mask.shape[0], loss_scale_factor=None
    )
    with running(OptimizerStep(index=0, bounds=bounds, dp_group=None)):
        full, _ = bapo_loss(old, log_prob, adv, mask, agg, config, weights)
    (grad_full,) = torch.autograd.grad(full, log_prob)
    total = 0
    for part in torch.arange(8).split(3):
        with running(OptimizerStep(index=0, bounds=bounds, dp_group=None)):
            loss, metrics = bapo_loss(old[part], log_prob[part], adv[part], mask[part], agg, config, weights[part])
        total = total + loss
        assert metrics["actor/bapo/bounds_from_update"] == 1.0
        assert metrics["actor/bapo/c_high"] == bounds.c_high
    (grad_split,) = torch.autograd.grad(total, log_prob)
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_split, grad_full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("use_weights", [False, True])
def test_rho_is_the_positive_share_of_the_losss_own_gradient(agg, use_weights):
    """At a fixed window, rho (gradient accounting) equals sum |dL/dlog pi| over A>0 tokens / over all
    tokens, with the gradient taken by autograd through the loss and verl's aggregation."""
    old, log_prob, adv, mask, weights = make_batch(seed=20, bsz=7, length=15, scale=0.6)
    adv = adv + torch.randn(adv.shape, generator=torch.Generator().manual_seed(1), dtype=adv.dtype) * 0.3  # token-level
    fixed = BAPOPolicyLossConfig(c_low_start=0.8, c_low_max=0.8, c_low_step=0.0, c_high_start=1.25, c_high_max=1.25, c_high_step=0.0, scope="micro_batch")
    loss, metrics = bapo_loss(old, log_prob, adv, mask, agg, actor_config(fixed, loss_agg_mode=agg), weights if use_weights else None)
    (grad,) = torch.autograd.grad(loss, log_prob)
    mass = grad.abs()
    assert (mass[~mask] == 0).all()
    share = mass[adv > 0].sum() / mass.sum()
    assert metrics["actor/bapo/rho"] == pytest.approx(share.item(), rel=1e-9)


def test_search_moves_bounds_and_loss_uses_them():
    """Stale data with a negative-heavy batch: the search widens c_high, and the loss clips at it."""
    old, log_prob, adv, mask, _ = make_batch(seed=4, scale=0.8)
    adv = adv - 0.7  # mostly negative advantages -> rho starts below 0.4
    loss, metrics = bapo_loss(old, log_prob, adv, mask, "token-mean", actor_config(BAPOPolicyLossConfig(scope="micro_batch")))
    assert metrics["actor/bapo/rho_start"] < 0.4 and metrics["actor/bapo/search_steps"] > 0
    assert metrics["actor/bapo/c_high"] > 1.2
    fixed = BAPOPolicyLossConfig(
        c_low_start=metrics["actor/bapo/c_low"], c_low_max=metrics["actor/bapo/c_low"], c_low_step=0.0,
        c_high_start=metrics["actor/bapo/c_high"], c_high_max=metrics["actor/bapo/c_high"], c_high_step=0.0,
        scope="micro_batch",
    )  # fmt: skip
    loss_fixed, _ = bapo_loss(old, log_prob, adv, mask, "token-mean", actor_config(fixed))
    torch.testing.assert_close(loss, loss_fixed, rtol=0, atol=0)


def test_metric_keys_are_complete_and_avoid_min_max_reduction():
    _, metrics = bapo_loss(*make_batch(seed=5)[:4], "token-mean", actor_config(BAPOPolicyLossConfig(scope="micro_batch")))
    required = {
        "actor/bapo/c_low", "actor/bapo/c_high", "actor/bapo/rho", "actor/bapo/rho_start", "actor/bapo/search_steps",
        "actor/bapo/target_met", "actor/bapo/pos_token_frac", "actor/bapo/clipfrac_pos", "actor/bapo/clipfrac_neg",
        "actor/bapo/clipfrac_entropy_raising_proxy", "actor/bapo/clipfrac_entropy_lowering_proxy",
        "actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower",
    }  # fmt: skip
    assert required <= set(metrics)
    # verl reduces keys containing "max"/"min" with max/min instead of the mean
    assert not [k for k in metrics if "max" in k or "min" in k]
    assert all(isinstance(v, float) for v in metrics.values())
    clipped = metrics["actor/bapo/clipfrac_pos"] + metrics["actor/bapo/clipfrac_neg"] + metrics["actor/bapo/clipfrac_dual"]
    split = metrics["actor/bapo/clipfrac_entropy_raising_proxy"] + metrics["actor/bapo/clipfrac_entropy_lowering_proxy"]
    assert split == pytest.approx(clipped)


def test_entropy_clip_rule_split_on_a_hand_example():
    """Low-probability positive and high-probability negative clipped tokens raise entropy; "low" is
    pi(y_t) < exp(-H_t) at the token's own position (paper Table 4 / App. B.4.2)."""
    log_prob = torch.log(torch.tensor([[0.05, 0.9, 0.05, 0.9, 0.3, 0.3]], dtype=torch.float64))
    ratio = torch.tensor([[5.0, 5.0, 0.1, 0.1, 5.0, 0.1]], dtype=torch.float64)  # positives above c_high, negatives below c_low
    old = log_prob - ratio.log()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    # the last two tokens have p = 0.3: "low" at a near-deterministic position (exp(-H) = 0.9),
    # "high" at a flat one (exp(-H) = 0.1); the mean-log-prob proxy calls both of them high
    entropy = -torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.9, 0.1]], dtype=torch.float64))
    fixed = BAPOPolicyLossConfig(c_high_start=1.2, c_high_max=1.2, c_high_step=0.0, c_low_start=0.8, c_low_max=0.8, c_low_step=0.0, scope="micro_batch")
    mask = torch.ones_like(adv, dtype=torch.bool)
    with running(OptimizerStep(index=0, bounds=None, dp_group=None)) as step, step.loss_call(entropy):
        _, metrics = bapo_loss(old, log_prob, adv, mask, "token-mean", actor_config(fixed))  # entropy from the actor hook
    # raising: the p=0.05 positive, the p=0.9 negative, the low positive at 4, the high negative at 5
    assert metrics["actor/bapo/clipfrac_entropy_raising"] == pytest.approx(4 / 6)
    assert metrics["actor/bapo/clipfrac_entropy_lowering"] == pytest.approx(2 / 6)
    assert not [k for k in metrics if k.endswith("_proxy")]
    _, proxy = bapo_loss(old, log_prob, adv, mask, "token-mean", actor_config(fixed))
    assert proxy["actor/bapo/clipfrac_entropy_raising_proxy"] == pytest.approx(3 / 6)  # mean log-prob: p=0.3 is "high"
    assert "actor/bapo/clipfrac_entropy_raising" not in proxy


def degenerate_batches():
    old, log_prob, adv, mask, _ = make_batch(seed=6)
    nan_lp = log_prob.detach().clone()
    nan_lp[0, 0], nan_lp[1, 1], nan_lp[2, 2] = float("nan"), float("inf"), float("-inf")
    nan_old = old.clone()
    nan_old[0, 1], nan_old[2, 2] = float("nan"), float("-inf")  # -inf - -inf = nan
    yield "nan_inf_log_prob", old, nan_lp, adv, mask
    yield "nan_inf_old_log_prob", nan_old, log_prob.detach(), adv, mask
    yield "empty_mask", old, log_prob.detach(), adv, torch.zeros_like(mask)
    yield "all_positive", old, log_prob.detach(), adv.abs() + 0.1, mask
    yield "all_negative", old, log_prob.detach(), -adv.abs() - 0.1, mask
    yield "all_zero", old, log_prob.detach(), torch.zeros_like(adv), mask
    yield "extreme_ratios", old, old + torch.where(torch.rand_like(old) < 0.5, 50.0, -50.0), adv, mask


@pytest.mark.parametrize("scope", ["micro_batch", "update"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_degenerate_inputs_give_finite_loss_and_gradients(scope, agg):
    for name, old, log_prob, adv, mask in degenerate_batches():
        log_prob = log_prob.clone().requires_grad_(True)
        config = actor_config(BAPOPolicyLossConfig(scope=scope, dual_clip_c=3.0))
        loss, metrics = bapo_loss(old, log_prob, adv, mask, agg, config)
        (grad,) = torch.autograd.grad(loss, log_prob)
        assert torch.isfinite(loss), name
        assert torch.isfinite(grad).all(), name
        assert all(math.isfinite(v) for k, v in metrics.items() if k != "actor/bapo/rho"), (name, metrics)
        if name.startswith("nan"):
            assert metrics["actor/bapo/nonfinite_token_frac"] > 0, name


@pytest.mark.parametrize("scope", ["micro_batch", "update"])
@pytest.mark.parametrize("rho_definition", ["share", "ratio"])
def test_no_signal_logs_no_search_metrics(scope, rho_definition):
    """No token with a non-zero weighted advantage: nothing to balance, so no rho (it was 0, or 1e6 for "ratio"),
    no start bounds, no search steps; the clip fractions (0: nothing can be clipped) and the rest stay."""
    old, log_prob, adv, mask, weights = make_batch(seed=6)
    cases = {
        "all_zero": (torch.zeros_like(adv), mask, None),
        "empty_mask": (adv, torch.zeros_like(mask), None),
        "zero_is_weights": (adv, mask, torch.zeros_like(weights)),  # rollout-IS weights count in rho
        "signal": (adv, mask, None),
    }
    config = actor_config(BAPOPolicyLossConfig(scope=scope, rho_definition=rho_definition))
    for name, (a, m, w) in cases.items():
        bounds = search_clip_bounds((log_prob - old).detach().exp(), a, m, config.policy_loss.search_spec, weights=w)
        with running(OptimizerStep(index=0, bounds=bounds if scope == "update" else None, dp_group=None)):
            _, metrics = bapo_loss(old, log_prob, a, m, "token-mean", config, w)
        if name == "signal":
            assert set(SEARCH_METRICS) <= set(metrics)
        else:
            assert not set(SEARCH_METRICS) & set(metrics), name
        assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/bapo/clipfrac_pos", "actor/bapo/bounds_from_update"} <= set(metrics)


def test_stock_policy_loss_config_gives_a_clear_error():
    config = actor_config(PolicyLossConfig(loss_mode="bapo"))
    with pytest.raises(TypeError, match="_target_=recipe.bapo.config.BAPOPolicyLossConfig"):
        bapo_loss(*make_batch()[:4], "token-mean", config)


def compose_actor(overrides=()):
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        cfg = compose(
            config_name="bapo_trainer",
            overrides=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.rollout.n=2", *overrides],
        )
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


@pytest.mark.parametrize("preset", ["bapo_paper", "bapo_authors_code"])
def test_loss_runs_through_verl_ppo_loss_with_actor_config_from_our_yaml(preset):
    config = compose_actor([f"policy_loss@actor_rollout_ref.actor.policy_loss={preset}"])
    assert isinstance(config.policy_loss, BAPOPolicyLossConfig)
    old, log_prob, adv, mask, _ = make_batch(seed=7, dtype=torch.float32, scale=0.5)
    adv = adv - 1.0  # negative-heavy: rho starts below both presets' targets
    data = ppo_batch(old, adv, mask)
    loss, metrics = ppo_loss(config, {"log_probs": model_log_probs(log_prob, mask)}, data)
    direct, direct_metrics = bapo_loss(old, log_prob, adv, mask, config.loss_agg_mode, config)
    torch.testing.assert_close(loss, direct)
    bapo_metrics = {k: v for k, v in metrics.items() if k.startswith("actor/bapo/")}
    assert bapo_metrics["actor/bapo/c_high"].aggregate() == direct_metrics["actor/bapo/c_high"]
    assert bapo_metrics["actor/bapo/search_steps"].aggregate() > 0
    if preset == "bapo_authors_code":  # c_low moves first (and, with value accounting, only lowers rho)
        assert direct_metrics["actor/bapo/c_low"] == 0.95
