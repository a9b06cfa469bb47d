"""The commands of the README and docs/, read out of the pages themselves. `accelerate launch` lines are parsed the way
`accelerate launch` parses them: every paper preset of every script is launched there; each command's config holds
its training state on an 80 GB GPU by the real parameter counts (and docs/multi-gpu.md's memory table is what
benchmarks/memory_estimate.py prints); and each command, exactly as written except for the sizes (one prompt,
groups of at most 4, 32 px, one iteration) and the paths, trains an iteration on a tiny random pipeline of its model
with its rewards loaded from --reward-dir. `python <script>.py` lines parse, need no reward weights unless they
name a real model, and those on the tiny FLUX run."""

import dataclasses
import importlib
import math
import re
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

from infra.args import parse_args
from infra import diffusers_models
from infra import rewards
from conftest import assert_trained
from tiny_pipelines import save_tiny_clip_rewards, save_tiny_flux_pipeline, save_tiny_sd3_pipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import memory_estimate  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses and training runs: the slow tier

SCRIPTS = ("flow_grpo", "dgpo", "neighbor_grpo", "g2rpo", "pro_grpo")
GPU_GIB = 74.5  # an 80 GB card as torch reports it


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def memory_section() -> str:
    return (ROOT / "docs" / "multi-gpu.md").read_text().split("\n## Memory\n", 1)[1].split("\n## ", 1)[0]


def readme_shell_lines() -> list[list[str]]:
    """Every command line of the bash blocks of the README and docs/ as words: continuation lines joined, comments
    dropped, the blocks' variables expanded except $FLUX and $SD3 (the pipeline directories, which the tests
    choose)."""
    text = "\n".join(doc.read_text() for doc in DOCS)
    variables, lines = {}, []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            if re.match(r"^[A-Z_]+=", line):  # FLUX=...; SD3=...  /  DATA="..."
                for assignment in line.split(";"):
                    name, _, value = assignment.strip().partition("=")
                    variables[name] = shlex.split(value)[0]
                continue
            words = []
            for w in shlex.split(line):
                keep = not w.startswith("$") or w[1:] in ("FLUX", "SD3")
                words += [w] if keep else shlex.split(variables[w[1:]])
            lines.append(words)
    return lines


def launch(words: list[str]):
    """accelerate's own parse of `accelerate launch ...`, with the config file resolved."""
    args = launch_command_parser().parse_args(words[2:])
    args.config_file = str(ROOT / args.config_file)
    args, _, _ = _validate_launch_command(args)
    return args


def parsed(words: list[str], assets: dict):
    """(module, args, argv): the script and its flags as the script parses them, with the command's paths (weights,
    prompt files, reward weights: checked to exist when parsed) replaced by the tests' tiny stand-ins."""
    la = launch(words)
    module = importlib.import_module(Path(la.training_script).stem)
    argv = list(la.training_script_args)
    preset = module.PRESETS[argv[argv.index("--preset") + 1]]
    model = argv[argv.index("--model") + 1] if "--model" in argv else preset["model"]
    paths = {"--pretrained": assets[model], **{k: v for k, v in assets.items() if k.startswith("--")}}
    argv = [paths.get(flag, word) for flag, word in zip([None] + argv, argv)]  # the value after each path flag
    return module, parse_args(module.Args, module.PRESETS, argv), argv


LINES = readme_shell_lines()
LAUNCHES = [w for w in LINES if w[:3] == ["accelerate", "launch", "--config_file"]]
IDS = [f"{i}-{Path(launch(c).config_file).stem}-{c[c.index('--preset') + 1]}" for i, c in enumerate(LAUNCHES)]
PYTHON = [w for w in LINES if w[0] == "python" and w[1].removesuffix(".py") in SCRIPTS]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    (root / "train.txt").write_text("a photo of red\na photo of green\na photo of cyan\n")
    (root / "eval.txt").write_text("a photo of blue\n")
    return {"flux": str(save_tiny_flux_pipeline(root / "FLUX.1-dev")),
            "sd3": str(save_tiny_sd3_pipeline(root / "stable-diffusion-3.5-medium")),
            "--reward-dir": str(save_tiny_clip_rewards(root / "rewards")),
            "--train-prompts": str(root / "train.txt"), "--eval-prompts": str(root / "eval.txt")}


def test_every_paper_preset_is_launched_in_the_readme_with_its_own_model(assets):
    assert len(LAUNCHES) >= 9 and len(PYTHON) >= 12  # what the parametrized tests below run on
    launched = set()
    for words in LAUNCHES:
        la = launch(words)
        assert la.num_processes == 8 and la.mixed_precision == "bf16"
        module, args, _ = parsed(words, assets)
        argv = list(la.training_script_args)
        pretrained = argv[argv.index("--pretrained") + 1]
        assert pretrained in {"flux": ("$FLUX", "/data/FLUX.1-dev"), "sd3": ("$SD3",)}[args.model], words
        assert args.train_prompts and args.eval_prompts and args.reward_dir and args.reward, words
        launched.add((module.__name__, args.preset))
    paper = {(name, preset) for name in SCRIPTS
             for preset, values in importlib.import_module(name).PRESETS.items() if values["model"] in ("flux", "sd3")}
    assert paper <= launched, f"paper presets with no command in the README or docs/: {sorted(paper - launched)}"


@lru_cache(maxsize=None)
def _counts(model: str, rank: int) -> tuple[int, int, int]:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    cls, config, targets = {
        "flux": (FluxTransformer2DModel, diffusers_models.FLUX_DEV_TRANSFORMER_CONFIG, diffusers_models.FLUX_LORA_TARGETS),
        "sd3": (SD3Transformer2DModel, diffusers_models.SD35_MEDIUM_TRANSFORMER_CONFIG, diffusers_models.SD3_LORA_TARGETS)}[model]
    params, lora, block = memory_estimate.counts(cls, config, max(rank, 1), targets)
    return params, lora if rank else 0, block


