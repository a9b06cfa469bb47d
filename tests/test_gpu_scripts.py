"""scripts/gpu_check.sh, the one command a session with a GPU runs (it has 15 minutes of device time, so the script
must work the first time), rehearsed on the CPU at diffusers' tiny widths: the smoke, the timing table of every
method, the full-depth rows, and the report that collects them; and a part that fails makes the whole check fail.

The first three tests run scripts/gpu_smoke.sh and gpu_check.sh with a stand-in interpreter (`fake_python`): it answers
for the training scripts and the timing benchmark with the outputs the test asks for (a good run, a NaN, a crash),
and hands everything else (the device query, the tiny pipelines, scripts/check_run.py, the report) to Python. So
the judging and the exit status of both scripts are tested in seconds (10-20 s a test; the failing smoke in the
fast tier), apart from what the runs compute."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("Flow-GRPO", "DGPO", "Neighbor GRPO", "G2RPO", "Pro-GRPO")


SCRIPTS = ("flow_grpo.py", "dgpo.py", "neighbor_grpo.py", "g2rpo.py", "pro_grpo.py")
FAKE = f"""#!{sys.executable}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
if args and args[0] in {SCRIPTS!r}:  # a training run: log its flags, write the run the test asked for
    out = Path(args[args.index("--output-dir") + 1])
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(args) + "\\n")
    kind = dict(b.split("=") for b in os.environ.get("FAKE_BREAK", "").split(",") if b).get(out.name, "good")
    print("training", out.name)
    if kind == "crash":
        print("Traceback: something broke"); sys.exit(1)
    out.mkdir(parents=True, exist_ok=True)
    summary = dict(eval_reward_before=0.1, eval_reward_after=float("nan") if kind == "nan" else 0.5, iterations=2,
                   trainable_tensors=4, trainable_tensors_changed=0 if kind == "unchanged" else 4, nfe_rollout=8,
                   nfe_train=8, num_processes=1)
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "metrics.jsonl").write_text("".join(json.dumps(dict(iteration=i, loss=0.1)) + "\\n" for i in range(2)))
    sys.exit(0)
if args and args[0] == "benchmarks/timing.py" and os.environ.get("FAKE_TIMING") == "crash":
    print("Traceback: the timing benchmark broke"); sys.exit(1)
