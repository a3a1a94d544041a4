"""Tiny local training assets (recipe/data/tiny_assets/): tokenizer, verl parquet, warm-started model.

The default build is made once per session (or taken from <repo>/.cache/tiny_assets, ~40 s when
built on 2 cores). The determinism test builds twice with a reduced configuration (few warm-start
steps, small splits) because two full builds would double the file's run time; the code path is the
same.
"""

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from recipe.data import tiny_assets as ta
from recipe.data.templates import MATH_INSTRUCTION, math_prompt

# Reduced build for tests that need fresh builds (determinism, atomicity): seconds, not the default.
SMALL = dict(n_train=48, n_test=16, n_val=32, bare_max_steps=30, bare_eval_every=10,
             full_max_steps=10, full_eval_every=5, eval_max_new_tokens=24)


@pytest.fixture(scope="module")
def assets():
    return ta.build_tiny_assets()


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.model_dir)


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_single_token_newline():
    tok = ta.build_tokenizer()
    for text in ["Compute 7*8.\n", "7*8=56 \\boxed{56}", "héllo wörld ∑ 😀", "\n\n  tabs\tand spaces "]:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text.encode("utf-8"))  # one token per byte, no merges
        assert tok.decode(ids) == text
    assert tok.encode("\n", add_special_tokens=False) == [tok.encode("\n", add_special_tokens=False)[0]]
    assert len(tok.encode("\n", add_special_tokens=False)) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert len({tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("<|im_start|>")}) == 3
    assert min(tok.eos_token_id, tok.pad_token_id) >= 256


def test_chat_template_output():
    tok = ta.build_tokenizer()
    messages = [{"role": "user", "content": math_prompt("Compute 7*8.")}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>user\nCompute 7*8.\n" + MATH_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = ta.chat_prompt_ids(tok, messages[0]["content"])
    assert tok.decode(ids) == text
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_saved_tokenizer_reloads_as_qwen2_with_same_ids(assets, tokenizer):
    from transformers import Qwen2Tokenizer

    fresh = ta.build_tokenizer()
    assert type(tokenizer) is Qwen2Tokenizer
    assert len(tokenizer) == len(fresh) == 259
    for text in ["Compute 3+4.\n", "3+4=7 \\boxed{7}", "é😀\n"]:
        assert tokenizer.encode(text, add_special_tokens=False) == fresh.encode(text, add_special_tokens=False)
    content = math_prompt("Compute 3+4.")
    assert ta.chat_prompt_ids(tokenizer, content) == ta.chat_prompt_ids(fresh, content)
    assert tokenizer.eos_token_id == fresh.eos_token_id and tokenizer.pad_token_id == fresh.pad_token_id
    assert len(tokenizer.encode("\n", add_special_tokens=False)) == 1


def test_model_config(assets, tokenizer):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(assets.model_dir)
    assert cfg.model_type == "qwen2"
    assert cfg.vocab_size == len(tokenizer)  # else rollout (vLLM) and actor log-probs normalise differently
    assert cfg.eos_token_id == tokenizer.eos_token_id and cfg.pad_token_id == tokenizer.pad_token_id
    assert cfg.tie_word_embeddings
    assert 1e5 < assets.manifest["n_params"] < 2e6


# ---------------------------------------------------------------------------------------------- data


def test_parquet_schema(assets):
    for path, split, n in ((assets.train_file, "train", 1024), (assets.test_file, "test", 128)):
        df = pd.read_parquet(path)
        assert list(df.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
        assert len(df) == n
        for i, row in enumerate(df.to_dict("records")):
            assert row["data_source"] == ta.DATA_SOURCE and row["ability"] == "math"
            (msg,) = list(row["prompt"])
            info = row["extra_info"]
            assert msg == {"role": "user", "content": math_prompt(info["problem"])}
            assert info["split"] == split and info["index"] == i
            problem = ta.Problem(int(info["a"]), info["op"], int(info["b"]))
            assert problem.text == info["problem"]
            assert row["reward_model"] == {"style": "rule", "ground_truth": str(problem.answer)}
            assert 0 <= problem.answer <= 999


def test_parquet_loads_with_verl_rlhf_dataset(assets, tokenizer, tmp_path):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    max_len = assets.max_prompt_length
    assert assets.manifest["lengths"]["max_prompt_tokens"] <= max_len
    config = OmegaConf.create({
        "prompt_key": "prompt", "max_prompt_length": max_len, "filter_overlong_prompts": True,
        "filter_overlong_prompts_workers": 1, "truncation": "error", "cache_dir": str(tmp_path),
    })
    for path in (assets.train_file, assets.test_file):
        ds = RLHFDataset(data_files=str(path), tokenizer=tokenizer, config=config)
        assert len(ds) == len(pd.read_parquet(path))  # nothing filtered as overlong
        item = ds[3]
        assert item["raw_prompt"][0]["role"] == "user"
        assert item["raw_prompt"][0]["content"].endswith(MATH_INSTRUCTION)
        assert item["index"] == 3 and item["data_source"] == ta.DATA_SOURCE
        lens = [len(ta.chat_prompt_ids(tokenizer, ds[i]["raw_prompt"][0]["content"])) for i in range(len(ds))]
        assert max(lens) <= max_len
    # prompt + target response fit the recommended lengths
    assert assets.manifest["lengths"]["max_target_response_tokens"] <= assets.max_response_length
    assert max_len + assets.max_response_length <= 160


# ---------------------------------------------------------------------------------------------- accuracy


def test_default_build_accuracy_in_band(assets, tokenizer):
    """Sampled (temperature 1, top_p 1) accuracy on the test split, measured here with our own seed and
    scored with the project's reward, which must agree with the assets' own scorer on every sample."""
    from transformers import AutoModelForCausalLM

    from recipe.reward.aime import compute_score

    def score(text, gt):
        return compute_score(ta.DATA_SOURCE, text, gt, use_math_verify=False)["score"]

    model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32)
    rows = pd.read_parquet(assets.test_file).to_dict("records")
    rng_before = torch.random.get_rng_state()
    _, texts = ta.sampled_accuracy(model, tokenizer, rows, temperature=1.0, seed=12345,
                                   max_new_tokens=assets.max_response_length)
    assert torch.equal(rng_before, torch.random.get_rng_state())  # caller's RNG untouched
    scores = [score(t, r["reward_model"]["ground_truth"]) for t, r in zip(texts, rows)]
    assert scores == [ta.score_response(t, r["reward_model"]["ground_truth"]) for t, r in zip(texts, rows)]
    acc = sum(scores) / len(scores)
    assert 0.2 <= acc <= 0.6, (acc, texts[:10])
    assert 0.2 <= assets.accuracy <= 0.6
    assert assets.manifest["warm_start"]["target_reached"]


# ---------------------------------------------------------------------------------------------- build


def _file_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ta.MANIFEST}


