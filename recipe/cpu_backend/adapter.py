"""Trainer-side half of the ``hf`` rollout: verl's ``BaseRollout`` living in each ActorRolloutRefWorker.

verl's naive checkpoint engine (``ActorRolloutRefWorker.update_weights``) hands every trainer rank a
generator of ``(hf_param_name, tensor)`` after each update. With FSDP2 producing a tensor all-gathers
the shards, a collective, so **every rank must drain the generator**, even ranks that send nothing. The
first rank of each replica (``rollout_rank == 0``) streams the tensors to its replica's
``HFRolloutServer`` in buckets of ``rollout.checkpoint_engine.update_weights_bucket_megabytes``:
``begin_weight_update`` (refused while sequences are mid-generation), ``load_weights`` per bucket
(unknown names / shape mismatches raise), ``finish_weight_update`` (raises unless every parameter was
written; records ``global_steps``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import ray
import torch
import torch.distributed
from torch.distributed.tensor import DTensor

from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.utils import ensure_async_iterator

from .server import require_cpu_platform, server_actor_name

logger = logging.getLogger(__name__)


class HFServerAdapter(BaseRollout):
    """Pushes the actor's weights to this rank's replica server; sleep/wake are no-ops on CPU."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1, *args, **kwargs) -> None:
        require_cpu_platform("actor_rollout_ref.rollout.name=hf")
        super().__init__(config, model_config, device_mesh)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", 0))
        replica_world = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // replica_world if replica_rank == -1 else replica_rank
        self.is_sender = rank % replica_world == 0
        self.bucket_bytes = int(self.config.checkpoint_engine.update_weights_bucket_megabytes) << 20
        self._server = None

    def _server_handle(self):
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def update_weights(
        self,
        weights,
        wire_format: str = "named_tensors",
        peft_config: Optional[Any] = None,
        global_steps: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        """Send all ``(name, tensor)`` pairs to the server (see module docstring).

        Args:
            weights: iterable of ``(hf_name, tensor)``; tensors may be DTensors (gathered here on every rank).
            wire_format: only "named_tensors" (full tensors) is supported.
            peft_config: must be None: LoRA adapters are synced merged (``actor_rollout_ref.model.lora.merge=True``).
            global_steps: recorded by the server and reported with each generation.
        """
        if wire_format != "named_tensors":
            raise NotImplementedError(f"hf rollout: wire_format={wire_format!r} unsupported; use the naive checkpoint engine")
        if peft_config is not None:
            raise NotImplementedError("hf rollout: LoRA adapter sync is unsupported; set actor_rollout_ref.model.lora.merge=True")
        start = time.perf_counter()
        server = self._server_handle() if self.is_sender else None
        if server is not None:
            await server.begin_weight_update.remote()
        bucket: dict[str, torch.Tensor] = {}
        bucket_size = sent = 0
        async for name, tensor in ensure_async_iterator(weights):
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()  # collective: all ranks take part
            if server is None:
                continue
            tensor = tensor.detach().to("cpu", copy=True)
            bucket[name] = tensor
            bucket_size += tensor.nbytes
            if bucket_size >= self.bucket_bytes:
                sent += await server.load_weights.remote(bucket)
                bucket, bucket_size = {}, 0
        if server is not None:
            if bucket:
                sent += await server.load_weights.remote(bucket)
            version = await server.finish_weight_update.remote(global_steps)
            logger.info("hf rollout: sent %d tensors (version %d) in %.3fs", sent, version, time.perf_counter() - start)

    async def resume(self, tags: list[str]) -> None:
        return None  # weights and KV cache never leave host memory

    async def release(self) -> None:
        return None