os.execv({sys.executable!r}, [{sys.executable!r}, *args])
"""


def fake_python(tmp_path: Path, **env) -> dict:
    """The environment that runs the GPU scripts through the stand-in interpreter (module docstring)."""
    exe = tmp_path / "fake_python"
    exe.write_text(FAKE)
    exe.chmod(0o755)
    return dict(os.environ, PYTHON=str(exe), FAKE_LOG=str(tmp_path / "runs.jsonl"), SMOKE_JOBS="4", **env)


def smoke(out: Path, env: dict):
    return subprocess.run(["bash", "scripts/gpu_smoke.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_the_smoke_runs_every_script_in_bf16_on_the_tiny_flux_and_both_pipelines_and_passes_good_runs(tmp_path):
    proc = smoke(tmp_path / "smoke", fake_python(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.stdout.rstrip().endswith("all smoke runs passed")
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    flags = {Path(r[r.index("--output-dir") + 1]).name: r for r in runs}
    tiny = {f"{s[:-3]}_tiny-flux" for s in SCRIPTS}
    pipelines = {f"{s}_{m}_r{r}" for s in ("flow_grpo", "dgpo") for m in ("flux", "sd3") for r in (8, 0)}
    assert set(flags) == tiny | pipelines and len(runs) == 13
    ok = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok")]
    assert sorted(ok) == sorted(flags)
    for name, r in flags.items():
        assert r[r.index("--mixed-precision") + 1] == "bf16" and r[r.index("--iterations") + 1] == "2", name
        assert r[0] == (name.rsplit("_", 2)[0] if name in pipelines else name.removesuffix("_tiny-flux")) + ".py"
        if name in pipelines:  # the real loading path: --model flux / sd3 from the tiny pipeline written for it
            model, rank = name.split("_")[-2], name.split("_r")[-1]
            assert r[r.index("--model") + 1] == model and r[r.index("--lora-rank") + 1] == rank
            assert (Path(r[r.index("--pretrained") + 1]) / "model_index.json").is_file()


def test_the_smoke_fails_on_a_nan_a_crash_or_weights_that_never_moved_and_names_those_runs(tmp_path):
    broken = {"dgpo_sd3_r0": "nan", "g2rpo_tiny-flux": "crash", "flow_grpo_flux_r8": "unchanged"}
    proc = smoke(tmp_path / "smoke", fake_python(tmp_path, FAKE_BREAK=",".join(f"{k}={v}" for k, v in broken.items())))
    assert proc.returncode == 1 and proc.stdout.rstrip().endswith("some smoke runs FAILED")
    failed = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    assert sorted(failed) == sorted(broken)
    assert sum(line.startswith("ok") for line in proc.stdout.splitlines()) == 10
    assert "Traceback: something broke" in proc.stdout  # the crashed run's log tail


@pytest.mark.slow
@pytest.mark.parametrize("part", ["1", "2"])
def test_the_check_fails_when_its_smoke_or_its_timing_fails_and_never_reports_a_stale_table(tmp_path, part):
    out = tmp_path / "check"
    out.mkdir()
    (out / "timing.md").write_text("## Time per iteration: a table from an earlier check\n")
    proc = gpu_check(out, part, **fake_python(tmp_path, FAKE_BREAK="pro_grpo_tiny-flux=nan", FAKE_TIMING="crash"))
    assert proc.returncode == 1 and "gpu_check: some part FAILED" in proc.stdout
    report = (out / "gpu_check.md").read_text()
    assert "an earlier check" not in report
    if part == "1":
        assert "FAILED pro_grpo_tiny-flux" in report and "some smoke runs FAILED" in report
    else:
        assert "(timing.md: not written; see timing.log)" in report


def gpu_check(out: Path, parts: str, **env):
    # the smoke runs as many at a time as there are cores (8 on 2 cores thrash), with the time that takes
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_TIMING_CONFIG": "tiny", "GPU_CHECK_DEPTH": "1 1",
           "GPU_CHECK_PARTS": parts, "SMOKE_JOBS": str(os.cpu_count() or 1), "GPU_CHECK_SMOKE_S": "900", **env}
    return subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)


@pytest.mark.slow
def test_the_gpu_check_runs_through_on_the_cpu_and_reports_every_part(tmp_path):
    proc = gpu_check(tmp_path / "check", "1 2 3")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = (tmp_path / "check" / "gpu_check.md").read_text()
    assert "CPU rehearsal" in report and "torch " in report and "diffusers " in report
    smoke = report.split("```")[1]
    assert sum(line.startswith("ok") for line in smoke.splitlines()) >= 13 and "all smoke runs passed" in smoke
    assert "FAILED" not in report and "failed" not in report
    tables = report.split("### Time per iteration")[1:]
    assert len(tables) == 2
    assert all(f"| {m} |" in tables[0] for m in METHODS)
    assert "| DGPO |" in tables[1] and "| Flow-GRPO |" in tables[1] and "--depth 1 1" in tables[1]
    assert "--extra-flags '--gradient-checkpointing" in tables[1]  # full depth needs it: 32 GiB with it at G = 8
    assert "Total:" in report


@pytest.mark.slow
def test_a_part_that_fails_fails_the_check_and_says_so(tmp_path):
    proc = gpu_check(tmp_path / "check", "3", GPU_CHECK_FULL_S="0.5")  # no run finishes in half a second
    assert proc.returncode == 1
    assert "gpu_check: some part FAILED" in proc.stdout
    report = (tmp_path / "check" / "gpu_check.md").read_text()
    assert "failed: over the 0 s timeout" in report or "failed: over the 1 s timeout" in report
