"""Budgeted segmented generation on the real ``hf`` server (tiny random Qwen2, in-process, no Ray).

* Greedy, weights unchanged between versions: the budgeted, segmented response equals the
  unbudgeted one token for token (and log-prob for log-prob).
* Sampled (T=1), new weights loaded between segments: each segment's log-probs are the log-softmax of
  the version that produced it (1e-5, fp32) and not of the other versions (negative control).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipe.cpu_backend.testing import TinyModelSpec, build_tiny_model
from recipe.partial.segments import BudgetPolicy, SegmentedGenerate
from recipe.partial.store import LocalClock, PartialRolloutStore

EOS = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_qwen2_partial")), TinyModelSpec(initializer_range=0.2))


@pytest.fixture
def server(model_dir, monkeypatch):
    from verl.workers.config import HFModelConfig, RolloutConfig

    from recipe.cpu_backend.server import HFRolloutServer

    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    rollout = RolloutConfig(name="hf", tensor_model_parallel_size=1, dtype="float32", prompt_length=64, response_length=48)
    server = HFRolloutServer(rollout, HFModelConfig(path=model_dir, override_config={"attn_implementation": "sdpa"}))
    server.global_steps = 0
    return server


def prompts(count: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 13, 21, 8)[:count]]


def call_server(server):
    async def call(request_id, *, prompt_ids, sampling_params, **kwargs):
        return await server.generate(prompt_ids, sampling_params, request_id)

    return call


async def segmented(server, prompt, params, policy, store, on_parked, uid="u"):
    """One budgeted session; ``on_parked(version)`` runs (as the trainer would) whenever it is parked."""
    gen = SegmentedGenerate(call_server(server), LocalClock(store, 0.001), policy, uid, 0, frozenset({EOS}))
    task = asyncio.ensure_future(gen.generate(f"{uid}-r", prompt_ids=prompt, sampling_params=params))
    while not task.done():
        await asyncio.sleep(0.002)
        record = store.records.get(f"{uid}_0")
        if record and record["status"] == "parked":
            version = store.version() + 1
            await on_parked(version)
            store.set_version(version)
    return await task


GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "logprobs": True}


def test_greedy_budgeted_equals_unbudgeted_with_unchanged_weights(server):
    policy = BudgetPolicy(token_budget=5, response_length=30)

    async def same_weights(version):
        await server.set_global_steps(version)

    async def run():
        results = []
        for i, prompt in enumerate(prompts(4)):
            full = await server.generate(prompt, dict(GREEDY, max_tokens=30), f"full{i}")
            part = await segmented(server, prompt, GREEDY, policy, PartialRolloutStore(), same_weights, uid=f"u{i}")
            results.append((full, part))
        return results

    results = asyncio.run(run())
    for full, part in results:
        assert part.token_ids == full.token_ids
        torch.testing.assert_close(torch.tensor(part.log_probs), torch.tensor(full.log_probs), atol=1e-5, rtol=0)
        per_version = {}
        for version, n, _ in part.extra_fields["partial_segments"]:
            per_version[version] = per_version.get(version, 0) + n
        assert all(n <= 5 for n in per_version.values()), per_version
    assert max(len(p.extra_fields["partial_segments"]) for _, p in results) >= 3  # really segmented


def perturbed_state(model, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}


def test_each_segment_has_the_log_probs_of_the_version_that_produced_it(server, model_dir):
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    states = [base.state_dict(), perturbed_state(base, 1), perturbed_state(base, 2)]
    states[0] = {k: v.clone() for k, v in states[0].items()}
    policy = BudgetPolicy(token_budget=6, response_length=18)

    async def new_weights(version):
        await server.begin_weight_update()
        await server.load_weights(states[version])
        await server.finish_weight_update(global_steps=version)

    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True, "ignore_eos": True, "seed": 3}
    prompt = prompts(1)[0]
    out = asyncio.run(segmented(server, prompt, params, policy, PartialRolloutStore(), new_weights))
    segments = out.extra_fields["partial_segments"]
    assert [s[0] for s in segments] == [0, 1, 2] and [s[1] for s in segments] == [6, 6, 6]
    assert [s[2] for s in segments] == [0, 1, 2]  # the engine's own weight counter agrees with the stamps

    def log_probs_under(version: int) -> torch.Tensor:
        base.load_state_dict(states[version])
        with torch.no_grad():
            logits = base(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
        return torch.log_softmax(logits / params["temperature"], -1).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]

    got = torch.tensor(out.log_probs)
    under = [log_probs_under(v) for v in range(3)]
    for k, (version, n, _) in enumerate(segments):
        piece = slice(6 * k, 6 * k + n)
        torch.testing.assert_close(got[piece], under[version][piece], atol=1e-5, rtol=0)
        for other in set(range(3)) - {version}:  # negative control: another version's weights do not match
            assert (got[piece] - under[other][piece]).abs().max() > 1e-3, (k, other)
