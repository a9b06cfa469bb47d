"""The accelerate config files in configs/accelerate parse the way `accelerate launch` parses them, and what they
set reaches the plugin that acts on it (FSDP), with transformer block class names that exist in diffusers."""

from pathlib import Path

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def _launch_args(name):
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "dgpo.py"])
    args, _, _ = _validate_launch_command(args)
    return args


def test_ddp_config_is_an_8_process_bf16_multi_gpu_launch():
    args = _launch_args("ddp")
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (True, False, False)
    assert (args.num_processes, args.mixed_precision) == (8, "bf16")


def test_fsdp_config_reaches_the_fsdp_plugin_as_full_shard_with_checkpointing(monkeypatch):
    args = _launch_args("fsdp")
    assert args.use_fsdp and args.num_processes == 8
    env = prepare_multi_gpu_env(args)
    # rank 0 loads the weights, the others receive them: the plugin checks this against a GPU, so it is off here
    assert env["FSDP_SYNC_MODULE_STATES"] == env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    env["FSDP_SYNC_MODULE_STATES"] = env["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()  # reads the environment accelerate launch sets
    assert plugin.sharding_strategy.name == "FULL_SHARD"
    assert plugin.activation_checkpointing and plugin.use_orig_params
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    classes = plugin.transformer_cls_names_to_wrap
    assert set(classes) == {"FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock"}
    import diffusers.models.transformers.transformer_flux as flux
    import diffusers.models.attention as attention
    assert all(hasattr(flux, c) or hasattr(attention, c) for c in classes)


def test_deepspeed_config_is_zero_stage_2_without_offload():
    args = _launch_args("deepspeed_zero2")
    assert args.use_deepspeed and args.num_processes == 8
    assert int(args.zero_stage) == 2
    assert args.offload_optimizer_device == "none" and args.offload_param_device == "none"


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2"])
def test_every_config_names_a_command_in_its_header(name):
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert f"accelerate launch --config_file configs/accelerate/{name}.yaml" in text
