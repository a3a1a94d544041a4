"""Per-update trace of BAPO's bounds, for debugging and tests: set BAPO_TRACE_DIR=/some/dir.

verl averages metrics over all updates of a training step; the trace keeps every one. Each process
appends JSON lines to <dir>/rank<R>-pid<P>.jsonl:
  {"kind": "probe", "update": i}                                      worker hook: the probe's ratios (tensors)
  {"kind": "update", "update": i, "c_low", "c_high", "rho", "steps", ...}   worker hook: the step's bounds
  {"kind": "loss", "update": i or null, "micro_batch": j or null, "c_low", "c_high"}   every loss call
i: the worker's optimizer step (null when the loss searched its own bounds); j: the loss call's index in
that step (null for a loss called outside the actor's step, e.g. directly).
With BAPO_TRACE_TENSORS=1 a loss (probe) record also names a .pt file with that micro-batch's (step's) ratio,
advantages, mask and weights, so a search can be re-done offline.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.distributed as dist

TRACE_DIR_ENV = "BAPO_TRACE_DIR"
TRACE_TENSORS_ENV = "BAPO_TRACE_TENSORS"
_counter = {"records": 0}


def enabled() -> bool:
    return bool(os.environ.get(TRACE_DIR_ENV))


def _path(suffix: str) -> str:
    directory = os.environ[TRACE_DIR_ENV]
    os.makedirs(directory, exist_ok=True)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return os.path.join(directory, f"rank{rank}-pid{os.getpid()}{suffix}")


def record(kind: str, tensors: Optional[dict[str, torch.Tensor]] = None, **fields) -> None:
    """Append one record (no-op unless BAPO_TRACE_DIR is set)."""
    if not enabled():
        return
    _counter["records"] += 1
    if tensors is not None and os.environ.get(TRACE_TENSORS_ENV) == "1":
        tensor_file = _path(f"-{_counter['records']}.pt")
        torch.save({k: v.detach().cpu() for k, v in tensors.items() if v is not None}, tensor_file)
        fields["tensors"] = os.path.basename(tensor_file)
    with open(_path(".jsonl"), "a") as f:
        f.write(json.dumps({"kind": kind, **fields}) + "\n")
