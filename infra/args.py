"""The command line of every script: dataclass defaults < preset < command line (or a .json / .yaml file)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

from infra.tasks import CUSTOM_MODELS, MODELS


def parse_args(args_cls, presets: dict[str, dict], argv: Optional[list[str]] = None):
    """Parse flags into `args_cls`: dataclass defaults < preset < command line (or a .json/.yaml file).

    The preset defaults to the one named after `--model`. A single argument ending in .json/.yaml is read
    as a config file by HfArgumentParser (its keys are the field names).
    """
    from transformers import HfArgumentParser
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(args_cls)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        reader = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        (args,) = reader(argv[0])
        return _check_args(args, presets)
    pre = HfArgumentParser(args_cls)
    known, _ = pre.parse_known_args(argv)
    name = known.preset
    if name is None:  # the preset named after the model, else the (paper) preset made for that model
        if known.model not in MODELS + tuple(CUSTOM_MODELS):
            raise SystemExit(f"unknown model {known.model!r}; available: {', '.join(MODELS + tuple(CUSTOM_MODELS))}")
        matching = [n for n, p in presets.items() if p.get("model") == known.model]
        name = known.model if known.model in presets else (matching[0] if matching else None)
        if name is None:
            raise SystemExit(f"this script has no preset for --model {known.model}; available: {', '.join(presets)}")
    if name not in presets:
        raise SystemExit(f"unknown preset {name!r}; available: {', '.join(presets)}")
    names = {f.name for f in dataclasses.fields(args_cls)}
    bad = set(presets[name]) - names
    if bad:
        raise ValueError(f"preset {name!r} sets unknown fields {sorted(bad)}")
    parser.set_defaults(**presets[name], preset=name)
    (args,) = parser.parse_args_into_dataclasses(argv)
    return _check_args(args, presets)


def _check_args(args, presets):
    if args.model not in MODELS + tuple(CUSTOM_MODELS):
        raise SystemExit(f"unknown model {args.model!r}; available: {', '.join(MODELS + tuple(CUSTOM_MODELS))}")
    if args.eval_solver not in ("euler", "dpm2m"):
        raise SystemExit(f"unknown eval solver {args.eval_solver!r}: use 'euler' or 'dpm2m'")
    return args
