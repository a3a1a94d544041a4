"""BAPOTrainingWorker's decisions, driven through verl's own TrainingWorker code with a fake engine.

The fake engine stands in for FSDP/Megatron: a one-parameter policy (log_prob = anchor + theta * feature),
micro-batching by `micro_batch_size_per_gpu`, verl's real `ppo_loss` per micro-batch, an SGD step on theta.
It records which bounds every micro-batch's loss used, so the tests can check them against a direct search.
"""

import json
import math
import os
import time
from contextlib import contextmanager
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import verl  # noqa: F401  (plugin: registers the loss and installs the worker hook)
from bapo_core import search_clip_bounds
from recipe.bapo import optimizer_step
from recipe.bapo.config import BaselinePolicyLossConfig, BAPOPolicyLossConfig
from recipe.bapo.loss import SEARCH_METRICS
from recipe.bapo.worker import BAPOTrainingWorker
from verl.utils import tensordict_utils as tu
from verl.utils.metric import reduce_metrics
from verl.utils.py_functional import append_to_dict
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker
from verl.workers.engine.utils import prepare_micro_batches
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from verl_batches import model_log_probs, ppo_batch, set_global_batch_info


class FakeEngine:
    """verl's engine surface with a one-parameter policy. Micro-batches come from verl's own
    prepare_micro_batches (fixed or dynamic bsz), in the probe forward and in the gradient pass alike;
    `shape_noise` adds a term that depends on the micro-batch's shape, as GEMM rounding does under bf16,
    so a probe partitioned differently from the gradient pass gives different ratios."""

    def __init__(self, has_outputs=True, lr=2.0, shape_noise=0.0, vpp_group=None, pipeline_peer=None, entropy=False,
                 verl_metrics=False):  # fmt: skip
        self.module = torch.nn.Module()
        # return the loss metrics as verl's engines do (per key, the micro-batches' values: verl's
        # postprocess_batch_func), so TrainingWorker aggregates them over the step; else none are returned
        self.verl_metrics = verl_metrics
        self.module.theta = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.has_outputs, self.lr, self.shape_noise = has_outputs, lr, shape_noise
        self.entropy = entropy  # the gradient pass's model output carries per-position entropy (calculate_entropy)
        # Megatron under virtual pipelining: the micro-batch count is rounded up to a multiple of the group
        # (dynamic bsz) and asserted (verl/workers/engine/megatron/transformer_impl.py:873-918)
        self.vpp_group = vpp_group
        # the other pipeline stage's rank: every forward exchanges one message per micro-batch with it, as
        # Megatron's p2p activations do, so a forward that one stage runs and the other skips hangs
        self.pipeline_peer = pipeline_peer
        self.infer_calls = 0
        self.partitions = {"infer": [], "train": []}  # per call: the micro-batches' row ids
        self.steps: list[list[dict]] = []  # per optimizer step: the loss metrics of each micro-batch

    @property
    def theta(self):
        return self.module.theta

    adapter_on = True  # theta plays the LoRA adapter: disable_adapter() gives the base model

    def log_prob(self, data):
        theta = self.theta if self.adapter_on else 0.0
        return data["fake_anchor"] + theta * data["fake_feature"] + self.shape_noise * data.batch_size[0]

    @contextmanager
    def disable_adapter(self):
        self.adapter_on = False
        try:
            yield
        finally:
            self.adapter_on = True

    def micro_batches(self, data, kind):
        data = data.copy()
        data["input_ids"] = data["attention_mask"]  # padded: verl balances by attention_mask sums
        micro, indices = prepare_micro_batches(data=data, dp_group=None, same_micro_num_in_dp=True,
                                               num_batches_divided_by=self.vpp_group)
        if self.vpp_group:
            assert len(micro) % self.vpp_group == 0, f"{len(micro)} micro-batches, VPP group {self.vpp_group}"
        self.partitions[kind].append([m["row_id"].tolist() for m in micro])
        if self.pipeline_peer is not None:
            self._p2p(len(micro))
        return micro

    def _p2p(self, n_micro):
        """Stage 0 sends its micro-batch count once per micro-batch; the last stage receives and compares."""
        for _ in range(n_micro):
            count = torch.tensor([n_micro])
            if self.has_outputs:
                dist.recv(count, src=self.pipeline_peer)
                assert count.item() == n_micro, f"stages disagree on the micro-batches: {count.item()} vs {n_micro}"
            else:
                dist.send(count, dst=self.pipeline_peer)

    # -- the BaseEngine surface TrainingWorker uses
    def get_data_parallel_group(self):
        return None

    def get_data_parallel_size(self):
        return 1

    def get_data_parallel_rank(self):
        return 0

    def is_mp_src_rank_with_outputs(self):
        return self.has_outputs

    @contextmanager
    def train_mode(self, **kwargs):
        yield

    eval_mode = train_mode

    def lr_scheduler_step(self):
        return 0.0

    def infer_batch(self, data, loss_function=None):
        self.infer_calls += 1
        if not self.has_outputs:  # e.g. a Megatron pipeline stage before the last: runs its layers, no logits
            self.micro_batches(data, "infer")
            return {}
        rows = {}
        with torch.no_grad():
            for micro in self.micro_batches(data, "infer"):
                for i, lp in zip(micro["row_id"].tolist(), self.log_prob(micro)):
                    rows[i] = lp
        log_probs = torch.stack([rows[i] for i in data["row_id"].tolist()])
        return {"loss": [], "metrics": {}, "model_output": {"log_probs": model_log_probs(log_probs, data["response_mask"])}}

    def train_batch(self, data, loss_function):
        metrics, returned = [], {}
        micro_batches = self.micro_batches(data, "train")
        if not self.has_outputs:  # Megatron runs the loss on the last pipeline stage only
            self.steps.append([])
            return {"loss": [], "metrics": {}, "model_output": {}}
        for micro in micro_batches:
            set_global_batch_info(micro, batch_num_tokens=int(data["response_mask"].sum()), global_batch_size=data.batch_size[0])
            output = {"log_probs": model_log_probs(self.log_prob(micro), micro["response_mask"])}
            if self.entropy:
                output["entropy"] = model_log_probs(-micro["fake_anchor"], micro["response_mask"])
            loss, m = loss_function(model_output=output, data=micro)
            loss.backward()
            metrics.append({k: v.aggregate() if hasattr(v, "aggregate") else v for k, v in m.items()})
            if self.verl_metrics:
                append_to_dict(returned, m)
        with torch.no_grad():
            self.theta.sub_(self.lr * self.theta.grad)
            self.theta.grad = None
        self.steps.append(metrics)
        return {"loss": [0.0], "metrics": returned, "model_output": {}}


