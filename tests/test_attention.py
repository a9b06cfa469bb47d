"""infra/attention.py: the attention kernel is chosen, checked numerically against the math kernel, and a kernel
that fails stops the run with one line naming one that passes. The kernels themselves run on the CPU (flash and
math exist there); a broken GPU kernel is simulated by a wrapper that corrupts one kernel's output."""

import pytest
import torch
import torch.nn.functional as F

from infra import tasks
from infra import diffusers_models
from infra import attention

SHAPE = attention.AttentionShape(heads=2, head_dim=16, seq_len=40)


@pytest.fixture(autouse=True)
def restore_kernel_flags():
    flags = [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()]
    yield
    for enable, on in zip((torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                           torch.backends.cuda.enable_cudnn_sdp, torch.backends.cuda.enable_math_sdp), flags):
        enable(on)


@pytest.fixture
def broken_flash(monkeypatch):
    """Flash attention that returns NaN wherever it is the only kernel allowed (as cuDNN's backward did on an H200)."""
    original = F.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        out = original(*args, **kwargs)
        only_flash = torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
        return out * float("nan") if only_flash else out

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_working_kernels_pass_the_check_on_the_cpu(dtype):
    assert attention.check_backend("flash", SHAPE, dtype, "cpu") is None
    assert attention.check_backend("math", SHAPE, dtype, "cpu") is None


def test_a_kernel_missing_on_this_device_fails_the_check_with_its_reason():
    reason = attention.check_backend("cudnn", SHAPE, torch.float32, "cpu")  # no cuDNN attention on a CPU
    assert reason and "RuntimeError" in reason


def test_a_kernel_giving_nan_fails_and_the_error_names_a_kernel_that_passes(broken_flash):
    assert attention.check_backend("flash", SHAPE, torch.float32, "cpu") == "non-finite output"
    with pytest.raises(SystemExit) as e:
        attention.configure("flash", SHAPE, torch.float32, "cpu", log=lambda *_: None)
    message = str(e.value)
    assert "\n" not in message and "flash: non-finite output" in message
    assert "Use --attention-backend math" in message  # efficient and cuDNN do not run on a CPU: math is what passes


