"""Tiny local training assets for CPU runs of the real verl trainer: a byte-level Qwen2 tokenizer, a small
Qwen2 causal LM given a short supervised warm start, and synthetic AIME-format math problems as verl
parquet splits. Nothing is downloaded.

    from recipe.data.tiny_assets import build_tiny_assets
    assets = build_tiny_assets()          # cached under <repo>/.cache/tiny_assets/<key>
    assets.model_dir, assets.train_file, assets.test_file, assets.accuracy

    python -m recipe.data.tiny_assets --out DIR [--seed N] [--force]

Problems: "Compute a+b." / "a-b" (a >= b) / "a*b" with single-digit operands (integer answers 0..81).
The user message is the paper's `math_prompt(problem)` (problem + "Please reason step by step, and put
your final answer within \\boxed{}."); the warm-start target response (`response_style`) is
  * "restate" (default): "7*8=56 \\boxed{56}" + eos;
  * "varied": one of five phrasings per example ("7*8=56 \\boxed{56}", "\\boxed{56}", "The answer is
    \\boxed{56}", "7*8 gives 56, so \\boxed{56}", "So 56. \\boxed{56}"): entropy over how to answer;
  * "scratch": six letters drawn uniformly per example, then the boxed answer ("qzkfia \\boxed{56}"):
    free tokens the reward ignores, like the inconsequential forking tokens of a reasoning trace.
The stress regimes (configs/regime/cpu_stress_{varied,scratch}.yaml) use the last two; every style is its own
build (the style is part of the cache key; `${tiny_assets:FIELD,STYLE}` in configs).

Tokenizer: transformers 5 always builds `Qwen2Tokenizer` for model_type=qwen2, and verl's agent loop
needs "\\n" to be one token. A byte-level `Qwen2Tokenizer` (the 256 byte symbols, no merges) with the
ChatML specials (`<|im_end|>` eos, `<|endoftext|>` pad, `<|im_start|>`) and a ChatML chat template
satisfies both; every byte is one token.

Warm start (plain PyTorch, AdamW): a randomly initialised 2-layer model cannot locate the operands
through the 72-token instruction quickly, so training runs in two phases:
  1. "bare" prompts (chat template around the problem alone, ~31 tokens, cheap steps) until the model
     computes (expected accuracy on a validation sample >= `bare_target`);
  2. the real prompts (`math_prompt`) until the expected accuracy on the validation sample first
     reaches `target_accuracy`.
"Expected accuracy" is the mean teacher-forced probability of the whole target response (without
eos; summed over the phrasings for "varied"; of the answer given a fixed scratch for "scratch") over a
fixed validation sample: exact and free of sampling noise, so the stopping step is
deterministic, and a lower bound of temperature-1 sampled accuracy. Stopping on it (rather than after
a fixed step count) put the model in the intended band for every seed tried (seeds 0-5: sampled test
accuracy 0.29-0.45). The build then reports the *sampled* accuracy (temperature 1, top_p 1, no top-k)
on the test split.

Determinism: the same parameters give identical files on the same machine. Every random stream is
seeded from `seed`; torch runs with `BUILD_THREADS` intra-op threads during the build (restored
afterwards), since the reduction order of CPU kernels may depend on the thread count. The global
torch RNG state of the caller is saved and restored.

Cache: the build is written to a temporary sibling directory and renamed into place, so a concurrent
or aborted build never leaves a half-written directory; `manifest.json` (written last) records the
parameters, cache key, accuracies, sizes and build time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe.data.templates import math_prompt

logger = logging.getLogger("bapo_verl.tiny_assets")

# Bump when anything that changes the built files changes (generator, tokenizer, training loop...).
VERSION = "1"
DATA_SOURCE = "tiny_aime"
BUILD_THREADS = 2
CACHE_ENV = "BAPO_TINY_ASSETS_CACHE"
MANIFEST = "manifest.json"
MODEL_SUBDIR = "model"
DATA_SUBDIR = "data"
OPS = ("+", "-", "*")

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
START_TOKEN = "<|im_start|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_BOXED_INT = re.compile(r"\\boxed\{\s*(\d+)\s*\}")


@dataclass(frozen=True)
class TinyAssetsParams:
    """Everything that determines the built files (hashed into the cache key with `VERSION`)."""

    seed: int = 0
    # data
    n_train: int = 1024
    n_test: int = 128
    n_val: int = 256  # validation sample for the stopping rule (not written)
    max_operand: int = 9
    # warm-start targets: "restate" = one phrasing ("7*8=56 \\boxed{56}"); "varied" = the five phrasings
    # of Problem.responses drawn uniformly per example, so the model starts with real entropy over how it
    # answers (the off-policy stress regime, configs/regime/cpu_stress_varied.yaml)
    response_style: str = "restate"
    # model (Qwen2, fp32, tied embeddings)
    # == the tokenizer's 259 entries: verl's vLLM server masks every id >= len(tokenizer) to -inf while the
    # actor normalises over the whole vocabulary, so padding rows would split the rollout and actor log-probs
    vocab_size: int = 259
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    # warm start
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    bare_target: float = 0.5
    bare_max_steps: int = 1200
    bare_eval_every: int = 25
    target_accuracy: float = 0.3  # on the validation expected accuracy (a lower bound of sampled accuracy)
    full_max_steps: int = 600
    full_eval_every: int = 5
    # test-split accuracy check (sampled)
    eval_max_new_tokens: int = 32

    def key(self) -> str:
        # the prompt template lives in recipe/data/templates.py: a change to it must miss the cache
        blob = json.dumps({"version": VERSION, "prompt_template": math_prompt("{problem}"),
                           **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TinyAssets:
    """A finished build. `accuracy`: sampled (temperature 1) accuracy on the test split."""

    root: Path
    model_dir: Path  # tokenizer + model (AutoTokenizer / AutoModelForCausalLM.from_pretrained)
    train_file: Path
    test_file: Path
    accuracy: float
    expected_accuracy: float  # teacher-forced probability of the target response, test split mean
    max_prompt_length: int  # recommended data.max_prompt_length
    max_response_length: int  # recommended data.max_response_length
    manifest: dict
    from_cache: bool

    @classmethod
    def from_dir(cls, root: str | os.PathLike, from_cache: bool = True) -> "TinyAssets":
        root = Path(root)
        manifest = json.loads((root / MANIFEST).read_text())
        rec = manifest["recommended"]
        return cls(
            root=root,
            model_dir=root / MODEL_SUBDIR,
            train_file=root / DATA_SUBDIR / "train.parquet",
            test_file=root / DATA_SUBDIR / "test.parquet",
            accuracy=float(manifest["accuracy"]),
            expected_accuracy=float(manifest["expected_accuracy"]),
            max_prompt_length=int(rec["data.max_prompt_length"]),
            max_response_length=int(rec["data.max_response_length"]),
            manifest=manifest,
            from_cache=from_cache,
        )


# ----------------------------------------------------------------------------------------------------
# problems


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
        if style == "restate":
            return (self.response,)
        if style == "scratch":
            rng = random.Random(f"{self.a}{self.op}{self.b}")
            return (scratch_response(self, "".join(rng.choice(SCRATCH_LETTERS) for _ in range(SCRATCH_LENGTH))),)
        a, op, b, x = self.a, self.op, self.b, self.answer
        return (self.response, f"\\boxed{{{x}}}", f"The answer is \\boxed{{{x}}}",
                f"{a}{op}{b} gives {x}, so \\boxed{{{x}}}", f"So {x}. \\boxed{{{x}}}")


RESPONSE_STYLES = ("restate", "varied", "scratch")
# "scratch": SCRATCH_LENGTH letters drawn uniformly and independently, then the boxed answer: free tokens the
# reward ignores (like the many inconsequential forking tokens of a reasoning trace), ~3.3 nats each
SCRATCH_LETTERS, SCRATCH_LENGTH = "abcdefghijklmnopqrstuvwxyz", 6


def scratch_response(problem: Problem, letters: str) -> str:
    return f"{letters} \\boxed{{{problem.answer}}}"


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


# ----------------------------------------------------------------------------------------------------
# tokenizer and model


def build_tokenizer(save_dir: str | os.PathLike | None = None, model_max_length: int = 512):
    """Byte-level Qwen2Tokenizer: 256 byte tokens (no merges) + ChatML specials and chat template."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Qwen2Tokenizer(
        vocab={s: i for i, s in enumerate(symbols)},
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )
    tok.add_special_tokens({"additional_special_tokens": [START_TOKEN]})
    tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = model_max_length
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def _token_ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5, a list before."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def chat_prompt_ids(tok, content: str) -> list[int]:
    """Token ids of one user message + generation prompt, exactly as verl's agent loop builds them."""
    messages = [{"role": "user", "content": content}]
    return _token_ids(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def qwen2_model(tok, *, seed: int, vocab_size: int, hidden_size: int, intermediate_size: int,
                num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int,
                max_position_embeddings: int, initializer_range: float = 0.02):
    """A randomly initialised fp32 Qwen2ForCausalLM (tied embeddings, sdpa) for the byte-level tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if len(tok) != vocab_size:  # see TinyAssetsParams.vocab_size
        raise ValueError(f"vocab_size={vocab_size} must equal the tokenizer size {len(tok)}")
    eos_id, pad_id = tok.convert_tokens_to_ids(EOS_TOKEN), tok.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = None
    return model


def build_model(params: TinyAssetsParams, tok):
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings")
    return qwen2_model(tok, seed=derive_seed(params.seed, "init"), **{k: getattr(params, k) for k in shape})


# ----------------------------------------------------------------------------------------------------
# warm start


class _Encoder:
    """Caches prompt / response token ids per problem (the problem space is small)."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)
        self.pad_id = tok.convert_tokens_to_ids(PAD_TOKEN)
        self._cache: dict[tuple, list[int]] = {}

    def prompt(self, problem: Problem, bare: bool = False) -> list[int]:
        key = (problem, bare)
        if key not in self._cache:
            self._cache[key] = chat_prompt_ids(self.tok, problem.text if bare else math_prompt(problem.text))
        return self._cache[key]

    def response(self, problem: Problem, style: str = "restate", variant: int = 0) -> list[int]:
        key = (problem, "response", style, variant)
        if key not in self._cache:
            text = problem.responses(style)[variant]
            self._cache[key] = list(self.tok.encode(text, add_special_tokens=False))
        return self._cache[key]


def _teacher_forced_batch(enc: _Encoder, problems: list[Problem], bare: bool, with_eos: bool,
                          style: str = "restate", variants: list[int] | None = None,
                          targets: list[list[int]] | None = None, unscored_prefix: int = 0):
    """Right-padded (input_ids, attention_mask, labels); labels are -100 outside the response and on its
    first ``unscored_prefix`` tokens. ``variants[i]``: which of ``problems[i].responses(style)`` is the
    target (default the first); ``targets``: explicit response ids instead."""
    import torch

    seqs, labels = [], []
    for i, p in enumerate(problems):
        target = targets[i] if targets is not None else enc.response(p, style, variants[i] if variants else 0)
        prompt, resp = enc.prompt(p, bare), target + ([enc.eos_id] if with_eos else [])
        seqs.append(prompt + resp)
        labels.append([-100] * (len(prompt) + unscored_prefix) + resp[unscored_prefix:])
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), enc.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        lab[i, : len(l)] = torch.tensor(l)
    return ids, mask, lab


