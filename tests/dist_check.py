"""Run under `torchrun --nproc_per_node 2` by tests/test_distributed.py (gloo, CPU): group statistics computed
across 2 processes, each holding half of the groups (or half of one group), saved per rank for comparison with a
1-process computation on the same data; then one iteration of every script as a 2-process run."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import infra.distributed  # noqa: E402
import dgpo  # noqa: E402


def main(out: Path):
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    assert world == 2, world
    g = torch.Generator().manual_seed(0)  # the same data on both ranks; each takes its share
    rewards = torch.rand(4, 6, generator=g)  # 4 groups of 6
    result = {}
    for std in ("global", "group"):
        _, adv = common.gathered_group_advantages(acc, rewards[2 * rank:2 * rank + 2], std, 5.0)
        result[f"adv_{std}"] = acc.gather(adv).tolist()
    # DGPO with groups split across processes: every group has 3 samples on each rank
    dsm, dsm_ref, advantages = (torch.randn(24, generator=g) for _ in range(3))
    group_index = torch.arange(4).repeat_interleave(6)
    mine = torch.cat([torch.arange(6 * k + 3 * rank, 6 * k + 3 * rank + 3) for k in range(4)])
    local = dsm[mine].clone().requires_grad_(True)
    loss = dgpo.dgpo_loss(local, dsm_ref[mine], advantages[mine], group_index[mine], beta=2.0, num_groups=4,
                          all_reduce=lambda t: acc.reduce(t, reduction="sum"))
    loss.backward()
    result["dgpo_grad_times_n"] = (local.grad * len(mine)).tolist()
    result["dgpo_index"] = mine.tolist()
    result.update(ddp_accumulation(acc))
    result.update(sharded_evaluation(acc, out))
    result.update(one_memory_plan(acc))
    (out / f"stats_rank{rank}.json").write_text(json.dumps(result))

    # every script, one iteration as a 2-process run; the first rollout noise each process draws (from the global
    # generator, which the run seeds per process) is kept
    import flow_grpo
    import g2rpo
    import neighbor_grpo
    import pro_grpo
    rollout_noise, original_noise = {}, common.Policy.initial_noise

    def recording_noise(self, n, generator=None):
        noise = original_noise(self, n, generator)
        if generator is None:
            rollout_noise.setdefault(name, noise.flatten()[:8].tolist())
        return noise

    common.Policy.initial_noise = recording_noise
    for name, script in [("flow_grpo", flow_grpo), ("dgpo", dgpo), ("neighbor_grpo", neighbor_grpo),
                         ("g2rpo", g2rpo), ("pro_grpo", pro_grpo)]:
        script.main(["--iterations", "1", "--output-dir", str(out / name), "--log-every", "0", "--checkpoint-every",
                     "0", "--save-weights", "false", "--eval-samples-per-prompt", "8"])
    (out / f"rollout_noise_rank{rank}.json").write_text(json.dumps(rollout_noise))
    common.Policy.initial_noise = original_noise
    (out / f"sigterm_rank{rank}.json").write_text(json.dumps(sigterm_one_process(out, rank)))
    default_output_dir(out, rank)
    (out / f"unshared_rank{rank}.json").write_text(json.dumps(unshared_output_dir(out, rank)))
    (out / f"locked_rank{rank}.json").write_text(json.dumps(locked_output_dir(out, rank)))
    (out / f"taken_rank{rank}.json").write_text(json.dumps(taken_over_while_checkpointing(out, rank)))
    # last: where a process stops alone (the planted bug of scripts/plant_bugs.py), it exits and the other's collective
    # fails at once; a later run would leave the two waiting in different collectives until the test's timeout
    (out / f"full_disk_rank{rank}.json").write_text(json.dumps(full_disk_on_one_process(out, rank)))


def outcome(flags: list[str]) -> dict:
    """A 2-process flow_grpo run as this process saw it: {"status": 0}, or the exit status and the line it stopped
    with (a refusal at start is status 1)."""
    import flow_grpo
    try:
        flow_grpo.main(flags)
        return {"status": 0}
    except SystemExit as e:
        return {"status": e.code if isinstance(e.code, int) else 1, "message": str(e)}


def locked_output_dir(out: Path, rank: int) -> dict:
    """An --output-dir a live run holds (its run.lock names the launcher, a live process of this host, and beats):
    process 0 finds it and refuses; process 1, which takes no lock, must stop with it, not wait in a collective."""
    import os
    import socket
    import threading

    locked, beating = out / "locked", threading.Event()
    if rank == 0:
        locked.mkdir()
        (locked / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                                                     "token": "theirs", "started": "2026-12-07 10:00:00"}))

        def heartbeat():  # the live run's
            while not beating.wait(0.2):
                os.utime(locked / "run.lock")

        threading.Thread(target=heartbeat, daemon=True).start()
    try:
        return outcome(["--iterations", "1", "--output-dir", str(locked), "--log-every", "0", "--save-weights", "false",
                        "--eval-samples-per-prompt", "8"])
    finally:
        beating.set()


def full_disk_on_one_process(out: Path, rank: int) -> dict:
    """Process 1 alone cannot write its run state into checkpoint-2 (its disk or quota is full): both processes stop
    with its line, neither waits in a collective for the other, and checkpoint-1 stays."""
    import errno
    import os

    def full(save, obj, f, *a, **k):
        if rank == 1 and str(f).endswith("checkpoint-2.partial/run_state_1.pt"):  # (after accelerate's own files)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return save(obj, f, *a, **k)

    return checkpointing_run(out / "full_disk", full)


def taken_over_while_checkpointing(out: Path, rank: int) -> dict:
    """The run was suspended while it wrote checkpoint-2, long enough for a second run to take its directory over
    (played by process 0 writing the second run's lock after its run state): only process 0 reads the lock, and both
    processes must stop with its line, checkpoint-2 neither completed nor left half-written."""
    import socket

    def suspended(save, obj, f, *a, **k):
        save(obj, f, *a, **k)
        if rank == 0 and str(f).endswith("checkpoint-2.partial/run_state_0.pt"):
            (out / "taken" / "run.lock").write_text(json.dumps({"host": socket.gethostname() + "-other", "pid": 4242,
                                                                "token": "theirs", "started": "2026-12-07 10:00:00"}))

    return checkpointing_run(out / "taken", suspended)


def checkpointing_run(run_dir: Path, save_with) -> dict:
    """outcome() of a 3-iteration run with a checkpoint after each, its torch.save calls going through
    `save_with(torch.save, obj, f, ...)`."""
    save = torch.save
    torch.save = lambda *a, **k: save_with(save, *a, **k)
    try:
        return outcome(["--iterations", "3", "--output-dir", str(run_dir), "--log-every", "0", "--checkpoint-every",
                        "1", "--save-weights", "false", "--eval-samples-per-prompt", "8"])
    finally:
        torch.save = save


def unshared_output_dir(out: Path, rank: int) -> dict:
    """Several nodes whose --output-dir is not on a shared filesystem, played by one directory per process: each
    process would write its checkpoint parts where the others cannot read them. Both stop at start, together."""
    return outcome(["--iterations", "1", "--output-dir", str(out / f"node{rank}"), "--log-every", "0",
                    "--save-weights", "false", "--eval-samples-per-prompt", "8"])


def default_output_dir(out: Path, rank: int):
    """Without --output-dir, the processes' clocks on either side of a second: both must write into the directory
    the main process chose (its checkpoint holds both processes' run states)."""
    import os
    import time

    import flow_grpo
    here, strftime = os.getcwd(), time.strftime
    os.chdir(out)
    time.strftime = lambda fmt, *a: f"20260101-00000{rank}"  # rank 0 at second 0, rank 1 at second 1
    try:
        flow_grpo.main(["--iterations", "2", "--checkpoint-every", "1", "--log-every", "0", "--save-weights", "false",
                        "--eval-samples-per-prompt", "8"])
    finally:
        time.strftime = strftime
        os.chdir(here)


def sigterm_one_process(out: Path, rank: int) -> dict:
    """SIGTERM reaches process 1 alone, during iteration 2 of 5: both processes must finish that iteration, write
    checkpoint-2 together and stop (a process that went on alone would hang in the next collective)."""
    import os
    import signal

    from infra import run
    original = run.Run.begin_iteration

    def begin(self, policy):
        original(self, policy)
        if rank == 1 and self.iteration == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    run.Run.begin_iteration = begin
    try:
        return outcome(["--iterations", "5", "--output-dir", str(out / "sigterm"), "--log-every", "0",
                        "--checkpoint-every", "0", "--save-weights", "false", "--eval-samples-per-prompt", "8"])
    finally:
        run.Run.begin_iteration = original


def sharded_evaluation(acc, out: Path) -> dict:
    """The evaluation split over the 2 processes: 3 samples, so process 1 pads its share with the last one."""
    import flow_grpo
    from infra.args import parse_args
    from infra.tasks import evaluate, load_task
    prompts = out / f"three_prompts_rank{acc.process_index}.txt"  # one file each: a reader never meets a half file
    prompts.write_text("mode 0\nmode 5\nmode 2\n")
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, ["--eval-prompts", str(prompts),
                                                          "--eval-samples-per-prompt", "1", "--eval-batch-size", "1"])
    task = load_task(args, keep_reference=False, log=lambda *a: None)
    task.policy.accelerator = acc  # the evaluation splits its samples over the policy's accelerator's processes
    rows, forward = [], task.policy._forward
    task.policy._forward = lambda net, x, *a: rows.append(x.shape[0]) or forward(net, x, *a)
    result, samples, prompts = evaluate(task, args, keep_samples=True)
    return {"eval_reward": result["reward"], "eval_on_manifold": result["on_manifold"],
            "eval_samples": samples.tolist(), "eval_prompts": prompts, "eval_model_rows": sum(rows),
            "eval_steps": args.eval_steps}


def one_memory_plan(acc) -> dict:
    """--fit-memory with measurements that differ between the processes (faked: process 1 measures twice the bytes):
    both must plan from the larger, or their micro-batches, and with them their collectives, would differ."""
    import flow_grpo
    from infra import memory
    from infra.args import parse_args
    from infra.tasks import load_task
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, ["--model", "tiny-flux", "--fit-memory",
                                                          "--memory-budget-gib", "0.02"])
    task = load_task(args, keep_reference=False, log=lambda *a: None)
    measured, original = [], memory.measure

    def measure(*a, **k):
        act = original(*a, **k)
        act = memory.ActivationBytes(*(b * (1 + acc.process_index) for b in (act.grad, act.checkpointed, act.no_grad)))
        measured.append(vars(act))
        return act

    memory.measure = measure
    try:
        plan = memory.fit_memory(args, task.policy, acc, task.train_prompts[0], train_field=None, unit_samples=4,
                                 units=2, train_cfg=False, log=lambda *a: None)
    finally:
        memory.measure = original
    return {"memory_measured": measured[0], "memory_plan": plan}


