"""The accelerate config files in configs/accelerate parse the way `accelerate launch` parses them, and what they
set reaches the plugin that acts on it: FSDP2 wraps the transformer blocks of FLUX and of SD3. (The FSDP config
and the DeepSpeed config train for real in tests/test_strategies.py.)"""

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


def test_fsdp_config_reaches_the_fsdp_plugin_as_fsdp2_with_checkpointing(monkeypatch):
    args = _launch_args("fsdp")
    assert args.use_fsdp and args.num_processes == 8
    for k, v in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()  # reads the environment accelerate launch sets
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward  # FSDP2: a bf16 base beside fp32 LoRA
    assert plugin.activation_checkpointing
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.transformer_cls_names_to_wrap is None  # the model's own _no_split_modules


@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_fsdp_config_wraps_the_transformer_blocks_of_either_model(monkeypatch, model):
    """accelerate resolves the blocks to shard against the model itself and fails on a class the model lacks (a
    FLUX + SD3 list in one config broke both); with none named it takes the model's `_no_split_modules`."""
    import diffusers
    from diffusers import SD3Transformer2DModel
    from infra.diffusers_models import tiny_flux_modules
    for k, v in prepare_multi_gpu_env(_launch_args("fsdp")).items():
        monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    if model == "flux":
        net, _ = tiny_flux_modules()
        expected = {diffusers.models.transformers.transformer_flux.FluxTransformerBlock,
                    diffusers.models.transformers.transformer_flux.FluxSingleTransformerBlock}
    else:
        net = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                    pooled_projection_dim=64, out_channels=4)
        expected = {diffusers.models.attention.JointTransformerBlock}
    plugin.set_auto_wrap_policy(net)
    assert set(plugin.auto_wrap_policy.keywords["transformer_layer_cls"]) == expected
    wrapped = [m for m in net.modules() if plugin.auto_wrap_policy(m, recurse=False, nonwrapped_numel=0)]
    assert len(wrapped) == net.config.num_layers + getattr(net.config, "num_single_layers", 0)


def test_deepspeed_config_is_zero_stage_2_without_offload():
    args = _launch_args("deepspeed_zero2")
    assert args.use_deepspeed and args.num_processes == 8
    assert int(args.zero_stage) == 2
    assert args.offload_optimizer_device == "none" and args.offload_param_device == "none"


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2"])
def test_every_config_names_a_command_in_its_header(name):
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert f"accelerate launch --config_file configs/accelerate/{name}.yaml" in text