def response_probabilities(model, enc: _Encoder, problems: list[Problem], bare: bool = False,
                           batch_size: int = 256, style: str = "restate") -> list[float]:
    """Teacher-forced probability of each problem's full target response (eos excluded); for several
    phrasings (``style``), the sum over them (each is a correct answer: still a lower bound of accuracy);
    for "scratch", of the boxed answer given the problem's fixed scratch (the scratch tokens are free)."""
    count = len(problems[0].responses(style)) if problems else 1
    if count > 1:
        per_variant = [_response_probabilities(model, enc, problems, bare, batch_size, style, v) for v in range(count)]
        return [sum(ps) for ps in zip(*per_variant)]
    return _response_probabilities(model, enc, problems, bare, batch_size, style, 0)


def _response_probabilities(model, enc, problems, bare, batch_size, style, variant) -> list[float]:
    import torch

    out: list[float] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            ids, mask, lab = _teacher_forced_batch(enc, chunk, bare, False, style, [variant] * len(chunk),
                                                   unscored_prefix=SCRATCH_LENGTH if style == "scratch" else 0)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = lab[:, 1:]
            logp = torch.log_softmax(logits, dim=-1)
            tok_lp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            tok_lp = torch.where(target == -100, torch.zeros_like(tok_lp), tok_lp)
            out.extend(torch.exp(tok_lp.sum(-1)).tolist())
    model.train(was_training)
    return out


