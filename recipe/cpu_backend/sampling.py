"""Sampling parameters and the per-step token choice of the ``hf`` rollout backend.

Log-prob convention (what ``TokenOutput.log_probs`` holds, i.e. verl's ``rollout_log_probs``)
------------------------------------------------------------------------------------------
verl runs vLLM with ``rollout.logprobs_mode`` (default ``processed_logprobs``). We follow vLLM:

* ``processed_logprobs`` (default): the log-prob of the chosen token under the distribution it was
  actually sampled from: ``log_softmax(top_p(top_k(logits / T)))`` with filtered-out tokens at -inf
  (so with top-k / top-p the kept tokens are renormalised). Greedy requests (``T == 0``) report
  ``log_softmax(logits)``, as vLLM does on its greedy path.
* ``raw_logprobs``: ``log_softmax(logits)`` for every request (temperature and filters ignored).

The actor recomputes ``log_softmax(logits / T)`` with ``T = rollout.temperature`` and no filters, so
with ``top_k=-1, top_p=1`` the processed rollout log-probs equal the actor's up to float error; with
top-k / top-p they are higher by the log of the kept probability mass (as with vLLM).

Filter order and semantics follow vLLM: temperature, then top-k (tokens below the k-th largest logit are
dropped, ties at the threshold kept), then top-p on the renormalised top-k distribution (keep the
smallest prefix of the sorted distribution whose mass reaches ``top_p``; the top token is always kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")

# vLLM SamplingParams keys that only shape *text* output: irrelevant for token-in/token-out.
_TEXT_ONLY_KEYS = frozenset(
    {"detokenize", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output"}
)
# Keys accepted only at their neutral value (we do not implement the feature).
_NEUTRAL_VALUES = {
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "min_p": 0.0,
    "n": 1,
    "min_tokens": 0,
}
_SUPPORTED_KEYS = frozenset(
    {"max_tokens", "max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "ignore_eos"}
    | {"logprobs", "seed"}
)


@dataclass(frozen=True)
class SamplingSpec:
    """Validated per-request sampling settings.

    ``temperature == 0`` means greedy; ``top_k <= 0`` and ``top_p >= 1`` mean "no filter".
    ``max_tokens`` is the budget of *this call*: the request stops with reason "length" when reached.
    """

    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    stop_token_ids: frozenset = frozenset()
    stop_strings: tuple = ()
    ignore_eos: bool = False
    want_logprobs: bool = False
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def parse_sampling_params(params: dict[str, Any], default_max_tokens: int, room: int) -> SamplingSpec:
    """Turn verl's / vLLM's ``sampling_params`` dict into a ``SamplingSpec``.

    Args:
        params: as sent by verl's agent loop (temperature, top_p, top_k, repetition_penalty, logprobs,
            optionally max_tokens / max_new_tokens, stop, stop_token_ids, ignore_eos, seed).
        default_max_tokens: budget when the request names none (the server's response_length rule).
        room: tokens left in the context window after the prompt (``max_model_len - len(prompt)``).

    Raises ``ValueError`` for unknown keys, out-of-range values, or a feature set to a non-neutral
    value that this backend does not implement (rather than silently ignoring it).
    """
    unknown = set(params) - _SUPPORTED_KEYS - _TEXT_ONLY_KEYS - set(_NEUTRAL_VALUES)
    if unknown:
        raise ValueError(f"hf rollout: unsupported sampling_params keys {sorted(unknown)}")
    for key, neutral in _NEUTRAL_VALUES.items():
        if key in params and params[key] is not None and float(params[key]) != float(neutral):
            raise ValueError(f"hf rollout: sampling_params[{key!r}]={params[key]!r} is not implemented (only {neutral})")
    if "max_tokens" in params and "max_new_tokens" in params:
        raise ValueError("hf rollout: give either max_tokens or max_new_tokens, not both")
    max_tokens = params.get("max_tokens", params.get("max_new_tokens"))
    max_tokens = default_max_tokens if max_tokens is None else int(max_tokens)
    if room < 1:
        raise ValueError(f"hf rollout: the prompt leaves no room to generate (room={room} tokens)")
    if max_tokens < 1:
        raise ValueError(f"hf rollout: max_tokens={max_tokens} must be >= 1")
    temperature = float(params.get("temperature", 1.0))
    top_p = float(params.get("top_p", 1.0))
    top_k = int(params.get("top_k", -1) if params.get("top_k") is not None else -1)
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"hf rollout: temperature={temperature} must be a finite number >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"hf rollout: top_p={top_p} must be in (0, 1]")
    logprobs = params.get("logprobs", False)
    if logprobs is not None and not isinstance(logprobs, bool) and int(logprobs) != 0:
        # vLLM's logprobs=k also returns the k most likely alternatives; TokenOutput has no room for them.
        raise ValueError(f"hf rollout: logprobs={logprobs!r}: only the sampled token's log-prob is returned (use True/0)")
    stop = params.get("stop") or ()
    stop_strings = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(f"hf rollout: stop={stop!r} must be a non-empty string or a list of them")
    seed = params.get("seed")
    return SamplingSpec(
        max_tokens=min(max_tokens, room),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_token_ids=frozenset(int(t) for t in (params.get("stop_token_ids") or ())),
        stop_strings=stop_strings,
        ignore_eos=bool(params.get("ignore_eos", False)),
        want_logprobs=logprobs is not None and logprobs is not False,
        seed=None if seed is None else int(seed),
    )


def filter_logits(logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    """Apply temperature, top-k and top-p row by row.

    Args:
        logits: ``[B, V]`` float32 next-token logits, one row per sequence.
        specs: ``B`` specs aligned with the rows.

    Returns:
        ``[B, V]`` processed logits: greedy rows unchanged, sampled rows ``logits / T`` with filtered
        tokens set to ``-inf``.
    """
    temps = torch.tensor([1.0 if s.greedy else s.temperature for s in specs], dtype=logits.dtype)
    out = logits / temps[:, None]
    vocab = logits.shape[-1]
    ks = torch.tensor([s.top_k if (not s.greedy and 0 < s.top_k < vocab) else vocab for s in specs])
    ps = torch.tensor([s.top_p if not s.greedy else 1.0 for s in specs], dtype=logits.dtype)
    if bool((ks < vocab).any()) or bool((ps < 1.0).any()):
        sorted_logits, _ = torch.sort(out, dim=-1, descending=True)
        kth = sorted_logits.gather(-1, (ks - 1)[:, None])  # [B, 1] k-th largest value
        out = out.masked_fill(out < kth, float("-inf"))
    if bool((ps < 1.0).any()):
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= ps[:, None]
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_rows(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of ``probs`` ([B, V], rows summing to ~1) by inverse-CDF sampling: each row draws one
    uniform from its own generator (so its token does not depend on the batch company), all rows are looked
    up at once. A zero-probability token is never chosen (its CDF step is empty). Returns ``[B]`` long."""
    uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    cdf = torch.cumsum(probs.double(), dim=-1)
    index = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0]
    last_positive = probs.shape[-1] - 1 - torch.argmax((probs.flip(-1) > 0).long(), dim=-1)
    return torch.minimum(index, last_positive)  # u * total rounding up to the total


