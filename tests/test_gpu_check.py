"""benchmarks/gpu_check.py on CPU: the smoke report (with verl, omegaconf, hydra, Ray and vLLM unimportable, as on
the bare GPU machine), and its two loss implementations against the verl losses they stand for."""

import re
import subprocess
import sys
import textwrap

import pytest
import torch

import verl  # noqa: F401  (registers the bapo loss through the plugin entry point)
from benchmarks import gpu_check
from benchmarks.gpu_memory import script_tokens, seven_b_shapes
from recipe.bapo.config import BAPOPolicyLossConfig
from run_scripts_helpers import ROOT, printed_runs, script_env
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, get_policy_loss_fn
from verl.workers.config import ActorConfig

BLOCKED = ("verl", "omegaconf", "hydra", "ray", "vllm")
# Runs the script as `python benchmarks/gpu_check.py ...` would, after making the BLOCKED packages unimportable
# (a finder in front of sys.meta_path), and first proves the finder works.
RUNNER = textwrap.dedent("""
    import runpy, sys
    BLOCKED = {blocked!r}
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"blocked: {{name}}")
    sys.meta_path.insert(0, Blocker())
    try:
        import omegaconf
        sys.exit("the blocker let omegaconf through")
    except ModuleNotFoundError:
        pass
    sys.argv = ["benchmarks/gpu_check.py", *sys.argv[1:]]
    runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
""")


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "report.md"
    code = RUNNER.format(blocked=BLOCKED)
    proc = subprocess.run([sys.executable, "-c", code, "--device", "cpu", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out.read_text()


def table(report: str, header_start: str) -> list[list[str]]:
    """Rows (cells) of the markdown table whose header line starts with `header_start`."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_smoke_report_structure_without_verl(smoke_report):
    report = smoke_report
    assert "**failed**" not in report and "| failed |" not in report  # no section, size or depth failed
    for key in ("date", "device", "torch", "CUDA (torch.version.cuda)", "transformers", "mode", "wall"):
        assert re.search(rf"^\| {re.escape(key)} \| .+ \|$", report, re.M), key
    assert "so far" not in report  # the run finished

    loss = table(report, "| tokens | log-probs |")
    sizes = gpu_check.SMOKE_SIZES.split(",")
    assert [(r[0], r[1]) for r in loss] == [(s, d) for s in sizes for d in gpu_check.DTYPES]
    for row in loss:
        assert len(row) == 10
        vanilla, bapo = float(row[2]), float(row[3])
        assert vanilla > 0 and bapo > 0 and row[4].endswith("x")
        assert float(row[4][:-1]) == pytest.approx(bapo / vanilla, abs=0.01)  # from the unrounded times
        assert 20 <= int(row[6]) <= 45  # the batches' searches walk 20-45 steps
        assert re.fullmatch(r"\d+ ops", row[7]) and int(row[7].split()[0]) > 0
        assert all(re.fullmatch(r"[\d.e+-]+ \(peak unknown\)", cell) for cell in row[8:10])

    memory = table(report, "| term | measured |")
    terms = [r[0] for r in memory]
    assert terms[0] == "logits + log-softmax (head alone)"
    for tag in ("checkpointing", "no checkpointing"):
        assert f"{tag}: activations per layer, held after forward" in terms
        assert f"{tag}: **scaled to L={seven_b_shapes().full_layers}** (estimate)" in terms
    for row in memory:
        assert re.fullmatch(r"-?[\d.]+ (GiB|MiB)", row[1]), row  # measured on CPU too (tensor accounting)
        if row[2] != "n/a":
            assert float(row[3]) > 0
    # with checkpointing a layer keeps exactly its bf16 input: the formula's T * H * 2 B
    per_layer = memory[terms.index("checkpointing: activations per layer, held after forward")]
    assert per_layer[3] == "1.00"


def same_loss_and_gradient(verl_fn, ours, old, log_prob, adv, mask) -> tuple[dict, dict]:
    """Asserts both losses give bitwise the same loss and log-prob gradient; returns both metrics dicts."""
    results = []
    for fn in (verl_fn, ours):
        lp = log_prob.clone().requires_grad_(True)
        loss, metrics = fn(old, lp, adv, mask)
        loss.backward()
        results.append((loss, lp.grad.nan_to_num(), metrics))
    (loss_a, grad_a, metrics_a), (loss_b, grad_b, metrics_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
    return metrics_a, metrics_b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vanilla_transcription_equals_verl(dtype):
    """Same loss, gradient and metrics as verl's compute_policy_loss_vanilla, dual clip and NaN padding included."""
    gen = torch.Generator().manual_seed(1)
    old = (-torch.rand(16, 64, generator=gen) * 3).to(dtype)
    log_prob = (old.float() + torch.randn(16, 64, generator=gen) * 1.5).to(dtype)  # ratios far above 3 occur
    adv = torch.randn(16, 1, generator=gen).expand(16, 64).contiguous()
    mask = torch.arange(64)[None, :] < torch.randint(1, 65, (16, 1), generator=gen)
    log_prob = torch.where(mask, log_prob, torch.full_like(log_prob, float("nan")))  # NaNs only in padding
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2, clip_ratio_high=0.2,
                         clip_ratio_c=3.0)
    ratio = (log_prob.float() - old.float()).exp()
    assert ((ratio > 3) & (adv < 0) & mask).any() and ((ratio > 1.2) & (adv > 0) & mask).any()
    verl_vanilla = lambda *b: compute_policy_loss_vanilla(*b, "token-mean", config)  # noqa: E731
    metrics_v, metrics_t = same_loss_and_gradient(verl_vanilla, gpu_check.vanilla_ppo_loss, old, log_prob, adv, mask)
    assert metrics_v == metrics_t


def test_bapo_composition_equals_registered_loss():
    """gpu_check's verl-free BAPO loss = the registered "bapo" loss at scope micro_batch (bounds, loss, gradient)."""
    policy = BAPOPolicyLossConfig(scope="micro_batch")
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=policy)
    registered = get_policy_loss_fn("bapo")
    steps = []
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        old = -torch.rand(8, 128, generator=gen) * 2
        log_prob = old + torch.randn(8, 128, generator=gen) * 0.6
        log_prob[:, ::5] = float("nan")  # non-finite tokens inside the mask: left out of search and loss by both
        adv = torch.randn(8, 1, generator=gen).expand(8, 128).contiguous()
        mask = torch.arange(128)[None, :] < torch.randint(64, 129, (8, 1), generator=gen)
        verl_bapo = lambda *b: registered(*b, "token-mean", config)  # noqa: E731
        metrics_r, metrics_g = same_loss_and_gradient(verl_bapo, gpu_check.bapo_loss, old, log_prob, adv, mask)
        assert (metrics_r["actor/bapo/c_low"], metrics_r["actor/bapo/c_high"]) == (metrics_g["c_low"], metrics_g["c_high"])
        for name in ("clipfrac_pos", "clipfrac_neg", "nonfinite_token_frac"):
            assert metrics_r[f"actor/bapo/{name}"] == metrics_g[name], name
        assert metrics_r["actor/ppo_kl"] == metrics_g["ppo_kl"]
        steps.append(metrics_g["steps"])
    assert max(steps) > 0  # some searches moved the bounds


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA H200", 4.8e12),
    ("NVIDIA H100 NVL", None), ("NVIDIA A100-SXM4-80GB", None), ("cpu (x86_64, 2 threads)", None),
])  # fmt: skip
def test_peak_bandwidth_by_device_name(name, expected):
    assert gpu_check.peak_bandwidth(name)[0] == expected


def test_token_count_is_the_7b_8k_scripts(tmp_path):
    """The memory check's T is the ppo_max_token_len_per_gpu the 7B 8k run script hands main_bapo."""
    (run,) = printed_runs("r1_7b_8k_staleness8.sh", script_env(tmp_path, METHOD="bapo"))
    (arg,) = [a for a in run if a.startswith("actor_rollout_ref.actor.ppo_max_token_len_per_gpu=")]
    assert script_tokens() == int(arg.split("=")[1])
    broken = tmp_path / "two.sh"
    broken.write_text("actor_rollout_ref.actor.ppo_max_token_len_per_gpu=1\nactor_rollout_ref.actor.ppo_max_token_len_per_gpu=2\n")
    with pytest.raises(ValueError, match="expected one"):
        script_tokens(broken)