@pytest.mark.slow
def test_same_seed_gives_identical_files(tmp_path):
    a = ta.build_tiny_assets(tmp_path / "a", seed=7, **SMALL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the caller's thread setting must not matter (the build fixes its own)
    try:
        b = ta.build_tiny_assets(tmp_path / "b", seed=7, **SMALL)
    finally:
        torch.set_num_threads(threads)
    c = ta.build_tiny_assets(tmp_path / "c", seed=8, **SMALL)
    assert not a.from_cache and not b.from_cache
    fa, fb, fc = _file_bytes(a.root), _file_bytes(b.root), _file_bytes(c.root)
    assert set(fa) == {"data/train.parquet", "data/test.parquet", "model/config.json",
                       "model/generation_config.json", "model/model.safetensors", "model/tokenizer.json",
                       "model/tokenizer_config.json", "model/chat_template.jinja"}
    assert fa == fb  # parquet, tokenizer, config and weights byte for byte
    timing_free = lambda m: {k: v for k, v in m["warm_start"].items() if k != "seconds"}  # noqa: E731
    assert a.accuracy == b.accuracy and timing_free(a.manifest) == timing_free(b.manifest)
    assert fa["data/train.parquet"] != fc["data/train.parquet"]
    assert fa["model/model.safetensors"] != fc["model/model.safetensors"]


def test_cache_hit_does_not_rebuild(assets):
    manifest = assets.root / ta.MANIFEST
    mtime = manifest.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = ta.build_tiny_assets()
    assert time.perf_counter() - t0 < 2.0
    assert again.from_cache and again.root == assets.root
    assert manifest.stat().st_mtime_ns == mtime
    assert assets.root.name == ta.TinyAssetsParams().key()
    assert json.loads(manifest.read_text())["key"] == assets.root.name


@pytest.mark.slow
def test_explicit_dir_cache_and_foreign_dir(tmp_path):
    first = ta.build_tiny_assets(tmp_path / "x", seed=1, **SMALL)
    again = ta.build_tiny_assets(tmp_path / "x", seed=1, **SMALL)
    assert again.from_cache and again.manifest == first.manifest
    with pytest.raises(FileExistsError):  # same dir, other parameters
        ta.build_tiny_assets(tmp_path / "x", seed=2, **SMALL)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ta.build_tiny_assets(tmp_path / "foreign", seed=1, **SMALL)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_aborted_build_leaves_nothing(tmp_path, monkeypatch):
    real = ta.build._write_files

    def crash(tmp, params, log):
        real(tmp, params, log)
        raise KeyboardInterrupt  # after everything was written into the temporary directory

    monkeypatch.setattr(ta.build, "_write_files", crash)
    threads = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        ta.build_tiny_assets(cache_root=tmp_path, seed=3, **SMALL)
    assert list(tmp_path.iterdir()) == []
    assert torch.get_num_threads() == threads


def test_cli_returns_cached_build(assets, capsys):
    assert ta.main(["--out", str(assets.root), "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["from_cache"] is True and out["model_dir"] == str(assets.model_dir)
    assert out["recommended"] == {"data.max_prompt_length": assets.max_prompt_length,
                                  "data.max_response_length": assets.max_response_length}


def test_default_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv(ta.CACHE_ENV, str(tmp_path))
    assert ta.default_cache_root() == tmp_path
    monkeypatch.delenv(ta.CACHE_ENV)
    assert ta.default_cache_root() == Path(__file__).resolve().parents[1] / ".cache" / "tiny_assets"


# ---------------------------------------------------------------------------------------------- varied phrasings


def test_every_varied_phrasing_is_scored_correct_by_the_reward_and_only_with_the_right_answer():
    from recipe.reward.aime import compute_score

    rng = __import__("random").Random(0)
    for _ in range(50):
        problem = ta.sample_problem(rng)
        for text in problem.responses("varied"):
            assert compute_score(ta.DATA_SOURCE, text, str(problem.answer), use_math_verify=False)["score"] == 1.0
            wrong = text.replace(f"\\boxed{{{problem.answer}}}", f"\\boxed{{{problem.answer + 1}}}")
            assert compute_score(ta.DATA_SOURCE, wrong, str(problem.answer), use_math_verify=False)["score"] == 0.0


@pytest.mark.slow
def test_varied_expected_accuracy_is_the_sum_over_phrasings(tmp_path):
    """Against a direct teacher-forced computation: chat prompt + phrasing, HF forward, product of the
    phrasing's token probabilities, summed over the five phrasings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built = ta.build_tiny_assets(tmp_path / "v", seed=3, response_style="varied", **SMALL)
    assert built.manifest["params"]["response_style"] == "varied"
    assert built.root.name != ta.TinyAssetsParams(seed=3, **SMALL).key()  # the style is in the cache key
    tok = AutoTokenizer.from_pretrained(built.model_dir)
    model = AutoModelForCausalLM.from_pretrained(built.model_dir, dtype=torch.float32).eval()
    problems = [ta.Problem(7, "*", 8), ta.Problem(9, "-", 2), ta.Problem(3, "+", 4)]
    expected = []
    for problem in problems:
        total = 0.0
        for text in problem.responses("varied"):
            prompt = ta.chat_prompt_ids(tok, math_prompt(problem.text))
            response = tok.encode(text, add_special_tokens=False)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
            total += float(torch.exp(logp[torch.arange(len(response)), torch.tensor(response)].sum()))
        expected.append(total)
    got = ta.response_probabilities(model, ta.training._Encoder(tok), problems, style="varied")
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-12)
    restate = ta.response_probabilities(model, ta.training._Encoder(tok), problems)
    assert all(r < g for r, g in zip(restate, got))  # one phrasing is a strict part of the sum


def test_an_unknown_response_style_is_rejected_before_building(tmp_path):
    with pytest.raises(ValueError, match="response_style='free' is invalid; valid: restate, varied"):
        ta.build_tiny_assets(tmp_path / "x", response_style="free", **SMALL)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_scratch_expected_accuracy_scores_the_answer_given_the_fixed_scratch(tmp_path):
    """Direct computation: P(" \\boxed{x}" tokens | prompt + the problem's fixed scratch letters)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built = ta.build_tiny_assets(tmp_path / "s", seed=3, response_style="scratch", **SMALL)
    tok = AutoTokenizer.from_pretrained(built.model_dir)
    model = AutoModelForCausalLM.from_pretrained(built.model_dir, dtype=torch.float32).eval()
    problems = [ta.Problem(7, "*", 8), ta.Problem(9, "-", 2)]
    expected = []
    for problem in problems:
        (text,) = problem.responses("scratch")
        letters, answer = text.split(" ", 1)
        assert len(letters) == ta.SCRATCH_LENGTH and letters.isalpha() and answer == f"\\boxed{{{problem.answer}}}"
        prompt = ta.chat_prompt_ids(tok, math_prompt(problem.text)) + tok.encode(letters, add_special_tokens=False)
        suffix = tok.encode(" " + answer, add_special_tokens=False)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + suffix])).logits[0].float()
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        expected.append(float(torch.exp(logp[torch.arange(len(suffix)), torch.tensor(suffix)].sum())))
    got = ta.response_probabilities(model, ta.training._Encoder(tok), problems, style="scratch")
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-12)
    assert problems[0].responses("scratch") == ta.Problem(7, "*", 8).responses("scratch")  # fixed per problem
