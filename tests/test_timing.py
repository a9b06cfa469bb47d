"""benchmarks/timing.py: FLOP counting against the backward = 2 x forward identity of linear layers, and one real
measurement run (tiny FLUX, one method in its own process) whose table is internally consistent."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import timing  # noqa: E402

from infra import diffusers_models  # noqa: E402


def test_full_fine_tune_backward_costs_two_forwards_and_lora_far_less():
    full = diffusers_models.build_tiny_flux(lora_rank=0)
    fwd, grad = timing.count_flops(full)
    assert fwd > 0
    # every matmul's backward computes the input and the weight gradient: 2x its forward. (The first layer's input
    # gradient is not needed, so slightly under 3x in total.)
    assert 2.6 < grad / fwd <= 3.0
    lora = diffusers_models.build_tiny_flux(lora_rank=4)
    fwd_l, grad_l = timing.count_flops(lora)
    assert fwd_l > fwd  # the adapters' own matmuls
    assert grad_l / fwd_l < grad / fwd  # no weight gradients for the frozen base


def test_the_forward_flops_are_every_linear_layer_and_attention_call_counted_by_hand(monkeypatch):
    """An independent count of one forward of the tiny FLUX: 2 x in x out per row through each Linear layer (forward
    hooks), 4 x L_q x L_k x head_dim per head for each attention call (QK^T and PV), and nothing else (FLUX has no
    other matrix products). The FLOP counter must see every one of them, attention included, and no more."""
    import torch
    import torch.nn.functional as F
    policy = diffusers_models.build_tiny_flux(lora_rank=0)
    by_hand = []
    hooks = [m.register_forward_hook(lambda m, inp, out: by_hand.append(2 * inp[0].numel() * m.out_features))
             for m in policy.net.modules() if isinstance(m, torch.nn.Linear)]
    original = F.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        q = args[0] if args else kwargs["query"]
        k = args[1] if len(args) > 1 else kwargs["key"]
        by_hand.append(4 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1])
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    with torch.no_grad():
        policy.velocity(policy.initial_noise(1), 0.5, policy.encode_prompts(["a photo of red"]))
    for h in hooks:
        h.remove()
    monkeypatch.setattr(F, "scaled_dot_product_attention", original)
    fwd, _ = timing.count_flops(policy)
    assert fwd == sum(by_hand)


def test_mfu_counts_the_models_flops_not_gradient_checkpointings_recomputation():
    """The full-depth rows run with --gradient-checkpointing: its recomputed forwards are time, not model FLOPs.
    count_flops gives a checkpointed policy the plain one's FLOPs and leaves checkpointing on, whose backward, counted
    as it trains, does recompute (about a third more FLOPs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    for rank in (0, 4):
        plain = timing.count_flops(diffusers_models.build_tiny_flux(lora_rank=rank, seed=0))
        policy = diffusers_models.build_tiny_flux(lora_rank=rank, seed=0)
        policy.enable_gradient_checkpointing()
        assert timing.count_flops(policy) == plain
        x, cond = policy.initial_noise(1), policy.encode_prompts(["a photo of red"])
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as training:
            policy.velocity(x, 0.5, cond).square().mean().backward()
        assert training.get_total_flops() > 1.2 * plain[1]
        assert all(m.gradient_checkpointing for m in policy.net.modules() if hasattr(m, "gradient_checkpointing"))


def test_the_table_is_the_stated_arithmetic_over_the_steady_iterations():
    """TFLOP / it = NFE_no_grad x forward + NFE_grad x (forward + backward); MFU = that / (s / it x the device's dense
    bf16 peak); medians over the iterations the worker kept (it drops the first, the warm-up)."""
    result = dict(method="DGPO", device="NVIDIA H200", params=12e9, trainable=2e7, resolution=512, tokens=1024,
                  lora_rank=32, iterations_measured=3, peak_gib=30.0, flops_fwd=1e12, flops_grad=3e12,
                  seconds=[2.0, 1.0, 8.0], warmup_seconds=40.0, fwd_seconds=[1.0, 0.5, 5.0],
                  bwd_seconds=[0.6, 0.3, 2.0], nfe_no_grad=[10, 10, 10], nfe_grad=[5, 5, 5], memory_plan=None)
    row = next(line for line in timing.table([result], "flux-dev", None) if line.startswith("| DGPO"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:12] == ["10 / 5", "2.00", "1.00", "0.60", "80.0%", "20.0%", "25.00",
                           f"{25e12 / 2.0 / 989.4e12:.1%}", "30.0 GiB"]
    assert timing.median([3.0, 1.0, 2.0, 10.0]) == 2.5


@pytest.mark.parametrize("device, peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H200", 989.4),
                                          ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                                          ("NVIDIA A100-SXM4-80GB", 312.0), ("cpu", None)])
