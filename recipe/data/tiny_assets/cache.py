"""What a build is and where it lives: the parameters hashed into the cache key, a finished build read from its
manifest, the cache root, and the checks and the atomic rename that keep a cache entry whole."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from recipe.data.templates import math_prompt

# Bump when anything that changes the built files changes (generator, tokenizer, training loop...).
VERSION = "1"
CACHE_ENV = "BAPO_TINY_ASSETS_CACHE"
MANIFEST = "manifest.json"
MODEL_SUBDIR = "model"
DATA_SUBDIR = "data"


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
        fields = {"version": VERSION, "prompt_template": math_prompt("{problem}"), **dataclasses.asdict(self)}
        if self.response_style == "ramble":  # only here, so the other styles keep their keys
            from .task import RAMBLE_EVAL_EVERY, RAMBLE_FRACTION, RAMBLE_LENGTH, RAMBLE_STEPS

            fields["ramble"] = [RAMBLE_FRACTION, RAMBLE_LENGTH, RAMBLE_STEPS, RAMBLE_EVAL_EVERY]
        blob = json.dumps(fields, sort_keys=True)
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

def default_cache_root() -> Path:
    """$BAPO_TINY_ASSETS_CACHE, else <repo>/.cache/tiny_assets (repo: the checkout holding recipe/)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[3]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "tiny_assets"
    return Path.home() / ".cache" / "bapo-verl" / "tiny_assets"



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
