"""The actor's optimizer step in progress: the one channel from BAPO's actor hook to the "bapo" loss.

    worker (recipe/bapo/worker.py), around verl's TrainingWorker.train_batch:
        with optimizer_step.running(OptimizerStep(index, bounds, dp_group)) as step:
            ...  # and around each loss call of the step: with step.loss_call(entropy): ...
    loss (recipe/bapo/loss.py):
        step = optimizer_step.current() if optimizer_step.is_running() else None  # None: the loss called directly
    (`current()` alone raises NoStepInProgress outside a step: the worker's loss wrapper uses it.)

It carries what the loss needs and verl cannot pass: the bounds searched over the whole step (`scope: update`),
the data-parallel group a `scope: micro_batch` search reduces over, the step's index and its loss calls so far
(for the trace) and, during a loss call, the gradient pass's per-position entropy.

Why a channel and not an argument (verl 0.9.1): verl binds the actor's loss once,
`functools.partial(ppo_loss, config=actor_config)` (ActorRolloutRefWorker.init_model), its engines call that
`loss_function(model_output=..., data=micro_batch, dp_group=...)` once per micro-batch, and `ppo_loss` calls
the registered policy loss with a fixed signature (`old_log_prob, log_prob, advantages, response_mask,
loss_agg_mode, config, rollout_is_weights`). The only object reaching the loss is the run's config, so no
argument can carry a step's bounds, and the config should not (it is the same object for the whole run).
A process runs one actor worker, which takes one optimizer step at a time on one thread, so one module-level
slot holds the step; entering a second one while a step runs is refused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from bapo_core import ClipSearchResult


class NoStepInProgress(RuntimeError):
    """Read outside BAPOTrainingWorker's optimizer step."""


@dataclass
class OptimizerStep:
    """One optimizer step of the actor (verl's TrainingWorker.train_batch), as the bapo loss sees it."""

    index: int  # this worker's optimizer steps before this one
    bounds: Optional[ClipSearchResult]  # searched over all micro-batches and DP ranks; None: the loss searches
    dp_group: Optional[dist.ProcessGroup]  # the actor's data-parallel group (the engine's)
    loss_calls: int = 0  # loss calls finished in this step: the running call's micro-batch index
    entropy: Optional[torch.Tensor] = None  # (bsz, resp_len) of the running loss call, when verl computed it

    @contextlib.contextmanager
    def loss_call(self, entropy: Optional[torch.Tensor]) -> Iterator[OptimizerStep]:
        """One micro-batch's loss call; `entropy`: its per-position entropy from the gradient pass, or None."""
        self.entropy = entropy
        try:
            yield self
        finally:
            self.entropy = None
            self.loss_calls += 1


_running: Optional[OptimizerStep] = None


@contextlib.contextmanager
def running(step: OptimizerStep) -> Iterator[OptimizerStep]:
    """Publish `step` to the loss for the duration of the block (cleared on exit, also on errors)."""
    global _running
    if _running is not None:
        raise RuntimeError(f"bapo: optimizer step {step.index} started while step {_running.index} is still running")
    _running = step
    try:
        yield step
    finally:
        _running = None


def is_running() -> bool:
    return _running is not None


def current() -> OptimizerStep:
    """The optimizer step in progress; NoStepInProgress outside one."""
    if _running is None:
        raise NoStepInProgress(
            "bapo: no optimizer step in progress: the bapo loss ran outside BAPOTrainingWorker.train_batch "
            "(recipe/bapo/worker.py), so it has no per-update bounds, DP group or entropy from the actor"
        )
    return _running
