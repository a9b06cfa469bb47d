"""A run never goes on, or saves, on NaN: a non-finite reward, loss, log-probability ratio or gradient norm stops it
with one line (which quantity, where, the likely causes), exit status 1, no traceback, no final weights, and the last
checkpoint as it was. And the summary says whether training changed the weights at all."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
from conftest import cpu_accelerator
from infra import distributed, rewards
from infra import tasks
import dgpo
import flow_grpo

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--log-every", "0", "--eval-samples-per-prompt", "8"]


def nan_reward_from_call(monkeypatch, n):
    """The toy reward, NaN for every sample from its n-th call on (call 1 is the evaluation before training)."""
    calls = []
    original = rewards.REWARDS["toy_mode"]

    def reward(points, prompts):
        calls.append(1)
        r = original(points, prompts)
        return r * float("nan") if len(calls) >= n else r

    monkeypatch.setitem(rewards.REWARDS, "toy_mode", reward)


def test_a_learning_rate_that_blows_up_the_weights_stops_the_run_at_once(tmp_path):
    """As a user would meet it: a subprocess, lr 1e6. One line on stderr, exit status 1, nothing saved."""
    cmd = [sys.executable, str(ROOT / "flow_grpo.py"), "--learning-rate", "1e6", "--iterations", "5",
           "--output-dir", str(tmp_path), *FLAGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: log-probability ratio is") and "in iteration 1 of 5" in last, proc.stderr
    assert "--learning-rate" in last and "--attention-backend" in last
    assert not (tmp_path / "final").exists() and not (tmp_path / "summary.json").exists()


def test_a_nan_reward_stops_the_run_and_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    nan_reward_from_call(monkeypatch, 5)  # iteration 3
    flags = ["--iterations", "8", "--checkpoint-every", "2", "--output-dir", str(tmp_path), *FLAGS]
    with pytest.raises(common.NonFiniteError) as e:
        flow_grpo.main(flags)
    message = e.value.code
    assert isinstance(message, str) and message.startswith("stopped: reward is nan")
    assert "in iteration 4 of 8" in message  # numbered as the console's "it 4/8"
    assert f"last checkpoint {tmp_path / 'checkpoints' / 'checkpoint-2'}" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert not (tmp_path / "final").exists() and not (tmp_path / "summary.json").exists()
    # the checkpoint holds finite weights, and the run resumes from it
    weights = tasks.toy2d_policy(keep_reference=False)
    weights.load(tmp_path / "checkpoints" / "checkpoint-2" / "weights")
    assert all(torch.isfinite(p).all() for p in weights.net.parameters())
    monkeypatch.undo()
    summary = flow_grpo.main(flags + ["--resume-from-checkpoint", "latest"])
    assert summary["iterations"] == 8 and (tmp_path / "final" / "model.safetensors").exists()


def test_a_run_stopped_on_nan_lets_go_of_its_directory_and_its_ctrl_c_handler(tmp_path, monkeypatch):
    """What a notebook that goes on after the stop needs: no lock keeping other runs out of the directory, Ctrl-C
    back to Python's own handler (not the stopped run's one-line stop), and a later non-finite number not reported
    as that run's."""
    import signal
    nan_reward_from_call(monkeypatch, 3)  # iteration 2
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(common.NonFiniteError, match="in iteration 2 of 4"):
        flow_grpo.main(["--iterations", "4", "--output-dir", str(tmp_path), *FLAGS])
    assert not (tmp_path / "run.lock").exists()
    assert signal.getsignal(signal.SIGINT) is handler
    assert str(common.NonFiniteError("loss", float("nan"))).startswith("stopped: loss is nan (1 of 1 values "
                                                                       "non-finite). Likely causes")


def test_a_nan_gradient_stops_before_the_optimizer_step():
    net = torch.nn.Linear(2, 1)
    policy = common.Policy(net)
    acc = cpu_accelerator()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1.0)
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.tensor([[float("nan"), 1.0]])).sum().backward()
    with pytest.raises(common.NonFiniteError, match="gradient norm is nan"):
        distributed.optimizer_step(acc, policy, optimizer, max_grad_norm=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the step never happened


def test_a_nan_loss_is_caught_when_it_is_logged(tmp_path, monkeypatch):
    """DGPO has no ratio; its loss is checked with every logged number before a checkpoint is written."""
    original = dgpo.dgpo_loss
    monkeypatch.setattr(dgpo, "dgpo_loss", lambda *a, **k: original(*a, **k) * float("nan"))
    monkeypatch.setattr(dgpo, "optimizer_step", lambda *a, **k: torch.tensor(0.0))  # let the NaN reach the log
    with pytest.raises(common.NonFiniteError, match="stopped: loss/dgpo_loss is nan .* in iteration 1 of 3"):
        dgpo.main(["--iterations", "3", "--checkpoint-every", "1", "--output-dir", str(tmp_path), *FLAGS])
    assert not (tmp_path / "checkpoints").exists()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])  # logged, for the post-mortem
    assert row["iteration"] == 0


def test_the_summary_says_whether_training_moved_the_weights(tmp_path):
    moved = flow_grpo.main(["--iterations", "2", "--output-dir", str(tmp_path / "a"), *FLAGS])
    assert moved["trainable_tensors_changed"] == moved["trainable_tensors"] > 0
    still = flow_grpo.main(["--iterations", "2", "--learning-rate", "0", "--output-dir", str(tmp_path / "b"), *FLAGS])
    assert still["trainable_tensors_changed"] == 0