def _state_gib(model: str, rank: int, strategy: str, reference: bool, gpus: int = 8) -> float:
    """Training state per GPU: memory_estimate's weights + gradients + AdamW, plus the bf16 frozen copy a full
    fine-tune keeps for a reference (a LoRA reference is the base with the adapters off: no memory)."""
    params, lora, block = _counts(model, rank)
    extra = 2 * params if reference and not rank else 0
    return (sum(memory_estimate.state_bytes(params, lora, block, strategy, gpus)) + extra) / memory_estimate.GIB


@pytest.mark.parametrize("words", LAUNCHES, ids=IDS)
def test_the_commands_config_holds_the_training_state_on_an_80gb_gpu(words, assets):
    la = launch(words)
    strategy = "fsdp" if la.use_fsdp else "deepspeed" if la.use_deepspeed else "ddp"
    module, args, _ = parsed(words, assets)
    reference = module.__name__ == "dgpo" or getattr(args, "kl_beta", 0) > 0
    assert _state_gib(args.model, args.lora_rank, strategy, reference) < GPU_GIB


def test_the_fit_check_can_fail_and_the_readme_memory_table_is_the_estimates(capsys, monkeypatch):
    assert _state_gib("flux", 0, "ddp", reference=False) > 2 * GPU_GIB  # FLUX.1-dev full fine-tune under DDP
    monkeypatch.setattr(sys, "argv", ["memory_estimate.py"])
    memory_estimate.main()
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 10 and table[0] in memory_section()
    missing = [row for row in table if row not in memory_section()]
    assert not missing, f"docs/multi-gpu.md's memory table differs from benchmarks/memory_estimate.py's: {missing}"


def _shrunk(module, args) -> list[str]:
    """Flags that shrink a paper preset to CPU size and change nothing else: one prompt, groups of at most 4 (Pro-
    GRPO's funnel scaled so that it ends at 2), anchors at most 4, 32 px, 16 text tokens, one iteration."""
    names = {f.name for f in dataclasses.fields(module.Args)}
    flags = ["--prompts-per-iteration", "1", "--resolution", "32", "--max-sequence-length", "16", "--iterations", "1",
             "--checkpoint-every", "0", "--log-every", "0"]
    if "group_sizes" in names:
        sizes = [int(g) for g in args.group_sizes.split(",")]
        flags += ["--group-sizes", ",".join(str(math.ceil(2 * g / sizes[-1])) for g in sizes)]
    else:
        flags += ["--group-size", str(min(args.group_size, 4))]
    if "num_anchors" in names:
        flags += ["--num-anchors", str(min(args.num_anchors, 4))]
    return flags


@pytest.mark.parametrize("words", LAUNCHES, ids=IDS)
def test_the_command_trains_an_iteration_on_a_tiny_pipeline(words, assets, tmp_path, monkeypatch):
    """HPSv2.1 (a reward extra, open-clip-torch, with a ViT-H that has no tiny stand-in) is swapped for PickScore:
    a weighted multi-reward stays one."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path / "cache"))
    loads = []
    for name in ("pickscore", "clip"):
        monkeypatch.setitem(rewards.LEARNED_REWARDS, name, lambda root, device="cpu", _name=name,
                            _load=rewards.LEARNED_REWARDS[name]: loads.append((_name, root)) or _load(root, device))
    module, args, argv = parsed(words, assets)
    reward = args.reward.replace("hpsv2", "pickscore")
    summary = module.main(argv + _shrunk(module, args) + ["--reward", reward, "--output-dir", str(tmp_path / "run")])
    assert summary["preset"] == args.preset and summary["model"] == args.model
    assert_trained(tmp_path / "run")  # finished, finite throughout, and the weights moved
    root = Path(assets["--reward-dir"])
    assert loads == [(part.split(":")[0], root) for part in reward.split(",")]
    final = tmp_path / "run" / "final"
    if args.lora_rank:
        assert (final / "pytorch_lora_weights.safetensors").is_file()
    else:
        assert (final / "transformer" / "config.json").is_file()


@pytest.mark.parametrize("words", PYTHON, ids=[" ".join(w[1:]) for w in PYTHON])
def test_the_python_commands_parse_and_those_on_the_tiny_flux_run(words, tmp_path, monkeypatch):
    module = importlib.import_module(words[1].removesuffix(".py"))
    if len(words) > 2 and words[2].endswith((".yaml", ".json")):  # a config file of the user's
        return
    if "--help" in words:
        with pytest.raises(SystemExit) as e:
            parse_args(module.Args, module.PRESETS, words[2:])
        assert e.value.code == 0
        return
    if "--resume-from-checkpoint" in words:  # the run it resumes, with a checkpoint, where the command looks for it
        monkeypatch.chdir(tmp_path)
        out = words[words.index("--output-dir") + 1]
        module.main(["--output-dir", out, "--iterations", "2", "--checkpoint-every", "1", "--log-every", "0",
                     "--eval-samples-per-prompt", "1", "--save-weights", "false"])
        (Path(out) / "summary.json").unlink()  # as a run stopped before its end leaves it
    args = parse_args(module.Args, module.PRESETS, words[2:])
    if args.model not in ("flux", "sd3"):  # the built-in models must run with no weights on disk
        assert args.reward is None or all(p.split(":")[0] in rewards.REWARDS for p in args.reward.split(",")), words
    if args.model == "tiny-flux":
        monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path / "cache"))
        summary = module.main(words[2:] + ["--output-dir", str(tmp_path / "run")])
        assert summary["iterations"] == args.iterations and summary["nfe_train"] > 0
