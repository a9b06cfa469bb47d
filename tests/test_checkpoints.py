"""Save, interrupt, resume: a resumed run continues exactly where an uninterrupted one would be."""

import json

import pytest
import torch

from infra import tasks
from infra import run
import dgpo
import flow_grpo
import g2rpo
import neighbor_grpo
import pro_grpo

SCRIPTS = {"flow_grpo": flow_grpo, "dgpo": dgpo, "pro_grpo": pro_grpo, "g2rpo": g2rpo, "neighbor_grpo": neighbor_grpo}


def metrics(path):
    rows = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.parametrize("name", SCRIPTS)
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(name, tmp_path, monkeypatch):
    main = SCRIPTS[name].main
    flags = ["--iterations", "6", "--checkpoint-every", "3", "--log-every", "0", "--seed", "5"]
    if name == "dgpo":
        flags += ["--ema-start", "2"]  # so the EMA (restored from the checkpoint) drives rollouts after resuming
    full = main(flags + ["--output-dir", str(tmp_path / "full")])

    original = run.Run.end_iteration

    def crash_at_5(self, iteration, *a, **kw):
        original(self, iteration, *a, **kw)
        if iteration == 4:  # after checkpoint-3 was written and two more iterations logged
            raise KeyboardInterrupt

    monkeypatch.setattr(run.Run, "end_iteration", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        main(flags + ["--output-dir", str(tmp_path / "cut")])
    assert len(metrics(tmp_path / "cut")) == 5
    monkeypatch.setattr(run.Run, "end_iteration", original)
    resumed = main(flags + ["--output-dir", str(tmp_path / "cut"), "--resume-from-checkpoint", "latest"])

    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [r["iteration"] for r in b] == list(range(6))
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["iteration"], k)
    for k in ("eval_reward_before", "eval_reward_after", "nfe_rollout", "nfe_train", "on_manifold_after"):
        assert full[k] == pytest.approx(resumed[k], rel=1e-6), k


def test_checkpoints_are_pruned_and_hold_loadable_weights(tmp_path):
    flow_grpo.main(["--iterations", "7", "--checkpoint-every", "2", "--checkpoints-total-limit", "2", "--log-every",
                    "0", "--output-dir", str(tmp_path)])
    found = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert found == ["checkpoint-4", "checkpoint-6"]
    policy = tasks.toy2d_policy(keep_reference=False)
    policy.load(tmp_path / "checkpoints" / "checkpoint-6" / "weights")
    assert any(not torch.equal(v, tasks.toy2d_policy(keep_reference=False).net.state_dict()[k])
               for k, v in policy.net.state_dict().items())


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="output-dir"):
        flow_grpo.main(["--resume-from-checkpoint", "latest", "--iterations", "1"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        flow_grpo.main(["--resume-from-checkpoint", "latest", "--output-dir", str(tmp_path), "--iterations", "1"])
