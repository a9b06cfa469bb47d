"""Run under `torchrun --nproc_per_node 2` by tests/test_strategies.py: the same scripts as 2-process runs under DDP,
under FSDP2 (configs/accelerate/fsdp.yaml) or under DeepSpeed ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml), on
the CPU with gloo.

accelerate lets FSDP and DeepSpeed run only on GPUs: it decides the distributed type from the device. PyTorch's
FSDP2 (`fully_shard`) and DeepSpeed's engine (its CPU accelerator) themselves run on the CPU with gloo. So for
`fsdp` and `deepspeed` this harness reads the config file the way `accelerate launch` does and, right after each
`Accelerator` is built, switches its distributed type with that plugin. From there everything is accelerate's real
path: `fully_shard` per transformer block with DTensor gradients reduce-scattered at every backward, or
`deepspeed.initialize` with the engine accumulating, reducing, clipping and stepping at the boundary; the sharded
gradient-norm clip; sharded `save_state` / `load_state`; the full state dict gathered for the saved weights.
Not covered: NCCL, CUDA memory, GPU kernels (the --compile run generates C++ for the CPU, not GPU kernels).

    python -m torch.distributed.run --nproc_per_node 2 tests/strategies_check.py {ddp,fsdp,deepspeed} OUT PIPELINE
    python -m torch.distributed.run --nproc_per_node 2 tests/strategies_check.py deepspeed-full-disk OUT {1,0,1}
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def launch_environment(config: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file configs/accelerate/<config>.yaml` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
    args = launch_command_parser().parse_args(["--config_file", str(ROOT / f"configs/accelerate/{config}.yaml"),
                                               "x.py"])
    args, _, _ = _validate_launch_command(args)
    if config.startswith("deepspeed"):
        args.deepspeed_fields_from_accelerate_config = []
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_USE_", "ACCELERATE_DEEPSPEED_",
                                                          "ACCELERATE_GRADIENT_", "ACCELERATE_CONFIG_DS"))}


def switch_strategy_on_cpu(strategy: str):
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
    os.environ.update(launch_environment({"fsdp": "fsdp", "deepspeed": "deepspeed_zero2"}[strategy]))
    if strategy == "deepspeed":
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce kernel (C++, cc1plus) when its comm
        # backend starts. Only `inference_all_reduce` uses it; training reduces through torch.distributed (gloo).
        import importlib
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # (deepspeed.comm.torch is torch)
    init = accelerate.Accelerator.__init__

    def strategy_init(self, *a, **k):
        if PartialState._shared_state:  # a later run in this process: start from the CPU state again (calling
            PartialState().distributed_type = DistributedType.MULTI_CPU  # PartialState() first would initialise it)
        init(self, *a, **k)
        if strategy == "fsdp":
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the environment, as accelerate does
            kind = DistributedType.FSDP
        else:
            plugin = DeepSpeedPlugin()  # from the environment
            plugin.set_mixed_precision(self.state.mixed_precision)
            self.state.deepspeed_plugins = plugin
            plugin.select(_from_accelerator_state=True)
            self.deepspeed_engine_wrapped = None
            kind = DistributedType.DEEPSPEED
        self.state.distributed_type = PartialState().distributed_type = kind

    accelerate.Accelerator.__init__ = strategy_init


# the trained weights are compared (not an evaluation EMA, which 2-3 iterations never update)
QUIET = ["--log-every", "0", "--eval-samples-per-prompt", "2", "--eval-ema", "false"]


def corner_red(images, prompts):
    """The bf16 run's reward: the red of the top-left 4 x 4 pixels."""
    return images.float()[:, 0, :4, :4].mean(dim=(1, 2))


