"""BAPOPolicyLossConfig validation, the YAML presets, and the verl plugin registration."""

import os
import subprocess
import sys

import pytest
import yaml

from recipe.bapo.config import BAPOPolicyLossConfig
from verl.utils.config import omega_conf_to_dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = os.path.join(ROOT, "configs", "policy_loss")

# (overrides, key the message must name, fragment of the valid range it must state)
INVALID = [
    ({"loss_mode": "vanilla"}, "loss_mode", "'bapo'"),
    ({"scope": "step"}, "scope", "update"),
    ({"search_order": "both"}, "search_order", "high_first"),
    ({"accounting": "loss"}, "accounting", "gradient"),
    ({"rho_definition": "fraction"}, "rho_definition", "share"),
    ({"rho_target": 0.0}, "rho_target", "0 < rho_target < 1"),
    ({"rho_target": 1.0}, "rho_target", "0 < rho_target < 1"),
    ({"rho_target": -0.3}, "rho_target", "0 < rho_target < 1"),
    ({"rho_target": 1.5}, "rho_target", "0 < rho_target < 1"),
    ({"rho_target": 0.0, "rho_definition": "ratio"}, "rho_target", "rho_target > 0"),
    ({"rho_target": float("nan")}, "rho_target", "finite"),
    ({"rho_target": "0.4"}, "rho_target", "finite number"),
    ({"c_low_start": 0.0}, "c_low_start", "0 < c_low_start"),
    ({"c_low_start": -0.1}, "c_low_start", "0 < c_low_start"),
    ({"c_low_start": 1.0, "c_low_max": 1.0}, "c_low_start", "c_low_max < 1"),
    ({"c_low_start": 0.95}, "c_low_max", "c_low_start <= c_low_max"),
    ({"c_low_max": 1.0}, "c_low_max", "c_low_max < 1"),
    ({"c_low_max": 1.2}, "c_low_max", "c_low_max < 1"),
    ({"c_high_start": 1.0}, "c_high_start", "1 < c_high_start"),
    ({"c_high_start": 0.9}, "c_high_start", "1 < c_high_start"),
    ({"c_high_max": 1.1}, "c_high_max", "c_high_start <= c_high_max"),
    ({"c_high_start": 3.5}, "c_high_max", "c_high_start <= c_high_max"),
    ({"c_low_step": -0.02}, "c_low_step", "c_low_step = 0 (fixed bound) or >= 0.0001"),
    ({"c_high_step": -0.05}, "c_high_step", "c_high_step = 0 (fixed bound) or >= 0.0001"),
    ({"c_high_step": 1e-6}, "c_high_step", "c_high_step = 0 (fixed bound) or >= 0.0001"),
    ({"c_low_step": 0.0}, "c_low_step", "c_low_max = c_low_start"),
    ({"c_high_step": 0.0}, "c_high_step", "c_high_max = c_high_start"),
    ({"c_high_step": float("inf")}, "c_high_step", "finite"),
    ({"c_high_max": 20.0, "c_high_step": 1e-4}, "c_low_step/c_high_step", "at most 100000 points"),
    ({"dual_clip_c": 1.0}, "dual_clip_c", "a value > 1"),
    ({"dual_clip_c": 0.5}, "dual_clip_c", "a value > 1"),
    ({"dual_clip_c": float("nan")}, "dual_clip_c", "finite"),
    ({"c_low_max": None}, "c_low_max", "finite number"),
    ({"c_high_max": 200.0, "c_high_step": 1e-4, "c_high_start": 199.0}, "c_high_step", "<= 1e+06"),
    ({"clamp_last_step": "yes"}, "clamp_last_step", "true or false"),
    ({"rollout_is_in_rho": 1}, "rollout_is_in_rho", "true or false"),
    ({"imbalance_metrics": "no"}, "imbalance_metrics", "true or false"),
]


@pytest.mark.parametrize("overrides,key,valid", INVALID, ids=[f"{i}-{c[1]}" for i, c in enumerate(INVALID)])
def test_invalid_configs_are_rejected_with_a_clear_message(overrides, key, valid):
    with pytest.raises(ValueError) as err:
        BAPOPolicyLossConfig(**overrides)
    message = str(err.value)
    assert f"{key}=" in message and valid in message, message


def test_every_config_key_has_an_invalid_row():
    """A key added to BAPOPolicyLossConfig without a rejection test fails here (fields read from the dataclass)."""
    import dataclasses

    from verl.workers.config import PolicyLossConfig

    ours = {f.name for f in dataclasses.fields(BAPOPolicyLossConfig)} - {f.name for f in dataclasses.fields(PolicyLossConfig)}
    tested = {key for _, key, _ in INVALID for key in key.split("/")} | {k for overrides, _, _ in INVALID for k in overrides}
    assert ours | {"loss_mode"} <= tested, sorted((ours | {"loss_mode"}) - tested)


def test_valid_edge_configs_are_accepted():
    BAPOPolicyLossConfig(c_low_start=0.9, c_low_max=0.9, c_low_step=0.0, c_high_start=3.0, c_high_max=3.0, c_high_step=0.0)
    BAPOPolicyLossConfig(c_high_step=5.0)  # a step larger than the range: the bound stays at its start
    BAPOPolicyLossConfig(rho_definition="ratio", rho_target=2.0, dual_clip_c=1.01)


