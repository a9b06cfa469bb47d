"""infra/distributed.py's optimizer step, on one process: every step applies its own loss's gradient (the last step's
is gone), clipped to --max-grad-norm, and returns that gradient's norm before clipping. The multi-process side
(one all-reduce per step under DDP, DeepSpeed's boundary) is in tests/test_distributed.py and test_strategies.py;
a NaN gradient norm stopping the step, in test_nonfinite.py."""

from types import SimpleNamespace

import pytest
import torch

from conftest import cpu_accelerator
from infra import distributed


def test_each_step_applies_its_own_clipped_gradient_and_returns_its_norm_before_clipping():
    acc = cpu_accelerator()
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    net, opt = acc.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    policy = SimpleNamespace(net=net)
    g = torch.Generator().manual_seed(1)
    norms = []
    for step in range(3):
        x, y = torch.randn(4, 3, generator=g), 10 * torch.randn(4, 1, generator=g)
        before = [p.detach().clone() for p in net.parameters()]
        loss = (net(x) - y).pow(2).mean()
        grads = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)  # this step's alone, by hand
        norm = torch.cat([gr.flatten() for gr in grads]).norm().item()
        with distributed.accumulating(acc, policy, last=True):
            acc.backward(loss)
        assert distributed.optimizer_step(acc, policy, opt, max_grad_norm=1.0).item() == pytest.approx(norm, rel=1e-5)
        scale = min(1.0, 1.0 / (norm + 1e-6))  # torch's clip_grad_norm_
        for p, w, gr in zip(net.parameters(), before, grads):
            torch.testing.assert_close(p.detach(), w - 0.1 * scale * gr, rtol=1e-5, atol=1e-6)
        norms.append(norm)
    assert min(norms) > 1  # every step was clipped: the test sees the clip
