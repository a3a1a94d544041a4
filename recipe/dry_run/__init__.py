"""Laptop dry run of a cluster run: `python -m recipe.dry_run [--config-name NAME] OVERRIDES...` and
`DRY_RUN=1 run_scripts/<script>.sh` (the scripts hand the dry run the same argument list they would hand
`python -m recipe.bapo.main_bapo`). No GPU, no Ray, no weights.

It owns: composing the config as main_bapo does (`core.py`), the checks verl 0.9.1 lacks (`checks.py`), the
model architecture lookup (`model.py`: local config.json, else the shipped `configs/models/*.json`, else the
hub's config.json when online), and the printed plan with its formulas (`plan.py`).

verl internals it touches (read-only): `verl.utils.config.validate_config` and `omega_conf_to_dataclass`
(verl's own checks, including the actor dataclass where BAPO's range checks run),
`verl.trainer.ppo.utils.need_reference_policy/need_critic`, `verl.utils.flops_counter.FlopsCounter`, and
verl's config tree (`pkg://verl.trainer.config`, through configs/bapo_trainer.yaml). The failure points the
cluster checks anticipate are cited next to each check with their verl file.
"""

from .core import DryRun, DryRunError, compose_config, dry_run

__all__ = ["DryRun", "DryRunError", "compose_config", "dry_run"]
