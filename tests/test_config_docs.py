"""The config keys are documented once, in their field metadata (bapo_core.spec.ClipSearchSpec and
recipe.bapo.config): the README table and the paper preset must agree with it."""

import dataclasses
import os

import yaml

from bapo_core import ClipSearchSpec
from recipe.bapo.config import BAPOPolicyLossConfig, config_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_SECTION = "### Policy-loss config (`recipe/bapo/config.py::BAPOPolicyLossConfig`)"


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of every row of the first markdown table in `markdown` (header and rule excluded)."""
    lines = markdown.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[first + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def documented(config_cls) -> list[list[str]]:
    """key, paper, default, meaning of every documented field, read from the dataclass itself."""
    rows = []
    for f in dataclasses.fields(config_cls):
        if "help" in f.metadata:
            default = yaml.safe_dump(f.default).removesuffix("\n").removesuffix("\n...")  # as the presets write it
            rows.append([f"`{f.name}`", f.metadata["paper"], f"`{default}`", f.metadata["help"]])
    return rows


def test_readme_table_matches_the_field_metadata():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index(README_SECTION) :]
    assert table_rows(section) == documented(BAPOPolicyLossConfig)
    assert table_rows(config_table(BAPOPolicyLossConfig)) == documented(BAPOPolicyLossConfig)


def test_every_config_key_is_documented_and_the_search_keys_are_the_specs():
    """Every key BAPO adds to verl's PolicyLossConfig has metadata; the search keys are ClipSearchSpec's
    fields with its defaults and docs (declared once)."""
    from verl.workers.config import PolicyLossConfig

    verl_keys = {f.name for f in dataclasses.fields(PolicyLossConfig)} - {"loss_mode"}
    ours = {f.name: f for f in dataclasses.fields(BAPOPolicyLossConfig) if f.name not in verl_keys}
    assert all("help" in f.metadata and "paper" in f.metadata for f in ours.values()), sorted(ours)
    for spec_field in dataclasses.fields(ClipSearchSpec):
        ours_field = ours[spec_field.name]
        assert (ours_field.default, ours_field.metadata) == (spec_field.default, spec_field.metadata)
    config = BAPOPolicyLossConfig(rho_target=0.3, dual_clip_c=2.0, clamp_last_step=True)
    assert config.search_spec == ClipSearchSpec(rho_target=0.3, dual_clip_c=2.0, clamp_last_step=True)


def test_paper_preset_sets_every_documented_key_to_its_default():
    with open(os.path.join(ROOT, "configs", "policy_loss", "bapo_paper.yaml")) as f:
        preset = yaml.safe_load(f)
    preset.pop("_target_")
    defaults = {f.name: f.default for f in dataclasses.fields(BAPOPolicyLossConfig) if "help" in f.metadata}
    assert preset == defaults