def load_preset(name):
    with open(os.path.join(PRESETS, f"{name}.yaml")) as f:
        return yaml.safe_load(f)


def test_paper_preset_is_the_documented_defaults():
    preset = load_preset("bapo_paper")
    config = omega_conf_to_dataclass(preset)
    assert isinstance(config, BAPOPolicyLossConfig)
    defaults = BAPOPolicyLossConfig()
    for key, value in preset.items():
        if key != "_target_":
            assert getattr(defaults, key) == value, key
    assert (defaults.rho_target, defaults.c_low_start, defaults.c_low_max, defaults.c_low_step) == (0.4, 0.6, 0.9, 0.02)
    assert (defaults.c_high_start, defaults.c_high_max, defaults.c_high_step) == (1.2, 3.0, 0.05)


def test_authors_code_preset_values():
    config = omega_conf_to_dataclass(load_preset("bapo_authors_code"))
    assert (config.search_order, config.accounting, config.rho_definition, config.scope) == ("low_first", "value", "ratio", "micro_batch")
    assert (config.rho_target, config.dual_clip_c) == (0.5, 3.0)
    assert (config.c_low_start, config.c_low_max, config.c_low_step) == (0.8, 0.95, 0.05)
    assert (config.c_high_start, config.c_high_max, config.c_high_step) == (1.2, 2.0, 0.1)
    assert (config.clamp_last_step, config.rollout_is_in_rho) == (True, False)


def run_python(code, cwd=ROOT, **env):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}, cwd=cwd
    )


@pytest.mark.slow
def test_entry_point_registers_bapo_on_import_verl():
    out = run_python("import verl; from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R; print('bapo' in R)")
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


@pytest.mark.slow
def test_external_modules_env_registers_bapo_without_entry_points():
    code = "import verl; from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R; print('bapo' in R)"
    without = run_python(code, VERL_USE_EXTERNAL_PLUGINS="none")
    assert without.stdout.strip() == "False", without.stderr
    with_env = run_python(code, VERL_USE_EXTERNAL_PLUGINS="none", VERL_USE_EXTERNAL_MODULES="recipe.bapo.plugin")
    assert with_env.stdout.strip() == "True", with_env.stderr


@pytest.mark.slow
def test_plugin_import_failure_is_logged_at_error_with_traceback():
    """verl swallows plugin import errors at DEBUG level; ours must be loud."""
    out = run_python("import sys; sys.modules['recipe.bapo.loss'] = None; import verl")
    assert out.returncode == 0  # verl itself carries on ...
    assert "ERROR" in out.stderr and "registering the BAPO plugin in verl failed" in out.stderr, out.stderr
    assert "Traceback" in out.stderr and "ModuleNotFoundError" in out.stderr, out.stderr


def installed_with_editable_finder() -> bool:
    """bapo-verl is installed editable through setuptools' import finder (pip install -e, as `make install`
    does), which maps `recipe` subpackages to this tree by name, rather than through a sys.path entry.
    Read from the import system (the same in the subprocesses), not from package metadata: the source
    tree's own bapo_verl.egg-info comes first on sys.path here and lists no finder."""
    return any(getattr(f, "__module__", "").startswith("__editable___bapo_verl") for f in sys.meta_path)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["authors_fork", "verl_recipe_package"])
def test_a_foreign_recipe_tree_first_on_the_path_is_a_loud_error_naming_both(tmp_path, layout):
    """A verl checkout's recipe/ (verl-recipe, a regular package) or the authors' fork's recipe/bapo
    ahead of bapo-verl on sys.path: the entry point names both trees instead of importing the wrong one."""
    foreign = tmp_path / "recipe"
    (foreign / "bapo").mkdir(parents=True)
    (foreign / "bapo" / "__init__.py").write_text("")
    if layout == "verl_recipe_package":
        (foreign / "__init__.py").write_text("")
        (foreign / "bapo" / "__init__.py").unlink()
        (foreign / "bapo").rmdir()
    elsewhere = tmp_path / "work"  # not the project root, which Python would put first on sys.path
    elsewhere.mkdir()
    code = "import verl, recipe.bapo; from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R; print('bapo' in R, recipe.bapo.__file__)"
    out = run_python(code, cwd=elsewhere, PYTHONPATH=str(tmp_path))
    ours = os.path.join(ROOT, "recipe", "bapo", "__init__.py")
    if layout == "verl_recipe_package" and installed_with_editable_finder():
        # the finder resolves recipe.bapo by name, past a foreign package that has no bapo: ours, correctly
        assert out.returncode == 0 and out.stdout.split() == ["True", ours], out.stdout + out.stderr
        assert "resolves to" not in out.stderr, out.stderr  # and the guard accepted it
        return
    assert "ERROR" in out.stderr and "resolves to" in out.stderr, out.stdout + out.stderr
    assert str(tmp_path) in out.stderr and os.path.dirname(ours) in out.stderr, out.stderr
    fine = run_python("import verl; from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R; print('bapo' in R)", cwd=elsewhere)
    assert fine.stdout.strip() == "True" and "resolves to" not in fine.stderr, fine.stderr