def ddp_accumulation(acc):
    """Two optimizer steps of 3 accumulated backward passes each inside infra.distributed.accumulating, then
    infra.distributed.optimizer_step, on a DDP-wrapped linear model, each process holding half of every pass's rows.
    A comm hook counts the gradient all-reduces: there must be one per optimizer step, not one per pass."""
    from types import SimpleNamespace

    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    rank = acc.process_index
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    net, opt = acc.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    reduces = []

    def counting_hook(state, bucket):
        reduces.append(1)
        return allreduce_hook(state, bucket)

    net.register_comm_hook(None, counting_hook)
    policy = SimpleNamespace(net=net)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 1, generator=g)  # step, pass, row
    reduces_per_step = []
    for step in range(2):
        before = len(reduces)
        for n in range(3):
            rows = slice(2 * rank, 2 * rank + 2)
            with infra.distributed.accumulating(acc, policy, last=n == 2):
                acc.backward((net(x[step, n, rows]) - y[step, n, rows]).pow(2).mean() / 3)
        infra.distributed.optimizer_step(acc, policy, opt, max_grad_norm=100.0)
        reduces_per_step.append(len(reduces) - before)
    unwrapped = acc.unwrap_model(net)
    return {"ddp_weight": unwrapped.weight.detach().flatten().tolist(), "ddp_bias": unwrapped.bias.item(),
            "ddp_reduces_per_step": reduces_per_step}


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # Every result is written: end without PyTorch's interpreter teardown, which on gloo now and then aborts a process
    # after its work is done ("terminate called without an active exception", SIGABRT; docs/multi-gpu.md), and the
    # launcher would report that as this harness failing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
