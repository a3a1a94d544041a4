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
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

CPU_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
LOGPROB_CHUNK_ELEMENTS = 1 << 24  # fix 5: logits per chunk (64 MiB in fp32): a 152K vocabulary gets 110 rows
_applied = False


def apply_cpu_fixes() -> None:
    """Apply fixes 1-5 once per process (idempotent)."""
    global _applied
    if _applied:
        return
    _fix_process_group_backend()
    _fix_fsdp2_pin_memory()
    _fix_value_model_attention()
    _fix_logprobs_row_loop()
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
