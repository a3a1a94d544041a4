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
  * "ramble": the "restate" model taught to ramble after a wrong first digit ("7*8=4qzkf..." with no answer,
    cut off by the length limit), so its own errors become long responses: the paper's precondition (negative
    tokens dominate) for configs/regime/cpu_imbalance.yaml. Built from the "restate" build of the same
    parameters (cached beside it) by a short extra phase (`training.ramble_phase`), not from scratch.
The stress regimes (configs/regime/cpu_stress_{varied,scratch}.yaml) use "varied" and "scratch"; every style is its
own build (the style is part of the cache key; `${tiny_assets:FIELD,STYLE}` in configs).

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

Modules: `task` (problems, rows, reward), `model` (tokenizer, Qwen2 model), `training` (warm start, accuracy
measures), `cache` (parameters and cache key, manifest, cache folder), `build` (the build and the config
resolver), `cli` (`python -m recipe.data.tiny_assets`). Everything public is importable from this package
(`from recipe.data.tiny_assets import build_tiny_assets`).
"""

from .build import BUILD_THREADS, RESOLVER, build_tiny_assets, register_resolver
from .cache import (CACHE_ENV, DATA_SUBDIR, MANIFEST, MODEL_SUBDIR, VERSION, TinyAssets, TinyAssetsParams,
                    default_cache_root)
from .cli import main
from .model import (CHATML_TEMPLATE, EOS_TOKEN, PAD_TOKEN, START_TOKEN, build_model, build_tokenizer, chat_prompt_ids,
                    qwen2_model)
from .task import (DATA_SOURCE, OPS, RESPONSE_STYLES, SCRATCH_LENGTH, SCRATCH_LETTERS, Problem, derive_seed,
                   sample_problem, score_response, scratch_response, verl_row, ramble_response, wrong_first_digits)
from .training import ramble_phase, ramble_probabilities, response_probabilities, sampled_accuracy, warm_start
