"""The command line every script shares: `python <script>.py [CONFIG.yaml|.json] [--flag value ...]`.

Precedence: the dataclass defaults < the preset (`--preset`, else the file's `preset`, else the one named after
`--model`) < the config file (its keys are the flag names, e.g. `learning_rate: 3e-4` or `learning-rate: 3e-4`) <
the flags. Resuming (`--resume-from-checkpoint`) starts from the run's own config.json instead, and refuses flags
that would change what the run computes. Every value is checked here, before anything is written: a bad one stops
with one line naming the flag and what it takes. `--help` shows the flags with their ranges and the values the
chosen preset gives them, and every preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import sys
import textwrap
from pathlib import Path
from typing import Optional

from infra.rewards import LEARNED_REWARDS, POINT_REWARDS, PROMPT_PARSERS, reward_names, spec_names
from infra.tasks import (CUSTOM_MODELS, DEFAULT_REWARDS, MODELS, default_prompts, read_prompts, reward_spec,
                         run_prompts)

TRUE, FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}
# What a resumed run may change: where things are, how often it logs and saves, memory, speed, and how long it runs.
# Anything else would make the resumed run a different run from its checkpoint.
RESUMABLE = {"iterations", "output_dir", "resume_from_checkpoint", "overwrite", "log_every", "report_to",
             "eval_every", "checkpoint_every", "checkpoint_minutes", "checkpoints_total_limit", "dist_timeout_minutes",
             "num_threads", "attention_backend", "save_weights", "rollout_batch_size", "eval_batch_size",
             "train_micro_batch_size", "train_micro_batch_groups", "gradient_checkpointing", "compile",
             "merge_lora_rollouts", "fit_memory", "memory_budget_gib", "pretrained", "reward_dir", "train_prompts",
             "eval_prompts"}

# The flags that name a file or directory: a leading ~ is the home directory, in a config file or quoted too
PATH_FLAGS = ("output_dir", "resume_from_checkpoint", "pretrained", "reward_dir", "train_prompts", "eval_prompts")

# The shared flags a built-in model has no use for: given another value than the default, they stop the run
MODEL_IGNORES = {
    "toy2d": {"flags": ("resolution", "lora_rank", "lora_alpha", "guidance_scale", "max_sequence_length",
                        "compile", "gradient_checkpointing", "fit_memory"),
              "why": "a 2D flow model, all of it trained: no images, no LoRA, no guidance, no text encoder, no "
                     "diffusers transformer to compile, checkpoint or fit to memory"},
    "tiny-flux": {"flags": ("max_sequence_length",), "why": "its hash text encoder has 8 tokens"},
    "shapes": {"flags": ("resolution", "guidance_scale", "max_sequence_length"),
               "why": "its base was pretrained on 32 px images, without a guidance embedding, with its own text "
                      "encoder"},
}


class ArgumentError(SystemExit):
    """A bad command line: the run stops with this one line on stderr (exit status 1), before anything is written."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{prog}: {message}")


# ------------------------------------------------------------------------------------------------------
# Types of the dataclass fields, read from their annotations ("int", "Optional[float]", "bool", ...)
# ------------------------------------------------------------------------------------------------------


def _kind(field: dataclasses.Field) -> tuple[str, bool]:
    """(base type name, whether None is allowed)."""
    t = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    optional = t.startswith("Optional[")
    return (t[len("Optional["):-1] if optional else t), optional


def convert(field: dataclasses.Field, value, flag: str):
    """A value from the command line or a config file, as the field's type; None where allowed."""
    kind, optional = _kind(field)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{flag} needs a value")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in TRUE | FALSE:
            return str(value).lower() in TRUE
        raise ValueError(f"{flag} takes true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{flag} takes an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{flag} takes an integer, got {value!r}") from None
    if kind == "float":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{flag} takes a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{flag} takes a finite number, got {value!r}")
        return number
    return str(value)


def int_list(text: str, flag: str) -> list[int]:
    """A comma-separated list of integers ('0,1,2'), as a ValueError naming `flag` if it is not one."""
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers such as '1,2'; got {text!r}") from None


