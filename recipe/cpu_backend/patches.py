"""The few changes verl 0.9.1 needs to train on CPU. Applied by ``register()`` only when VERL_PLATFORM=cpu.

Each fix replaces one CUDA-only assumption; none changes behaviour on a GPU platform because none is
applied there. They run inside ``import verl`` (plugin entry point); a function imported by name
elsewhere before that (``from verl.utils.distributed import ...``) is re-pointed too.

1. Process-group backend. verl initialises torch.distributed with ``"cpu:gloo,<device>:<backend>"``,
   which on CPU is ``"cpu:gloo,cpu:gloo"``: torch rejects a device listed twice. Plain ``"gloo"`` is the
   intended meaning.
2. FSDP2 CPU offload. verl builds ``CPUOffloadPolicy(pin_memory=True)`` for forward-only engines (the
   ref model); pinning host memory needs an accelerator ("Cannot access accelerator device when none is
   available"). Without an accelerator there is nothing to pin for, so pin_memory is forced off.
3. Value-model loading. ``verl.utils.model.load_valuehead_model`` (critic) hard-codes
   ``attn_implementation="flash_attention_2"``; on CPU the HF config's own attention implementation
   (``critic.model.override_config.attn_implementation``) is used instead.
4. Engine selection. verl registers its FSDP engines for devices "cuda"/"npu" only; the engine class is
   device-agnostic (it asks the platform for the device). verl's own override ``VERL_ENGINE_DEVICE`` is
   set to "cuda" (unless the user set it) so the FSDP2 engine is found; ``config_check`` makes sure the
   strategy is fsdp2 before any worker starts.
5. Log-probs from logits. Without flash-attn (GPU-only) ``verl.utils.torch_functional.logprobs_from_logits``
   falls back to ``logprobs_from_logits_v2``, which loops over rows to bound peak memory: one logsumexp per
   token once padding is removed, thousands of tiny ops forward and backward per micro-batch, ~20% of the
   CPU demo's step. The replacement computes the same identity (label logit - logsumexp; log_softmax +
   gather for 16-bit logits) on chunks of rows holding at most ``LOGPROB_CHUNK_ELEMENTS`` logits, so peak
   memory stays bounded for a large vocabulary; its values and gradients are identical (tested).
6. Weight-sync socket per Ray cluster. The trainer pushes weights to its colocated vLLM worker over the ZMQ
   socket ``ipc:///tmp/rl-colocate-zmq-{job_id}-replica-{r}-rank-{k}.sock``: the sender's name is built in
   ``vllm_rollout.ServerAdapter.__init__`` from ``ray.get_runtime_context().get_job_id()``, the receiver's
   (``vllm_rollout.utils`` ``_get_zmq_handle``, in the vLLM worker) from the env var ``VERL_RAY_JOB_ID``
   that ``vllm_async_server.vLLMHttpServer.__init__`` sets to the same id (verl PR #6246, for two jobs on one
   host). But every fresh local Ray cluster numbers its first job ``01000000``: two runs on one machine,
   each with its own cluster (CI's two trainer tests, ``recipe.sweep --jobs 2``), share the socket. The
   second sender deletes the first one's socket file; a receiver then connects to the other run's sender,
   and both runs hang in the weight sync (seen in CI). Both names get the node's id in this cluster
   (``weight_sync_job_id``), applied when verl imports those two modules (``when_imported``).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

CPU_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
LOGPROB_CHUNK_ELEMENTS = 1 << 24  # fix 5: logits per chunk (64 MiB in fp32): a 152K vocabulary gets 110 rows
WEIGHT_SYNC_SOCKET_PREFIX = "ipc:///tmp/rl-colocate-zmq-"  # fix 6: verl's name, up to the job id
_applied = False


def apply_cpu_fixes() -> None:
    """Apply fixes 1-6 once per process (idempotent)."""
    global _applied
    if _applied:
        return
    _fix_process_group_backend()
    _fix_fsdp2_pin_memory()
    _fix_value_model_attention()
    _fix_logprobs_row_loop()
    _fix_weight_sync_socket()
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    _applied = True


def _fix_process_group_backend() -> None:
    import verl.utils.distributed as dist_utils

    original = dist_utils.initialize_global_process_group_ray

    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        # backend=None would become "cpu:gloo,cpu:gloo"; explicit backends (e.g. "cpu:gloo") are valid as given.
        return original(timeout_second=timeout_second, backend=backend or "gloo")

    initialize_global_process_group_ray.__doc__ = f"CPU platform: gloo-only wrapper of {original.__qualname__}."
    _rebind(original, initialize_global_process_group_ray)


def _rebind(original, replacement) -> None:
    """Point every already-imported ``from ... import`` alias of ``original`` (e.g. in engine_workers, if a
    plugin imported it before this ran) and its home module at ``replacement``."""
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if namespace is None:
            continue
        for attr, value in list(namespace.items()):
            if value is original:
                setattr(module, attr, replacement)


def _fix_fsdp2_pin_memory() -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy

    original_init = CPUOffloadPolicy.__init__

    def __init__(self, pin_memory: bool = True) -> None:
        original_init(self, pin_memory=False)  # no accelerator: pinned host memory cannot be allocated

    CPUOffloadPolicy.__init__ = __init__


def _fix_value_model_attention() -> None:
    import verl.utils.model as model_utils

    def load_valuehead_model(local_path, torch_dtype, model_config, trust_remote_code):
        """CPU replacement: token-classification head with the config's attention implementation."""
        from transformers import AutoModelForTokenClassification

        attn = getattr(model_config, "_attn_implementation", None)
        if attn not in CPU_ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"critic on CPU: attention implementation {attn!r} is unavailable; set "
                "+critic.model.override_config.attn_implementation=sdpa"
            )
        return AutoModelForTokenClassification.from_pretrained(
            pretrained_model_name_or_path=local_path,
            torch_dtype=torch_dtype,
            config=model_config,
            attn_implementation=attn,
            trust_remote_code=trust_remote_code,
        )

    model_utils.load_valuehead_model = load_valuehead_model


