"""Only the CPU backend, without BAPO: ``VERL_USE_EXTERNAL_PLUGINS=none VERL_USE_EXTERNAL_MODULES=recipe.cpu_backend.plugin``.

For running verl's own trainer on CPU exactly as verl would run it on a GPU, with none of BAPO's
registrations (loss, advantage estimator, actor hook). The tests compare such a run with one where
the bapo-verl plugin is loaded, to show that the plugin changes nothing for a non-BAPO run.
"""

from recipe import cpu_backend

cpu_backend.register()