def check_reward_fits(args, files: dict[str, list[str]]):
    """A built-in reward scores what the model makes (toy2d: 2D points; the others: images) and reads its prompts
    (toy_mode: 'mode 3', mean_color: '... orange', geneval: 'a red circle left of a blue square'): the prompt files'
    (`files`: flag -> prompts) or the model's own. Checked here: a mismatch otherwise fails with a traceback in the
    first reward call, after the model loads."""
    if args.model not in DEFAULT_REWARDS:  # a registered model: its own rewards
        return
    names = spec_names(reward_spec(args))
    for name in names:
        points = name in POINT_REWARDS
        if (args.model == "toy2d") != points and (points or name in PROMPT_PARSERS or name in LEARNED_REWARDS):
            made = "2D points" if args.model == "toy2d" else "images"
            raise ValueError(f"--reward {name} cannot score the {made} --model {args.model} makes: use "
                             f"{DEFAULT_REWARDS[args.model] if args.model == 'toy2d' else 'an image reward'}")
    defaults = default_prompts(args.model)
    for flag, path, prompts in (("--train-prompts", args.train_prompts, defaults and defaults[0]),
                                ("--eval-prompts", args.eval_prompts, defaults and defaults[1])):
        where = f"the prompts of {flag} {path}" if path else f"the {args.model} prompts"
        prompts = files[flag] if path else prompts or []
        for name in (n for n in names if n in PROMPT_PARSERS):
            try:
                for prompt in prompts:
                    PROMPT_PARSERS[name](prompt)
            except ValueError as e:
                raise ValueError(f"--reward {name} cannot score {where}: {e}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(field: dataclasses.Field, value):
    """The field's own rules (metadata `choices`, `min` / `max` (inclusive), `above` / `below` (exclusive),
    `unused`), as a one-line ValueError."""
    flag = _flag(field.name)
    if field.metadata.get("unused") and value != field.default:  # a shared flag this script has no use for
        raise ValueError(f"{flag} is not used here: {field.metadata['unused']}")
    if value is None:
        return
    choices = field.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{flag} takes one of {', '.join(map(str, choices))}; got {value!r}")
    low, above = field.metadata.get("min"), field.metadata.get("above")
    if low is not None and value < low:
        raise ValueError(f"{flag} must be at least {low}; got {value}")
    if above is not None and value <= above:
        raise ValueError(f"{flag} must be above {above}; got {value}")
    high, below = field.metadata.get("max"), field.metadata.get("below")
    if high is not None and value > high:
        raise ValueError(f"{flag} must be at most {high}; got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{flag} must be below {below}; got {value}")


def value_range(field: dataclasses.Field) -> str:
    """What --help says the field takes beyond its help text: its bounds ('x > 0', '0 <= x <= 1') and any choices
    the help text does not already name; '' when none."""
    m = field.metadata
    low = f"{m['min']} <=" if m.get("min") is not None else f"{m['above']} <" if m.get("above") is not None else ""
    high = f"<= {m['max']}" if m.get("max") is not None else f"< {m['below']}" if m.get("below") is not None else ""
    if low and high:
        return f"{low} x {high}"
    if low:  # one-sided: 'x >= 1' reads better than '1 <= x'
        bound, sign = low.split()
        return f"x {sign.replace('<', '>')} {bound}"
    if high:
        return f"x {high}"
    missing = [str(c) for c in m.get("choices") or () if str(c) not in m.get("help", "")]
    return f"one of {', '.join(map(str, m['choices']))}" if missing else ""


def check_together(args):
    """The rules that involve the model, the reward, the files: before anything loads or is written."""
    if args.model not in MODELS + tuple(CUSTOM_MODELS):
        raise ValueError(f"--model takes one of {', '.join(MODELS + tuple(CUSTOM_MODELS))}; got {args.model!r}")
    if args.overwrite and args.resume_from_checkpoint:  # (the resume went ahead, the --overwrite silently ignored)
        raise ValueError("--overwrite starts the run in --output-dir over and --resume-from-checkpoint continues it: "
                         "give one of them")
    if args.reward is not None:
        for item in args.reward.split(","):
            name, _, weight = item.strip().partition(":")
            if name not in reward_names():
                close = difflib.get_close_matches(name, reward_names(), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(f"--reward: unknown reward {name!r}{hint}; available: {', '.join(reward_names())}, or "
                                 f"a weighted sum such as hpsv2:1,clip:0.5")
            try:
                float(weight or 1)
            except ValueError:
                raise ValueError(f"--reward: the weight of {name} must be a number, got {weight!r}") from None
    for name in MODEL_IGNORES.get(args.model, {}).get("flags", ()):  # a value the model would silently ignore
        if getattr(args, name) != next(f.default for f in dataclasses.fields(args) if f.name == name):
            raise ValueError(f"{_flag(name)} is not used by --model {args.model}: {MODEL_IGNORES[args.model]['why']}")
    multiple = {"flux": 16, "sd3": 16, "tiny-flux": 2}.get(args.model)  # the VAE's factor (8; tiny: 1) x 2x2 patches
    if multiple and args.resolution % multiple:
        raise ValueError(f"--resolution takes a multiple of {multiple} for --model {args.model} (its VAE's factor "
                         f"times the transformer's 2x2 patches); got {args.resolution}")
    fetch = {"flux": "black-forest-labs/FLUX.1-dev", "sd3": "stabilityai/stable-diffusion-3.5-medium"}.get(args.model)
    if fetch:
        if not args.pretrained:
            raise ValueError(f"--model {args.model} needs --pretrained <a diffusers pipeline directory>: weights are "
                             f"never downloaded at run time (fetch them once: hf download {fetch} --local-dir <dir>)")
        if not args.train_prompts:
            raise ValueError(f"--model {args.model} needs --train-prompts <file.txt|file.jsonl>")
    if args.pretrained:
        path = Path(args.pretrained).expanduser()
        looks_like_a_path = args.pretrained.startswith(("/", ".", "~")) or path.exists()
        if looks_like_a_path and not (path / "model_index.json").is_file():
            what = ("no such directory" if not path.exists() else
                    "not a diffusers pipeline directory (no model_index.json)")
            advice = f"; fetch them once with: hf download {fetch} --local-dir {args.pretrained}" if fetch else ""
            raise ValueError(f"--pretrained {args.pretrained}: {what}{advice}")
        family = {"flux": "Flux", "sd3": "StableDiffusion3"}.get(args.model)
        if looks_like_a_path and family:  # FLUX's loader takes an SD3 directory and fails later, in its text encoder
            try:
                pipeline = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise ValueError(f"--pretrained {args.pretrained}: model_index.json is not a JSON object") from None
            if pipeline and family not in pipeline:
                raise ValueError(f"--pretrained {args.pretrained} holds a {pipeline} (its model_index.json), not the "
                                 f"{family} pipeline --model {args.model} loads")
    files = {}  # flag -> the prompts of its file
    for flag, value in (("--train-prompts", args.train_prompts), ("--eval-prompts", args.eval_prompts)):
        if value is None:
            continue
        if not Path(value).is_file():
            raise ValueError(f"{flag} {value}: no such file")
        try:  # read now: a bad line would otherwise stop the run after the model loads or pretrains
            files[flag] = read_prompts(value)
        except SystemExit as e:
            raise ValueError(f"{flag}: {e}") from None
    check_reward_fits(args, files)
    if args.output_dir:  # before any model loads
        out = Path(args.output_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise ValueError(f"--output-dir {args.output_dir} is a file, not a directory")
        existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"--output-dir {args.output_dir}: cannot create or write in {existing}")
    if getattr(args, "merge_lora_rollouts", False) and args.lora_rank == 0 and args.model in MODELS:
        raise ValueError(f"--merge-lora-rollouts needs LoRA adapters to merge: --model tiny-flux, shapes, flux or sd3 "
                         f"with --lora-rank > 0 (got --model {args.model} --lora-rank 0)")
    if args.fit_memory and args.gradient_checkpointing:
        raise ValueError("--fit-memory turns gradient checkpointing on when memory needs it: drop "
                         "--gradient-checkpointing")
    if args.memory_budget_gib and not args.fit_memory:
        raise ValueError("--memory-budget-gib is the budget of --fit-memory: add --fit-memory")
    if args.resume_from_checkpoint == "latest" and not args.output_dir:
        raise ValueError("--resume-from-checkpoint latest needs the --output-dir of the run to resume")


# ------------------------------------------------------------------------------------------------------
# The parser
# ------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise ArgumentError(self.prog, f"{message} (see --help)")


def _build_parser(args_cls, prog: str) -> _Parser:
    """Every field as --hyphen-name (the underscore spelling is accepted too); bools also as --no-name. Only the
    flags given end up in the result: the defaults come from the layers below."""
    parser = _Parser(prog=prog, add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    parser.add_argument("-h", "--help", action="store_true")
    for f in dataclasses.fields(args_cls):
        spellings = dict.fromkeys([_flag(f.name), "--" + f.name])  # hyphens, then underscores (one if the same)
        if _kind(f)[0] == "bool":
            parser.add_argument(*spellings, dest=f.name, nargs="?", const="true")
            parser.add_argument(*(s.replace("--", "--no-" if s == _flag(f.name) else "--no_", 1) for s in spellings),
                                dest=f.name, action="store_const", const="false")
        else:
            parser.add_argument(*spellings, dest=f.name)
    return parser


def read_config_file(path: str, fields: dict, prog: str) -> dict:
    """A .json / .yaml file of flag names (underscores or hyphens) and values."""
    p = Path(path)
    if not p.is_file():
        raise ArgumentError(prog, f"config file {path}: no such file (the one positional argument is a .json or "
                                  f".yaml file of flag names and values)")
    try:
        if p.suffix == ".json":
            data = json.loads(p.read_text())
        elif p.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(p.read_text())
        else:
            raise ArgumentError(prog, f"config file {path}: use a .json or .yaml file")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArgumentError(prog, f"config file {path}: not valid JSON ({e})") from None
    except Exception as e:  # yaml's own errors
        if isinstance(e, SystemExit):
            raise
        raise ArgumentError(prog, f"config file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ArgumentError(prog, f"config file {path}: expected a mapping of flag names to values")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ArgumentError(prog, f"config file {path}: unknown key {key!r}{hint}")
        out[name] = value
    return out


def _default_preset(model: str, presets: dict, prog: str) -> str:
    if model in presets:
        return model
    matching = [n for n, p in presets.items() if p.get("model") == model]
    if matching:
        return matching[0]
    if model not in MODELS + tuple(CUSTOM_MODELS):
        raise ArgumentError(prog, f"--model takes one of {', '.join(MODELS + tuple(CUSTOM_MODELS))}; got {model!r}")
    advice = " and give the weights with --pretrained <dir>" if model in ("flux", "sd3") else ""
    raise ArgumentError(prog, f"no preset for --model {model}: name one with --preset{advice} "
                              f"(presets: {', '.join(presets)})")


def parse_args(args_cls, presets: dict[str, dict], argv: Optional[list[str]] = None, prog: Optional[str] = None):
    """`argv` (default sys.argv[1:]) into an `args_cls` instance: defaults < preset < config file (or, resuming,
    the run's own config) < flags, every value checked."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or Path(getattr(sys.modules.get(args_cls.__module__), "__file__", None) or sys.argv[0]).name
    fields = {f.name: f for f in dataclasses.fields(args_cls)}
    config_file = argv.pop(0) if argv and not argv[0].startswith("-") else None
    parsed, unknown = _build_parser(args_cls, prog).parse_known_args(argv)
    if unknown:
        word = next((u for u in unknown if u.startswith("-")), unknown[0])
        close = difflib.get_close_matches(word, [_flag(n) for n in fields], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        what = "flag" if word.startswith("-") else "argument (only one config file may come first)"
        raise ArgumentError(prog, f"unknown {what} {word}{hint}; see --help")
    explicit = vars(parsed)
    show_help = explicit.pop("help", False)
    layer = read_config_file(os.path.expanduser(config_file), fields, prog) if config_file else {}
    for source in (explicit, layer):  # '~/runs/x' quoted, or in a config file: no shell expanded it
        for name in PATH_FLAGS:
            if isinstance(source.get(name), str):
                source[name] = os.path.expanduser(source[name])

    try:
        model = convert(fields["model"], explicit.get("model", layer.get("model", fields["model"].default)), "--model")
        preset = explicit.get("preset") or layer.get("preset") or _default_preset(model, presets, prog)
        if preset not in presets:
            raise ValueError(f"--preset takes one of {', '.join(presets)}; got {preset!r}")
        unknown_fields = sorted(set(presets[preset]) - set(fields))
        assert not unknown_fields, f"preset {preset!r} sets unknown fields {unknown_fields}"
        if show_help:
            print_help(args_cls, presets, preset, {**layer, **explicit}, prog)
            raise SystemExit(0)
        values = {name: f.default for name, f in fields.items()}
        values.update(presets[preset], preset=preset)
        resume = explicit.get("resume_from_checkpoint", layer.get("resume_from_checkpoint"))
        output_dir = explicit.get("output_dir", layer.get("output_dir"))
        _check_resume_dir(resume, output_dir)
        saved = _saved_config(resume, output_dir, prog) if resume else None
        if saved is not None:  # the run's own config: the flags need not be repeated
            values.update({k: v for k, v in saved.items() if k in fields})
        for source, flagged in ((layer, False), (explicit, True)):
            for name, raw in source.items():
                values[name] = convert(fields[name], raw, _flag(name) if flagged else f"{config_file}: {name}")
        for name, f in fields.items():
            check(f, values[name])
        args = args_cls(**values)
        check_together(args)
    except ValueError as e:
        raise ArgumentError(prog, str(e)) from None
    if saved is not None:
        changed = [f"{_flag(k)} ({saved[k]!r} in the run, {getattr(args, k)!r} now)" for k in saved
                   if k in fields and k not in RESUMABLE and saved[k] != getattr(args, k)]
        if changed:
            raise ArgumentError(prog, f"cannot resume {args.output_dir}: its run differs in {', '.join(changed)}; "
                                      f"leave them out to resume as it ran, or start a new run in another --output-dir")
    if resume:
        _check_resume_point(args, prog)
    return args


def _check_resume_dir(resume: str, output_dir: Optional[str]):
    """A checkpoint inside a run's directory (<run>/checkpoints/checkpoint-N beside <run>/config.json) continues
    that run there. Into another --output-dir it ran with the preset's flags instead of the run's (its config.json
    was looked for in the new directory), and that directory's metrics.jsonl began at the checkpoint."""
    from infra.run import run_dir_of
    if resume in (None, "latest") or not output_dir:
        return
    run = run_dir_of(resume, None)
    if (run / "config.json").is_file() and run != Path(output_dir).resolve():
        raise ValueError(f"--resume-from-checkpoint {resume} continues the run in {run}, in that directory: leave "
                         f"--output-dir out (or give {run}); to keep that run as it is, copy the whole directory "
                         f"and resume the copy")


def _check_resume_point(args, prog: str):
    """A resumed run trains from its checkpoint up to --iterations, so it must have iterations left. `latest` of a
    finished run is refused: it would evaluate again (minutes on FLUX) and replace the summary with the same
    numbers."""
    from infra.run import (checkpoint_iteration, checkpoints, inputs_changed, not_a_checkpoint,
                           process_count_mismatch, run_dir_of)
    run_dir = run_dir_of(args.resume_from_checkpoint, args.output_dir)
    if run_dir is None:
        return
    if args.resume_from_checkpoint == "latest":
        found = checkpoints(run_dir)
        if not found:  # (found only after the model loaded, before)
            raise ArgumentError(prog, f"no checkpoint to resume in {run_dir / 'checkpoints'} (a run writes one every "
                                      f"--checkpoint-every iterations, every --checkpoint-minutes and at SIGTERM); "
                                      f"start over with --overwrite, or choose another --output-dir")
        summary = run_dir / "summary.json"
        done = json.loads(summary.read_text()).get("iterations") if summary.is_file() else None
        if done is not None and done >= args.iterations:
            raise ArgumentError(prog, f"{run_dir} finished its {done} iterations (summary.json, weights in "
                                      f"{run_dir / 'final'}): nothing to resume. To train longer, resume with "
                                      f"--iterations above {done} (it continues from the last checkpoint, "
                                      f"{found[-1].name}); to start over, --overwrite")
        point = found[-1]
    else:
        point = Path(args.resume_from_checkpoint)
        if not list(point.glob("run_state_*.pt")):  # (a run's directory, say: its parent's parent was taken for it)
            raise ArgumentError(prog, not_a_checkpoint(point))
    # the launcher's process count (torchrun and accelerate launch set WORLD_SIZE); run.start checks it again
    mismatch = process_count_mismatch(point, int(os.environ.get("WORLD_SIZE", "1")))
    if mismatch:
        raise ArgumentError(prog, mismatch)
    changed = inputs_changed(point, args, run_prompts(args))
    if changed:  # before minutes of model loading
        raise ArgumentError(prog, changed)
    trained = checkpoint_iteration(point)
    if trained is not None and trained > args.iterations:
        raise ArgumentError(prog, f"{point} has trained {trained} iterations, more than --iterations "
                                  f"{args.iterations}: a resumed run trains up to --iterations, so pass {trained} or "
                                  f"more (or resume an earlier checkpoint)")


def _saved_config(resume: str, output_dir: Optional[str], prog: str) -> Optional[dict]:
    """The config.json of the run a `--resume-from-checkpoint` points at (None if that run has none)."""
    from infra.run import run_dir_of
    run_dir = run_dir_of(resume, output_dir)
    if run_dir is None or not (run_dir / "config.json").is_file():
        return None
    saved = json.loads((run_dir / "config.json").read_text())
    for launch_only in ("output_dir", "resume_from_checkpoint", "overwrite"):  # how that run was started, not what
        saved.pop(launch_only, None)                                         # it computes
    return saved


def print_help(args_cls, presets: dict, preset: str, given: dict, prog: str):
    """The flags with the values this preset gives them (any flag overrides), then every preset."""
    module = sys.modules.get(args_cls.__module__)
    doc = (module.__doc__ or "").strip().split("\n\n")[0] if module else ""
    common = {f.name for f in dataclasses.fields(args_cls.__mro__[1])} if len(args_cls.__mro__) > 2 else set()
    values = {f.name: f.default for f in dataclasses.fields(args_cls)} | presets[preset] | given
    width = 100

    def entries(fs):
        out = []
        for f in fs:
            kind, _ = _kind(f)
            negation = f" / --no-{f.name.replace('_', '-')}" if kind == "bool" else f" {kind.upper()}"
            head = f"  {_flag(f.name)}{negation}"
            bounds = value_range(f)
            text = f"{f.metadata.get('help', '')}{f'; {bounds}' if bounds else ''} [{values[f.name]!r}]"
            out += [head] + textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
        return out

    fields = dataclasses.fields(args_cls)
    lines = [f"usage: {prog} [CONFIG.yaml|.json] [--flag VALUE ...]", "", doc, "",
             "Precedence: the defaults < the preset < a config file of flag names and values (e.g. `preset: toy2d`,",
             "`learning_rate: 3e-4`) < the flags. Bool flags take --flag [true|false] or --no-flag.",
             "", f"{prog} flags (values in [] are what preset {preset!r} runs):"]
    lines += entries([f for f in fields if f.name not in common])
    lines += ["", "flags every script shares:"] + entries([f for f in fields if f.name in common])
    lines += ["", "presets (--preset NAME; default: the one named after --model, else that model's paper preset):"]
    for name, p in presets.items():
        settings = " ".join(f"{k}={v}" for k, v in p.items())
        lines += textwrap.wrap(f"{name}: {settings}", width, initial_indent="  ", subsequent_indent=" " * 6)
    print("\n".join(lines))
