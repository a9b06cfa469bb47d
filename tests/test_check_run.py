"""scripts/check_run.py, the judge of every smoke run: it must fail a run with a NaN anywhere or weights that never
moved, and pass a real one."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import check_run  # noqa: E402

import flow_grpo  # noqa: E402


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    flow_grpo.main(["--iterations", "2", "--output-dir", str(out), "--log-every", "0", "--eval-samples-per-prompt", "4"])
    return out


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("summary.json", "metrics.jsonl"):
        (out / name).write_text((run_dir / name).read_text())
    return out


def test_a_real_run_passes(real_run):
    ok, what = check_run.check(real_run)
    assert ok, what
    assert check_run.main([str(real_run)]) == 0


@pytest.mark.parametrize("breakage", ["nan_reward", "nan_loss", "weights_unchanged", "unfinished", "short_log"])
def test_each_kind_of_broken_run_fails(real_run, tmp_path, breakage, capsys):
    run = copy_of(real_run, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    if breakage == "nan_reward":
        summary["eval_reward_after"] = math.nan
    elif breakage == "nan_loss":
        rows[1]["loss/policy_loss"] = math.nan
    elif breakage == "weights_unchanged":
        summary["trainable_tensors_changed"] = 0
    elif breakage == "short_log":
        rows = rows[:1]
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if breakage == "unfinished":
        (run / "summary.json").unlink()
    ok, what = check_run.check(run)
    assert not ok and what
    assert check_run.main([str(real_run), str(run)]) == 1
    assert check_run.main([str(run), str(real_run)]) == 1  # a failure is not forgotten behind a good run
    assert "FAILED" in capsys.readouterr().out
