"""The ``hf`` rollout backend (recipe/cpu_backend): batched generation, log-probs, budgets, abort/resume,
weight sync. A tiny random Qwen2 is built locally (init std 0.2: greedy outputs depend on the context, logits stay
small enough that fp32 log-probs of two computation orders agree to ~1e-6).

Server-level tests run ``HFRolloutServer`` in-process (no Ray); the weight-sync test goes through Ray:
the real ``HFReplica`` launches the server actor and the real ``HFServerAdapter`` pushes new weights.
"""

from __future__ import annotations

import asyncio
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from hypothesis import given, settings
from hypothesis import strategies as st

from recipe.cpu_backend.engine import PREFILL_MAX_PAD_SHARE, HFGenerationEngine, prefill_groups
from recipe.cpu_backend.sampling import SamplingSpec, sample_rows
from recipe.cpu_backend.testing import TinyModelSpec, build_tiny_model

PROMPT_LENGTHS = (3, 9, 17, 26, 5, 12, 1, 30)
EOS = 256  # "<|im_end|>" of the byte-level tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_qwen2")), TinyModelSpec(initializer_range=0.2))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def rollout_config(**overrides):
    from verl.workers.config import RolloutConfig

    settings = dict(name="hf", tensor_model_parallel_size=1, dtype="float32", prompt_length=64, response_length=48)
    settings.update(overrides)
    return RolloutConfig(**settings)


def model_config(model_dir):
    from verl.workers.config import HFModelConfig

    return HFModelConfig(path=model_dir, override_config={"attn_implementation": "sdpa"})


@pytest.fixture
def server(model_dir, monkeypatch):
    from recipe.cpu_backend.server import HFRolloutServer

    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    return HFRolloutServer(rollout_config(), model_config(model_dir))


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF ``generate`` greedy reference for one unpadded prompt (stops at eos like the server)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=257,
        )
    return out[0, len(prompt) :].tolist()


