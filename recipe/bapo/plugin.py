"""verl plugin entry point (group "verl.plugins", see pyproject.toml).

`import verl` imports this module in the driver, the TaskRunner and every Ray worker, so BAPO's
registrations exist wherever verl looks them up. Without the entry point (e.g. a non-editable copy of
the code) use VERL_USE_EXTERNAL_MODULES=recipe.bapo.plugin.

verl logs a failing plugin import only at DEBUG level, and the failure then surfaces much later as
"Unsupported loss mode: bapo". This module logs the failure at ERROR with the traceback first.
"""

import logging

logger = logging.getLogger("bapo_verl.plugin")


def register() -> None:
    from recipe import cpu_backend

    cpu_backend.register()  # first: the CPU fixes (VERL_PLATFORM=cpu only) must precede verl.workers imports
    from recipe.bapo import advantage, loss, worker  # noqa: F401  register the "bapo" estimator and loss

    worker.install()  # the actor's per-update hook (scope: update)
    from recipe.data import tiny_assets

    tiny_assets.register_resolver()  # ${tiny_assets:...} paths in configs/cpu_tiny.yaml
    from recipe import partial

    partial.register()  # names only: the "bapo_partial" agent loop and the "colocate_budget" trainer mode


try:
    register()
except Exception:
    logger.error(
        "bapo-verl: registering the BAPO plugin in verl failed; BAPO's loss/advantage estimator will be missing in this process",
        exc_info=True,
    )
    raise
