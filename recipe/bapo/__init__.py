"""BAPO's verl glue. Importing any of it imports verl first, which runs the bapo-verl plugin
(recipe/bapo/plugin.py) completely; importing a submodule such as recipe.bapo.config before verl
would otherwise start the plugin half-way through that submodule (a circular import)."""

import verl  # noqa: F401