def _fix_logprobs_row_loop() -> None:
    import verl.utils.torch_functional as verl_F

    _rebind(verl_F.logprobs_from_logits_v2, logprobs_from_logits_chunked)


def logprobs_from_logits_chunked(logits, labels):
    """CPU replacement of verl's ``logprobs_from_logits_v2`` (fix 5): the same values, per chunk of rows.

    logits: (..., V); labels: (...) -> log-probabilities (...)."""
    import torch
    import torch.nn.functional as F

    rows = max(1, LOGPROB_CHUNK_ELEMENTS // max(1, logits[0].numel()))  # verl loops over dim 0
    if logits.dtype in (torch.float32, torch.float64):
        label_logits = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
        return label_logits - torch.cat([torch.logsumexp(chunk, dim=-1) for chunk in logits.split(rows)])
    # 16-bit logits: verl avoids logsumexp there for its accuracy; log_softmax + gather as verl does
    return torch.cat([F.log_softmax(chunk, dim=-1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)
                      for chunk, lab in zip(logits.split(rows), labels.split(rows), strict=True)])


def when_imported(module_name: str, action) -> None:
    """Call ``action(module)`` once ``module_name`` is imported (now, if it already is): patches a module that
    imports vLLM without importing it in every process that imports verl."""
    if module_name in sys.modules:
        action(sys.modules[module_name])
        return
    sys.meta_path.insert(0, _AfterImport(module_name, action))


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``module_name`` through the other finders, then runs ``action`` after the module's own code."""

    def __init__(self, module_name: str, action) -> None:
        self.module_name, self.action, self.loader = module_name, action, None

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module_name:
            return None
        sys.meta_path.remove(self)  # one module, once; and the search below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        self.action(module)


def weight_sync_job_id() -> str:
    """Fix 6: verl's Ray job id qualified by this node's id in this Ray cluster, unique among the clusters on
    the machine (the job id alone is ``01000000`` in each). Sender and receiver share a node, so they agree."""
    import ray

    context = ray.get_runtime_context()
    return f"{context.get_job_id()}-{context.get_node_id()[:16]}"


def weight_sync_socket(replica_and_rank: str) -> str:
    """Fix 6: the socket of ``replica_and_rank`` (verl's tail of the name, e.g. "replica-0-rank-0.sock")."""
    return f"{WEIGHT_SYNC_SOCKET_PREFIX}{weight_sync_job_id()}-{replica_and_rank}"


def _fix_weight_sync_socket() -> None:
    when_imported("verl.workers.rollout.vllm_rollout.vllm_rollout",
                  lambda module: _after_init(module.ServerAdapter, _qualify_the_senders_socket))
    when_imported("verl.workers.rollout.vllm_rollout.vllm_async_server",
                  lambda module: _after_init(module.vLLMHttpServer, _qualify_the_receivers_socket))


def _after_init(cls, after) -> None:
    """Run ``after(instance)`` at the end of ``cls.__init__``."""
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        after(self)

    cls.__init__ = __init__


def _verls_job_id_moved(what: str) -> RuntimeError:
    return RuntimeError(f"CPU backend fix 6: verl 0.9.1's {what} no longer names the weight-sync socket by the Ray job "
                        "id; recipe/cpu_backend/patches.py must follow verl's new naming")


def _qualify_the_senders_socket(adapter) -> None:
    import ray

    verls_prefix = f"{WEIGHT_SYNC_SOCKET_PREFIX}{ray.get_runtime_context().get_job_id()}-"
    if not adapter.zmq_handle.startswith(verls_prefix):
        raise _verls_job_id_moved(f"ServerAdapter.zmq_handle ({adapter.zmq_handle!r})")
    adapter.zmq_handle = weight_sync_socket(adapter.zmq_handle[len(verls_prefix):])


def _qualify_the_receivers_socket(server) -> None:
    """vLLMHttpServer.__init__ set VERL_RAY_JOB_ID, which the vLLM workers it spawns later inherit."""
    import ray

    if os.environ.get("VERL_RAY_JOB_ID") != ray.get_runtime_context().get_job_id():
        raise _verls_job_id_moved(f"vLLMHttpServer.__init__ (VERL_RAY_JOB_ID={os.environ.get('VERL_RAY_JOB_ID')!r})")
    os.environ["VERL_RAY_JOB_ID"] = weight_sync_job_id()