def main(strategy: str, out: Path, pipeline: Path):
    if strategy != "ddp":
        switch_strategy_on_cpu(strategy)
    import torch.distributed as dist

    import dgpo
    import flow_grpo
    tiny = ["--model", "tiny-flux", *QUIET]
    # full fine-tuning: every weight sharded; 3 iterations with a checkpoint after each
    flow_grpo.main([*tiny, "--lora-rank", "0", "--iterations", "3", "--checkpoint-every", "1",
                    "--output-dir", str(out / "flow_full")])
    # the same run cut after 2 iterations (checkpoint-2, after its last, is `latest`), then resumed to 3
    flow_grpo.main([*tiny, "--lora-rank", "0", "--iterations", "2", "--checkpoint-every", "1",
                    "--output-dir", str(out / "flow_cut")])
    flow_grpo.main([*tiny, "--lora-rank", "0", "--iterations", "3", "--checkpoint-every", "1",
                    "--output-dir", str(out / "flow_cut"), "--resume-from-checkpoint", "latest"])
    # LoRA: frozen base, trainable adapters, the reference through disabled adapters, the EMA, DGPO's all-reduce
    dgpo.main([*tiny, "--lora-rank", "8", "--iterations", "2", "--checkpoint-every", "0", "--ema-start", "1",
               "--output-dir", str(out / "dgpo_lora")])
    # with the evaluation EMA (every 8 optimizer steps: 2 iterations never update it): final/ must hold the EMA,
    # gathered from the shards after it is swapped in, not the trained weights gathered before
    dgpo.main([*tiny, "--lora-rank", "8", "--iterations", "2", "--checkpoint-every", "0", "--eval-ema", "true",
               "--output-dir", str(out / "dgpo_lora_eval_ema")])
    # the same with regional torch.compile (--compile): compiled blocks inside DDP, FSDP2's per-block shards, DeepSpeed
    from torch._dynamo.utils import counters
    counters.clear()
    dgpo.main([*tiny, "--lora-rank", "8", "--iterations", "2", "--checkpoint-every", "0", "--ema-start", "1",
               "--compile", "--output-dir", str(out / "dgpo_lora_compiled")])
    (out / f"dynamo_{os.environ['RANK']}.json").write_text(json.dumps({k: dict(v) for k, v in counters.items()}))
    # --model flux from disk in bf16: a bf16 base with fp32 adapters (FSDP1 refuses to flatten the two together)
    from infra.rewards import register_reward
    register_reward("corner_red", corner_red)
    prompts = out / "prompts.txt"
    if int(os.environ["RANK"]) == 0:
        prompts.write_text("a photo of red\na photo of green\n")
    dist.barrier()
    flow_grpo.main(["--preset", "tiny-flux", "--model", "flux", "--pretrained", str(pipeline), "--train-prompts",
                    str(prompts), "--reward", "corner_red", "--max-sequence-length", "16", "--mixed-precision", "bf16",
                    "--lora-rank", "8", "--iterations", "2", "--checkpoint-every", "1", *QUIET,
                    "--output-dir", str(out / "flux_bf16_lora")])
    from accelerate.state import AcceleratorState
    (out / f"distributed_type_{os.environ['RANK']}.json").write_text(
        json.dumps(str(AcceleratorState().distributed_type)))
    # a full disk on process 1 alone (DeepSpeed's own launch: `deepspeed_full_disk`, below)
    if strategy != "deepspeed":
        (out / f"full_disk_{os.environ['RANK']}.json").write_text(json.dumps(full_disk(out, tiny, (1,))))


def deepspeed_full_disk(out: Path, ranks: tuple[int, ...]):
    """A full disk on `ranks` under DeepSpeed, in a launch of its own: a process that did not fail is stopped by the
    failed one's line from the key-value store (Run._failed_writes_watched), with os._exit, so it writes no result
    and no later run could follow in this launch."""
    switch_strategy_on_cpu("deepspeed")
    # a process left waiting in a collective fails after a minute, not --dist-timeout-minutes' default 120
    result = full_disk(out, ["--model", "tiny-flux", *QUIET, "--dist-timeout-minutes", "1"], ranks)
    (out / f"full_disk_{os.environ['RANK']}.json").write_text(json.dumps(result))


def full_disk(out: Path, tiny: list[str], ranks: tuple[int, ...]) -> dict:
    """The disk of the processes `ranks` takes no more than 200 bytes per file (RLIMIT_FSIZE, as a full disk or a
    quota fails a write) from the start of checkpoint-2: under FSDP2 a shard of the sharded save
    (torch.distributed.checkpoint) fails, under DDP an RNG state, under DeepSpeed its checkpoint files. Every process
    must stop with the same line, checkpoint-1 kept."""
    import resource
    import signal

    import flow_grpo
    from infra import run
    save, limit = run.Run.save_checkpoint, resource.getrlimit(resource.RLIMIT_FSIZE)

    def full_from_2(self, n):
        if n == 2 and int(os.environ["RANK"]) in ranks:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (else the signal kills the process at the write)
            resource.setrlimit(resource.RLIMIT_FSIZE, (200, limit[1]))
        return save(self, n)

    run.Run.save_checkpoint = full_from_2
    try:
        flow_grpo.main([*tiny, "--lora-rank", "0", "--iterations", "3", "--checkpoint-every", "1", "--log-every", "0",
                        "--save-weights", "false", "--output-dir", str(out / "full_disk")])
        return {"status": 0}
    except SystemExit as e:
        return {"status": e.code, "message": str(e)}
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        run.Run.save_checkpoint = save


if __name__ == "__main__":
    if sys.argv[1] == "deepspeed-full-disk":  # ... deepspeed-full-disk OUT RANKS (e.g. 1, or 0,1)
        deepspeed_full_disk(Path(sys.argv[2]), tuple(int(r) for r in sys.argv[3].split(",")))
    else:
        main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
    # Every result is written: end without PyTorch's interpreter teardown, which on gloo now and then aborts a process
    # after its work is done ("terminate called without an active exception", SIGABRT; docs/multi-gpu.md), and the
    # launcher would report that as this harness failing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
