"""The tiny task: synthetic AIME-format arithmetic problems, their warm-start target responses, verl rows
and the reward (the last \\boxed{integer} against the answer). See the package docstring."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from recipe.data.templates import math_prompt

DATA_SOURCE = "tiny_aime"
OPS = ("+", "-", "*")
_BOXED_INT = re.compile(r"\\boxed\{\s*(\d+)\s*\}")


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    @property
    def text(self) -> str:
        return f"Compute {self.a}{self.op}{self.b}."

    @property
    def response(self) -> str:
        """Warm-start target: the computation restated, then the boxed answer."""
        return f"{self.a}{self.op}{self.b}={self.answer} \\boxed{{{self.answer}}}"

    def responses(self, style: str) -> tuple[str, ...]:
        """Warm-start targets of ``style`` (every one ends with the boxed answer; the first is ``response``;
        for "scratch", one fixed scratch: the warm start draws a fresh one per example)."""
        if style in ("restate", "ramble"):  # a ramble never answers: the one correct target is the restatement
            return (self.response,)
        if style == "scratch":
            rng = random.Random(f"{self.a}{self.op}{self.b}")
            return (scratch_response(self, "".join(rng.choice(SCRATCH_LETTERS) for _ in range(SCRATCH_LENGTH))),)
        a, op, b, x = self.a, self.op, self.b, self.answer
        return (self.response, f"\\boxed{{{x}}}", f"The answer is \\boxed{{{x}}}",
                f"{a}{op}{b} gives {x}, so \\boxed{{{x}}}", f"So {x}. \\boxed{{{x}}}")


RESPONSE_STYLES = ("restate", "varied", "scratch", "ramble")
# "scratch": SCRATCH_LENGTH letters drawn uniformly and independently, then the boxed answer: free tokens the
# reward ignores (like the many inconsequential forking tokens of a reasoning trace), ~3.3 nats each
SCRATCH_LETTERS, SCRATCH_LENGTH = "abcdefghijklmnopqrstuvwxyz", 6


def scratch_response(problem: Problem, letters: str) -> str:
    return f"{letters} \\boxed{{{problem.answer}}}"


# "ramble" (configs/regime/cpu_imbalance.yaml): after a wrong first answer digit the model loses its way and
# rambles: RAMBLE_LENGTH free letters with no answer and no end, cut off by the length limit ("7*8=4qzkf...", the
# paper's overlong negatives). The warm start shows rambles after wrong digits it does not score (the model keeps
# its own arithmetic, and learns only what follows a wrong digit), so its own errors, as far as it can tell them
# from right digits, turn into long responses: failures are long because they fail. The policy can shorten them
# only by failing less (a ramble and a short wrong answer both score 0, so after a wrong digit RL has no reason to
# prefer either; after a right digit it learns not to ramble). The reward is the plain last-\boxed{} check.
RAMBLE_FRACTION = 0.3  # share of the ramble phase's training examples that are rambles
RAMBLE_LIMIT = 128  # the length limit (tokens) of ramble runs: the build's recommended data.max_response_length
RAMBLE_LENGTH = RAMBLE_LIMIT  # letters; with "7*8=4" in front past the limit, so a ramble is always cut off
# A "ramble" build starts from the "restate" build of the same parameters (cached beside it) and learns to ramble
# in RAMBLE_STEPS steps (training.ramble_phase, evaluated every RAMBLE_EVAL_EVERY); these constants enter the
# cache key of "ramble" builds only (cache.TinyAssetsParams.key)
RAMBLE_STEPS, RAMBLE_EVAL_EVERY = 100, 25


def wrong_first_digits(problem: Problem) -> list[str]:
    """The digits an answer to `problem` cannot start with (the nine others than its own first digit)."""
    return [d for d in "0123456789" if d != str(problem.answer)[0]]


def ramble_response(problem: Problem, first: str, letters: str) -> str:
    """A ramble: the restated problem, a wrong first digit `first`, then free letters (no answer, no end)."""
    return f"{problem.a}{problem.op}{problem.b}={first}{letters}"


def derive_seed(seed: int, stream: str) -> int:
    """Independent, reproducible seed for one random stream of a build."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:8], "little")


def sample_problem(rng: random.Random, max_operand: int = 9) -> Problem:
    op = OPS[rng.randrange(len(OPS))]
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if op == "-" and a < b:
        a, b = b, a
    return Problem(a, op, b)


def verl_row(problem: Problem, split: str, index: int) -> dict:
    """One row of verl's RL schema (RLHFDataset: chat `prompt`, rule reward with a string answer)."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": math_prompt(problem.text)}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(problem.answer)},
        "extra_info": {
            "split": split,
            "index": index,
            "problem": problem.text,
            "a": problem.a,
            "b": problem.b,
            "op": problem.op,
            "answer": problem.answer,
        },
    }


def score_response(response: str, ground_truth: str | int) -> float:
    """1.0 when the last \\boxed{integer} of `response` equals `ground_truth`, else 0.0."""
    found = _BOXED_INT.findall(response)
    return float(bool(found) and int(found[-1]) == int(ground_truth))