def make_worker(policy_loss, engine, micro_batch_size=2, dynamic_bsz=False, max_token_len=None, infer_micro_batch_size=None, cls=BAPOTrainingWorker, **actor):
    """A (BAPO)TrainingWorker around the fake engine (TrainingWorker.__init__ needs a real engine).
    The inference micro-batch size (the old-log-prob pass) differs from the gradient pass's by default."""
    worker = object.__new__(cls)
    worker.engine = engine
    worker.device_name = "cpu"
    worker.flops_counter = None
    worker.engine_config = SimpleNamespace(
        forward_only=False, use_dynamic_bsz=dynamic_bsz, max_token_len_per_gpu=max_token_len,
        micro_batch_size_per_gpu=micro_batch_size, use_fused_kernels=False,
        infer_max_token_len_per_gpu=None if max_token_len is None else 3 * max_token_len,
        infer_micro_batch_size_per_gpu=infer_micro_batch_size or 2 * micro_batch_size,
    )  # fmt: skip
    worker.model_config = {"use_remove_padding": False}
    worker.profiler = SimpleNamespace(rank=0, step=lambda: None, check_enable=lambda: False)
    batch_keys = {"ppo_max_token_len_per_gpu": max_token_len} if dynamic_bsz else {"ppo_micro_batch_size_per_gpu": micro_batch_size}
    config = ActorConfig(strategy="fsdp", rollout_n=1, use_dynamic_bsz=dynamic_bsz, policy_loss=policy_loss, **batch_keys, **actor)
    worker.set_loss_fn(partial(ppo_loss, config=config))
    return worker


