"""bapo-verl's verl plugin entry point (group "verl.plugins", see pyproject.toml): guard, then register.

The top-level package name `recipe` is shared: a verl source checkout ships a `recipe/` (verl-recipe)
and the authors' BAPO fork has `recipe/bapo`. Whichever is first on sys.path wins, so `recipe.bapo`
could silently be someone else's code. This module has a name nobody else uses: it checks that
`recipe.bapo` resolves to this install's tree (an ImportError naming both paths otherwise), then
loads `recipe.bapo.plugin`. verl logs plugin import errors at DEBUG only; these are logged at ERROR.
"""

import importlib.util
import logging
import os

logger = logging.getLogger("bapo_verl.plugin")
EXPECTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipe", "bapo")


def check_recipe_tree() -> None:
    """Raise ImportError when `recipe.bapo` is not this install's `recipe/bapo`."""
    try:
        spec = importlib.util.find_spec("recipe.bapo")
    except ImportError:  # `recipe` itself is another tree's package without a `bapo`
        spec = None
    found = os.path.dirname(spec.origin) if spec is not None and spec.origin else None
    if found is not None and os.path.realpath(found) == os.path.realpath(EXPECTED):
        return
    recipe = importlib.util.find_spec("recipe")
    roots = list(recipe.submodule_search_locations or []) if recipe is not None else []
    raise ImportError(
        f"bapo-verl: `recipe.bapo` resolves to {found or 'nothing'} (package `recipe` from {roots}), not to this "
        f"install's {EXPECTED}. Another `recipe` package (a verl source checkout's verl-recipe, or the authors' "
        "BAPO fork) comes first on sys.path: remove it from PYTHONPATH / the working directory, or install verl "
        "from the wheel."
    )


try:
    check_recipe_tree()
except ImportError:
    logger.error("bapo-verl: the BAPO plugin is not loaded into verl", exc_info=True)
    raise
import recipe.bapo.plugin  # noqa: E402,F401  (the registrations; it logs its own failures at ERROR)
