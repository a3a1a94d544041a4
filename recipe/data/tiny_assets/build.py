"""Building the tiny assets: every file of a build written into a temporary folder (data, tokenizer, warm-started
model, manifest) and renamed into the cache; the `${tiny_assets:FIELD}` config resolver."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from .cache import (DATA_SUBDIR, MANIFEST, MODEL_SUBDIR, VERSION, TinyAssets, TinyAssetsParams, _install, _valid_build,
                    default_cache_root)
from .model import build_model, build_tokenizer, chat_prompt_ids
from .task import DATA_SOURCE, OPS, RAMBLE_LIMIT, RESPONSE_STYLES, Problem, derive_seed, sample_problem, score_response, verl_row
from .training import _Encoder, ramble_phase, response_probabilities, sampled_accuracy, warm_start

logger = logging.getLogger("bapo_verl.tiny_assets")

BUILD_THREADS = 2


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

    if params.response_style == "ramble":  # the "restate" build of the same parameters, then the ramble phase
        base = build_tiny_assets(tmp.parent / dataclasses.replace(params, response_style="restate").key(),
                                 **{**dataclasses.asdict(params), "response_style": "restate"})
        model = AutoModelForCausalLM.from_pretrained(base.model_dir, dtype=torch.float32)
        log(f"tiny assets: ramble phase on the restate build {base.root}")
        ws = {"base": {"key": base.manifest["key"], "accuracy": base.accuracy, "warm_start": base.manifest["warm_start"]},
              "ramble": ramble_phase(model, enc, params, val, log=log)}
    else:
        model = build_model(params, tok)
        ws = warm_start(model, enc, params, val, log=log)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny assets: {n_params} parameters, {params.n_train} train / {params.n_test} test problems")
    model.save_pretrained(model_dir)

    # check the artefact as a consumer loads it
    tok2 = AutoTokenizer.from_pretrained(model_dir)
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    test_problems = [Problem(r["extra_info"]["a"], r["extra_info"]["op"], r["extra_info"]["b"])
                     for r in splits["test"]]
    test_probs = response_probabilities(loaded, _Encoder(tok2), test_problems, style=params.response_style)
    # a ramble build is sampled at the limit its runs use (a ramble's length is that limit)
    eval_tokens = RAMBLE_LIMIT if params.response_style == "ramble" else params.eval_max_new_tokens
    acc, texts = sampled_accuracy(loaded, tok2, splits["test"], max_new_tokens=eval_tokens,
                                  seed=derive_seed(params.seed, "eval"))
    by_op = {}
    for op in OPS:
        idx = [i for i, p in enumerate(test_problems) if p.op == op]
        by_op[op] = round(sum(score_response(texts[i], test_problems[i].answer) for i in idx) / max(1, len(idx)), 4)

    prompt_lens = [len(chat_prompt_ids(tok2, r["prompt"][0]["content"])) for r in splits["train"] + splits["test"]]
    resp_lens = [max(len(enc.response(p, params.response_style, v)) for v in range(len(p.responses(params.response_style)))) + 1
                 for p in test_problems]  # longest phrasing + eos
    sampled_lens = [len(tok2.encode(t, add_special_tokens=False)) for t in texts]
    right = [score_response(t, p.answer) for t, p in zip(texts, test_problems)]

    def mean_length(outcome: float) -> float | None:
        lens = [n for n, r in zip(sampled_lens, right) if r == outcome]
        return round(sum(lens) / len(lens), 2) if lens else None
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
                             "max_new_tokens": eval_tokens, "scorer": "last \\boxed{int}"},
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
            "mean_sampled_response_tokens_right": mean_length(1.0),
            "mean_sampled_response_tokens_wrong": mean_length(0.0),
        },
        "recommended": {
            "data.max_prompt_length": _ceil_to(max(prompt_lens), 16),
            "data.max_response_length": RAMBLE_LIMIT if params.response_style == "ramble" else _ceil_to(max(resp_lens) + 8, 16),
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