def forward_logits(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """``[len(response), V]`` logits predicting each response token (plain full-sequence forward)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    return logits[len(prompt) - 1 : -1]


GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "logprobs": True}


# ---------------------------------------------------------------------------------------- greedy / batching
def test_single_greedy_requests_match_hf_generate(server, hf_model, prompts):
    async def run():
        return [await server.generate(p, dict(GREEDY, max_tokens=24), f"r{i}") for i, p in enumerate(prompts)]

    outputs = asyncio.run(run())
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(hf_model, prompt, 24)
        assert out.stop_reason in ("length", "completed")
    assert server.stats()["decode_rows"] == server.stats()["steps"]  # one request at a time: batch of 1


def test_concurrent_greedy_requests_are_batched_and_match_hf_generate(server, hf_model, prompts):
    """8 requests of different prompt lengths; half join while the first half is mid-decode."""

    async def run():
        first = [asyncio.create_task(server.generate(p, dict(GREEDY, max_tokens=32), f"a{i}")) for i, p in enumerate(prompts[:4])]
        while server.engine.stats.steps < 5:
            await asyncio.sleep(0.001)
        late = [asyncio.create_task(server.generate(p, dict(GREEDY, max_tokens=32), f"b{i}")) for i, p in enumerate(prompts[4:])]
        return await asyncio.gather(*first, *late)

    outputs = asyncio.run(run())
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(hf_model, prompt, 32)
    stats = server.stats()
    assert stats["decode_rows"] / stats["steps"] > 4  # rows really shared decode steps
    assert stats["steps"] < 2 * 32  # 8 x 32 tokens in far fewer than 8 x 32 steps


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=40))
def test_prefill_groups_partition_and_bound_the_padding(lengths):
    groups = prefill_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        width, real = max(lengths[i] for i in group), sum(lengths[i] for i in group)
        assert width * len(group) - real <= PREFILL_MAX_PAD_SHARE * width * len(group) + 1e-9
    # one batch when it already meets the bound (no needless extra forwards)
    width = max(lengths)
    if width * len(lengths) * (1 - PREFILL_MAX_PAD_SHARE) <= sum(lengths):
        assert len(groups) == 1


def test_prompts_of_very_different_lengths_are_prefilled_apart(server, hf_model):
    """A 4-token and a 60-token prompt admitted together: 64 prefill columns, not 2 x 60; outputs unchanged."""
    gen = torch.Generator().manual_seed(3)
    short, long = (torch.randint(0, 256, (n,), generator=gen).tolist() for n in (4, 60))

    async def run():
        return await asyncio.gather(*(server.generate(p, dict(GREEDY, max_tokens=8), f"p{i}") for i, p in enumerate((short, long))))

    outputs = asyncio.run(run())
    assert server.stats()["prefill_tokens"] == 64
    for prompt, out in zip((short, long), outputs):
        assert out.token_ids == hf_greedy(hf_model, prompt, 8)


def test_greedy_logprobs_are_log_softmax_of_logits(server, hf_model, prompts):
    out = asyncio.run(server.generate(prompts[3], dict(GREEDY, max_tokens=16), "lp"))
    expected = torch.log_softmax(forward_logits(hf_model, prompts[3], out.token_ids), -1)
    expected = expected.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.log_probs), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- budgets / abort
def test_budget_stop_then_continue_equals_uninterrupted(server, prompts):
    prompt = prompts[2]

    async def run():
        full = await server.generate(prompt, dict(GREEDY, max_tokens=30), "full")
        part = await server.generate(prompt, dict(GREEDY, max_tokens=11), "part")
        rest = await server.generate(prompt + part.token_ids, dict(GREEDY, max_tokens=19), "rest")
        return full, part, rest

    full, part, rest = asyncio.run(run())
    assert part.stop_reason == "length" and len(part.token_ids) == 11
    assert part.token_ids + rest.token_ids == full.token_ids
    torch.testing.assert_close(torch.tensor(part.log_probs + rest.log_probs), torch.tensor(full.log_probs), atol=1e-5, rtol=0)


def test_abort_all_returns_partial_tokens_and_resumed_continuation_matches(server, hf_model, prompts):
    chosen = prompts[:3]

    async def run():
        tasks = [asyncio.create_task(server.generate(p, dict(GREEDY, max_tokens=40), f"x{i}")) for i, p in enumerate(chosen)]
        while server.engine.stats.steps < 6:
            await asyncio.sleep(0.001)
        report = await server.abort_all_requests()
        partial = await asyncio.gather(*tasks)
        # gate closed: a new request is held, not served, until resume_generation()
        held = asyncio.create_task(server.generate(chosen[0], dict(GREEDY, max_tokens=3), "held"))
        await asyncio.sleep(0.2)
        held_done_before_resume = held.done()
        await server.resume_generation()
        await held
        rest = [
            await server.generate(p + out.token_ids, dict(GREEDY, max_tokens=40 - len(out.token_ids)), f"y{i}")
            for i, (p, out) in enumerate(zip(chosen, partial))
        ]
        return report, partial, held_done_before_resume, rest

    report, partial, held_done_before_resume, rest = asyncio.run(run())
    assert report["aborted_count"] == 3 and sorted(report["request_ids"]) == ["x0", "x1", "x2"]
    assert not held_done_before_resume
    for prompt, out, cont in zip(chosen, partial, rest):
        assert out.stop_reason == "aborted" and 1 <= len(out.token_ids) < 40
        assert len(out.log_probs) == len(out.token_ids)
        assert out.token_ids + cont.token_ids == hf_greedy(hf_model, prompt, 40)


def test_abort_with_reject_answers_new_requests_at_once(server, prompts):
    async def run():
        await server.abort_all_requests(reject_request=True)
        rejected = await asyncio.wait_for(server.generate(prompts[0], dict(GREEDY, max_tokens=5), "r"), timeout=5)
        await server.resume_generation()
        served = await server.generate(prompts[0], dict(GREEDY, max_tokens=5), "s")
        return rejected, served

    rejected, served = asyncio.run(run())
    assert rejected.stop_reason == "aborted" and rejected.token_ids == []
    assert served.stop_reason == "length" and len(served.token_ids) == 5


def test_abort_one_request_leaves_the_others_intact(server, hf_model, prompts):
    async def run():
        keep = asyncio.create_task(server.generate(prompts[1], dict(GREEDY, max_tokens=30), "keep"))
        drop = asyncio.create_task(server.generate(prompts[4], dict(GREEDY, max_tokens=30), "drop"))
        while server.engine.stats.steps < 4:
            await asyncio.sleep(0.001)
        report = await server.abort_request("drop")
        missing = await server.abort_request("never-sent")
        return report, missing, await keep, await drop

    report, missing, kept, dropped = asyncio.run(run())
    assert report["aborted"] is True and missing["aborted"] is False
    assert dropped.stop_reason == "aborted" and len(dropped.token_ids) < 30
    assert kept.token_ids == hf_greedy(hf_model, prompts[1], 30)


# ---------------------------------------------------------------------------------------- sampling
def test_seeded_sampling_does_not_depend_on_batch_company(server, prompts):
    params = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "logprobs": True, "max_tokens": 20, "seed": 1234}

    async def run():
        alone = await server.generate(prompts[5], params, "alone")
        others = [server.generate(p, dict(params, seed=i), f"o{i}") for i, p in enumerate(prompts[:5])]
        together, *_ = await asyncio.gather(server.generate(prompts[5], params, "together"), *others)
        return alone, together

    alone, together = asyncio.run(run())
    assert alone.token_ids == together.token_ids
    # batch size changes float summation order only: log-probs agree to float32 rounding
    torch.testing.assert_close(torch.tensor(alone.log_probs), torch.tensor(together.log_probs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_logprobs_are_temperature_scaled_log_softmax(server, hf_model, prompts, temperature):
    """No filters: rollout log-prob = log_softmax(logits / T)[token], what the actor computes at temperature T."""
    params = {"temperature": temperature, "top_p": 1.0, "top_k": -1, "logprobs": True, "max_tokens": 24, "seed": 5}
    out = asyncio.run(server.generate(prompts[6], params, "t"))
    logits = forward_logits(hf_model, prompts[6], out.token_ids)
    expected = torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.log_probs), expected, atol=1e-5, rtol=0)


def test_top_k_logprobs_are_renormalised_over_the_kept_tokens(server, hf_model, prompts):
    k, temperature = 4, 0.9
    params = {"temperature": temperature, "top_k": k, "logprobs": True, "max_tokens": 24, "seed": 11}
    out = asyncio.run(server.generate(prompts[7], params, "k"))
    logits = forward_logits(hf_model, prompts[7], out.token_ids) / temperature
    top = logits.topk(k, dim=-1)
    for row, token in enumerate(out.token_ids):
        assert token in top.indices[row].tolist()
        expected = torch.log_softmax(top.values[row], -1)[top.indices[row].tolist().index(token)]
        assert abs(out.log_probs[row] - float(expected)) < 1e-5


def test_raw_logprobs_mode_ignores_temperature(model_dir, hf_model, prompts, monkeypatch):
    from recipe.cpu_backend.server import HFRolloutServer

    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    raw_server = HFRolloutServer(rollout_config(logprobs_mode="raw_logprobs"), model_config(model_dir))
    params = {"temperature": 0.5, "logprobs": True, "max_tokens": 12, "seed": 3}
    out = asyncio.run(raw_server.generate(prompts[0], params, "raw"))
    expected = torch.log_softmax(forward_logits(hf_model, prompts[0], out.token_ids), -1)
    expected = expected.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.log_probs), expected, atol=1e-5, rtol=0)


def test_inverse_cdf_sampling_follows_each_rows_distribution():
    """sample_rows: frequencies within 5 sigma of the probabilities, zero-probability tokens never drawn,
    a one-hot row always gives its token, and a row's draw depends only on its own generator."""
    dists = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.0, 0.0, 0.4, 0.4]])
    n = 20000
    generator = torch.Generator().manual_seed(0)
    draws = sample_rows(dists.repeat_interleave(n, 0), [generator] * (3 * n)).view(3, n)
    for row, probs in enumerate(dists):
        freq = torch.bincount(draws[row], minlength=6).double() / n
        sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
        assert ((freq - probs.double()).abs() <= 5 * sigma + 1e-12).all(), (row, freq, probs)
        assert (freq[probs == 0] == 0).all()
    alone = sample_rows(dists[:1], [torch.Generator().manual_seed(7)])
    crowd = sample_rows(dists, [torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    assert alone[0] == crowd[0]


def test_top_p_keeps_the_smallest_most_likely_set_reaching_p():
    from recipe.cpu_backend.sampling import filter_logits

    logits = 3 * torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    top_ps = [0.1, 0.5, 0.9, 0.99, 1.0]
    out = filter_logits(logits, [SamplingSpec(max_tokens=1, temperature=1.0, top_p=p) for p in top_ps])
    for row, top_p in enumerate(top_ps):
        order = torch.argsort(logits[row], descending=True)
        mass = torch.cumsum(torch.softmax(logits[row], -1)[order], 0)
        n_keep = 50 if top_p == 1.0 else int((mass < top_p).sum()) + 1
        assert set(torch.isfinite(out[row]).nonzero()[:, 0].tolist()) == set(order[:n_keep].tolist())


# ---------------------------------------------------------------------------------------- stop conditions
def test_stop_token_ids_and_stop_strings(server, hf_model, prompts):
    reference = hf_greedy(hf_model, prompts[3], 30)
    stop_token = reference[6]
    expected_by_token = reference[: reference.index(stop_token) + 1]
    tokenizer = server.model_config.tokenizer
    stop_text = tokenizer.decode([reference[8]])
    cut = next(i for i in range(len(reference)) if stop_text in tokenizer.decode(reference[: i + 1]))

    async def run():
        by_token = await server.generate(prompts[3], dict(GREEDY, max_tokens=30, stop_token_ids=[stop_token]), "st")
        by_text = await server.generate(prompts[3], dict(GREEDY, max_tokens=30, stop=[stop_text]), "ss")
        return by_token, by_text

    by_token, by_text = asyncio.run(run())
    assert by_token.token_ids == expected_by_token and by_token.stop_reason == "completed"
    assert by_text.token_ids == reference[: cut + 1] and by_text.stop_reason == "completed"


def test_eos_stops_unless_ignore_eos(hf_model, prompts):
    """Engine-level: declare a token the model emits greedily as eos; ignore_eos runs to the budget."""
    reference = hf_greedy(hf_model, prompts[1], 20)
    fake_eos = reference[5]
    engine = HFGenerationEngine(hf_model, eos_ids={fake_eos}, pad_id=0, max_batch_size=8)

    async def run():
        stop = await engine.generate("e", prompts[1], SamplingSpec(max_tokens=20, temperature=0.0))
        ignore = await engine.generate("i", prompts[1], SamplingSpec(max_tokens=20, temperature=0.0, ignore_eos=True))
        return stop, ignore

    stop, ignore = asyncio.run(run())
    assert stop.token_ids == reference[: reference.index(fake_eos) + 1] and stop.stop_reason == "completed"
    assert ignore.token_ids == reference and ignore.stop_reason == "length"


@pytest.mark.parametrize(
    "params, error",
    [
        ({"temperature": 1.0, "best_of": 2}, "unsupported sampling_params keys"),
        ({"temperature": 1.0, "repetition_penalty": 1.2}, "repetition_penalty"),
        ({"temperature": 1.0, "max_tokens": 0}, "max_tokens=0"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": 1.0, "logprobs": 5}, "logprobs=5"),
    ],
)
def test_invalid_sampling_params_raise(server, prompts, params, error):
    with pytest.raises(ValueError, match=error):
        asyncio.run(server.generate(prompts[0], params, "bad"))


def test_prompt_without_room_and_multimodal_inputs_raise(server):
    with pytest.raises(ValueError, match="no room"):
        asyncio.run(server.generate([1] * server.max_model_len, dict(GREEDY), "long"))
    with pytest.raises(NotImplementedError, match="text-only"):
        asyncio.run(server.generate([1, 2], dict(GREEDY), "img", image_data=["x"]))


def test_a_failing_forward_fails_the_requests_instead_of_hanging(prompts):
    class BrokenLM(torch.nn.Module):
        def forward(self, **kwargs):
            raise RuntimeError("boom")

    engine = HFGenerationEngine(BrokenLM(), eos_ids={EOS}, pad_id=0, max_batch_size=4)

    async def run():
        with pytest.raises(RuntimeError, match="generation loop failed.*boom"):
            await asyncio.wait_for(engine.generate("a", prompts[0], SamplingSpec(max_tokens=4, temperature=0.0)), 10)
        with pytest.raises(RuntimeError, match="loop died"):
            await engine.generate("b", prompts[0], SamplingSpec(max_tokens=4, temperature=0.0))

    asyncio.run(run())


# ---------------------------------------------------------------------------------------- weights
def test_weight_update_guards(server, prompts):
    async def run():
        task = asyncio.create_task(server.generate(prompts[0], dict(GREEDY, max_tokens=40), "busy"))
        while server.engine.stats.steps < 2:
            await asyncio.sleep(0.001)
        with pytest.raises(RuntimeError, match="mid-generation"):
            await server.begin_weight_update()
        await task
        await server.begin_weight_update()
        with pytest.raises(KeyError, match="not_a_weight"):
            await server.load_weights({"not_a_weight": torch.zeros(1)})
        with pytest.raises(ValueError, match="shape"):
            await server.load_weights({"model.norm.weight": torch.zeros(3)})
        await server.load_weights({"model.norm.weight": server.model.model.norm.weight.detach().clone()})
        with pytest.raises(RuntimeError, match="did not include"):
            await server.finish_weight_update(global_steps=1)
        return await server.generate(prompts[0], dict(GREEDY, max_tokens=3), "after")  # still serving

    after = asyncio.run(run())
    assert len(after.token_ids) == 3 and after.extra_fields["weight_version"] == 0


@pytest.fixture(scope="module")
def ray_replica(model_dir):
    """A Ray cluster with VERL_PLATFORM=cpu and one hf replica launched by the real ``HFReplica``."""
    import ray

    from recipe.cpu_backend.server import HFReplica

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VERL_PLATFORM", "cpu")
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"VERL_PLATFORM": "cpu"}})
        try:
            # stands in for the trainer worker group (the replica only asks a worker for its node id)
            worker = ray.remote(num_cpus=0)(type("TrainerRankStandIn", (), {})).remote()
            replica = HFReplica(replica_rank=0, config=rollout_config(), model_config=model_config(model_dir), gpus_per_node=1)
            asyncio.run(replica.init_hybrid(types.SimpleNamespace(workers=[worker])))
            yield replica
        finally:
            ray.shutdown()