def warm_start(model, enc: _Encoder, params: TinyAssetsParams, val: list[Problem], log=print) -> dict:
    """Supervised warm start in two phases (bare prompts, then the real prompts); see module docstring."""
    import torch

    rng = random.Random(derive_seed(params.seed, "sft"))
    style_rng = random.Random(derive_seed(params.seed, "sft-style"))  # own stream: "restate" builds unchanged
    n_styles = len(Problem(1, "+", 1).responses(params.response_style))
    torch.manual_seed(derive_seed(params.seed, "sft-torch"))
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    history: list[dict] = []
    step = 0
    t0 = time.perf_counter()

    def run_phase(bare: bool, target: float, max_steps: int, every: int) -> tuple[int, float]:
        nonlocal step
        acc = float("nan")
        for i in range(1, max_steps + 1):
            step += 1
            for group in opt.param_groups:
                group["lr"] = params.lr * min(1.0, step / max(1, params.warmup_steps))
            batch = [sample_problem(rng, params.max_operand) for _ in range(params.batch_size)]
            variants = [style_rng.randrange(n_styles) for _ in batch] if n_styles > 1 else None
            targets = None
            if params.response_style == "scratch":
                letters = ["".join(style_rng.choice(SCRATCH_LETTERS) for _ in range(SCRATCH_LENGTH)) for _ in batch]
                targets = [enc.tok.encode(scratch_response(p, w), add_special_tokens=False) for p, w in zip(batch, letters)]
            ids, mask, lab = _teacher_forced_batch(enc, batch, bare, True, params.response_style, variants, targets)
            loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if i % every == 0 or i == max_steps:
                probs = response_probabilities(model, enc, val, bare=bare, style=params.response_style)
                acc = sum(probs) / len(probs)
                phase = "bare" if bare else "full"
                history.append({"step": step, "phase": phase, "loss": round(loss.item(), 4),
                                "expected_accuracy": round(acc, 4)})
                log(f"  warm start step {step:4d} ({phase}) loss {loss.item():.3f} "
                    f"expected acc {acc:.3f} [{time.perf_counter() - t0:.1f}s]")
                if acc >= target:
                    return i, acc
        return max_steps, acc

    bare_steps, bare_acc = run_phase(True, params.bare_target, params.bare_max_steps, params.bare_eval_every)
    full_steps, full_acc = run_phase(False, params.target_accuracy, params.full_max_steps,
                                     params.full_eval_every)
    model.eval()
    return {
        "bare_steps": bare_steps,
        "bare_expected_accuracy": round(bare_acc, 4),
        "full_steps": full_steps,
        "val_expected_accuracy": round(full_acc, 4),
        "target_reached": bool(full_acc >= params.target_accuracy),
        "seconds": round(time.perf_counter() - t0, 2),
        "history": history,
    }


