"""Rule-based math reward for verl (AIME-style integer answers, math-verify for everything else).

Use as verl's custom reward function (verl 0.9.1 loads it with `importlib.import_module` after
stripping `pkg://`; both `pkg://recipe.reward.aime` and `pkg://recipe/reward/aime` work):

    reward.custom_reward_function.path=pkg://recipe.reward.aime
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.score_mode=signed     # optional, see below

verl merges `reward.custom_reward_function.reward_kwargs` into every call (it is not in verl's
schema, hence the `+`). A DAPO overlong-penalty setup is in configs/reward/dapo_overlong.yaml.

Decision order for one response:
  1. keep the last `max_tail_chars` characters (the final answer is at the end; this bounds the
     cost of pathological responses) and drop control characters;
  2. extract the answer (`recipe.reward.extract.extract_answer`): last box, else "Answer:" line,
     else bold; no answer -> incorrect;
  3. answers longer than MAX_ANSWER_CHARS are refused (incorrect);
  4. integer fast path: if gold and prediction both read as plain integers, compare exactly;
  5. identical normalised strings -> correct;
  6. otherwise math-verify in a worker process with a hard timeout (`recipe.reward.mv_pool`);
     exponent towers deeper than MAX_TOWER_DEPTH are refused (incorrect) before that, and a
     timeout or a crashed worker counts as incorrect.
Refusals, timeouts and crashes are counted (`reward_stats()`) and logged (first one, then every
100th) on the "bapo_verl.reward" logger.
"""

from __future__ import annotations

import logging
import numbers
import os
import threading

from recipe.reward.extract import (
    exponent_tower_depth,
    extract_answer,
    integer_of_normalized,
    normalize_answer,
    strip_control_chars,
)

logger = logging.getLogger("bapo_verl.reward")

DEFAULT_MAX_TAIL_CHARS = 8192
DEFAULT_MV_TIMEOUT = 3.0
MAX_ANSWER_CHARS = 512
MAX_TOWER_DEPTH = 2
SCORE_MODES = {"binary": (1.0, 0.0), "signed": (1.0, -1.0)}
# keyword arguments verl's reward managers may add to every call; they do not concern this reward
_VERL_CALL_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})

_stats_lock = threading.Lock()
_stats: dict[str, int] = {}


def _count(key: str) -> int:
    with _stats_lock:
        _stats[key] = _stats.get(key, 0) + 1
        return _stats[key]


def _count_and_warn(key: str, message: str, *args) -> None:
    n = _count(key)
    if n == 1 or n % 100 == 0:
        logger.warning(message + " (%s so far: %d)", *args, key, n)


def reward_stats() -> dict[str, int]:
    """Counters of this process since start (or `reset_reward_stats()`): calls, no_answer,
    fast_path_int, exact_match, math_verify, mv_timeout, mv_crashed, refused_long, refused_tower,
    correct; plus the math-verify pool's counters as pool_* when the pool exists."""
    from recipe.reward import mv_pool

    with _stats_lock:
        out = dict(_stats)
    pool = mv_pool._pool
    if pool is not None and pool.owner_pid == os.getpid():
        out.update({f"pool_{k}": v for k, v in pool.stats().items()})
    return out


def reset_reward_stats() -> None:
    """Zero the counters of `reward_stats()` (not the pool's)."""
    with _stats_lock:
        _stats.clear()


def default_mv_timeout() -> float:
    """BAPO_REWARD_MV_TIMEOUT (seconds) if set, else DEFAULT_MV_TIMEOUT."""
    raw = os.environ.get("BAPO_REWARD_MV_TIMEOUT")
    if raw is None or raw == "":
        return DEFAULT_MV_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"BAPO_REWARD_MV_TIMEOUT={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"BAPO_REWARD_MV_TIMEOUT={raw!r} must be > 0")
    return value


def _gold_text(ground_truth) -> str:
    if isinstance(ground_truth, str):
        text = ground_truth
    elif isinstance(ground_truth, numbers.Integral) and not isinstance(ground_truth, bool):
        text = str(int(ground_truth))
    else:
        raise TypeError(
            f"ground_truth must be a str or int, got {type(ground_truth).__name__}: {ground_truth!r:.80}"
        )
    text = text.strip()
    if not text:
        raise ValueError("ground_truth is empty")
    return text