def push_weights(model_dir, model, global_steps: int) -> None:
    """Send ``model``'s weights through the real trainer-side adapter (rank 0 of replica 0)."""
    from recipe.cpu_backend.adapter import HFServerAdapter

    adapter = HFServerAdapter(config=rollout_config(), model_config=model_config(model_dir), device_mesh=None)
    asyncio.run(adapter.update_weights(iter(model.state_dict().items()), global_steps=global_steps))


def test_weight_sync_through_adapter_then_logprobs_match_actor(ray_replica, model_dir, hf_model, prompts, monkeypatch):
    """Perturb the weights, push them with HFServerAdapter into the Ray server, generate, and recompute the
    log-probs with the new weights the way the actor does (logits / T, log-softmax, gather)."""
    import ray

    from verl.utils.torch_functional import logprobs_from_logits

    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    monkeypatch.delenv("RANK", raising=False)
    actor = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for param in actor.parameters():  # tied embeddings are one parameter: perturbed once
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    push_weights(model_dir, actor, global_steps=7)
    server = ray_replica.server_handle
    version = ray.get(server.stats.remote())["weight_version"]

    for temperature in (1.0, 0.7):
        params = {"temperature": temperature, "top_k": -1, "top_p": 1.0, "logprobs": True, "max_tokens": 32, "seed": 9}
        out = ray.get(server.generate.remote(prompts[3], params, f"sync-{temperature}"))
        assert out.extra_fields["global_steps"] == 7 and out.extra_fields["weight_version"] == version
        labels = torch.tensor(out.token_ids)
        with torch.no_grad():
            recomputed = logprobs_from_logits(forward_logits(actor, prompts[3], out.token_ids) / temperature, labels)
            stale = logprobs_from_logits(forward_logits(hf_model, prompts[3], out.token_ids) / temperature, labels)
        rollout = torch.tensor(out.log_probs)
        assert (rollout - recomputed).abs().max() < 1e-5
        assert (rollout - stale).abs().max() > 1e-2  # the old weights would not match: the sync happened


