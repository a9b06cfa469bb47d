"""Gradient accumulation and the optimizer step under DDP, FSDP and DeepSpeed: the distributed plumbing every script
calls around its backward passes. A reader following an algorithm can take the names at their word: `accumulating`
adds one pass's gradients to the step's, `optimizer_step` clips, steps and zeroes."""

from __future__ import annotations

import contextlib

from common import Policy, check_finite


@contextlib.contextmanager
def accumulating(accelerator, policy: Policy, last: bool):
    """Context for ONE forward + backward pass of several whose gradients add up to one optimizer step (every
    script sums over trained timesteps and micro-batches). `last=False` on every pass but the last:

    - DDP: those passes skip the gradient all-reduce (`no_sync`, which must cover the forward too: DDP decides
      there); the last one reduces the summed gradients. Same update, one all-reduce per optimizer step
      instead of one per pass (tests/test_distributed.py counts them).
    - DeepSpeed: the engine accumulates without stepping; on the last pass it reduces, clips (`gradient_clipping`
      = --max-grad-norm) and steps inside `backward` (accelerate's wrapper), so `optimizer.step()` is a no-op.
      Without the boundary the engine would step after every pass.
    - FSDP: every pass reduce-scatters into the sharded gradients (its `no_sync` would keep the full unsharded
      gradients on every GPU, the memory FSDP exists to save).
    """
    from accelerate.utils import DistributedType
    # accelerate's accumulation flag: DeepSpeed's wrapper reads it as the boundary, and the wrapped optimizer
    # steps only when it is True. (`accelerator.accumulate` sets it from a fixed count of passes; here the count
    # varies per script and iteration, so each pass says whether it is the last.)
    accelerator.gradient_state._set_sync_gradients(last)
    skip_reduce = not last and accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    with accelerator.no_sync(policy.net) if skip_reduce else contextlib.nullcontext():
        yield


def optimizer_step(accelerator, policy: Policy, optimizer, max_grad_norm: float):
    """Clip the gradient norm, step, zero the gradients; returns the norm before clipping (for logging).

    The norm is over ALL the network's parameters (frozen ones have no gradient and count zero): under FSDP
    accelerate computes the global norm across shards only when handed exactly the wrapped model's parameters,
    and would otherwise clip each process's shard by its local norm. Under DeepSpeed the engine has already
    clipped and stepped in the last backward pass (see `accumulating`); this returns its global norm. A non-finite
    norm stops the run (NonFiniteError) before the step.
    """
    grad_norm = accelerator.clip_grad_norm_(policy.net.parameters(), max_grad_norm)
    if grad_norm is not None:  # checked before the step: the weights never take a non-finite update
        check_finite("gradient norm", grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    return grad_norm
