"""The supervised warm start of the tiny model (two phases, plain PyTorch) and the accuracy measures of a
build: teacher-forced probability of the target response, and sampled accuracy. See the package docstring."""

from __future__ import annotations

import random
import statistics
import time
from typing import TYPE_CHECKING

from recipe.data.templates import math_prompt

from .model import EOS_TOKEN, PAD_TOKEN, _token_ids, chat_prompt_ids
from .task import (RAMBLE_EVAL_EVERY, RAMBLE_LENGTH, RAMBLE_FRACTION, RAMBLE_STEPS, SCRATCH_LENGTH, SCRATCH_LETTERS, Problem, derive_seed,
                   ramble_response, sample_problem, score_response, scratch_response, wrong_first_digits)

if TYPE_CHECKING:
    from .cache import TinyAssetsParams


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


def _teacher_forced_batch(enc: _Encoder, problems: list[Problem], bare: bool, with_eos: bool | list[bool],
                          style: str = "restate", variants: list[int] | None = None,
                          targets: list[list[int]] | None = None, unscored_prefix: int = 0):
    """Right-padded (input_ids, attention_mask, labels); labels are -100 outside the response and on its
    first ``unscored_prefix`` tokens. ``variants[i]``: which of ``problems[i].responses(style)`` is the
    target (default the first); ``targets``: explicit response ids instead. ``with_eos``: append eos to every
    response, or per response (a list: a ramble is cut off, it has no end)."""
    import torch

    seqs, labels = [], []
    for i, p in enumerate(problems):
        target = targets[i] if targets is not None else enc.response(p, style, variants[i] if variants else 0)
        eos = with_eos[i] if isinstance(with_eos, list) else with_eos
        prompt, resp = enc.prompt(p, bare), target + ([enc.eos_id] if eos else [])
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


def _train_step(model, opt, ids, mask, lab):
    """One AdamW step on the teacher-forced loss (gradient norm clipped to 1); returns the loss."""
    import torch

    loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


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
            loss = _train_step(model, opt, *_teacher_forced_batch(enc, batch, bare, True, params.response_style, variants, targets))
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


def ramble_probabilities(model, enc: _Encoder, problems: list[Problem]) -> tuple[list[float], list[float]]:
    """Per problem, the probability that the model rambles (the next token is a letter) after the restated
    "a op b=" and a first answer digit: (mean over the nine wrong first digits, after the right one); teacher
    forced, real prompt."""
    import torch

    letters = [enc.tok.convert_tokens_to_ids(c) for c in SCRATCH_LETTERS]
    heads = [enc.prompt(p) + enc.tok.encode(f"{p.a}{p.op}{p.b}={d}", add_special_tokens=False)
             for p in problems for d in [str(p.answer)[0], *wrong_first_digits(p)]]
    width = max(map(len, heads))
    ids = torch.full((len(heads), width), enc.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, h in enumerate(heads):  # left padding: the branch is the last position of every row
        ids[i, width - len(h):], mask[i, width - len(h):] = torch.tensor(h), 1
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    model.train(was_training)
    ramble = torch.softmax(logits, -1)[:, letters].sum(-1).view(len(problems), 10)
    return ramble[:, 1:].mean(-1).tolist(), ramble[:, 0].tolist()


def ramble_phase(model, enc: _Encoder, params: TinyAssetsParams, val: list[Problem], log=print) -> dict:
    """Teach a warm-started "restate" model to ramble after a wrong first digit: RAMBLE_STEPS AdamW steps (real
    prompts) on answers mixed with rambles (RAMBLE_FRACTION of the examples: "7*8=" + a wrong first digit, not
    scored, + RAMBLE_LENGTH fresh letters, no eos: it is cut off). A fixed step count (no accuracy target)."""
    import torch

    rng = random.Random(derive_seed(params.seed, "ramble"))
    torch.manual_seed(derive_seed(params.seed, "ramble-torch"))
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    history: list[dict] = []
    t0 = time.perf_counter()
    for step in range(1, RAMBLE_STEPS + 1):
        for group in opt.param_groups:
            group["lr"] = params.lr * min(1.0, step / max(1, params.warmup_steps))
        batch = [sample_problem(rng, params.max_operand) for _ in range(params.batch_size)]
        texts = [ramble_response(p, rng.choice(wrong_first_digits(p)), "".join(rng.choices(SCRATCH_LETTERS, k=RAMBLE_LENGTH)))
                 if rng.random() < RAMBLE_FRACTION else p.response for p in batch]
        targets = [enc.tok.encode(t, add_special_tokens=False) for t in texts]
        with_eos = [t == p.response for t, p in zip(texts, batch)]  # the answer ends; a ramble is cut off
        ids, mask, lab = _teacher_forced_batch(enc, batch, False, with_eos, targets=targets)
        for i, (p, ends) in enumerate(zip(batch, with_eos)):
            if not ends:  # the wrong digit is given, not taught: its position is len(prompt) + len("7*8=")
                lab[i, len(enc.prompt(p)) + len(f"{p.a}{p.op}{p.b}=")] = -100
        loss = _train_step(model, opt, ids, mask, lab)
        if step % RAMBLE_EVAL_EVERY == 0 or step == RAMBLE_STEPS:
            acc = statistics.fmean(response_probabilities(model, enc, val, style="ramble"))
            after_wrong, after_right = ramble_probabilities(model, enc, val)
            ramble = {"after_wrong_digit": round(statistics.fmean(after_wrong), 4),
                      "after_right_digit": round(statistics.fmean(after_right), 4)}
            history.append({"step": step, "loss": round(loss.item(), 4), "expected_accuracy": round(acc, 4),
                            "ramble_probability": ramble})
            log(f"  ramble step {step:4d} loss {loss.item():.3f} expected acc {acc:.3f} "
                f"P(ramble) {ramble} [{time.perf_counter() - t0:.1f}s]")
    model.eval()
    return {"steps": RAMBLE_STEPS, "seconds": round(time.perf_counter() - t0, 2), "history": history,
            "val_expected_accuracy": history[-1]["expected_accuracy"],
            "val_ramble_probability": history[-1]["ramble_probability"]}


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