def test_verl_partial_rollout_client_resumes_an_aborted_request(ray_replica, model_dir, hf_model, prompts, monkeypatch):
    """verl's colocate_async path: FullyAsyncLLMServerClient + router + our server. The request is aborted
    mid-generation, weights are re-synced (same values, new version), generation resumes; verl resubmits
    prompt + tokens so far and the stitched result equals one uninterrupted greedy run."""
    import ray
    from omegaconf import OmegaConf

    from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient
    from verl.workers.rollout.router import get_router_handle

    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    monkeypatch.delenv("RANK", raising=False)
    server, length = ray_replica.server_handle, 160
    push_weights(model_dir, hf_model, global_steps=1)
    router = get_router_handle(servers={ray_replica.server_address: server})
    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"name": "hf", "response_length": length}}})
    client = FullyAsyncLLMServerClient(config=config, load_balancer_handle=router)

    async def run():
        start = (await server.stats.remote())["steps"]
        task = asyncio.create_task(client.generate("req-0", prompt_ids=prompts[2], sampling_params=dict(GREEDY)))
        while (await server.stats.remote())["steps"] < start + 10:
            await asyncio.sleep(0.005)
        report = await server.abort_all_requests.remote()
        await asyncio.to_thread(push_weights, model_dir, hf_model, 2)  # what the trainer does between
        await server.resume_generation.remote()
        return report, await task

    report, out = asyncio.run(run())
    assert report["aborted_count"] == 1
    assert out.token_ids == hf_greedy(hf_model, prompts[2], length) and len(out.log_probs) == len(out.token_ids)
    assert (out.extra_fields["min_global_steps"], out.extra_fields["max_global_steps"]) == (1, 2)


def test_adapter_non_sender_rank_drains_the_weight_generator(model_dir, monkeypatch):
    """Rank 1 of a 2-rank replica sends nothing but must still consume every tensor (FSDP collectives)."""
    from recipe.cpu_backend.adapter import HFServerAdapter

    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    monkeypatch.setenv("RANK", "1")
    adapter = HFServerAdapter(config=rollout_config(tensor_model_parallel_size=2), model_config=model_config(model_dir), device_mesh=None)
    consumed = []

    def weights():
        for i in range(5):
            consumed.append(i)
            yield f"w{i}", torch.zeros(2)

    asyncio.run(adapter.update_weights(weights(), global_steps=1))
    assert adapter.is_sender is False and consumed == [0, 1, 2, 3, 4]
