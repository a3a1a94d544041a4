"""A random tiny Qwen2 causal LM for CPU rollout tests and benchmarks (nothing is downloaded).

It uses the project's byte-level tokenizer (`recipe.data.tiny_assets.build_tokenizer`). The trained,
warm-started tiny model for trainer runs is `recipe.data.tiny_assets.build_tiny_assets`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from recipe.data.tiny_assets import build_tokenizer, qwen2_model


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the random Qwen2 model; the defaults give ~95K parameters."""

    vocab_size: int = 259  # == the tokenizer's entries (see recipe.data.tiny_assets.TinyAssetsParams.vocab_size)
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    # HF's default 0.02 makes a random model repeat one token under greedy decoding; tests of the decode
    # path use ~0.2 so greedy outputs vary with the context (an attention bug then changes tokens).
    initializer_range: float = 0.02
    seed: int = 0


def build_tiny_model(out_dir: str, spec: TinyModelSpec = TinyModelSpec()) -> str:
    """Write tokenizer + random fp32 Qwen2ForCausalLM (tied embeddings) to ``out_dir``; return the path."""
    os.makedirs(out_dir, exist_ok=True)
    shape = {k: v for k, v in dataclasses.asdict(spec).items() if k != "seed"}
    qwen2_model(build_tokenizer(out_dir), seed=spec.seed, **shape).save_pretrained(out_dir)
    return out_dir


# vLLM's CPU attention kernels have no head_dim 16 (TinyModelSpec's default: 64 / 4 heads); this shape has 32
VLLM_TINY_HEADS = {"num_attention_heads": 2, "num_key_value_heads": 1}


def init_local_ray() -> None:
    """A local Ray instance for an in-process vLLM server: one "GPU" slot (the cpu platform's placeholder) and
    every address on loopback."""
    import ray

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")


async def launch_vllm_server(model_dir: str, **rollout):
    """verl's own ``vLLMHttpServer`` in this process, launched as ``vLLMReplica`` launches it (HYBRID mode, dummy
    weights until the first ``push_weights``) with the CPU settings of ``configs/cpu_tiny.yaml``.

    Needs ``init_local_ray()`` and ``VERL_PLATFORM=cpu`` (set before verl is imported) and ``VLLM_CPU_KVCACHE_SPACE``.
    ``rollout`` are ``RolloutConfig`` fields (lengths, ``max_num_seqs``, ...). Call from the event loop that
    will use the server: vLLM's engine runs its output handler on that loop.
    """
    server = vllm_server(model_dir, **rollout)
    await server.launch_server()
    return server


def cpu_rollout_config(**rollout):
    """verl's ``RolloutConfig`` for vLLM with the CPU settings of ``configs/cpu_tiny.yaml``."""
    from verl.workers.config import RolloutConfig

    return RolloutConfig(name="vllm", tensor_model_parallel_size=1, dtype="float32", enforce_eager=True,
                         enable_sleep_mode=False, load_format="dummy", free_cache_engine=True, n_gpus_per_node=1,
                         nnodes=1, **rollout)


def vllm_server(model_dir: str, **rollout):
    """verl's ``vLLMHttpServer`` as ``vLLMReplica`` builds it for replica 0 in HYBRID mode (not yet launched)."""
    from verl.workers.config import HFModelConfig
    from verl.workers.rollout.replica import RolloutMode
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer

    return vLLMHttpServer(cpu_rollout_config(**rollout), HFModelConfig(path=model_dir), RolloutMode.HYBRID,
                          workers=[], replica_rank=0, node_rank=0, gpus_per_node=1, nnodes=1, cuda_visible_devices="0")


async def push_weights(server, state: dict, version: int) -> None:
    """verl's weight sync as its trainer runs it (``vllm_rollout.ServerAdapter.update_weights``): a
    ``BucketedWeightSender`` over shared memory (the cpu platform has no CUDA IPC) on the trainer side, the
    server's ``collective_rpc("update_weights_from_ipc")`` on the vLLM worker side; then the KV cache is
    cleared and the policy version stamped, as the trainer does after an update."""
    import asyncio

    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender

    from .patches import weight_sync_socket

    handle = weight_sync_socket("replica-0-rank-0.sock")  # ServerAdapter's on the cpu platform (patches.py fix 6)
    receive = asyncio.ensure_future(server.collective_rpc("update_weights_from_ipc", kwargs={"use_shm": True}))
    sender = BucketedWeightSender(zmq_handle=handle, use_shm=True,
                                  bucket_size_mb=server.config.checkpoint_engine.update_weights_bucket_megabytes)
    await asyncio.to_thread(lambda: asyncio.run(sender.async_send_weights(iter(state.items()))))
    await receive
    await server.clear_kv_cache()
    await server.set_global_steps(version)
