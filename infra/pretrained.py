"""Base models the project pretrains itself, and the on-disk cache they share with the shapes base model and the
prompt-embedding cache: $FLOWRL_CACHE (default ~/.cache/flowrl), one file per config hash."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from common import TOY_MODE_STD, TOY_NUM_MODES, TOY_RING_RADIUS, ToyVelocityNet, toy_modes


def cached_model_path(name: str, config: dict) -> Path:
    """Where a base model pretrained by the project is cached: $FLOWRL_CACHE (default ~/.cache/flowrl)/
    <name>-<hash of its config>.pt, so a changed config never loads stale weights."""
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return Path(os.environ.get("FLOWRL_CACHE") or Path.home() / ".cache" / "flowrl") / f"{name}-{key}.pt"


def atomic_save(obj, path: Path):
    """torch.save through a temporary file and a rename: concurrent runs never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def pretrain_toy_base(config: dict, log: Callable[[str], None] = print) -> ToyVelocityNet:
    """Flow-matching pretraining of the toy base model on the ring (data independent of the prompt).

    Cached on disk under $FLOWRL_CACHE (default ~/.cache/flowrl), keyed by a hash of its config, so only the
    first run pays the few seconds it takes.
    """
    path = cached_model_path("toy2d-base", config)
    net = ToyVelocityNet(hidden=config["hidden"], depth=config["depth"])  # draws from the global RNG either way, so
    if path.exists():  # a run that pretrains and one that loads draw the same rollout noise afterwards
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net
    log(f"[toy2d] pretraining the base flow model ({config['steps']} steps); cached at {path}")
    with torch.random.fork_rng(devices=[]):  # the cached model depends on its config alone, not on what ran before
        torch.manual_seed(config["seed"])
        net.load_state_dict(ToyVelocityNet(hidden=config["hidden"], depth=config["depth"]).state_dict())
    g = torch.Generator().manual_seed(config["seed"])
    opt = torch.optim.Adam(net.parameters(), lr=config["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config["steps"])
    modes = toy_modes()
    for _ in range(config["steps"]):
        n = config["batch"]
        x0 = modes[torch.randint(TOY_NUM_MODES, (n,), generator=g)] + TOY_MODE_STD * torch.randn(n, 2, generator=g)
        eps = torch.randn(n, 2, generator=g)
        s = torch.rand(n, generator=g)
        xs = (1 - s[:, None]) * x0 + s[:, None] * eps
        c = torch.randint(TOY_NUM_MODES, (n,), generator=g)  # the prompt carries no information here
        loss = F.mse_loss(net(xs, s, c), eps - x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.zero_grad(set_to_none=True)  # the last step's gradients must not leak into the first RL update
    atomic_save(net.state_dict(), path)
    return net


TOY_BASE_CONFIG = {"hidden": 128, "depth": 3, "steps": 3000, "batch": 512, "lr": 3e-3, "seed": 0,
                   "modes": TOY_NUM_MODES, "radius": TOY_RING_RADIUS, "std": TOY_MODE_STD}
