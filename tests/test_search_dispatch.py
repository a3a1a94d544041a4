"""The paper's search (bapo_core.clip_search.paper_path_sums) runs on the paper's settings; every other
setting, the bapo_authors_code preset included, runs bapo_core.authors_variants."""

import pytest
import torch

import bapo_core.authors_variants as authors_variants
import bapo_core.clip_search as clip_search
from bapo_core import ClipSearchSpec, path_contributions

VARIANTS = {"search_order": "low_first", "accounting": "value", "rho_definition": "ratio", "clamp_last_step": True, "dual_clip_c": 3.0}


def called_function(spec, monkeypatch):
    called = []
    for module, name in ((clip_search, "paper_path_sums"), (authors_variants, "variant_path_sums")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _n=name, **k: called.append(_n) or _o(*a, **k))
    ratio = torch.tensor([0.5, 1.0, 1.5])
    path_contributions(ratio, torch.tensor([1.0, -1.0, 1.0]), torch.ones(3, dtype=torch.bool), spec)
    return called


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_each_authors_setting_runs_the_variants_module(key, monkeypatch):
    rho_target = 0.5 if key == "rho_definition" else 0.4
    assert called_function(ClipSearchSpec(rho_target=rho_target, **{key: VARIANTS[key]}), monkeypatch) == ["variant_path_sums"]


def test_paper_settings_run_the_paper_function_and_the_authors_preset_the_variants(monkeypatch):
    from recipe.bapo.config import BAPOPolicyLossConfig

    assert called_function(ClipSearchSpec(), monkeypatch) == ["paper_path_sums"]
    assert called_function(ClipSearchSpec(rho_target=0.2, c_high_max=2.0, c_low_step=0.05), monkeypatch) == ["paper_path_sums"]
    authors = BAPOPolicyLossConfig(rho_target=0.5, c_low_start=0.8, c_low_max=0.95, c_low_step=0.05, c_high_max=2.0, c_high_step=0.1, **VARIANTS)
    assert called_function(authors.search_spec, monkeypatch) == ["variant_path_sums"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_variants_module_reduces_to_the_paper_function_on_the_paper_settings(dtype):
    gen = torch.Generator().manual_seed(7)
    for spec in (ClipSearchSpec(), ClipSearchSpec(c_low_step=0.05, c_high_step=0.3, c_high_max=2.9)):
        for _ in range(50):
            ratio = (torch.randn(4, 33, generator=gen, dtype=torch.float64) * 0.5).exp().to(dtype)
            ratio[0, :3] = torch.tensor([1.2, 0.6, float("nan")], dtype=dtype)  # on the grid, and not finite
            adv = torch.randn(4, 33, generator=gen, dtype=torch.float64).to(dtype)
            mask = torch.rand(4, 33, generator=gen) < 0.8
            weights = torch.rand(4, 33, generator=gen, dtype=torch.float64)
            paper = clip_search.paper_path_sums(ratio, adv, mask, spec, weights)
            general = authors_variants.variant_path_sums(ratio, adv, mask, spec, weights)
            torch.testing.assert_close(paper, general, rtol=1e-12, atol=0)
