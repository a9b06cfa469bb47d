"""`--fit-memory`: the rollout and evaluation batch, the training micro-batch and gradient checkpointing, chosen
from the device's free memory instead of a preset's fixed numbers.

Before the first iteration, one transformer call with gradient is made at batch 1 and at batch 2 on the run's own
sample shape and prompt length, and every tensor autograd saves for backward is recorded
(torch.autograd.graph.saved_tensors_hooks; the recorder keeps none of them, so the probe itself needs only a no-grad
call's memory). The difference between the two batches is one sample's share, free of what the call holds once per
batch (autocast's bf16 copies of fp32 weights, positional embeddings). From it, per transformer sample:
- `grad`: what a call with gradient keeps until its backward pass, without checkpointing;
- `checkpointed`: the same with gradient checkpointing, which keeps each block's inputs plus one block's
  activations while that block is recomputed;
- `no_grad`: an upper bound on a no-grad call's working set: the largest block's inputs and intermediates.

The budget is `--memory-budget-gib` if given, else 85% of what the device has free (what the CUDA caching allocator
holds unused counts as free), less what the run will still allocate for its trainable parameters (fp32 gradients
and AdamW's two moments, 12 bytes each; 4 more per EMA the script keeps, DGPO's theta_minus and the evaluation EMA,
and 4 for the copy an EMA swap holds), taken as the smallest over the processes, so that every process makes the same
number of model calls (FSDP gathers weights in every forward). The 15% margin is for what saved tensors do not
show: the backward pass's temporaries, kernel workspaces, fragmentation. It is a guess that a GPU run checks
(benchmarks/timing.py prints the peak memory).

The plan, in this order, because recomputing activations costs about a third more per gradient call while a
larger micro-batch rarely buys that much once one unit holds a whole sample:
1. no checkpointing, with the largest training micro-batch that fits (in the script's unit: whole groups for DGPO,
   samples or anchors elsewhere), if one unit fits;
2. otherwise checkpointing, with the largest micro-batch that fits then;
3. otherwise the run stops, saying how much one unit needs.
Rollouts and evaluation take the largest no-grad batch that fits. Micro-batches split the same sums (every script
tests that), so the plan changes memory and speed, not what is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef

GIB = 2**30
FREE_FRACTION = 0.85  # of the free device memory the plan may use
OPTIMIZER_BYTES = 12  # per trainable parameter still to allocate: fp32 gradient + AdamW's two fp32 moments
EMA_BYTES = 4  # per trainable parameter and fp32 EMA copy


def size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.2f} MiB"


@dataclass
class ActivationBytes:
    """Bytes per transformer sample (classifier-free guidance counts 2 samples); see the module docstring."""
    grad: int
    checkpointed: int
    no_grad: int


def _tensors(value):
    """The tensors in a block's positional and keyword inputs (FLUX passes its rotary embedding as a tuple)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def saved_bytes(policy, x: torch.Tensor, sigma: float, cond: dict, autocast) -> dict[str, int]:
    """One call with gradient of the policy's transformer on `x`, recorded but not kept: the distinct storages autograd
    would save (weights left out), in total ("saved") and inside each block ("per_block"), and the blocks' inputs:
    each block's ("block_inputs") and all of them, a storage passed to several blocks counted once ("inputs").
    Nothing is kept for a backward pass, so this costs a no-grad call's memory."""
    from infra.diffusers_models import transformer_blocks
    net = policy._unwrapped()
    blocks = transformer_blocks(net)
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, StorageWeakRef] = {}  # storage address -> the storage counted there, while it lives
    saved, per_block, block_inputs, inputs = [0], [0] * len(blocks), [0] * len(blocks), {}
    current = [None]

    def record(t: torch.Tensor) -> int:
        """The bytes of t's storage if it is not a weight and not counted yet (a dead storage's address can be
        reused by a new one, which then counts)."""
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in weights or (ptr in seen and not seen[ptr].expired()):
            return 0
        seen[ptr] = StorageWeakRef(storage)
        return storage.nbytes()

    def pack(t):
        n = record(t)
        saved[0] += n
        if current[0] is not None:
            per_block[current[0]] += n
        return None  # nothing kept: no backward pass follows

    def enter(i):
        def hook(module, args, kwargs):
            current[0] = i
            mine = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors((args, kwargs))}
            block_inputs[i] = sum(mine.values())
            inputs.update(mine)
        return hook

    def leave(module, args, kwargs, output):
        current[0] = None

    handles = [b.register_forward_pre_hook(enter(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(leave, with_kwargs=True) for b in blocks]
    sigma_t = torch.full((x.shape[0],), float(sigma), device=x.device)
    try:
        with torch.enable_grad(), torch.compiler.set_stance("force_eager"), autocast(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            policy._forward(net, x, sigma_t, cond)
    finally:
        for h in handles:
            h.remove()
    return {"saved": saved[0], "per_block": per_block, "block_inputs": block_inputs, "inputs": sum(inputs.values())}


def per_sample_bytes(policy, cond: dict, autocast) -> dict:
    """`saved_bytes` of one transformer sample: the batch-2 call's less the batch-1 call's, each entry, plus
    "outside" (what the embeddings and the output layer save). `cond`: one prompt's conditioning (batch 1);
    `autocast`: a function giving the run's autocast context."""
    calls = []
    for n in (1, 2):
        x = policy.initial_noise(n, torch.Generator().manual_seed(0))  # its own generator: the run's noise is untouched
        c = {k: t.expand(n, *t.shape[1:]).contiguous() for k, t in cond.items()}
        call = saved_bytes(policy, x, 0.5, c, autocast)
        calls.append({**call, "outside": call["saved"] - sum(call["per_block"])})
    one, two = calls
    diff = lambda a, b: max(b - a, 0)  # noqa: E731
    return {k: [diff(a, b) for a, b in zip(one[k], two[k])] if isinstance(one[k], list) else diff(one[k], two[k])
            for k in one}


def measure(policy, cond: dict, autocast) -> ActivationBytes:
    """ActivationBytes of one transformer sample (`per_sample_bytes`)."""
    s = per_sample_bytes(policy, cond, autocast)
    return ActivationBytes(grad=s["saved"], checkpointed=s["inputs"] + max(s["per_block"], default=0) + s["outside"],
                           no_grad=max((i + b for i, b in zip(s["block_inputs"], s["per_block"])), default=0))


@dataclass
class Plan:
    micro_units: int  # training units per forward/backward
    checkpointing: bool
    rollout_batch: int  # samples per no-grad call (rollouts and evaluation)


def plan(act: ActivationBytes, budget: int, unit_samples: int, units: int, no_grad_cfg: bool) -> Plan:
    """The largest micro-batch and no-grad batch within `budget` bytes; checkpointing only when one unit of
    `unit_samples` transformer samples does not fit without it. `units`: the units of one optimizer step (the
    micro-batch never exceeds them)."""
    def fit(per_unit: int) -> int:
        return min(units, budget // per_unit) if per_unit > 0 else units

    micro, checkpointing = fit(act.grad * unit_samples), False
    if micro < 1:
        micro, checkpointing = fit(act.checkpointed * unit_samples), True
    per_row = act.no_grad * (2 if no_grad_cfg else 1)
    rollout = budget // per_row if per_row > 0 else 2**31 - 1
    if micro < 1 or rollout < 1:
        need = max(act.checkpointed * unit_samples, per_row)
        raise SystemExit(f"--fit-memory: one training unit ({unit_samples} transformer samples) needs "
                         f"{size(need)} even with gradient checkpointing, and the budget is {size(budget)}: lower "
                         f"--resolution or --group-size, shard the model (FSDP, docs/multi-gpu.md), or free the "
                         f"device")
    return Plan(micro_units=int(micro), checkpointing=checkpointing, rollout_batch=int(rollout))


def reserve_bytes(args, trainable: int) -> int:
    """What the run allocates after the plan for `trainable` parameters: optimizer state and EMA copies."""
    emas = int(hasattr(args, "ema_decay")) + int(getattr(args, "eval_ema", False))  # DGPO's theta_minus; eval EMA
    return (OPTIMIZER_BYTES + EMA_BYTES * (emas + (emas > 0))) * trainable


def budget_bytes(args, policy, accelerator) -> int:
    """The bytes the plan may fill on this device (module docstring), the smallest over the processes."""
    reserve = reserve_bytes(args, sum(p.numel() for p in policy.trainable_parameters()))
    if args.memory_budget_gib:
        total = args.memory_budget_gib * GIB
    elif policy.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(policy.device)
        total = FREE_FRACTION * (free + torch.cuda.memory_reserved(policy.device)
                                 - torch.cuda.memory_allocated(policy.device))
    else:
        raise SystemExit(f"--fit-memory reads the free memory of a CUDA device; on {policy.device.type} give "
                         f"--memory-budget-gib")
    budget = torch.tensor([total - reserve], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(budget, op=torch.distributed.ReduceOp.MIN)
    return max(int(budget.item()), 0)


def fit_memory(args, policy, accelerator, prompt: str, *, train_field: Optional[str], unit_samples: int,
               units: int, train_cfg: bool, log=print) -> dict:
    """Measure, plan, and apply the plan to `args` (--rollout-batch-size, --eval-batch-size, the script's
    `train_field`, or None where it has none) and to the model (gradient checkpointing). Called before the model is
    handed to accelerate. `unit_samples`: the samples of one training unit before classifier-free guidance, which
    `train_cfg` doubles; `units`: the units of one optimizer step. Returns the plan as logged in summary.json."""
    if not hasattr(policy, "enable_gradient_checkpointing"):
        raise SystemExit(f"--fit-memory plans a diffusers transformer's memory; --model {args.model} has none")
    cfg = policy.cfg_active()
    with policy.without_cfg():
        act = measure(policy, policy.encode_prompts([prompt]), accelerator.autocast)
    if accelerator.num_processes > 1:  # one plan for all: batch sizes that differed would differ in collectives (FSDP)
        most = torch.tensor([act.grad, act.checkpointed, act.no_grad], dtype=torch.float64, device=accelerator.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        act = ActivationBytes(*(int(b) for b in most.tolist()))
    budget = budget_bytes(args, policy, accelerator)
    p = plan(act, budget, unit_samples * (2 if train_cfg and cfg else 1), units, cfg)
    if p.checkpointing:
        policy.enable_gradient_checkpointing()
    args.rollout_batch_size = args.eval_batch_size = p.rollout_batch
    if train_field is not None:
        setattr(args, train_field, p.micro_units)
    out = {"budget_bytes": budget, "per_sample_bytes": vars(act),
           "train_micro_units": p.micro_units, "train_unit_samples": unit_samples,
           "gradient_checkpointing": p.checkpointing, "rollout_batch_size": p.rollout_batch}
    log(f"fit-memory | budget {size(budget)} | per sample: {size(act.grad)} with gradient, "
        f"{size(act.checkpointed)} checkpointed, {size(act.no_grad)} without gradient | training "
        f"micro-batch {p.micro_units} of {units} units ({unit_samples} samples each), checkpointing "
        f"{'on' if p.checkpointing else 'off'} | rollout and eval batch {p.rollout_batch}")
    return out