def _math_verify_equal(gold: str, pred: str, timeout: float) -> bool:
    from recipe.reward.mv_pool import get_pool

    if exponent_tower_depth(pred) > MAX_TOWER_DEPTH or exponent_tower_depth(gold) > MAX_TOWER_DEPTH:
        _count_and_warn("refused_tower", "reward: exponent tower refused before math-verify: %.60r", pred)
        return False
    _count("math_verify")
    result = get_pool().call("verify", (gold, pred), timeout)
    if result.status == "timeout":
        _count_and_warn("mv_timeout", "reward: math-verify timed out after %.1f s on %.60r; scored incorrect",
                        timeout, pred)
        return False
    if result.status == "crashed":
        _count_and_warn("mv_crashed", "reward: math-verify worker died on %.60r; scored incorrect", pred)
        return False
    return bool(result.value)


def is_correct(solution_str: str, ground_truth, *, mv_timeout: float | None = None,
               max_tail_chars: int = DEFAULT_MAX_TAIL_CHARS, use_math_verify: bool = True) -> tuple[bool, str]:
    """(correct, normalised predicted answer or "") for one response; options as in `compute_score`."""
    if not isinstance(solution_str, str):
        raise TypeError(f"solution_str must be a str, got {type(solution_str).__name__}")
    if not (isinstance(max_tail_chars, int) and max_tail_chars > 0):
        raise ValueError(f"max_tail_chars must be a positive int, got {max_tail_chars!r}")
    gold = _gold_text(ground_truth)
    _count("calls")
    extraction = extract_answer(strip_control_chars(solution_str[-max_tail_chars:]))
    if extraction.answer is None:
        _count("no_answer")
        return False, ""
    if len(extraction.answer) > MAX_ANSWER_CHARS:
        # no real final answer is this long; refusing early also bounds the work below
        _count_and_warn("refused_long", "reward: answer of %d chars refused", len(extraction.answer))
        return False, normalize_answer(extraction.answer[:MAX_ANSWER_CHARS])
    pred = normalize_answer(extraction.answer)
    if not pred:
        _count("no_answer")
        return False, ""
    gold = normalize_answer(gold)
    gold_int, pred_int = integer_of_normalized(gold), integer_of_normalized(pred)
    if gold_int is not None and pred_int is not None:
        _count("fast_path_int")
        return gold_int == pred_int, pred
    if pred == gold:
        _count("exact_match")
        return True, pred
    if not use_math_verify:
        return False, pred
    timeout = default_mv_timeout() if mv_timeout is None else float(mv_timeout)
    if not timeout > 0:
        raise ValueError(f"mv_timeout must be > 0 seconds, got {mv_timeout!r}")
    return _math_verify_equal(gold, pred, timeout), pred


def compute_score(data_source, solution_str, ground_truth, extra_info=None, *, score_mode: str = "binary",
                  mv_timeout: float | None = None, max_tail_chars: int = DEFAULT_MAX_TAIL_CHARS,
                  use_math_verify: bool = True, **kwargs) -> dict:
    """verl custom reward: score one response against its ground truth.

    data_source, extra_info: accepted for verl's interface; not used (every source is scored alike).
    solution_str: the decoded response. ground_truth: the reference answer (str or int).
    score_mode: "binary" (default): 1.0 correct / 0.0 otherwise; "signed": 1.0 / -1.0 (DAPO style).
        A refused input, a math-verify timeout and a crashed worker all score as incorrect.
    mv_timeout: seconds math-verify may spend on one comparison (default: env BAPO_REWARD_MV_TIMEOUT,
        else 3.0). The worker is killed when it is exceeded.
    max_tail_chars: only the last this-many characters of the response are read (default 8192).
    use_math_verify: False limits non-integer answers to exact normalised string equality.
    kwargs: verl's reward_router_address / reward_model_tokenizer are ignored; anything else is a
        TypeError, so a misspelt reward_kwargs key fails instead of being ignored.

    Returns {"score": float, "acc": 1.0 or 0.0, "pred": normalised extracted answer ("" if none)}.
    """
    unknown = set(kwargs) - _VERL_CALL_KWARGS
    if unknown:
        raise TypeError(f"compute_score got unknown keyword arguments {sorted(unknown)}; "
                        "options: score_mode, mv_timeout, max_tail_chars, use_math_verify")
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {sorted(SCORE_MODES)}, got {score_mode!r}")
    correct, pred = is_correct(solution_str, ground_truth, mv_timeout=mv_timeout,
                               max_tail_chars=max_tail_chars, use_math_verify=use_math_verify)
    if correct:
        _count("correct")
    good, bad = SCORE_MODES[score_mode]
    return {"score": good if correct else bad, "acc": 1.0 if correct else 0.0, "pred": pred}
