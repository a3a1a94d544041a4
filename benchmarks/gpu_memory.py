"""Memory half of gpu_check.py: measured peaks of a Qwen2-shaped model next to the dry run's formulas.

A random-weight Qwen2 model with R1-Distill-Qwen-7B's widths (configs/models/, not downloaded) but only a few
layers runs fwd+bwd on one packed sequence of T tokens, T = the 7B 8k script's ppo_max_token_len_per_gpu.
The loss is the head the formula assumes: bf16 logits, fp32 log-softmax, the label's log-prob.
Weights and their gradients are allocated before measuring (a warm-up step), and the embedding and output
tables are frozen: those are model states, not terms compared here. Per-layer terms are the slope between
two depths; full-depth rows add (L - depth) slopes to the deeper measurement.

CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU (--smoke): benchmarks.probes.
PeakTensorMemory, an accounting of the tensors created inside the block (approximate: a storage counts
until the tensor that created it is freed).
"""

from __future__ import annotations

import gc
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.probes import PeakTensorMemory

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILE = ROOT / "configs/models/deepseek-ai--DeepSeek-R1-Distill-Qwen-7B.json"
SCRIPT_FILE = ROOT / "run_scripts/r1_7b_8k_staleness8.sh"
GIB = 1024**3


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    full_layers: int
    tokens: int
    depths: tuple[int, int]  # the two shallow models measured


def script_tokens(script: Path = SCRIPT_FILE) -> int:
    """actor_rollout_ref.actor.ppo_max_token_len_per_gpu as the script sets it (one literal value expected)."""
    values = set(re.findall(r"actor_rollout_ref\.actor\.ppo_max_token_len_per_gpu=(\d+)", script.read_text()))
    if len(values) != 1:
        raise ValueError(f"{script}: expected one actor.ppo_max_token_len_per_gpu=<int>, found {sorted(values) or 'none'}")
    return int(values.pop())


def seven_b_shapes(depths=(1, 2)) -> Shapes:
    cfg = json.loads(MODEL_FILE.read_text())
    return Shapes(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                  cfg["vocab_size"], cfg["num_hidden_layers"], script_tokens(), tuple(depths))


