"""scripts/gpu_check.sh, the one command a session with a GPU runs (it has 15 minutes of device time, so the script
must work the first time), rehearsed on the CPU at diffusers' tiny widths: the smoke, the timing table of every
method, the full-depth rows, and the report that collects them; and a part that fails makes the whole check fail."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("Flow-GRPO", "DGPO", "Neighbor GRPO", "G2RPO", "Pro-GRPO")


def gpu_check(out: Path, parts: str, **env):
    # the smoke runs as many at a time as there are cores (8 on 2 cores thrash), with the time that takes
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_TIMING_CONFIG="tiny", GPU_CHECK_DEPTH="1 1",
               GPU_CHECK_PARTS=parts, SMOKE_JOBS=str(os.cpu_count() or 1), GPU_CHECK_SMOKE_S="900", **env)
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
    assert "Total:" in report


@pytest.mark.slow
def test_a_part_that_fails_fails_the_check_and_says_so(tmp_path):
    proc = gpu_check(tmp_path / "check", "3", GPU_CHECK_FULL_S="0.5")  # no run finishes in half a second
    assert proc.returncode == 1
    assert "gpu_check: some part FAILED" in proc.stdout
    report = (tmp_path / "check" / "gpu_check.md").read_text()
    assert "failed: over the 0 s timeout" in report or "failed: over the 1 s timeout" in report