def sampled_accuracy(model, tok, rows: list[dict], *, temperature: float = 1.0, max_new_tokens: int = 32,
                     seed: int = 0, batch_size: int = 128) -> tuple[float, list[str]]:
    """Sample one response per row (temperature, top_p 1, no top-k) with HF generate; (accuracy, texts).

    `rows` are verl rows (prompt messages + reward_model.ground_truth). The caller's torch RNG state
    is left untouched."""
    import torch

    eos_id, pad_id = tok.convert_tokens_to_ids(EOS_TOKEN), tok.convert_tokens_to_ids(PAD_TOKEN)
    texts: list[str] = []
    correct = 0.0
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            prompts = [
                _token_ids(tok.apply_chat_template(list(r["prompt"]), add_generation_prompt=True, tokenize=True))
                for r in chunk
            ]
            width = max(map(len, prompts))
            ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):  # left padding for generation
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_p=1.0,
                top_k=0, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
            )
            for r, seq in zip(chunk, out[:, width:]):
                text = tok.decode(seq, skip_special_tokens=True)
                texts.append(text)
                correct += score_response(text, r["reward_model"]["ground_truth"])
    return correct / max(1, len(rows)), texts


# ----------------------------------------------------------------------------------------------------
# build + cache


def default_cache_root() -> Path:
    """$BAPO_TINY_ASSETS_CACHE, else <repo>/.cache/tiny_assets (repo: the checkout holding recipe/)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "tiny_assets"
    return Path.home() / ".cache" / "bapo-verl" / "tiny_assets"


@contextlib.contextmanager
def _build_environment(n_threads: int):
    """Fixed torch intra-op threads (determinism), caller's RNG state kept, no HF progress bars."""
    import torch
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    bars = hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(n_threads)
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def _valid_build(root: Path, key: str | None) -> bool:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if key is not None and manifest.get("key") != key:
        return False
    files = manifest.get("files")
    if not files:
        return False
    try:
        return all((root / rel).stat().st_size == size for rel, size in files.items())
    except OSError:
        return False


