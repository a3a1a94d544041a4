"""Shared test setup: the repository root on sys.path (for benchmarks/ helpers), CPU-friendly threads, and
the order of tests under pytest-xdist (`make test` runs two workers)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under xdist the controller hands out tests in collection order, a few at a time, to whichever worker is free:
# trainer and vLLM runs (1-5 min each) go first so that the many short tests fill the gaps at the end, instead of
# one worker starting a 5-minute run while the other has nothing left.
_COST_RANK = (("trainer", 0), ("vllm", 0), ("slow", 1))


def _cost_rank(item) -> int:
    return min((rank for name, rank in _COST_RANK if item.get_closest_marker(name)), default=2)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # only for distributed runs; a plain pytest keeps file order
        items.sort(key=_cost_rank)  # stable: file order within a rank