def choose_tokens(
    logits: torch.Tensor, specs: list[SamplingSpec], generators: list[Optional[torch.Generator]], logprobs_mode: str
) -> tuple[list[int], list[float]]:
    """Pick one token per row and its log-prob (see the module docstring for the convention).

    Args:
        logits: ``[B, V]`` float32 raw next-token logits.
        specs / generators: per row; a sampled row draws with its own generator so its result does not
            depend on which other requests share the batch.
        logprobs_mode: one of ``LOGPROBS_MODES``.

    Returns:
        (token ids, log-probs), each of length ``B``.
    """
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"hf rollout: rollout.logprobs_mode={logprobs_mode!r} not supported; use one of {LOGPROBS_MODES}")
    processed = filter_logits(logits, specs)
    logp = torch.log_softmax(processed, dim=-1)
    index = torch.argmax(logits, dim=-1)  # greedy rows
    sampled = [row for row, spec in enumerate(specs) if not spec.greedy]
    if sampled:
        index[sampled] = sample_rows(logp[sampled].exp(), [generators[row] for row in sampled])
    tokens = index.tolist()
    index = index[:, None]
    if logprobs_mode == "raw_logprobs":
        chosen = torch.log_softmax(logits, dim=-1).gather(-1, index)
    else:
        chosen = logp.gather(-1, index)
    return tokens, chosen[:, 0].tolist()