def _ceil_to(x: int, multiple: int) -> int:
    return multiple * math.ceil(x / multiple)


def _write_files(tmp: Path, params: TinyAssetsParams, log) -> dict:
    """Build everything into `tmp`; returns the manifest (also written there, last)."""
    import pandas as pd
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model_dir, data_dir = tmp / MODEL_SUBDIR, tmp / DATA_SUBDIR
    model_dir.mkdir(parents=True)
    data_dir.mkdir(parents=True)

    tok = build_tokenizer(model_dir, model_max_length=params.max_position_embeddings)
    enc = _Encoder(tok)

    splits = {}
    for split, n in (("train", params.n_train), ("test", params.n_test)):
        rng = random.Random(derive_seed(params.seed, f"data-{split}"))
        splits[split] = [verl_row(sample_problem(rng, params.max_operand), split, i) for i in range(n)]
        pd.DataFrame(splits[split]).to_parquet(data_dir / f"{split}.parquet", index=False)
    val_rng = random.Random(derive_seed(params.seed, "val"))
    val = [sample_problem(val_rng, params.max_operand) for _ in range(params.n_val)]

    model = build_model(params, tok)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny assets: {n_params} parameters, {params.n_train} train / {params.n_test} test problems")
    ws = warm_start(model, enc, params, val, log=log)
    model.save_pretrained(model_dir)

    # check the artefact as a consumer loads it
    tok2 = AutoTokenizer.from_pretrained(model_dir)
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    test_problems = [Problem(r["extra_info"]["a"], r["extra_info"]["op"], r["extra_info"]["b"])
                     for r in splits["test"]]
    test_probs = response_probabilities(loaded, _Encoder(tok2), test_problems, style=params.response_style)
    acc, texts = sampled_accuracy(loaded, tok2, splits["test"], max_new_tokens=params.eval_max_new_tokens,
                                  seed=derive_seed(params.seed, "eval"))
    by_op = {}
    for op in OPS:
        idx = [i for i, p in enumerate(test_problems) if p.op == op]
        by_op[op] = round(sum(score_response(texts[i], test_problems[i].answer) for i in idx) / max(1, len(idx)), 4)

    prompt_lens = [len(chat_prompt_ids(tok2, r["prompt"][0]["content"])) for r in splits["train"] + splits["test"]]
    resp_lens = [max(len(enc.response(p, params.response_style, v)) for v in range(len(p.responses(params.response_style)))) + 1
                 for p in test_problems]  # longest phrasing + eos
    sampled_lens = [len(tok2.encode(t, add_special_tokens=False)) for t in texts]
    files = {}
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(tmp))] = path.stat().st_size
    manifest = {
        "version": VERSION,
        "key": params.key(),
        "params": dataclasses.asdict(params),
        "data_source": DATA_SOURCE,
        "accuracy": round(acc, 4),
        "accuracy_by_op": by_op,
        "accuracy_setting": {"temperature": 1.0, "top_p": 1.0, "top_k": None, "split": "test",
                             "max_new_tokens": params.eval_max_new_tokens, "scorer": "last \\boxed{int}"},
        "expected_accuracy": round(sum(test_probs) / len(test_probs), 4),
        "fraction_test_prompts_mixed": round(sum(0.1 <= p <= 0.9 for p in test_probs) / len(test_probs), 4),
        "warm_start": ws,
        "n_params": n_params,
        "sizes": {"n_train": params.n_train, "n_test": params.n_test, "files": files,
                  "model_bytes": sum(v for k, v in files.items() if k.startswith(MODEL_SUBDIR + "/"))},
        "lengths": {
            "max_prompt_tokens": max(prompt_lens),
            "max_target_response_tokens": max(resp_lens),
            "mean_sampled_response_tokens": round(sum(sampled_lens) / max(1, len(sampled_lens)), 2),
        },
        "recommended": {
            "data.max_prompt_length": _ceil_to(max(prompt_lens), 16),
            "data.max_response_length": _ceil_to(max(resp_lens) + 8, 16),
        },
        "files": files,
        "sample_responses": texts[:8],
        "build_seconds": round(time.perf_counter() - t0, 2),
        "build_threads": BUILD_THREADS,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def build_tiny_assets(out_dir: str | os.PathLike | None = None, seed: int = 0, *, force: bool = False,
                      cache_root: str | os.PathLike | None = None, verbose: bool = False,
                      **overrides: Any) -> TinyAssets:
    """Build (or return the cached build of) the tiny assets.

    out_dir: where the build lives; default `<cache_root>/<key>` (cache_root default
        `default_cache_root()`). A directory that already holds a build with the same key is
        returned as is (`from_cache=True`); one holding anything else is an error unless `force`.
    seed: seeds every random stream (data, init, warm start, accuracy sampling).
    force: rebuild even when a matching build exists (replaces it).
    overrides: any other `TinyAssetsParams` field (e.g. n_train=64, bare_max_steps=10); all of them
        enter the cache key.
    """
    params = TinyAssetsParams(seed=seed, **overrides)
    if params.response_style not in RESPONSE_STYLES:
        raise ValueError(f"tiny assets: response_style={params.response_style!r} is invalid; valid: {', '.join(RESPONSE_STYLES)}")
    key = params.key()
    target = Path(out_dir) if out_dir is not None else Path(cache_root or default_cache_root()) / key
    target = target.expanduser().resolve()
    if not force and _valid_build(target, key):
        return TinyAssets.from_dir(target, from_cache=True)
    if target.exists() and not force and any(target.iterdir()):
        raise FileExistsError(
            f"{target} exists and holds no tiny-assets build with key {key}; use another directory or force=True"
        )
    log = (lambda msg: print(msg, flush=True)) if verbose else logger.info

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _build_environment(BUILD_THREADS):
            _write_files(tmp, params, log)
        _install(tmp, target, key, replace=force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    assets = TinyAssets.from_dir(target, from_cache=False)
    log(f"tiny assets in {target}: accuracy {assets.accuracy:.3f} "
        f"(build {assets.manifest['build_seconds']:.1f}s)")
    return assets


def _install(tmp: Path, target: Path, key: str, replace: bool) -> None:
    """Move the finished build `tmp` to `target` atomically (rename)."""
    old = None
    if target.exists():
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        elif _valid_build(target, key) and not replace:
            return  # a concurrent build of the same key won the race; keep it
        else:
            old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        if not _valid_build(target, key):  # lost a race to a concurrent build: fine if it is the same
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


RESOLVER = "tiny_assets"


def register_resolver() -> None:
    """OmegaConf resolver `${tiny_assets:FIELD}` (model_dir, train_file, test_file, ...): the default
    build's path, built on first use (cached); `${tiny_assets:FIELD,STYLE}` the build with
    `response_style=STYLE`. configs/cpu_tiny.yaml uses it, so a laptop run needs no paths. Registered by
    the project's verl plugin."""
    from omegaconf import OmegaConf

    def resolve(field: str, style: str = "restate") -> str:
        if field not in TinyAssets.__dataclass_fields__:
            raise ValueError(f"${{{RESOLVER}:{field}}}: unknown field; valid: {sorted(TinyAssets.__dataclass_fields__)}")
        return str(getattr(build_tiny_assets(verbose=True, response_style=style), field))

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, resolve)


# ----------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe.data.tiny_assets", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None,
                        help="output directory (default: the cache, <repo>/.cache/tiny_assets/<key>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    assets = build_tiny_assets(args.out, seed=args.seed, force=args.force, verbose=not args.quiet)
    m = assets.manifest
    print(json.dumps({
        "root": str(assets.root),
        "model_dir": str(assets.model_dir),
        "train_file": str(assets.train_file),
        "test_file": str(assets.test_file),
        "from_cache": assets.from_cache,
        "accuracy": assets.accuracy,
        "expected_accuracy": assets.expected_accuracy,
        "n_params": m["n_params"],
        "recommended": m["recommended"],
        "build_seconds": m["build_seconds"],
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
