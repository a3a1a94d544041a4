"""Rollout throughput with and without the token budget on a heavy-tailed response-length distribution.

    python benchmarks/bench_partial_rollout.py [--steps 36 --warmup-steps 12 --groups 8 --n 4 --budget 32 --repeats 3]
                                               [--at-cap force|lift] [--threshold N (wait)] [--inflight-factor F]
                                               [--hidden 64 --layers 2 (the random model's shape)]

Both modes run verl's own vLLM server on vLLM's CPU build in-process (``recipe.cpu_backend.testing.launch_vllm_server``:
a local Ray instance, the engine in its own processes), on a tiny random Qwen2 and the same
prompts and the same per-response lengths (forced with ``ignore_eos`` and a per-response length: 90%
of the responses 16-48 tokens, 12% 160-256, so the longest 10% are >= 4x the median; prompts of 16
tokens), side by side in one
process:

* **no budget** (a synchronous rollout): every step dispatches ``groups`` prompts x ``n`` and waits for all of
  them, so each step lasts as long as its longest response while the batch empties;
* **budget** (``recipe.partial``, as the ``colocate_budget`` trainer does it): sessions generate at most
  ``budget`` tokens per version (``SegmentedGenerate`` + store + the sampler's rules: refill under the
  in-flight cap, else ``--at-cap`` force the oldest groups / lift the version's budget; with ``--threshold``
  the ``wait`` staleness cap); a step ends once ``groups`` groups are finished (and, with ``wait``, no
  forced group still runs), the oldest finished groups are trained, the in-flight calls are aborted and
  the version advances (no weights change: the cost is the scheduling).

Steady state: the budget mode starts with an empty pool, so ``--warmup-steps`` are not counted, and the
report checks that the counted steps trained as many response tokens as the no-budget mode (a window
that harvests a pool filled before it, or that trains only short responses, would read faster than it is).

Reported: trained responses (and response tokens) per second of rollout wall time for each mode, the
ratio, the staleness of the trained trajectories, and the re-prefill
share of the budget mode (prompt + prefix tokens prefilled again by continuation calls / all tokens the
server processed: prompt prefills + re-prefills + generated tokens), the median ratio over alternating
pairs and the ratio of each mode's fastest run (robust to load spikes from other jobs on the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from collections import Counter

# the cpu platform before anything imports verl (recipe.partial does): verl resolves its platform once per process
os.environ["VERL_PLATFORM"] = "cpu"

from recipe.cpu_backend.testing import TinyModelSpec, build_tiny_model
from recipe.partial.segments import BudgetPolicy, SegmentedGenerate
from recipe.partial.store import LocalClock, PartialRolloutStore

PROMPT_LENGTH = 16
SHORT, LONG, LONG_SHARE = (16, 48), (160, 256), 0.12


def heavy_tailed_lengths(count: int, rng: random.Random) -> list[int]:
    return [rng.randint(*LONG) if rng.random() < LONG_SHARE else rng.randint(*SHORT) for _ in range(count)]


async def make_server(model_dir: str, max_len: int):
    from recipe.cpu_backend.testing import init_local_ray, launch_vllm_server

    init_local_ray()
    server = await launch_vllm_server(model_dir, max_model_len=PROMPT_LENGTH + max_len, prompt_length=PROMPT_LENGTH,
                                      response_length=max_len, max_num_seqs=256, max_num_batched_tokens=4096)
    await server.set_global_steps(0)
    return server


PARAMS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True, "ignore_eos": True}


class Workload:
    """Prompt groups in a fixed order: (prompt ids, n response lengths)."""

    def __init__(self, total_groups: int, n: int, seed: int = 0):
        rng = random.Random(seed)
        self.groups = [([rng.randrange(256) for _ in range(PROMPT_LENGTH)], heavy_tailed_lengths(n, rng))
                       for _ in range(total_groups)]
        self.next = 0

    def take(self):
        group = self.groups[self.next]
        self.next += 1
        return group


async def run_no_budget(server, work: Workload, steps: int, groups: int) -> dict:
    rollout_s, trained, trained_tokens, counter = 0.0, 0, 0, 0
    for _ in range(steps):
        batch = [work.take() for _ in range(groups)]
        start = time.perf_counter()
        calls = []
        for prompt, lengths in batch:
            for length in lengths:
                counter += 1
                calls.append(server.generate(prompt, dict(PARAMS, max_tokens=length), f"full{counter}"))
        outputs = await asyncio.gather(*calls)
        rollout_s += time.perf_counter() - start
        trained += len(calls)
        trained_tokens += sum(len(o.token_ids) for o in outputs)
    return {"rollout_s": rollout_s, "trained": trained, "trained_tokens": trained_tokens}


async def run_budget(server, work: Workload, steps: int, groups: int, budget: int, warmup_steps: int = 0,
                     poll_s: float = 0.005, inflight_factor: float = 1.0, at_cap: str = "force",
                     threshold: int | None = None) -> dict:
    """``warmup_steps`` first steps fill the in-flight pool (steady state) and are not counted. The in-flight cap
    is ``inflight_factor`` x the trainer's default ``max_inflight_groups`` (groups x (1 + ceil(L / B)))."""
    store = PartialRolloutStore()
    store.configure_cap(threshold, "wait")
    clock = LocalClock(store, poll_interval_s=0.05)  # woken by notify() below
    await server.set_global_steps(0)  # version stamps of this run start at the store's clock
    max_len = max(max(lengths) for _, lengths in work.groups)
    cap = int(inflight_factor * groups * (1 + -(-max_len // budget)))
    inflight: dict[str, asyncio.Task] = {}  # uid -> task gathering its n sessions
    finished: list[str] = []

    async def call(request_id, *, prompt_ids, sampling_params, **kwargs):
        return await server.generate(prompt_ids, sampling_params, request_id)

    def dispatch():
        prompt, lengths = work.take()
        uid = f"g{work.next}"
        sessions = [SegmentedGenerate(call, clock, BudgetPolicy(budget, length, threshold, "wait"), uid, i, frozenset())
                    for i, length in enumerate(lengths)]
        inflight[uid] = asyncio.ensure_future(
            asyncio.gather(*[s.generate(f"{uid}-{i}", prompt_ids=prompt, sampling_params=PARAMS) for i, s in enumerate(sessions)]))

    def all_parked() -> bool:
        live = [u for u in inflight if not inflight[u].done()]
        states = store.session_states()
        return all(len(states.get(u, {})) == len(work.groups[0][1]) and "calling" not in states[u].values() for u in live)

    rollout_s, trained, base = 0.0, 0, {}
    trained_tokens, spans, gen_spans, stale_token_steps = 0, [], [], 0
    for _ in range(2 * groups):  # warm-up batch + the first step's batch, as colocate_budget dispatches
        dispatch()
    for step in range(warmup_steps + steps):
        if step == warmup_steps:  # measure from here
            rollout_s, trained, base = 0.0, 0, dict(store.counters)
            trained_tokens, spans, gen_spans, stale_token_steps = 0, [], [], 0
        if step:
            for _ in range(groups):
                dispatch()
        start = time.perf_counter()
        stuck = 0
        while True:
            finished += [u for u, t in list(inflight.items()) if t.done() and u not in finished]
            if len(finished) >= groups and not any(u in store.forced and not inflight[u].done() for u in inflight):
                break  # as the sampler: a full batch, and (wait) no group forced by the cap still running
            if time.perf_counter() - start > 120:
                states = Counter(v for d in store.session_states().values() for v in d.values())
                raise RuntimeError(f"budget mode stalled at step {step}: {len(finished)} finished, "
                                   f"{len(inflight)} in flight, session states {dict(states)}")
            stuck = stuck + 1 if all_parked() else 0
            if stuck >= 2:  # the progress rule
                stuck = 0
                live = [u for u in inflight if not inflight[u].done()]
                if len(live) < cap:  # refill the deficit under the in-flight cap (as the sampler does)
                    for _ in range(min(cap - len(live), groups - len(finished))):
                        dispatch()
                elif at_cap == "lift":  # lift this version's budget for every trajectory
                    store.lift()
                    clock.notify()
                else:  # force the oldest groups to finish under this version
                    oldest = store.running_min_versions()
                    store.force(sorted(live, key=lambda u: oldest.get(u, 1 << 62))[: groups - len(finished)])
                    clock.notify()
            await asyncio.sleep(poll_s)
        await server.abort_all_requests()  # end of sampling: in-flight calls park
        rollout_s += time.perf_counter() - start
        oldest = store.running_min_versions()  # the sampler trains finished groups oldest segment first
        finished.sort(key=lambda u: (oldest.get(u, 1 << 62), int(u[1:])))
        for uid in finished[:groups]:
            versions = [s[0] for r in store.group_records([uid]).values() for s in r["segments"]]
            gen_spans.append(max(versions) - min(versions) + 1)
            for output in await inflight.pop(uid):  # trained under policy version `step`
                segments = output.extra_fields["partial_segments"]
                trained += 1
                trained_tokens += len(output.token_ids)
                spans.append(step - min(v for v, _, _ in segments) + 1)
                stale_token_steps += sum(n * (step - v) for v, n, _ in segments)
        store.forget(finished[:groups])
        finished = finished[groups:]
        store.set_version(step + 1)  # the weight update (unchanged weights)
        await server.set_global_steps(step + 1)
        await server.resume_generation()
        clock.notify()
    for task in inflight.values():
        task.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no "never retrieved" log
        task.cancel()
    counters = {k: v - base.get(k, 0) for k, v in store.counters.items()}
    return {"rollout_s": rollout_s, "trained": trained, "reprefill": counters["reprefill_tokens"],
            "generated": counters["tokens_generated"], "calls": counters["calls"], "trained_tokens": trained_tokens,
            "inflight_cap": cap, "mean_span": statistics.mean(spans), "max_span": max(spans),
            "max_gen_span": max(gen_spans),
            "token_staleness": stale_token_steps / trained_tokens}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--groups", type=int, default=8, help="prompt groups trained per step")
    parser.add_argument("--n", type=int, default=4, help="responses per prompt")
    parser.add_argument("--budget", type=int, default=32, help="token budget per policy version")
    parser.add_argument("--warmup-steps", type=int, default=12, help="budget-mode steps that fill the pool (not counted)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating pairs of runs (median ratio reported)")
    parser.add_argument("--inflight-factor", type=float, default=1.0,
                        help="in-flight cap / the trainer's default max_inflight_groups (more = faster, staler)")
    parser.add_argument("--at-cap", choices=("force", "lift"), default="force",
                        help="colocate_budget.at_cap: at the in-flight cap force the oldest groups or lift the version's budget")
    parser.add_argument("--threshold", type=int, default=None,
                        help="staleness cap with strategy wait (max_off_policy_threshold); default: none (the paper)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=TinyModelSpec.hidden_size, help="model width (random Qwen2)")
    parser.add_argument("--layers", type=int, default=TinyModelSpec.num_hidden_layers)
    args = parser.parse_args(argv)
    for key, value in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("TORCHDYNAMO_DISABLE", "1")):  # as configs/cpu_tiny.yaml
        os.environ.setdefault(key, value)
        print(f"{key}={os.environ[key]}")
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    heads = max(2, args.hidden // 32)  # head_dim 32: vLLM's CPU attention has no kernel for 16
    spec = TinyModelSpec(initializer_range=0.2, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
    model_dir = build_tiny_model(tempfile.mkdtemp(prefix="bench_partial_"), spec)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    print(f"model: random Qwen2, hidden {args.hidden}, {args.layers} layers, {params / 1e6:.2f}M parameters, fp32")
    probe = Workload(args.steps * args.groups * 4, args.n)
    lengths = sorted(length for _, ls in probe.groups for length in ls)
    median, top = statistics.median(lengths), lengths[int(0.9 * len(lengths)):]
    print(f"response lengths: median {median}, longest 10% >= {min(top)} ({min(top) / median:.1f}x median), max {lengths[-1]}")
    server = None
    pool = (args.steps + args.warmup_steps) * args.groups * 4  # enough groups for either mode

    async def one_pair():
        full = await run_no_budget(server, Workload(pool, args.n), args.steps, args.groups)
        budget = await run_budget(server, Workload(pool, args.n), args.steps, args.groups, args.budget,
                                  warmup_steps=args.warmup_steps, inflight_factor=args.inflight_factor, at_cap=args.at_cap, threshold=args.threshold)
        return full, budget

    async def pairs():
        nonlocal server
        server = await make_server(model_dir, lengths[-1])
        await run_no_budget(server, Workload(pool, args.n, seed=1), 1, args.groups)  # warm-up (not counted)
        return [await one_pair() for _ in range(args.repeats)]

    results = asyncio.run(pairs())  # the two modes alternate: machine load hits both alike
    print(f"{'mode':<10} {'trained':>8} {'rollout s':>10} {'responses/s':>12}")
    ratios = []
    for full, budget in results:
        rates = {}
        for name, r in (("no budget", full), ("budget", budget)):
            rates[name] = r["trained"] / r["rollout_s"]
            print(f"{name:<10} {r['trained']:>8} {r['rollout_s']:>10.2f} {rates[name]:>12.1f}")
        ratios.append(rates["budget"] / rates["no budget"])
    full, budget = results[-1]
    share = budget["reprefill"] / (budget["reprefill"] + budget["generated"] + PROMPT_LENGTH * budget["trained"])
    print(f"speed-up (trained responses per rollout second, budget / no budget): median {statistics.median(ratios):.2f}x "
          f"over {len(ratios)} alternating pairs {[round(r, 2) for r in ratios]} (target >= 1.5x)")
    best = {mode: min(pair[i]["rollout_s"] / pair[i]["trained"] for pair in results) for i, mode in enumerate(("no budget", "budget"))}
    print(f"fastest run of each mode (robust to load spikes on a shared machine): {best['no budget'] / best['budget']:.2f}x")
    tokens = [pair[1]["trained_tokens"] / pair[0]["trained_tokens"] for pair in results]
    print(f"steady state: the budget mode trained {min(tokens):.2f}-{max(tokens):.2f}x the no-budget mode's response tokens "
          f"(1.00 = the same responses, not a pool filled before the window); trained tokens per rollout second: "
          f"median {statistics.median(t * r for t, r in zip(tokens, ratios)):.2f}x")
    print(f"staleness (budget mode, in-flight cap {budget['inflight_cap']} groups): trained trajectories span "
          f"{budget['mean_span']:.2f} policy versions on average from the oldest segment to training (max {budget['max_span']}), "
          f"groups generated by at most {budget['max_gen_span']} versions, token-weighted staleness "
          f"{budget['token_staleness']:.2f} versions")
    print(f"budget {args.budget} tokens; re-prefill share {share:.1%} of processed tokens ({budget['reprefill']} "
          f"re-prefilled, {budget['generated']} generated, {budget['calls']} calls)")


if __name__ == "__main__":
    main()
