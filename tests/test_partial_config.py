"""``trainer.v1.colocate_budget`` parsing and start-up checks (recipe/partial/config.py), on the composed preset."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from recipe.partial.config import parse

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose(config_name="bapo_trainer", overrides=["+rollout=partial", "actor_rollout_ref.rollout.name=vllm", *overrides])


def test_preset_turns_the_mode_on_and_derives_the_inflight_cap():
    config = composed("trainer.v1.colocate_budget.token_budget=2048", "actor_rollout_ref.rollout.response_length=8192",
                      "data.train_batch_size=32")
    assert config.trainer.v1.trainer_mode == "colocate_budget" and config.trainer.use_v1
    settings = parse(config)
    assert settings.token_budget == 2048 and settings.threshold is None and settings.persist_partial
    assert settings.max_inflight_groups == 32 * (1 + 4) and settings.at_cap == "force"


@pytest.mark.parametrize("overrides,message", [
    (["actor_rollout_ref.rollout.response_length=1024", "trainer.v1.colocate_budget.token_budget=1024"],
     "token_budget=1024 is invalid; valid: 1 <= token_budget < rollout.response_length=1024"),
    (["trainer.v1.colocate_budget.token_budget=0"], "token_budget=0 is invalid"),
    (["trainer.v1.colocate_budget.token_budget=256", "actor_rollout_ref.rollout.calculate_log_probs=False"],
     "calculate_log_probs=False is invalid"),
    (["trainer.v1.colocate_budget.token_budget=256", "actor_rollout_ref.rollout.response_length=1024",
      "trainer.v1.sampler.max_off_policy_threshold=4"], r"valid: null or >= ceil\(1024/256\) \+ 1 = 5"),
    (["trainer.v1.colocate_budget.token_budget=256", "trainer.v1.colocate_budget.max_inflight_groups=1",
      "data.train_batch_size=8"], "max_inflight_groups=1 is invalid"),
    (["trainer.v1.colocate_budget.token_budget=256", "trainer.v1.colocate_budget.at_cap=wait"],
     "at_cap='wait' is invalid; valid: force, lift"),
])  # fmt: skip
def test_invalid_settings_name_key_value_and_range(overrides, message):
    with pytest.raises(ValueError, match=message):
        parse(composed(*overrides))


def test_wait_accepts_a_cap_below_the_drop_minimum():
    config = composed("trainer.v1.colocate_budget.token_budget=256", "actor_rollout_ref.rollout.response_length=1024",
                      "trainer.v1.sampler.max_off_policy_threshold=2", "trainer.v1.sampler.max_off_policy_strategy=wait")
    assert parse(config).threshold == 2


def test_budget_is_mandatory():
    with pytest.raises(ValueError, match="colocate_budget.token_budget is required"):
        parse(composed())