def rl_batch(seed=0, bsz=8, length=10):
    gen = torch.Generator().manual_seed(seed)
    anchor = -torch.rand(bsz, length, generator=gen, dtype=torch.float64) * 2
    feature = torch.randn(bsz, length, generator=gen, dtype=torch.float64)
    adv = torch.randn(bsz, 1, generator=gen, dtype=torch.float64).expand(bsz, length) - 0.6  # negatives dominate
    lengths = torch.randint(2, length + 1, (bsz,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return ppo_batch(anchor.clone(), adv.contiguous() * mask, mask, fake_anchor=anchor, fake_feature=feature, row_id=torch.arange(bsz))


def compute_old_log_probs(worker, data, **flags):
    """What the trainer's compute_log_prob does: a log-prob pass of the current weights, whose output
    becomes the batch's old_log_probs (as verl's trainers copy it)."""
    probe = data.copy()
    tu.assign_non_tensor(probe, compute_loss=False, global_token_num=None, **flags)
    output = worker.infer_batch(probe)
    data["old_log_probs"] = no_padding_2_padding(output["log_probs"], probe).to(data["old_log_probs"].dtype)


def run_step(worker, data, mini_batch_size=4, epochs=1):
    step = data.copy()
    tu.assign_non_tensor(step, mini_batch_size=mini_batch_size, epochs=epochs, seed=0, dataloader_kwargs={"shuffle": False})
    worker.train_mini_batch(step)


def direct_search(engine_theta, mini, spec):
    """Independent: the bounds over the whole mini-batch with the policy before the step."""
    with torch.no_grad():
        log_prob = mini["fake_anchor"] + engine_theta * mini["fake_feature"]
    return search_clip_bounds((log_prob - mini["old_log_probs"]).exp(), mini["advantages"], mini["response_mask"].bool(), spec)


def test_every_micro_batch_of_a_step_uses_the_bounds_of_the_whole_mini_batch():
    engine = FakeEngine()
    worker = make_worker(BAPOPolicyLossConfig(), engine, micro_batch_size=2)
    data = rl_batch()
    compute_old_log_probs(worker, data)
    thetas = []
    original_train_batch = engine.train_batch

    def recording_train_batch(d, loss_function):
        thetas.append(engine.theta.detach().clone())
        return original_train_batch(d, loss_function)

    engine.train_batch = recording_train_batch
    run_step(worker, data, mini_batch_size=4, epochs=2)  # 2 mini-batches x 2 epochs = 4 optimizer steps
    assert len(engine.steps) == 4 and all(len(step) == 2 for step in engine.steps)
    minis = [data[0:4], data[4:8], data[0:4], data[4:8]]
    spec = worker._bapo.search_spec
    moved = 0
    for step, (metrics, mini, theta) in enumerate(zip(engine.steps, minis, thetas)):
        bounds = {(m["actor/bapo/c_low"], m["actor/bapo/c_high"]) for m in metrics}
        assert len(bounds) == 1, (step, bounds)  # identical across the step's micro-batches
        expected = direct_search(theta, mini, spec)
        assert bounds == {(expected.c_low, expected.c_high)}, (step, bounds, expected)
        assert all(m["actor/bapo/bounds_from_update"] == 1.0 for m in metrics)
        moved += expected.steps > 0
    assert moved >= 2  # the data is stale enough for the bounds to move
    assert engine.infer_calls == 1 + 4  # the old-log-prob pass + one probe forward per update
    assert not optimizer_step.is_running()  # the step's bounds are gone after it


def test_the_probe_leaves_out_per_sample_bookkeeping_only():
    """The probe's batch drops per-sample non-tensor entries no engine forward reads (reward and rollout
    bookkeeping), keeps multi-modal inputs, every tensor and every batch-level flag; `data` is untouched;
    and a step with those entries searches the same bounds as without them."""
    from tensordict import NonTensorStack

    bookkeeping = {"extra_info": [{"index": i} for i in range(8)], "uid": [f"u{i}" for i in range(8)]}
    images = [{"pixel_values": None}] * 8
    data = rl_batch()
    for key, values in {**bookkeeping, "multi_modal_inputs": images}.items():
        data[key] = NonTensorStack.from_list(values)
    tu.assign_non_tensor(data, temperature=0.7)
    worker = make_worker(BAPOPolicyLossConfig(), FakeEngine())
    probe = worker.probe_batch(data)
    assert set(data.keys()) - set(probe.keys()) == set(bookkeeping)
    assert "multi_modal_inputs" in probe.keys() and tu.get(probe, "temperature") == 0.7
    assert {"extra_info", "uid"} <= set(data.keys())

    bounds = []
    for batch in (data, rl_batch()):
        engine = FakeEngine()
        worker = make_worker(BAPOPolicyLossConfig(), engine)
        run_step(worker, batch)
        bounds.append([update_bounds(m) for m in engine.steps])
    assert bounds[0] == bounds[1]


def test_bypass_mode_first_update_runs_the_forward():
    """Old log-probs from the rollout policy (not recomputed by the actor): the ratio is not 1."""
    engine = FakeEngine()
    worker = make_worker(BAPOPolicyLossConfig(), engine)
    data = rl_batch(seed=1)
    data["old_log_probs"] = data["fake_anchor"] + 0.3 * torch.randn_like(data["fake_anchor"])  # rollout policy
    run_step(worker, data, mini_batch_size=8)
    assert engine.infer_calls == 1
    expected = direct_search(torch.tensor(0.0, dtype=torch.float64), data, worker._bapo.search_spec)
    assert {(m["actor/bapo/c_low"], m["actor/bapo/c_high"]) for m in engine.steps[0]} == {(expected.c_low, expected.c_high)}


@pytest.mark.parametrize("policy_loss", [PolicyLossConfig(loss_mode="vanilla"), BAPOPolicyLossConfig(scope="micro_batch")], ids=["vanilla", "micro_batch"])
def test_hook_changes_nothing_for_other_losses_and_micro_batch_scope(policy_loss):
    engine = FakeEngine()
    worker = make_worker(policy_loss, engine)
    data = rl_batch(seed=2)
    data["old_log_probs"] = data["fake_anchor"] - 0.2 * data["fake_feature"]
    run_step(worker, data, mini_batch_size=4)
    assert engine.infer_calls == 0  # no extra forward
    if isinstance(policy_loss, BAPOPolicyLossConfig):
        assert all(m["actor/bapo/bounds_from_update"] == 0.0 for step in engine.steps for m in step)
    assert not optimizer_step.is_running()


def update_bounds(metrics):
    return {(m["actor/bapo/c_low"], m["actor/bapo/c_high"]) for m in metrics}


def test_restored_old_weights_are_not_mistaken_for_the_current_policy():
    """verl's separate_async / fully_async trainers (decoupled mode): save the current weights, restore
    pi_old, compute_log_prob, restore the current weights -- by copying tensors, unseen by the worker.
    The probe sees the current weights."""
    engine = FakeEngine()
    worker = make_worker(BAPOPolicyLossConfig(), engine)
    first, second = rl_batch(seed=10), rl_batch(seed=11)
    compute_old_log_probs(worker, first)
    pi_old = engine.theta.detach().clone()
    run_step(worker, first, mini_batch_size=8)  # one update: the weights move to pi_1
    pi_current = engine.theta.detach().clone()
    assert pi_current != pi_old
    engine.theta.data.copy_(pi_old)  # restore_model_from_cpu(pi_old), like Megatron's .data.copy_
    compute_old_log_probs(worker, second)
    engine.theta.data.copy_(pi_current)  # restore_model_from_cpu(current)
    run_step(worker, second, mini_batch_size=8)
    (update,) = engine.steps[1:]
    expected = direct_search(pi_current, second, worker._bapo.search_spec)
    assert expected.steps > 0  # r != 1: the search has something to do
    assert update_bounds(update) == {(expected.c_low, expected.c_high)}


def test_an_adapter_disabled_pass_does_not_count_as_the_current_policy():
    """LoRA with the reference in the actor: compute_ref_log_prob runs the actor with no_lora_adapter=True.
    In bypass mode (old_log_probs = the rollout's) the next update's probe has the adapter on."""
    engine = FakeEngine()
    worker = make_worker(BAPOPolicyLossConfig(), engine)
    data = rl_batch(seed=12)
    engine.theta.data.fill_(0.3)
    reference = data.copy()
    compute_old_log_probs(worker, reference, no_lora_adapter=True)  # adapter off: theta does not act
    data["old_log_probs"] = reference["old_log_probs"]  # the rollout's log-probs (here: = the base model's)
    run_step(worker, data, mini_batch_size=8)
    expected = direct_search(torch.tensor(0.3, dtype=torch.float64), data, worker._bapo.search_spec)
    assert update_bounds(engine.steps[0]) == {(expected.c_low, expected.c_high)}


def test_the_loss_reads_the_step_from_the_channel_and_only_inside_it():
    """recipe/bapo/optimizer_step.py: the worker publishes each optimizer step (bounds, DP group, entropy of the
    running loss call) for the duration of verl's train_batch; reading it outside a step is a clear error,
    a step inside a step is refused, and an error inside a step still clears it."""
    with pytest.raises(optimizer_step.NoStepInProgress, match="outside BAPOTrainingWorker.train_batch"):
        optimizer_step.current()
    step = optimizer_step.OptimizerStep(index=3, bounds=None, dp_group=None)
    with pytest.raises(ValueError, match="inside"):
        with optimizer_step.running(step):
            assert optimizer_step.current() is step
            with pytest.raises(RuntimeError, match="optimizer step 3 started while step 3"):
                with optimizer_step.running(step):
                    pass
            with step.loss_call(torch.ones(2, 3)):
                assert step.entropy is not None and step.loss_calls == 0
            assert step.entropy is None and step.loss_calls == 1
            raise ValueError("inside")
    assert not optimizer_step.is_running()

    # verl running the actor's bapo loss outside train_batch (e.g. infer_batch with compute_loss=True)
    engine = FakeEngine()
    worker = make_worker(BAPOPolicyLossConfig(), engine)
    micro = rl_batch(seed=13)
    with pytest.raises(optimizer_step.NoStepInProgress, match="no optimizer step in progress"):
        worker.loss_fn(model_output={"log_probs": model_log_probs(engine.log_prob(micro), micro["response_mask"])}, data=micro)


def test_the_gradient_pass_entropy_reaches_the_loss():
    """With verl's per-position entropy in the gradient pass, each micro-batch's loss logs the exact
    Entropy-Clip split, not its proxy."""
    engine = FakeEngine(entropy=True)
    worker = make_worker(BAPOPolicyLossConfig(), engine)
    data = rl_batch(seed=13)
    data["old_log_probs"] = data["fake_anchor"] - 0.5 * data["fake_feature"]
    run_step(worker, data, mini_batch_size=4)
    metrics = [m for step in engine.steps for m in step]
    assert len(metrics) == 4
    assert all("actor/bapo/clipfrac_entropy_raising" in m and "actor/bapo/clipfrac_entropy_raising_proxy" not in m for m in metrics)


@pytest.mark.parametrize("dynamic_bsz", [False, True], ids=["fixed", "dynamic"])
def test_probe_is_micro_batched_like_the_gradient_pass_and_its_ratios_are_the_loss_ratios(dynamic_bsz, tmp_path, monkeypatch):
    monkeypatch.setenv("BAPO_TRACE_DIR", str(tmp_path))
    monkeypatch.setenv("BAPO_TRACE_TENSORS", "1")
    engine = FakeEngine(shape_noise=1e-3)
    worker = make_worker(BAPOPolicyLossConfig(), engine, micro_batch_size=2, dynamic_bsz=dynamic_bsz, max_token_len=13)
    data = rl_batch(seed=14, bsz=8, length=10)
    data["old_log_probs"] = data["fake_anchor"] - 0.3 * data["fake_feature"]  # bypass: every update probes
    run_step(worker, data, mini_batch_size=8, epochs=2)
    probes, trains = engine.partitions["infer"], engine.partitions["train"]
    assert len(probes) == len(trains) == 2 and probes == trains
    assert any(len(p) > 1 for p in trains)  # several micro-batches per update
    if dynamic_bsz:  # token-balanced: not the fixed micro-batch size
        assert any(len(m) != 2 for p in trains for m in p)
    records = [json.loads(line) for f in tmp_path.glob("*.jsonl") for line in f.read_text().splitlines()]
    for update, partition in enumerate(trains):
        (probe,) = [r for r in records if r["kind"] == "probe" and r["update"] == update]
        losses = [r for r in records if r["kind"] == "loss" and r["update"] == update]
        probe_ratio = torch.load(tmp_path / probe["tensors"])["ratio"]
        order = data["row_id"].tolist()
        for rows, loss in zip(partition, losses):
            saved = torch.load(tmp_path / loss["tensors"])
            for j, row in enumerate(rows):
                n = int(data["response_mask"][row].sum())
                assert torch.equal(saved["ratio"][j, :n], probe_ratio[order.index(row), :n]), (update, row)


def test_hook_uses_rollout_is_weights_and_the_aggregation_in_rho():
    for in_rho, agg in ((True, "token-mean"), (False, "token-mean"), (True, "seq-mean-token-mean")):
        engine = FakeEngine()
        worker = make_worker(BAPOPolicyLossConfig(rollout_is_in_rho=in_rho), engine, loss_agg_mode=agg)
        data = rl_batch(seed=15)
        data["old_log_probs"] = data["fake_anchor"] - 0.5 * data["fake_feature"]
        gen = torch.Generator().manual_seed(3)
        data["rollout_is_weights"] = torch.rand(data["old_log_probs"].shape, generator=gen, dtype=torch.float64) * 3
        run_step(worker, data, mini_batch_size=8)
        mask = data["response_mask"].bool()
        weights = data["rollout_is_weights"] if in_rho else torch.ones_like(data["rollout_is_weights"])
        if agg == "seq-mean-token-mean":  # each response's tokens share 1 / |y_i|
            weights = weights / mask.sum(-1, keepdim=True)
        ratio = (data["fake_anchor"] - data["old_log_probs"]).exp()
        expected = search_clip_bounds(ratio, data["advantages"], mask, worker._bapo.search_spec, weights=weights)
        assert update_bounds(engine.steps[0]) == {(expected.c_low, expected.c_high)}, (in_rho, agg)


def test_plain_verl_loss_gets_exactly_verl_behaviour():
    """With verl's own PolicyLossConfig the installed worker is inert: same metrics, same weights, no extra forward."""
    results = {}
    for cls in (TrainingWorker, BAPOTrainingWorker):
        engine = FakeEngine()
        worker = make_worker(PolicyLossConfig(loss_mode="vanilla"), engine, cls=cls)
        data = rl_batch(seed=16)
        data["old_log_probs"] = data["fake_anchor"] - 0.2 * data["fake_feature"]
        step = data.copy()
        tu.assign_non_tensor(step, mini_batch_size=4, epochs=1, seed=0, dataloader_kwargs={"shuffle": False})
        output = worker.train_mini_batch(step)
        results[cls] = (engine.theta.item(), engine.infer_calls, engine.steps, sorted(tu.get(output, "metrics")))
    assert results[TrainingWorker] == results[BAPOTrainingWorker]
    assert not [k for step in results[BAPOTrainingWorker][2] for m in step for k in m if k.startswith("actor/bapo")]


def test_baseline_config_opts_in_to_the_imbalance_metrics():
    engine = FakeEngine()
    worker = make_worker(BaselinePolicyLossConfig(loss_mode="vanilla"), engine)
    data = rl_batch(seed=17)
    step = data.copy()
    tu.assign_non_tensor(step, mini_batch_size=4, epochs=1, seed=0, dataloader_kwargs={"shuffle": False})
    metrics = tu.get(worker.train_mini_batch(step), "metrics")
    assert {"actor/bapo/neg_token_share", "actor/bapo/neg_adv_mass_share"} <= set(metrics)
    assert engine.infer_calls == 0


@pytest.mark.parametrize("with_entropy", [True, False])
def test_vanilla_baseline_logs_the_entropy_clip_split_of_verls_clipped_tokens(with_entropy):
    """GRPO's Entropy-Clip split: verl's loss and metrics unchanged; raising + lowering = verl's own clip fractions
    (pg_clipfrac + pg_clipfrac_lower); each token classified by the paper's rule, written out per token here."""
    from verl_batches import model_log_probs, ppo_batch

    eps_low, eps_high, dual_c = 0.2, 0.28, 2.0
    worker = make_worker(BaselinePolicyLossConfig(loss_mode="vanilla"), FakeEngine(), clip_ratio_low=eps_low,
                         clip_ratio_high=eps_high, clip_ratio_c=dual_c)
    gen = torch.Generator().manual_seed(5)
    bsz, length = 16, 12
    old = -torch.rand(bsz, length, generator=gen, dtype=torch.float64) * 3
    log_prob = old + torch.randn(bsz, length, generator=gen, dtype=torch.float64) * 0.6
    adv = torch.randn(bsz, 1, generator=gen, dtype=torch.float64).expand(bsz, length).contiguous()
    mask = torch.arange(length)[None, :] < torch.randint(1, length + 1, (bsz,), generator=gen)[:, None]
    entropy = torch.rand(bsz, length, generator=gen, dtype=torch.float64) * 2
    output = {"log_probs": model_log_probs(log_prob, mask)}
    if with_entropy:
        output["entropy"] = model_log_probs(entropy, mask)
    loss, metrics = worker.loss_fn(model_output=output, data=ppo_batch(old, adv, mask))
    plain_loss, plain = ppo_loss(worker._actor_config, dict(output), ppo_batch(old, adv, mask))

    assert torch.equal(loss, plain_loss)
    suffix = "" if with_entropy else "_proxy"
    split = {f"actor/bapo/clipfrac_entropy_{side}{suffix}" for side in ("raising", "lowering")}
    assert set(metrics) == set(plain) | split
    value = {k: (v.aggregate() if hasattr(v, "aggregate") else v) for k, v in metrics.items()}
    verl_clipped = value["actor/pg_clipfrac"] + value["actor/pg_clipfrac_lower"]
    assert verl_clipped > 0.1 and value["actor/pg_clipfrac_lower"] > 0  # both of verl's clip kinds occur
    assert sum(value[k] for k in split) == pytest.approx(verl_clipped, abs=1e-6)  # float32 fractions; 1 token = 0.005

    mean_log_prob = log_prob[mask].mean().item()
    raising = lowering = tokens = 0
    for i in range(bsz):
        for t in range(length):
            if not mask[i, t]:
                continue
            tokens += 1
            a, r, lp = adv[i, t].item(), math.exp(log_prob[i, t].item() - old[i, t].item()), log_prob[i, t].item()
            if not ((a > 0 and r > 1 + eps_high) or (a < 0 and r < 1 - eps_low) or (a < 0 and r > dual_c)):
                continue
            low_prob = lp < -entropy[i, t].item() if with_entropy else lp < mean_log_prob  # pi(y_t) < exp(-H_t)
            if (a > 0 and low_prob) or (a < 0 and not low_prob):
                raising += 1
            else:
                lowering += 1
    assert value[f"actor/bapo/clipfrac_entropy_raising{suffix}"] == pytest.approx(raising / tokens, abs=1e-6)
    assert value[f"actor/bapo/clipfrac_entropy_lowering{suffix}"] == pytest.approx(lowering / tokens, abs=1e-6)
    assert raising > 0 and lowering > 0


def test_dynamic_context_parallel_is_refused_at_start_up():
    engine = FakeEngine()
    with pytest.raises(ValueError, match="dynamic_context_parallel"):
        worker = object.__new__(BAPOTrainingWorker)
        worker.engine, worker.engine_config = engine, SimpleNamespace(dynamic_context_parallel=True)
        worker.set_loss_fn(partial(ppo_loss, config=ActorConfig(strategy="megatron", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=BAPOPolicyLossConfig())))


def test_bapo_configs_refuse_to_build_without_the_actor_hook(monkeypatch):
    class OtherPluginsWorker(TrainingWorker):
        pass

    monkeypatch.setattr(ActorRolloutRefWorker, "actor_worker_cls", OtherPluginsWorker)
    for build in (BAPOPolicyLossConfig, lambda: BaselinePolicyLossConfig(loss_mode="vanilla")):
        with pytest.raises(RuntimeError, match="OtherPluginsWorker"):
            build()
    PolicyLossConfig(loss_mode="vanilla")  # other runs are unaffected


def _pipeline_worker(rank, init_file, out_dir):
    """Rank 0 = a first pipeline stage (no logits), rank 1 = the last stage; each its own DP group."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        dp_groups = [dist.new_group([0]), dist.new_group([1])]
        engine = FakeEngine(has_outputs=rank == 1)
        engine.get_data_parallel_group = lambda: dp_groups[rank]
        worker = make_worker(BAPOPolicyLossConfig(), engine)
        data = rl_batch(seed=18)
        compute = data.copy()
        tu.assign_non_tensor(compute, compute_loss=False, global_token_num=None)
        worker.infer_batch(compute)  # a log-prob pass: every stage runs it, only the last has outputs
        # bypass mode: old_log_probs are the rollout's; both stages run the probe forward
        data["old_log_probs"] = data["fake_anchor"] - 0.4 * data["fake_feature"]
        result = worker._search_update_bounds(data, worker._bapo)
        torch.save({"result": result, "infer_calls": engine.infer_calls}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_pipeline_stage_without_outputs_gets_no_bounds(tmp_path):
    """Real gloo group: rank 0 (no outputs) must not join the last stage's search all-reduce, and both
    ranks run the probe forward (their forwards are collectives under Megatron)."""
    context = mp.spawn(_pipeline_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120  # a rank stuck in a collective the other never joins would hang
    while not context.join(timeout=1):
        assert time.monotonic() < deadline, "deadlock: the ranks did not finish"
    first, last = (torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2))
    assert first["result"] is None and last["result"] is not None
    assert first["infer_calls"] == last["infer_calls"] == 2  # both ran the probe forward
    data = rl_batch(seed=18)
    data["old_log_probs"] = data["fake_anchor"] - 0.4 * data["fake_feature"]
    expected = direct_search(torch.tensor(0.0, dtype=torch.float64), data, BAPOPolicyLossConfig().search_spec)
    assert (last["result"].c_low, last["result"].c_high) == (expected.c_low, expected.c_high)


def _pipeline_train_worker(rank, init_file, out_dir):
    """Two pipeline stages of one model replica under virtual pipelining (micro-batch group 2), each its own DP
    group, through verl's TrainingWorker.train_mini_batch: rank 0 runs its layers only, rank 1 (the last stage)
    runs the loss. Old log-probs come from the rollout (bypass mode), so every update probes."""
    os.environ.update(BAPO_TRACE_DIR=os.path.join(out_dir, "trace"), BAPO_TRACE_TENSORS="1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        dp_groups = [dist.new_group([0]), dist.new_group([1])]
        engine = FakeEngine(has_outputs=rank == 1, vpp_group=2, pipeline_peer=1 - rank)
        engine.get_data_parallel_group = lambda: dp_groups[rank]
        worker = make_worker(BAPOPolicyLossConfig(), engine, dynamic_bsz=True, max_token_len=13)
        data = rl_batch(seed=26)  # stale enough that some update's search stops inside the path
        data["old_log_probs"] = data["fake_anchor"] - data["fake_feature"]
        run_step(worker, data, mini_batch_size=4, epochs=2)  # 2 mini-batches x 2 epochs = 4 updates
        torch.save({"infer_calls": engine.infer_calls, "partitions": engine.partitions, "steps": engine.steps},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_pipeline_parallel_update_uses_bounds_searched_over_the_loss_ratios(tmp_path):
    """The invariants a real Megatron PP 2 run would be checked for (verl's Megatron engine cannot run on CPU,
    see README "Known limits"): both stages run every probe forward with the gradient pass's micro-batch
    partition (a count verl accepts under VPP); the loss runs on the last stage only; each update's bounds, used
    by every micro-batch's loss, equal a direct search over the ratios that loss computed (saved by the trace);
    the first stage searches nothing. (Broken by skipping the probe on ranks without outputs: the stages'
    p2p exchange failed the test; by probing with the log-prob micro-batch size: the partitions differed; by
    inverting the probe's ratios: the bounds differed from the search over the loss's ratios.)"""
    context = mp.spawn(_pipeline_train_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        assert time.monotonic() < deadline, "deadlock: the stages did not run the same forwards"
    first, last = (torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2))
    assert first["infer_calls"] == last["infer_calls"] == 4  # one probe per update, on both stages
    assert first["partitions"] == last["partitions"]
    assert last["partitions"]["infer"] == last["partitions"]["train"]  # the probe is micro-batched like the update
    assert all(len(p) % 2 == 0 for kind in ("infer", "train") for p in last["partitions"][kind])
    assert first["steps"] == [[]] * 4 and all(len(step) > 1 for step in last["steps"])

    traces = {r: [json.loads(line) for f in (tmp_path / "trace").glob(f"rank{r}-*.jsonl") for line in f.read_text().splitlines()]
              for r in range(2)}
    assert not [t for t in traces[0] if t["kind"] in ("update", "loss")]  # no search, no loss on the first stage
    updates = [t for t in traces[1] if t["kind"] == "update"]
    losses = [t for t in traces[1] if t["kind"] == "loss"]
    assert [u["update"] for u in updates] == [0, 1, 2, 3]
    inside = 0
    for u in updates:
        mine = [t for t in losses if t["update"] == u["update"]]
        assert len(mine) == len(last["partitions"]["train"][u["update"]])
        assert {(t["c_low"], t["c_high"]) for t in mine} == {(u["c_low"], u["c_high"])}
        saved = [torch.load(tmp_path / "trace" / t["tensors"]) for t in mine]
        joined = {k: torch.cat([x[k].reshape(-1) for x in saved]) for k in ("ratio", "advantages", "mask")}
        again = search_clip_bounds(joined["ratio"], joined["advantages"], joined["mask"], BAPOPolicyLossConfig().search_spec)
        assert (again.c_low, again.c_high, again.steps) == (u["c_low"], u["c_high"], u["steps"])
        inside += again.steps > 0 and again.target_met
    assert inside >= 1  # a search that moved and stopped at rho0: other ratios would give other bounds


def test_imbalance_metrics_match_a_direct_count():
    engine = FakeEngine()
    worker = make_worker(BAPOPolicyLossConfig(), engine)
    data = rl_batch(seed=5)
    metrics = worker._imbalance_metrics(data)
    mask, adv = data["response_mask"].bool(), data["advantages"]
    neg, pos = (adv < 0) & mask, (adv > 0) & mask
    assert metrics["actor/bapo/neg_token_share"] == pytest.approx(neg.sum().item() / (neg | pos).sum().item())
    assert metrics["actor/bapo/neg_adv_mass_share"] == pytest.approx(adv[neg].abs().sum().item() / adv[mask].abs().sum().item())
    lengths = mask.sum(-1).double()
    seq_sign = adv.sum(-1).sign()
    assert metrics["actor/bapo/response_length_neg"] == pytest.approx(lengths[seq_sign < 0].mean().item())
    assert metrics["actor/bapo/response_length_pos"] == pytest.approx(lengths[seq_sign > 0].mean().item())


def test_imbalance_metrics_without_signal_are_missing():
    """A mean over nothing is NaN, not 0: both shares when every advantage is 0, the response length of a sign no
    response has. (With the old 0.0 fallback both checks fail.)"""
    worker = make_worker(BAPOPolicyLossConfig(), FakeEngine())
    data = rl_batch(seed=5)
    data["advantages"].zero_()
    metrics = worker._imbalance_metrics(data)
    assert set(metrics) == set(IMBALANCE_METRICS) and all(math.isnan(v) for v in metrics.values())
    data = rl_batch(seed=5)
    data["advantages"] = -data["advantages"].abs()  # negatives only
    metrics = worker._imbalance_metrics(data)
    assert math.isnan(metrics["actor/bapo/response_length_pos"])
    assert metrics["actor/bapo/neg_token_share"] == metrics["actor/bapo/neg_adv_mass_share"] == 1.0
    assert metrics["actor/bapo/response_length_neg"] > 0


IMBALANCE_METRICS = ("actor/bapo/neg_token_share", "actor/bapo/neg_adv_mass_share",
                     "actor/bapo/response_length_pos", "actor/bapo/response_length_neg")  # fmt: skip


def logged_step(worker, data, mini_batch_size=4):
    """The actor metrics of one training step as verl's trainer logs them: train_mini_batch's output through
    verl's reduce_metrics (mean over the values collected for each key)."""
    step = data.copy()
    tu.assign_non_tensor(step, mini_batch_size=mini_batch_size, epochs=1, seed=0, dataloader_kwargs={"shuffle": False})
    return reduce_metrics(dict(tu.get(worker.train_mini_batch(step), "metrics")))


@pytest.mark.parametrize("scope", ["update", "micro_batch"])
def test_updates_without_signal_log_no_search_metrics(scope):
    """An update whose tokens all have advantage 0 logs no rho / bounds / search keys, so the step's value is the
    mean over the updates with signal; a step with no signal at all logs them as NaN (null in the file logger),
    and its imbalance metrics too. verl's own keys are logged as before. (Broken by logging the search metrics of
    every update, as before: the step's rho became the mean with update 1's made-up 0.)"""
    engine = FakeEngine(verl_metrics=True)
    worker = make_worker(BAPOPolicyLossConfig(scope=scope), engine, micro_batch_size=2)
    data = rl_batch(seed=4)  # rows 1 and 3 positive: each micro-batch of update 0 has both signs
    data["old_log_probs"] = data["fake_anchor"] - 0.3 * data["fake_feature"]  # stale: bounds and rho differ from the start
    data["advantages"][4:] = 0.0  # the second mini-batch, update 1, has no signal
    metrics = logged_step(worker, data)
    signal, no_signal = engine.steps
    assert all(set(SEARCH_METRICS) <= set(m) for m in signal)
    assert not [k for m in no_signal for k in m if k in SEARCH_METRICS]
    assert all({"actor/pg_clipfrac", "actor/ppo_kl", "actor/bapo/bounds_from_update"} <= set(m) for m in no_signal)
    assert all(m["actor/bapo/rho"] > 0 for m in signal)
    for key in SEARCH_METRICS:
        assert metrics[key] == pytest.approx(sum(m[key] for m in signal) / len(signal)), key
    # the imbalance metrics are over the step's whole batch, which has signal in its first half
    mask, adv = data["response_mask"].bool(), data["advantages"]
    assert metrics["actor/bapo/neg_adv_mass_share"] == pytest.approx(adv[adv < 0].abs().sum().item() / adv[mask].abs().sum().item())

    engine = FakeEngine(verl_metrics=True)
    worker = make_worker(BAPOPolicyLossConfig(scope=scope), engine, micro_batch_size=2)
    data["advantages"].zero_()
    metrics = logged_step(worker, data)
    assert not [k for step in engine.steps for m in step for k in m if k in SEARCH_METRICS]
    assert all(math.isnan(metrics[key]) for key in (*SEARCH_METRICS, *IMBALANCE_METRICS))
    assert metrics["actor/pg_clipfrac"] == 0.0 and metrics["actor/bapo/bounds_from_update"] == float(scope == "update")


def test_plugin_installs_the_worker_class():
    assert ActorRolloutRefWorker.actor_worker_cls is BAPOTrainingWorker


def test_trace_records_every_update_and_every_micro_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("BAPO_TRACE_DIR", str(tmp_path))
    monkeypatch.setenv("BAPO_TRACE_TENSORS", "1")
    engine = FakeEngine()
    worker = make_worker(BAPOPolicyLossConfig(), engine, micro_batch_size=2)
    data = rl_batch(seed=6)
    data["old_log_probs"] = data["fake_anchor"] - 0.5 * data["fake_feature"]
    run_step(worker, data, mini_batch_size=4)
    (trace_file,) = tmp_path.glob("*.jsonl")
    records = [json.loads(line) for line in trace_file.read_text().splitlines()]
    updates = [r for r in records if r["kind"] == "update"]
    losses = [r for r in records if r["kind"] == "loss"]
    assert [u["update"] for u in updates] == [0, 1] and len(losses) == 4
    for u in updates:
        mine = [r for r in losses if r["update"] == u["update"]]
        assert [r["micro_batch"] for r in mine] == [0, 1]
        assert {(r["c_low"], r["c_high"]) for r in mine} == {(u["c_low"], u["c_high"])}
        # the saved micro-batch tensors reproduce the update's search
        saved = [torch.load(tmp_path / r["tensors"]) for r in mine]
        joined = {k: torch.cat([s[k].reshape(-1) for s in saved]) for k in ("ratio", "advantages", "mask")}
        again = search_clip_bounds(joined["ratio"], joined["advantages"], joined["mask"], worker._bapo.search_spec)
        assert (again.c_low, again.c_high, again.steps) == (u["c_low"], u["c_high"], u["steps"])