def smoke_shapes(full: Shapes) -> Shapes:
    """Laptop-sized, same heads/KV ratio and I/H ratio as the 7B model; only the report structure matters here."""
    return replace(full, hidden=128, intermediate=128 * full.intermediate // full.hidden, heads=4,
                   kv_heads=max(1, 4 * full.kv_heads // full.heads), vocab=2048, tokens=256)


class CudaMeter:
    """Same interface as PeakTensorMemory (live_bytes, peak_bytes), from the CUDA caching allocator."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak_bytes = torch.cuda.max_memory_allocated() - self.base

    @property
    def live_bytes(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() - self.base


def meter(device: str):
    return CudaMeter() if device.startswith("cuda") else PeakTensorMemory()


def head_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What the logits formula counts: bf16 logits, their fp32 log-softmax (whose gradient backward makes)."""
    logits = hidden @ weight.T
    return logits.float().log_softmax(-1).gather(-1, labels[:, None])


def measure_head(s: Shapes, device: str) -> int:
    """Peak bytes of the head alone, fwd+bwd, above its inputs."""
    hidden = torch.randn(s.tokens, s.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(s.vocab, s.hidden, device=device, dtype=torch.bfloat16) * 0.02
    labels = torch.randint(0, s.vocab, (s.tokens,), device=device)
    with meter(device) as m:
        head_log_probs(hidden, weight, labels).sum().backward()
    return m.peak_bytes


def build_model(s: Shapes, layers: int, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=layers,
                         num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                         max_position_embeddings=s.tokens, tie_word_embeddings=False, use_cache=False)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16).train()
    model.model.embed_tokens.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    return model


def measure_model(model, s: Shapes, device: str, checkpointing: bool) -> tuple[int, int]:
    """(bytes held after the forward, fwd+bwd peak), both above weights and gradients."""
    if checkpointing:  # non-reentrant: the input of layer 0 (frozen embeddings) needs no grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    ids = torch.randint(0, s.vocab, (1, s.tokens), device=device)

    def step():
        hidden = model.model(input_ids=ids).last_hidden_state[0]
        return head_log_probs(hidden, model.lm_head.weight, ids[0])

    step().sum().backward()  # warm-up: allocates the layers' .grad (model states) and library workspaces
    with meter(device) as m:
        log_probs = step()
        after_forward = m.live_bytes
        log_probs.sum().backward()
        del log_probs
    return after_forward, m.peak_bytes


def _free(device: str):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _size(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x / GIB:.2f} GiB" if abs(x) >= GIB / 4 else f"{x / 2**20:.2f} MiB"


def _row(term: str, measured: float | None, formula: float | None, how: str) -> str:
    ratio = f"{measured / formula:.2f}" if measured is not None and formula else "-"
    return f"| {term} | {_size(measured)} | {_size(formula)} | {ratio} | {how} |"


def memory_section(s: Shapes, device: str, mem) -> list[str]:
    """Markdown lines: per-term measured peaks next to `mem` (recipe/dry_run/memory.py) for the same shapes."""
    T, H, I, V, L = s.tokens, s.hidden, s.intermediate, s.vocab, s.full_layers
    lo, hi = s.depths
    how_measured = ("torch.cuda.max_memory_allocated" if device.startswith("cuda")
                    else "PeakTensorMemory (CPU tensor accounting, approximate)")
    lines = [
        f"Qwen2, random bf16 weights: H={H} I={I} heads={s.heads} kv={s.kv_heads} V={V}, depths {lo} and {hi} "
        f"(full model: L={L}); one packed sequence of T={T} tokens (the 7B 8k script's actor.ppo_max_token_len_per_gpu "
        f"is {script_tokens()}, {SCRIPT_FILE.relative_to(ROOT)}).",
        f"Measured with {how_measured}; ratio = measured / formula.",
        "",
        "| term | measured | formula | ratio | measured as / formula |",
        "|---|---|---|---|---|",
    ]
    try:
        head = measure_head(s, device)
    except torch.cuda.OutOfMemoryError as err:
        raise RuntimeError(f"the head alone does not fit at T={T}, V={V}; rerun with --tokens lower") from err
    _free(device)
    lines.append(_row("logits + log-softmax (head alone)", head, mem.logits(T, V),
                      "fwd+bwd peak above its inputs / T * V * (2 + 4 + 4) B"))
    results = {}
    for depth in (lo, hi):
        model = build_model(s, depth, device)
        attention = model.config._attn_implementation
        for ckpt in (True, False):  # the smaller case first: an out-of-memory error loses less
            try:
                results[depth, ckpt] = measure_model(model, s, device, ckpt)
            except Exception as err:  # out of memory, most likely: the other measurements still report
                results[depth, ckpt] = None
                reason = f"{type(err).__name__}: {err}"[:150].replace("|", "/").replace("\n", " ")
                lines.append(f"| depth {depth}, checkpointing {ckpt} | failed | | | {reason} |")
            _free(device)
        del model
        _free(device)
    lines.insert(1, f"Attention implementation (transformers): {attention}.")
    for ckpt in (True, False):
        if results.get((lo, ckpt)) is None or results.get((hi, ckpt)) is None:
            continue
        (fwd_lo, peak_lo), (fwd_hi, peak_hi) = results[lo, ckpt], results[hi, ckpt]
        per_layer = mem.layer_checkpoint(T, H) if ckpt else mem.layer_working_set(T, H, I)
        per_layer_text = "T * H * 2 B" if ckpt else "T * (6H + 3I) * 2 B"
        slope_fwd, slope_peak = (fwd_hi - fwd_lo) / (hi - lo), (peak_hi - peak_lo) / (hi - lo)
        tag = "checkpointing" if ckpt else "no checkpointing"
        rest = peak_lo - lo * slope_peak - head
        lines += [
            _row(f"{tag}: activations per layer, held after forward", slope_fwd, per_layer,
                 f"slope over depth of the bytes held after the forward / {per_layer_text}"),
            _row(f"{tag}: activations per layer, fwd+bwd peak", slope_peak, per_layer,
                 f"slope over depth of the peak / {per_layer_text}"),
            _row(f"{tag}: rest of the peak (recomputed layer, backward transients)", rest,
                 mem.layer_working_set(T, H, I) if ckpt else None,
                 "peak - depth * slope - head peak / "
                 + ("T * (6H + 3I) * 2 B (one layer)" if ckpt else "not in the formula")),
            _row(f"{tag}: fwd+bwd peak, {hi} layers", peak_hi,
                 mem.activations(T, H, I, hi, ckpt) + mem.logits(T, V), "peak above weights and grads / activations + logits"),
            _row(f"{tag}: **scaled to L={L}** (estimate)", peak_hi + (L - hi) * slope_peak,
                 mem.activations(T, H, I, L, ckpt) + mem.logits(T, V),
                 f"peak at {hi} layers + (L - {hi}) * per-layer slope / activations + logits"),
        ]
    return lines
