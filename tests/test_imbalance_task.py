"""The "ramble" tiny task of the imbalance regime (issue 22): wrong responses are longer than right ones.

The length claim is the one the calibration states (docs/study_cpu_imbalance/calibration/claim.json, measured
from the trainer's rollouts on vLLM); here it is checked on fresh samples of the built model (HF generate,
temperature 1, at the regime's length limit), scored with the project's reward.
"""

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from recipe.data import tiny_assets as ta

REPO = Path(__file__).resolve().parents[1]
CLAIM = REPO / "docs" / "study_cpu_imbalance" / "calibration" / "claim.json"
REGIME = REPO / "configs" / "regime" / "cpu_imbalance.yaml"

pytestmark = pytest.mark.slow  # builds the ramble assets (~80 s on 2 cores, on top of the default build)


@pytest.fixture(scope="module")
def ramble():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = ta.build_tiny_assets(response_style="ramble")
    return (assets, AutoTokenizer.from_pretrained(assets.model_dir),
            AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32))


def test_wrong_responses_are_longer_by_the_calibrated_factor(ramble):
    from recipe.reward.aime import compute_score

    assets, tok, model = ramble
    limit = yaml.safe_load(REGIME.read_text())["data"]["max_response_length"]
    rows = pd.read_parquet(assets.train_file).to_dict("records")[:512]
    _, texts = ta.sampled_accuracy(model, tok, rows, seed=2026, max_new_tokens=limit)
    lengths = {1.0: [], 0.0: []}
    for text, row in zip(texts, rows):
        score = compute_score(ta.DATA_SOURCE, text, row["reward_model"]["ground_truth"], use_math_verify=False)["score"]
        n_tokens = len(tok.encode(text, add_special_tokens=False)) + (not _cut_off(tok, text, limit))  # + eos
        lengths[float(score)].append(n_tokens)
    ratio = statistics.fmean(lengths[0.0]) / statistics.fmean(lengths[1.0])
    claim = json.loads(CLAIM.read_text())["wrong_over_right_length_min"]
    assert ratio >= claim, (ratio, claim, {k: statistics.fmean(v) for k, v in lengths.items()})
    # the ramble is where the length comes from: cut-off responses are wrong, and they are common
    cut = [_cut_off(tok, t, limit) for t in texts]
    assert 0.1 <= statistics.fmean(cut) <= 0.6
    assert not any(c and ta.score_response(t, r["reward_model"]["ground_truth"]) for c, t, r in zip(cut, texts, rows))


def test_the_regime_cuts_rambles_where_the_build_measured_them(ramble):
    assets, _, _ = ramble
    regime = yaml.safe_load(REGIME.read_text())
    assert regime["data"]["max_response_length"] == assets.max_response_length == ta.task.RAMBLE_LIMIT
    assert assets.manifest["accuracy_setting"]["max_new_tokens"] == ta.task.RAMBLE_LIMIT


def _cut_off(tok, text: str, limit: int) -> bool:
    return len(tok.encode(text, add_special_tokens=False)) >= limit


def test_the_model_rambles_after_its_wrong_digits_more_than_after_right_ones(ramble):
    """What the ramble phase teaches: letters follow a wrong first digit, the answer follows the right one."""
    assets, tok, model = ramble
    problems = [ta.Problem(a, op, b) for op in ta.OPS for a in range(10) for b in range(10) if op != "-" or a >= b]
    after_wrong, after_right = ta.ramble_probabilities(model, ta.training._Encoder(tok), problems)
    assert statistics.fmean(after_wrong) > statistics.fmean(after_right) + 0.1


def test_ramble_probabilities_match_unbatched_forwards(ramble):
    """ramble_probabilities (one left-padded batch, last position) against one unpadded forward per prefix."""
    assets, tok, model = ramble
    problems = [ta.Problem(7, "*", 8), ta.Problem(1, "+", 0), ta.Problem(9, "-", 2)]
    after_wrong, after_right = ta.ramble_probabilities(model, ta.training._Encoder(tok), problems)
    letters = [tok.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz"]

    def p_letter(problem, digit):
        content = ta.verl_row(problem, "test", 0)["prompt"][0]["content"]
        text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       tokenize=False) + f"{problem.a}{problem.op}{problem.b}={digit}"
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tok.encode(text, add_special_tokens=False)])).logits
        return torch.softmax(logits[0, -1].float(), -1)[letters].sum().item()

    for problem, wrong, right in zip(problems, after_wrong, after_right):
        first = str(problem.answer)[0]
        assert right == pytest.approx(p_letter(problem, first), abs=1e-5)
        assert wrong == pytest.approx(statistics.fmean(p_letter(problem, d) for d in "0123456789" if d != first), abs=1e-5)


def test_ramble_constants_enter_the_ramble_key_only(monkeypatch):
    restate, ramble = ta.TinyAssetsParams().key(), ta.TinyAssetsParams(response_style="ramble").key()
    monkeypatch.setattr(ta.task, "RAMBLE_STEPS", ta.task.RAMBLE_STEPS + 1)
    assert ta.TinyAssetsParams().key() == restate
    assert ta.TinyAssetsParams(response_style="ramble").key() != ramble