class _NaNBackward(torch.autograd.Function):
    """The identity forward, NaN gradients backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _broken(monkeypatch, when):
    """Flash attention whose forward is right and whose backward gives NaN (cuDNN's bug on the H200), wherever it is
    the only kernel allowed and `when(query)` holds."""
    original = F.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        out = original(*args, **kwargs)
        only_flash = torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
        return _NaNBackward.apply(out) if only_flash and when(args[0]) else out

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)


def test_a_kernel_whose_backward_alone_gives_nan_fails_the_check(monkeypatch):
    _broken(monkeypatch, when=lambda q: True)
    assert attention.check_backend("flash", SHAPE, torch.float32, "cpu") == "non-finite dq"


def test_a_bf16_run_checks_the_kernel_in_bf16(tmp_path, monkeypatch):
    """A kernel broken only for bf16 inputs (as cuDNN failed only in some dtypes) passes an fp32 check: the run
    under --mixed-precision bf16 must check it in bf16, and stop."""
    _broken(monkeypatch, when=lambda q: q.dtype == torch.bfloat16)
    assert attention.check_backend("flash", SHAPE, torch.float32, "cpu") is None
    assert attention.check_backend("flash", SHAPE, torch.bfloat16, "cpu") == "non-finite dq"
    import flow_grpo
    flags = ["--model", "tiny-flux", "--iterations", "1", "--output-dir", str(tmp_path), "--log-every", "0",
             "--attention-backend", "flash", "--mixed-precision", "bf16"]
    with pytest.raises(SystemExit, match="flash: non-finite dq"):
        flow_grpo.main(flags)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_wrong_answer_is_caught_not_only_nan(monkeypatch, dtype):
    """10% off fails in bf16 too, whose own rounding (~4e-3 here) the tolerance must allow and no more."""
    original = F.scaled_dot_product_attention

    def off_by_a_bit(*args, **kwargs):
        out = original(*args, **kwargs)
        return out * 1.1 if not torch.backends.cuda.math_sdp_enabled() else out

    monkeypatch.setattr(F, "scaled_dot_product_attention", off_by_a_bit)
    reason = attention.check_backend("flash", SHAPE, dtype, "cpu")
    assert reason.startswith("output differs from the math kernel")


def test_auto_on_a_gpu_takes_flash_else_efficient_and_never_cudnn(monkeypatch):
    """The choice and the process-wide flags, with the per-kernel check replaced by its verdicts."""
    verdicts = {"flash": None, "efficient": None, "cudnn": None, "math": None}
    monkeypatch.setattr(attention, "check_backend", lambda name, *a, **k: verdicts[name])
    said = []
    assert attention.configure("auto", SHAPE, torch.bfloat16, "cuda", log=said.append) == "flash"
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert said[-1].startswith("attention: flash, efficient for what flash cannot take (checked")
    verdicts["efficient"] = "non-finite dk"  # flash passes, memory-efficient fails its own check: it stays off
    assert attention.configure("auto", SHAPE, torch.bfloat16, "cuda", log=said.append) == "flash"
    assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert said[-1].startswith("attention: flash (checked")
    verdicts["efficient"] = None
    verdicts["flash"] = "non-finite dq"
    assert attention.configure("auto", SHAPE, torch.bfloat16, "cuda", log=lambda *_: None) == "efficient"
    assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    verdicts["efficient"] = "RuntimeError: illegal memory access"
    with pytest.raises(SystemExit, match="Use --attention-backend cudnn"):
        attention.configure("auto", SHAPE, torch.bfloat16, "cuda", log=lambda *_: None)
    assert attention.configure("cudnn", SHAPE, torch.bfloat16, "cuda", log=lambda *_: None) == "cudnn"
    assert torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()


def test_a_kernel_the_fp32_reward_models_would_use_is_checked_in_fp32_too(monkeypatch):
    """Under bf16 the reward models still call attention in fp32, on the same process-wide kernels. Flash does not take
    fp32 (those calls go on to the next kernel), memory-efficient does: it is turned on only if it is right in fp32."""
    cannot = "RuntimeError: No available kernel. Aborting execution."  # what CUDA's PyTorch says
    assert cannot.startswith(attention.CANNOT_TAKE)
    # and what PyTorch really says here for a kernel that cannot take the inputs (no memory-efficient kernel on a CPU)
    assert attention.check_backend("efficient", SHAPE, torch.float32, "cpu").startswith(attention.CANNOT_TAKE)
    verdicts = {("flash", torch.bfloat16): None, ("flash", torch.float32): cannot,
                ("efficient", torch.bfloat16): None, ("efficient", torch.float32): None,
                ("cudnn", torch.bfloat16): None, ("cudnn", torch.float32): cannot,
                ("math", torch.bfloat16): None, ("math", torch.float32): None}
    asked = []

    def check(name, shape, dtype, device):
        asked.append((name, dtype))
        return verdicts[name, dtype]

    monkeypatch.setattr(attention, "check_backend", check)
    said = []
    assert attention.configure("auto", SHAPE, torch.bfloat16, "cuda", log=said.append) == "flash"
    assert ("efficient", torch.float32) in asked and ("flash", torch.float32) in asked
    assert torch.backends.cuda.mem_efficient_sdp_enabled()
    assert "bfloat16 and float32" in said[-1]
    verdicts["efficient", torch.float32] = "non-finite dv"  # right in bf16, wrong in fp32: math serves fp32 instead
    assert attention.configure("auto", SHAPE, torch.bfloat16, "cuda", log=said.append) == "flash"
    assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert said[-1].endswith("; efficient off: in float32 (the reward models' dtype): non-finite dv")  # and why
    verdicts["flash", torch.bfloat16] = "non-finite dq"  # no kernel left for bf16 that is right in both dtypes
    with pytest.raises(SystemExit, match=r"efficient: in float32 \(the reward models' dtype\): non-finite dv\. "
                                         r"Use --attention-backend cudnn"):
        attention.configure("auto", SHAPE, torch.bfloat16, "cuda", log=lambda *_: None)
    asked.clear()  # an fp32 policy is checked once per kernel, in fp32
    verdicts["efficient", torch.float32] = None
    assert attention.configure("efficient", SHAPE, torch.float32, "cuda", log=said.append) == "efficient"
    assert asked == [("efficient", torch.float32)] and "float32, forward" in said[-1]


def test_auto_on_the_cpu_changes_nothing_and_bad_names_are_refused():
    assert attention.configure("auto", SHAPE, torch.float32, "cpu") is None
    assert attention.configure("flash", None, torch.float32, "cpu") is None  # a model without attention (the toy)
    with pytest.raises(SystemExit, match="--attention-backend must be one of auto, flash"):
        attention.configure("xformers", SHAPE, torch.float32, "cpu")


def test_flux_and_sd3_report_their_attention_shape():
    flux = diffusers_models.build_tiny_flux(resolution=32, lora_rank=4)
    assert flux.attention_shape() == attention.AttentionShape(heads=2, head_dim=16, seq_len=256 + 8)
    assert tasks.toy2d_policy(keep_reference=False).attention_shape() is None


def test_a_run_with_a_named_kernel_checks_it_before_training(tmp_path, broken_flash):
    """The check runs at the start of a real run, before the first evaluation, and stops it with one line."""
    import flow_grpo
    flags = ["--model", "tiny-flux", "--iterations", "1", "--output-dir", str(tmp_path), "--log-every", "0"]
    with pytest.raises(SystemExit, match="flash: non-finite output"):
        flow_grpo.main(flags + ["--attention-backend", "flash"])
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "final").exists()


def test_preselect_keeps_cudnn_off_before_the_check_on_a_gpu_only():
    """The text encoders run before the transformer can be checked: on a GPU they get the kernels asked for (never
    cuDNN under auto) from the start; the CPU keeps PyTorch's choice."""
    attention.enable({"flash", "efficient", "cudnn"})
    attention.preselect("auto", "cpu")
    assert torch.backends.cuda.cudnn_sdp_enabled()
    attention.preselect("auto", "cuda")
    assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    attention.preselect("cudnn", torch.device("cuda", 0))
    assert torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()


def test_a_run_preselects_the_kernels_before_the_model_loads(tmp_path, monkeypatch):
    """Run() preselects the asked-for kernels before the script loads its model (and with it the text encoders)."""
    import flow_grpo
    order = []
    monkeypatch.setattr(attention, "preselect", lambda requested, device: order.append(("preselect", requested)))
    load = flow_grpo.load_task
    monkeypatch.setattr(flow_grpo, "load_task", lambda *a, **k: order.append(("load",)) or load(*a, **k))
    flow_grpo.main(["--iterations", "1", "--output-dir", str(tmp_path), "--log-every", "0", "--eval-samples-per-prompt",
                    "2", "--attention-backend", "math"])
    assert order == [("preselect", "math"), ("load",)]


def test_the_reward_models_shapes_are_checked_in_fp32_too(monkeypatch):
    """A kernel right at the policy's shape may still be wrong at a reward model's (CLIP-H: 16 heads x 80, 257
    tokens): a kernel that takes fp32 is checked there too, and stays off if it fails (math serves those calls)."""
    clip_h = attention.AttentionShape(heads=16, head_dim=80, seq_len=257)
    cannot = "RuntimeError: No available kernel. Aborting execution."
    broken = {("efficient", clip_h, torch.float32)}
    asked = []

    def check(name, shape, dtype, device):
        asked.append((name, shape, dtype))
        if (name, shape, dtype) in broken:
            return "non-finite dq"
        return cannot if name == "flash" and dtype == torch.float32 else None

    monkeypatch.setattr(attention, "check_backend", check)
    said = []
    shapes = [clip_h, clip_h, SHAPE]  # repeated: checked once
    assert attention.configure("auto", SHAPE, torch.bfloat16, "cuda", log=said.append, reward_shapes=shapes) == "flash"
    assert asked.count(("efficient", clip_h, torch.float32)) == 1 and ("flash", clip_h, torch.float32) in asked
    assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert said[-1].endswith("; efficient off: in float32 at a reward model's 16 heads x 80, 257 tokens: "
                             "non-finite dq")
    broken.clear()
    asked.clear()
    attention.configure("auto", SHAPE, torch.bfloat16, "cuda", log=said.append, reward_shapes=shapes)
    assert torch.backends.cuda.mem_efficient_sdp_enabled()
    assert "bfloat16 and float32, forward and backward; 16 x 80, 257 tokens in float32)" in said[-1]
    assert asked.count(("efficient", SHAPE, torch.float32)) == 1  # a reward at the policy's shape: checked once
    asked.clear()  # an fp32 policy: its own shape is not checked twice, the reward model's is
    attention.configure("efficient", SHAPE, torch.float32, "cuda", log=said.append, reward_shapes=shapes)
    assert asked == [("efficient", SHAPE, torch.float32), ("efficient", clip_h, torch.float32)]


def test_a_run_checks_its_reward_models_shapes(tmp_path, monkeypatch):
    """Run hands the reward's attention shapes to the check."""
    import flow_grpo
    from infra import rewards
    got = {}
    configure = attention.configure

    def recording(*a, reward_shapes=(), **k):
        got["reward_shapes"] = list(reward_shapes)
        return configure(*a, reward_shapes=reward_shapes, **k)

    clip_h = attention.AttentionShape(heads=16, head_dim=80, seq_len=257)
    reward = rewards.WeightedReward([(1.0, rewards.mean_color_reward)])
    reward.attention_shapes = lambda: [clip_h]
    monkeypatch.setattr(attention, "configure", recording)
    monkeypatch.setattr(tasks, "get_reward", lambda *a, **k: reward)
    flow_grpo.main(["--model", "tiny-flux", "--iterations", "1", "--output-dir", str(tmp_path), "--log-every", "0",
                    "--eval-samples-per-prompt", "1", "--save-weights", "false"])
    assert got["reward_shapes"] == [clip_h]


# ------------------------------------------------------------------------------------------------ masked calls
CAUSAL = attention.AttentionShape(heads=2, head_dim=16, seq_len=40, mask="causal")
BIAS = attention.AttentionShape(heads=2, head_dim=16, seq_len=40, mask="bias")


def _mask_ignored(monkeypatch):
    """Flash attention that drops the mask it is given wherever it is the only kernel allowed: right on unmasked
    calls, wrong on every masked one."""
    original = F.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        only_flash = torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
        return original(*args, **{**kwargs, "attn_mask": None}) if only_flash else original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_calls_are_checked_with_their_mask(monkeypatch, dtype):
    """CLIP's text towers pass a causal mask, T5 its position bias: the check passes those masks to both kernels, so a
    kernel that mishandles them fails where an unmasked check would pass."""
    for shape in (CAUSAL, BIAS):
        assert attention.check_backend("flash", shape, dtype, "cpu") is None
    _mask_ignored(monkeypatch)
    assert attention.check_backend("flash", SHAPE, dtype, "cpu") is None
    for shape in (CAUSAL, BIAS):
        assert attention.check_backend("flash", shape, dtype, "cpu").startswith("output differs from the math kernel")
    assert str(BIAS) == "2 heads x 16, 40 tokens, bias mask" and str(SHAPE) == "2 heads x 16, 40 tokens"


def test_the_text_encoders_kernels_are_checked_and_a_failing_one_is_off_while_they_embed(monkeypatch):
    """On a GPU (the check's verdicts stand in for the kernels): every kernel preselect turned on is checked at every
    encoder's shape in their dtype; a failing one is turned off (math serves), one that cannot take masked inputs
    (flash on a GPU) stays on for the rest. Under auto on the CPU nothing is checked."""
    t5 = attention.AttentionShape(heads=64, head_dim=64, seq_len=512, mask="bias")
    asked, verdicts = [], {}
    monkeypatch.setattr(attention, "check_backend", lambda name, shape, dtype, device: asked.append(
        (name, shape, dtype)) or verdicts.get((name, shape)))
    said = []
    assert attention.check_text_encoders("auto", [CAUSAL, t5], torch.bfloat16, "cpu", log=said.append) == []
    assert asked == [] and said == []
    assert attention.check_text_encoders("auto", [CAUSAL, t5, CAUSAL], torch.bfloat16, "cuda", log=said.append) == \
        ["flash", "efficient"]
    assert asked == [(n, s, torch.bfloat16) for n in ("flash", "efficient") for s in (CAUSAL, t5)]
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert said[-1] == ("text encoders' attention: flash, efficient (checked against the math kernel at 2 heads x 16, "
                        "40 tokens, causal mask; 64 heads x 64, 512 tokens, bias mask, bfloat16)")
    verdicts.update({("flash", CAUSAL): "RuntimeError: No available kernel. Aborting execution.",
                     ("efficient", t5): "non-finite output"})
    assert attention.check_text_encoders("auto", [CAUSAL, t5], torch.bfloat16, "cuda", log=said.append) == ["flash"]
    assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert said[-1].endswith("; efficient off while they embed: non-finite output at 64 heads x 64, 512 tokens, bias "
                             "mask")


def test_a_named_kernel_that_mishandles_masks_does_not_embed_the_prompts(monkeypatch):
    """With a kernel named (checked on the CPU too) that drops masks: it is off while the encoders embed."""
    _mask_ignored(monkeypatch)
    said = []
    assert attention.check_text_encoders("flash", [BIAS], torch.float32, "cpu", log=said.append) == []
    assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert "flash off while they embed: output differs from the math kernel" in said[-1]


def test_a_pipeline_checks_its_text_encoders_kernels_at_the_calls_they_make_before_they_embed(tmp_path, monkeypatch):
    """The tiny FLUX pipeline on disk, `--attention-backend flash`, and a flash kernel that drops the mask it is given
    whenever it is on (PyTorch takes flash first): its T5 would embed without the position bias. The check, handed the
    encoders' shapes (those of every call they then make, mask included), turns flash off before they embed, and the
    cached embeddings are the pipeline's own."""
    import flow_grpo
    from diffusers import FluxPipeline
    from infra.args import parse_args
    from tiny_pipelines import save_tiny_flux_pipeline
    pipeline_dir = save_tiny_flux_pipeline(tmp_path / "flux")
    prompts = ["a photo of red", "a photo of blue"]
    (tmp_path / "train.txt").write_text("\n".join(prompts) + "\n")
    pipe = FluxPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    want, _, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=16)

    original, calls = F.scaled_dot_product_attention, []

    def flash_first(q, k, v, attn_mask=None, **kw):
        kind = "" if attn_mask is None and not kw.get("is_causal") else \
            "bias" if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.shape[1] > 1 else "causal"
        calls.append(attention.AttentionShape(q.shape[1], q.shape[-1], q.shape[-2], kind))
        return original(q, k, v, attn_mask=None if torch.backends.cuda.flash_sdp_enabled() else attn_mask, **kw)

    checked = []
    check = attention.check_text_encoders
    monkeypatch.setattr(attention, "check_text_encoders", lambda requested, shapes, *a, **k: checked.append(
        (requested, list(shapes), len(calls))) or check(requested, shapes, *a, **k))
    monkeypatch.setattr(F, "scaled_dot_product_attention", flash_first)
    monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path / "cache"))
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, [
        "--preset", "tiny-flux", "--model", "flux", "--pretrained", str(pipeline_dir), "--max-sequence-length", "16",
        "--train-prompts", str(tmp_path / "train.txt"), "--reward", "mean_color", "--attention-backend", "flash",
        "--output-dir", str(tmp_path / "run")])
    attention.enable({"flash"})  # what preselect leaves on a GPU
    said = []
    task = tasks.load_task(args, keep_reference=False, log=said.append)
    (requested, shapes, calls_before), = checked
    assert requested == "flash" and shapes == [attention.AttentionShape(2, 16, 77, "causal"),
                                               attention.AttentionShape(4, 8, 16, "bias")]  # CLIP-L, then T5
    encoding = calls[calls_before:]
    assert encoding and all(any((c.heads, c.head_dim, c.mask) == (s.heads, s.head_dim, s.mask) and
                                c.seq_len <= s.seq_len for s in shapes) for c in encoding)
    assert {c.mask for c in encoding} == {"causal", "bias"}
    assert any("flash off while they embed: output differs from the math kernel" in line for line in said)
    torch.testing.assert_close(task.policy.encode_prompts(prompts)["prompt_embeds"], want)