def test_each_devices_mfu_is_against_its_own_dense_bf16_peak(device, peak):
    assert timing.peak_tflops(device) == peak


def test_the_worker_measures_every_iteration_after_the_first_on_the_depth_asked_for(tmp_path):
    """What the table's medians are taken over: each iteration after the warm-up one, with its own forward and
    backward clocks (never more than the iteration), on a transformer of the depth asked for (the full-depth rows)."""
    import json
    import subprocess
    from diffusers import FluxTransformer2DModel
    proc = subprocess.run([sys.executable, "benchmarks/timing.py", "--config", "tiny", "--depth", "2", "1",
                           "--worker", "DGPO", str(tmp_path)], cwd=timing.ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["iterations_measured"] == len(r["seconds"]) == len(r["fwd_seconds"]) == 2  # 3 run, the first dropped
    assert all(0 < f + b <= s for f, b, s in zip(r["fwd_seconds"], r["bwd_seconds"], r["seconds"]))
    base = FluxTransformer2DModel(**{**timing.CONFIGS["tiny"]["transformer"], "num_layers": 2, "num_single_layers": 1})
    assert r["lora_rank"] > 0 and r["params"] == sum(p.numel() for p in base.parameters()) + r["trainable"]


@pytest.mark.slow
def test_a_measurement_run_gives_a_consistent_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["timing.py", "--config", "tiny", "--methods", "Flow-GRPO", "--out",
                                      str(tmp_path / "t.md")])
    timing.main()
    row = next(line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| Flow-GRPO"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    seconds, fwd, bwd, share, overhead = float(cells[4]), float(cells[5]), float(cells[6]), cells[7], cells[8]
    assert 0 < fwd + bwd <= seconds
    assert float(share.rstrip("%")) + float(overhead.rstrip("%")) == pytest.approx(100, abs=0.11)
    assert cells[3] == "48 / 40"  # the tiny-flux preset: 2 prompts x 4 samples x 6 steps; 5 of 6 steps trained


@pytest.mark.slow
def test_variants_give_one_row_each_with_the_same_work_and_the_memory_plan_is_listed(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["timing.py", "--config", "tiny", "--methods", "DGPO", "--variants", "plain=",
                "merged=--merge-lora-rollouts", "fit=--fit-memory --memory-budget-gib 1",
                "--out", str(tmp_path / "t.md")])
    assert timing.main() == 0
    text = (tmp_path / "t.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| DGPO")]
    assert [r[0] for r in rows] == ["DGPO (plain)", "DGPO (merged)", "DGPO (fit)"]
    assert rows[0][3] == rows[1][3] == rows[2][3] == "64 / 16"  # a lever changes how calls run, not how many
    # the plan is listed under the table: 1 GiB holds both groups of the tiny-flux preset without checkpointing
    assert "- DGPO (fit): --fit-memory chose training micro-batches of 2 unit(s) of 4 samples, checkpointing off" \
        in text


@pytest.mark.parametrize("argv, match", [(["--variants", "compile"], "each one is NAME=FLAGS"),
                                         (["--methods", "DPO"], "unknown \\['DPO'\\]")])
def test_bad_variants_and_methods_stop_before_running(argv, match, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["timing.py", "--config", "tiny", *argv])
    with pytest.raises(SystemExit, match=match):
        timing.main()


@pytest.mark.slow
def test_compiled_blocks_count_the_eager_flops():
    """MFU of a --compile run is counted right: with the blocks compiled by inductor (and already run), the FLOP
    counter still sees every matmul and attention call, the same FLOPs as the eager model."""
    eager = timing.count_flops(diffusers_models.build_tiny_flux(lora_rank=4, seed=0))
    policy = diffusers_models.build_tiny_flux(lora_rank=4, seed=0)
    policy.compile_blocks()
    x = policy.initial_noise(1)
    policy.velocity(x, 0.5, policy.encode_prompts(["a photo of red"]))  # compiled and run before counting
    assert timing.count_flops(policy) == eager
