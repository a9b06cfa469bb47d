"""Shared test fixtures: an isolated model cache, and a velocity field that is EXACT for Gaussian data."""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The toy base model is cached per config; tests share one cache dir so it is pretrained once per session.
os.environ["FLOWRL_CACHE"] = os.environ.get("FLOWRL_CACHE") or str(ROOT / ".cache" / "test")
torch.set_num_threads(2)

import common  # noqa: E402
from infra import run  # noqa: E402


def free_port() -> int:
    """A TCP port no process listens on now, for a torchrun rendezvous (a fixed one can still be held by the last)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GaussianPolicy(common.Policy):
    """Data x0 ~ N(m, s0^2 I). Then x_s = (1-s) x0 + s eps is Gaussian and the flow's velocity is exact:
        var(s) = (1-s)^2 s0^2 + s^2,  r = x - (1-s) m
        E[x0 | x_s]  = m + (1-s) s0^2 / var * r,   E[eps | x_s] = s / var * r
        v(x, s)      = E[eps | x_s] - E[x0 | x_s]
    so any correct sampler must reproduce N(m, s0^2 I) at s = 0 (up to discretisation error)."""

    def __init__(self, mean=(1.0, -2.0), std=0.5):
        super().__init__(nn.Linear(1, 1))
        self.m, self.s0 = torch.tensor(mean), std

    def _forward(self, net, x, sigma, cond):
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        var = (1 - s) ** 2 * self.s0**2 + s**2
        r = x - (1 - s) * self.m
        return s / var * r - (self.m + (1 - s) * self.s0**2 / var * r)

    def sample_shape(self):
        return (2,)

    def encode_prompts(self, prompts):
        return {}

    def decode(self, x):
        return x


def cpu_accelerator():
    """A single-process Accelerator on the CPU, with the precision and accumulation state an earlier test left in
    this process forgotten first (accelerate keeps it process-wide; infra/run.py's Run does the same)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(cpu=True)


def register_toy_as(monkeypatch, name: str, **changes):
    """`--model name`: the toy, built as `--model toy2d` with `changes` to its args: a registered model whose policy
    has no diffusers transformer (and, with lora_rank=0, no LoRA)."""
    import dataclasses

    from infra import tasks
    monkeypatch.setitem(tasks.CUSTOM_MODELS, name, lambda args, keep, device, log: tasks._build(
        dataclasses.replace(args, model="toy2d", **changes), keep, device, log))


@pytest.fixture(autouse=True)
def repository_runs_untouched():
    """No test may write into the repository's own runs/ (a user's runs live there): a run without --output-dir
    belongs under tmp_path (monkeypatch.chdir). Its empty default directory is removed only when the process exits,
    so a test that forgot would leave one behind each time the session is killed."""
    runs = ROOT / "runs"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    yield
    after = set(runs.iterdir()) if runs.is_dir() else set()
    assert after <= before, f"the test wrote into the repository's runs/: {sorted(p.name for p in after - before)}"


@pytest.fixture
def gaussian_policy():
    return GaussianPolicy()


@pytest.fixture
def capture_policy(monkeypatch):
    """Run a script's main() and keep the trained policy: returns a dict filled with it at Run.finish."""
    captured = {}
    original = run.Run.finish

    def finish(self, task, before, after, **extra):
        captured["policy"] = task.policy
        return original(self, task, before, after, **extra)

    monkeypatch.setattr(run.Run, "finish", finish)
    return captured


def assert_trained(run_dir):
    """scripts/check_run.py's verdict: the run finished, its rewards and every logged number are finite, and training
    changed its trainable weights."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import check_run
    ok, what = check_run.check(Path(run_dir))
    assert ok, what
