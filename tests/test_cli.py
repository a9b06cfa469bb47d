"""What a user meets on the command line: config files that apply their preset and combine with flags, output
directories that are never silently overwritten or mixed, every bad value a single line before anything is written,
Ctrl-C as one line with the resume command, --help that shows what the preset runs, and a toy run that draws its
picture and says what its numbers mean."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dgpo
import flow_grpo
import neighbor_grpo
from infra.args import parse_args
from infra.run import OUTPUTS

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--log-every", "0", "--eval-samples-per-prompt", "4"]


def parse(*argv, module=dgpo):
    return parse_args(module.Args, module.PRESETS, list(argv), prog=f"{module.__name__}.py")


# ------------------------------------------------------------------------------------------------ config files
def test_a_config_file_applies_its_preset_exactly_as_the_command_line(tmp_path):
    (tmp_path / "cfg.yaml").write_text("preset: toy2d\n")
    from_file, from_flag = parse(str(tmp_path / "cfg.yaml")), parse("--preset", "toy2d")
    assert from_file == from_flag and from_file.beta == 1.0 and from_file.t_min == 0.4  # the preset's, not 100 / 0.6


def test_a_config_file_combines_with_flags_which_win(tmp_path):
    (tmp_path / "cfg.yaml").write_text("preset: shapes\nlearning-rate: 0.002\niterations: 7\n")
    args = parse(str(tmp_path / "cfg.yaml"), "--iterations", "3")
    assert (args.model, args.learning_rate, args.iterations, args.beta) == ("shapes", 0.002, 3, 100.0)
    (tmp_path / "cfg.json").write_text(json.dumps({"model": "tiny-flux", "group_size": 3}))
    args = parse(str(tmp_path / "cfg.json"))
    assert args.preset == "tiny-flux" and args.group_size == 3 and args.lora_rank == 8  # the model's preset applies


@pytest.mark.parametrize("content,message", [
    ("lerning_rate: 0.1\n", "unknown key 'lerning_rate' (did you mean learning_rate?)"),
    ("group_size: many\n", "group_size takes an integer, got 'many'"),
    ("group_size: 2.5\n", "group_size takes an integer, got 2.5"),
    ("[1, 2]\n", "expected a mapping"),
])
def test_a_bad_config_file_is_one_line_naming_the_key(tmp_path, content, message):
    (tmp_path / "cfg.yaml").write_text(content)
    with pytest.raises(SystemExit) as e:
        parse(str(tmp_path / "cfg.yaml"))
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ bad values
@pytest.mark.parametrize("argv,message", [
    (["--foo", "1"], "unknown flag --foo"),
    (["--group-siz", "4"], "did you mean --group-size?"),
    (["--group-size", "1"], "--group-size must be at least 2; got 1"),
    (["--group-size", "0"], "--group-size must be at least 2; got 0"),
    (["--iterations", "-1"], "--iterations must be at least 1; got -1"),
    (["--learning-rate", "nan"], "--learning-rate takes a finite number, got 'nan'"),
    (["--learning-rate", "fast"], "--learning-rate takes a number, got 'fast'"),
    (["--reward", "nope"], "--reward: unknown reward 'nope'"),
    (["--reward", "pickscore:x"], "the weight of pickscore must be a number"),
    (["--eval-solver", "rk4"], "--eval-solver takes one of euler, dpm2m; got 'rk4'"),
    (["--model", "sdxl"], "--model takes one of toy2d, tiny-flux, shapes, flux, sd3"),
    (["--model", "flux"], "no preset for --model flux: name one with --preset and give the weights with "
                          "--pretrained"),
    (["--preset", "dgpo-sd3"], "--model sd3 needs --pretrained"),
    (["--preset", "dgpo-sd3", "--pretrained", "/nonexistent", "--train-prompts", __file__],
     "--pretrained /nonexistent: no such directory"),
    (["--train-prompts", "/nonexistent.txt"], "--train-prompts /nonexistent.txt: no such file"),
    (["--resume-from-checkpoint", "latest"], "needs the --output-dir of the run to resume"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be above 0; got 0.0"),
    (["--save-weights", "maybe"], "--save-weights takes true or false, got 'maybe'"),
    (["--preset", "dgpo-sd3", "--pretrained", str(ROOT), "--train-prompts", __file__],
     f"--pretrained {ROOT}: not a diffusers pipeline directory (no model_index.json)"),
    (["--model", "tiny-flux", "--fit-memory", "--gradient-checkpointing"],
     "--fit-memory turns gradient checkpointing on when memory needs it"),
    (["--model", "tiny-flux", "--memory-budget-gib", "4"],
     "--memory-budget-gib is the budget of --fit-memory: add --fit-memory"),
    (["--model", "tiny-flux", "--resolution", "31"], "--resolution takes a multiple of 2 for --model tiny-flux"),
    (["--preset", "dgpo-sd3", "--resolution", "520"], "--resolution takes a multiple of 16 for --model sd3 (its VAE's "
                                                      "factor times the transformer's 2x2 patches); got 520"),
    (["--num-steps", "2"], "--num-train-timesteps 4 must be at most --num-steps 2"),  # (parse's default module: dgpo)
    (["--seed", "-1"], "--seed must be at least 0; got -1"),
    (["--output-dir", __file__], f"--output-dir {__file__} is a file, not a directory"),
])
def test_every_bad_value_is_one_line_naming_the_flag(argv, message):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    text = str(e.value)
    assert message in text and "\n" not in text, text


@pytest.mark.parametrize("model, flag, value", [
    ("toy2d", "--lora-rank", "8"), ("toy2d", "--lora-alpha", "4"), ("toy2d", "--resolution", "64"),
    ("toy2d", "--guidance-scale", "7"), ("toy2d", "--max-sequence-length", "77"),
    ("toy2d", "--compile", "true"), ("toy2d", "--gradient-checkpointing", "true"), ("toy2d", "--fit-memory", "true"),
    ("tiny-flux", "--max-sequence-length", "77"),
    ("shapes", "--resolution", "64"), ("shapes", "--guidance-scale", "7"), ("shapes", "--max-sequence-length", "77"),
])
def test_a_flag_the_model_has_no_use_for_is_refused_not_ignored(model, flag, value):
    """Given another value than the default, each of these would change nothing (the toy has no images, shapes
    generates 32 px from its own base): a user asking for it would get a run that silently is not what was asked.
    The toy's speed and memory levers would fail only once its model had loaded: refused here too."""
    with pytest.raises(SystemExit) as e:
        parse("--model", model, flag, value)
    assert str(e.value).startswith(f"dgpo.py: {flag} is not used by --model {model}: ") and "\n" not in str(e.value)
    parse("--model", model, flag, str(getattr(dgpo.Args, flag[2:].replace("-", "_"))))  # the default is no request
    assert parse("--model", "tiny-flux", "--lora-rank", "8", "--guidance-scale", "7").lora_rank == 8  # used there


def test_a_path_starting_with_a_tilde_is_in_the_home_directory(tmp_path, monkeypatch):
    """'~/runs/x' quoted, or in a config file, reaches the script unexpanded: the run wrote into a directory named '~'
    under the working directory, and a resume of '~/runs/x' did not find the run's config.json."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "modes.txt").write_text("mode 1\nmode 2\n")
    (tmp_path / "home" / "cfg.yaml").write_text("train-prompts: ~/modes.txt\nlearning_rate: 0.002\n")
    flow_grpo.main(["~/cfg.yaml", "--output-dir", "~/runs/x", "--iterations", "2", "--checkpoint-every", "1", *QUICK])
    run_dir = tmp_path / "home" / "runs" / "x"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["output_dir"] == str(run_dir) and config["train_prompts"] == str(tmp_path / "home" / "modes.txt")
    assert not (tmp_path / "~").exists()
    resumed = parse("--resume-from-checkpoint", "~/runs/x/checkpoints/checkpoint-1", "--iterations", "3",
                    module=flow_grpo)
    assert resumed.learning_rate == 0.002  # the run's own config.json was found


def test_a_pipeline_directory_of_the_other_model_is_refused_with_the_flags(tmp_path):
    """FluxPipeline.from_pretrained takes an SD3 directory and fails only later, in its text encoder (a traceback
    after the whole pipeline loaded): the directory's model_index.json names its pipeline class."""
    (tmp_path / "prompts.txt").write_text("a cat\n")
    for model, preset, held, wanted in [("flux", "dgpo-sd3", "StableDiffusion3Pipeline", "Flux"),
                                        ("sd3", "dgpo-sd3", "FluxPipeline", "StableDiffusion3")]:
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": held}))
        with pytest.raises(SystemExit) as e:
            parse("--preset", preset, "--model", model, "--pretrained", str(tmp_path), "--train-prompts",
                  str(tmp_path / "prompts.txt"))
        assert str(e.value) == (f"dgpo.py: --pretrained {tmp_path} holds a {held} (its model_index.json), not the "
                                f"{wanted} pipeline --model {model} loads")
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": wanted + "Pipeline"}))
        assert parse("--preset", preset, "--model", model, "--pretrained", str(tmp_path), "--train-prompts",
                     str(tmp_path / "prompts.txt")).model == model


def test_a_bad_prompt_file_stops_at_parse_time_not_after_the_model_loads(tmp_path):
    """The shapes base pretrains for minutes and FLUX loads for minutes: a prompt file's format is checked with the
    flags, each problem as one line."""
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n')
    (tmp_path / "prompts.csv").write_text("a cat\n")
    for flag, name, message in [
            ("--train-prompts", "empty.txt", f"--train-prompts: prompt file {tmp_path / 'empty.txt'} has no prompts"),
            ("--eval-prompts", "bad.jsonl", f"--eval-prompts: {tmp_path / 'bad.jsonl'}:2: each line of a .jsonl "
                                            f"prompt file must be a JSON object with a \"prompt\" field"),
            ("--train-prompts", "prompts.csv", "use .txt (one prompt per line) or .jsonl")]:
        with pytest.raises(SystemExit) as e:
            parse("--model", "shapes", flag, str(tmp_path / name))
        assert message in str(e.value) and str(e.value).startswith("dgpo.py: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("script,flag,bad,message,edge", [
    # each would otherwise fail later with a traceback (sqrt of a negative, torch's "Invalid beta parameter") or run
    # silently wrong (an EMA that diverges, a fraction of transitions above all of them)
    ("neighbor_grpo", "--perturb-sigma", "1.2", "--perturb-sigma must be at most 1; got 1.2", "1"),
    ("dgpo", "--ema-decay", "1.5", "--ema-decay must be at most 1; got 1.5", "1"),
    ("flow_grpo", "--timestep-fraction", "2", "--timestep-fraction must be at most 1; got 2.0", "1"),
    ("pro_grpo", "--timestep-fraction", "1.01", "--timestep-fraction must be at most 1; got 1.01", "1"),
    ("g2rpo", "--adam-beta2", "1", "--adam-beta2 must be below 1; got 1.0", "0.9999"),
])
def test_bounded_values_are_checked_at_both_ends_of_their_range(script, flag, bad, message, edge):
    module = __import__(script)
    with pytest.raises(SystemExit) as e:
        parse(flag, bad, module=module)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert getattr(parse(flag, edge, module=module), flag[2:].replace("-", "_")) == float(edge)  # the edge is in


@pytest.mark.parametrize("script,model,preset", [
    ("dgpo", "sd3", "dgpo-sd3"), ("flow_grpo", "sd3", "flow-grpo-sd3"), ("flow_grpo", "flux", "dancegrpo-flux"),
    ("neighbor_grpo", "flux", "neighbor-grpo-flux"), ("g2rpo", "flux", "g2rpo-flux"),
    ("pro_grpo", "sd3", "pro-grpo-sd3"),  # the paper's Pro-GRPO, not its Flash variant listed after it
])
def test_a_real_model_without_a_preset_flag_runs_its_paper_preset(tmp_path, script, model, preset):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    args = parse("--model", model, "--pretrained", str(tmp_path), "--train-prompts", str(tmp_path / "prompts.txt"),
                 module=__import__(script))
    assert args.preset == preset and args.model == model


def test_a_bad_value_writes_nothing_and_as_a_command_prints_one_line(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "dgpo.py", "--group-size", "0", "--output-dir", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "group-size" in line] == \
        ["dgpo.py: --group-size must be at least 2; got 0"]
    assert not out.exists()


def test_a_cpu_run_of_the_flux_code_path_prints_no_third_party_warnings(tmp_path):
    """DeepSpeed (which accelerate imports) warned that it found no GPU, and transformers' image processors (which
    diffusers' FLUX pipeline imports to save LoRA weights) told the user to install a torchvision that does not
    exist for this CPU torch. A fresh process: both warn once per process."""
    proc = subprocess.run([sys.executable, "flow_grpo.py", "--model", "tiny-flux", "--iterations", "1",
                           "--log-every", "0", "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").exists()  # the pipeline class ran
    printed = proc.stdout + proc.stderr
    for noise in ("WARNING", "torchvision", "unable to detect"):
        assert noise not in printed, printed[-3000:]


def test_an_output_dir_that_cannot_be_a_directory_stops_the_run_before_the_model_loads(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(flow_grpo, "load_task", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit, match="a_file is a file, not a directory"):
        flow_grpo.main(["--output-dir", str(tmp_path / "a_file"), *QUICK])
    with pytest.raises(SystemExit, match="cannot create or write in .*a_file"):
        flow_grpo.main(["--output-dir", str(tmp_path / "a_file" / "run"), *QUICK])
    # what only the first write finds (here: a directory made unwritable after the flags were parsed) is one line too
    monkeypatch.undo()
    from pathlib import Path
    mkdir = Path.mkdir

    def refused_mkdir(self, *a, **k):
        if self == tmp_path / "run":
            raise PermissionError(13, "Permission denied", str(self))
        return mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refused_mkdir)
    with pytest.raises(SystemExit, match=f"--output-dir {tmp_path / 'run'}: Permission denied"):
        flow_grpo.main(["--output-dir", str(tmp_path / "run"), "--iterations", "1", *QUICK])


def test_a_start_that_fails_after_parsing_leaves_no_output_folder(tmp_path, monkeypatch):
    from infra import tasks
    monkeypatch.setattr(dgpo, "load_task", lambda *a, **k: (_ for _ in ()).throw(SystemExit("weights missing")))
    with pytest.raises(SystemExit, match="weights missing"):
        dgpo.main(["--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    assert tasks  # (imported to show the task loader is what failed)


def test_a_prompt_file_that_is_not_utf8_names_itself(tmp_path):
    from infra.tasks import read_prompts
    bad = tmp_path / "prompts.txt"
    bad.write_bytes("a red circle\n".encode() + b"a blue \xff square\n")
    with pytest.raises(SystemExit, match=r"prompt file .*prompts.txt:2: not UTF-8"):
        read_prompts(bad)


def test_the_timestep_clip_is_checked_before_anything_is_written(tmp_path):
    with pytest.raises(SystemExit, match="--t-min 0.95 leaves 1 nodes"):
        dgpo.main(["--t-min", "0.95", "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_the_timestep_clip_on_the_dpm_flow_schedule_is_checked_with_the_flags():
    """The official schedule does not depend on the model, so a clip that leaves too few of its nodes is refused as
    the flags are parsed, before FLUX or SD3 load; at N = 10 its nodes are 1, 0.964, 0.923, 0.875, 0.818, ..."""
    from infra.args import ArgumentError
    parse = lambda *flags: parse_args(dgpo.Args, dgpo.PRESETS, ["--rollout-schedule", "dpm-flow", *flags])
    with pytest.raises(ArgumentError, match="--t-min 0.9 leaves 3 nodes"):
        parse("--t-min", "0.9", "--num-train-timesteps", "4")
    assert parse("--t-min", "0.9", "--num-train-timesteps", "3").t_min == 0.9
    assert parse("--t-min", "0.66", "--num-train-timesteps", "7").t_min == 0.66  # the official config's 7 nodes


# ------------------------------------------------------------------------------------------------ run directories
def test_an_output_dir_that_holds_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    flags = ["--iterations", "4", "--checkpoint-every", "2", "--output-dir", str(out), *QUICK]
    flow_grpo.main(flags)
    summary = (out / "summary.json").read_text()
    with pytest.raises(SystemExit, match="holds a run .*--resume-from-checkpoint latest.*--overwrite"):
        flow_grpo.main(flags)
    assert (out / "summary.json").read_text() == summary  # untouched
    for name in OUTPUTS:  # any one thing a run writes marks the folder as a run's
        held = tmp_path / f"holds-{name}"
        (held / name).mkdir(parents=True)
        with pytest.raises(SystemExit, match=f"holds a run \\({name}\\): it has no checkpoint to resume; start over"):
            flow_grpo.main(["--output-dir", str(held), *QUICK])  # resuming is not offered where it cannot work
    flow_grpo.main(flags + ["--overwrite", "--iterations", "2"])
    assert json.loads((out / "summary.json").read_text())["iterations"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # a fresh log, not appended to the old one
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]  # the old run's checkpoint-4 is gone


def test_overwrite_and_resume_together_are_refused_and_a_run_started_with_overwrite_resumes(tmp_path):
    """Both flags: the resume went ahead and --overwrite was ignored without a word; refused now. A run started with
    --overwrite keeps it in its config.json, which must not make its own resume look like both."""
    out = tmp_path / "run"
    flags = ["--iterations", "4", "--checkpoint-every", "2", "--output-dir", str(out), *QUICK]
    flow_grpo.main(flags + ["--overwrite"])
    assert json.loads((out / "config.json").read_text())["overwrite"] is True
    with pytest.raises(SystemExit, match="--overwrite starts the run in --output-dir over and "
                                         "--resume-from-checkpoint continues it: give one of them"):
        flow_grpo.main(flags + ["--iterations", "6", "--resume-from-checkpoint", "latest", "--overwrite"])
    resumed = flow_grpo.main(flags + ["--iterations", "6", "--resume-from-checkpoint", "latest"])
    assert resumed["iterations"] == 6 and len((out / "metrics.jsonl").read_text().splitlines()) == 6


def test_resume_takes_the_runs_own_flags_and_refuses_ones_that_change_what_it_computes(tmp_path):
    out = tmp_path / "run"
    flow_grpo.main(["--group-size", "4", "--iterations", "4", "--checkpoint-every", "2", "--output-dir", str(out),
                    *QUICK])
    with pytest.raises(SystemExit) as e:
        flow_grpo.main(["--resume-from-checkpoint", "latest", "--output-dir", str(out), "--group-size", "16"])
    assert "cannot resume" in str(e.value) and "--group-size (4 in the run, 16 now)" in str(e.value)
    with pytest.raises(SystemExit, match=r"--learning-rate \(0.001 in the run, 0.5 now\)"):
        flow_grpo.main(["--resume-from-checkpoint", "latest", "--output-dir", str(out), "--learning-rate", "0.5"])
    (tmp_path / "cfg.yaml").write_text("learning_rate: 0.5\n")  # a config file changes what it computes too
    with pytest.raises(SystemExit, match=r"--learning-rate \(0.001 in the run, 0.5 now\)"):
        flow_grpo.main([str(tmp_path / "cfg.yaml"), "--resume-from-checkpoint", "latest", "--output-dir", str(out)])
    # the run's own flags apply, none repeated: its 4 iterations (not the preset's 400), which it finished
    with pytest.raises(SystemExit, match="finished its 4 iterations"):
        flow_grpo.main(["--resume-from-checkpoint", "latest", "--output-dir", str(out)])
    (out / "summary.json").unlink()  # as if it had been cut after checkpoint-2
    s = flow_grpo.main(["--resume-from-checkpoint", "latest", "--output-dir", str(out)])
    assert s["iterations"] == 4
    # and it may run longer
    s = flow_grpo.main(["--resume-from-checkpoint", "latest", "--output-dir", str(out), "--iterations", "6"])
    assert s["iterations"] == 6 and json.loads((out / "config.json").read_text())["group_size"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(6))


def test_ctrl_c_stops_with_one_line_naming_the_iteration_checkpoint_and_resume_command(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "dgpo.py", "--iterations", "100000", "--checkpoint-every", "3", "--output-dir", str(out),
           "--log-every", "0", "--eval-samples-per-prompt", "4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list((out / "checkpoints").glob("checkpoint-[0-9]*")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted in iteration ") and " of 100000; last checkpoint " in line, err
    assert f"resume: python dgpo.py --resume-from-checkpoint latest --output-dir {out}" in line
    assert not (out / "final").exists()


def test_a_launch_that_asked_for_processes_but_got_one_says_so(tmp_path, monkeypatch, capsys):
    from infra.run import Run
    monkeypatch.setenv("MASTER_PORT", "29500")  # what `accelerate launch --cpu --num_processes 2` sets, one process
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    Run(parse("--output-dir", str(tmp_path / "run"), module=flow_grpo), "flow_grpo")
    out = capsys.readouterr()
    text = out.out + out.err
    assert "| 1 process on cpu |" in text and "warning: this run has ONE process" in text


# ------------------------------------------------------------------------------------------------ help and output
def test_help_shows_hyphen_flags_the_presets_values_and_every_preset(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--help")
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--output-dir" in text and "--output_dir" not in text
    assert "--save-weights / --no-save-weights" in text and text.count("--no-save-weights") == 1
    assert "--beta FLOAT" in text and "[1.0]" in text  # what the default preset (toy2d) runs, not the field's 100
    for name in dgpo.PRESETS:
        assert f"  {name}: " in text
    assert "config file" in text
    with pytest.raises(SystemExit):
        parse("--preset", "dgpo-sd3", "--help")
    assert "[10.0]" in capsys.readouterr().out  # the paper preset's beta


def test_help_shows_each_flags_range_as_the_parser_checks_it(capsys):
    with pytest.raises(SystemExit):
        parse("--help", module=neighbor_grpo)
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "(paper's optimum 0.3); 0 <= x <= 1 [0.3]" in text  # --perturb-sigma: min and max
    assert "AdamW beta2; 0 <= x < 1 [0.999]" in text  # min and below
    assert "gradient clipping norm; x > 0 [1.0]" in text  # above alone
    assert "(a group needs 2 to have an advantage); x >= 2 [16]" in text  # min alone
    assert "also log to 'tensorboard' or 'wandb' through accelerate's trackers; one of none, tensorboard, wandb" in text
    assert "'efficient', 'cudnn' or 'math'; checked against math before training ['auto']" in text  # named already
    assert "--seed INT seed; each process adds its rank for rollout noise; 0 <= x <= 2147483647 [0]" in text
    assert "instead of the model's default set [None]" in text  # --train-prompts: no bounds, nothing added


def test_a_toy_run_draws_its_picture_and_says_what_its_numbers_mean(tmp_path, capsys):
    from PIL import Image
    flow_grpo.main(["--iterations", "3", "--output-dir", str(tmp_path), "--log-every", "1",
                    "--eval-samples-per-prompt", "8"])
    image = Image.open(tmp_path / "samples.png")
    colours = {tuple(p) for p in np.asarray(image).reshape(-1, len(image.getbands()))}
    assert image.size == (940, 340) and len(colours) > 10  # three drawn panels, not a blank canvas
    out = capsys.readouterr().out
    assert "it 3/3" in out and "s/it" in out and "ETA" in out and "done" in out
    assert "the base model ignores the prompt and scores about 0.13" in out and "on_manifold" in out


def test_a_tiny_flux_run_says_its_reward_need_not_move(tmp_path, capsys):
    """A random FLUX of 68k parameters: 'eval reward 0.715 -> 0.715' after 50 iterations read as a broken method."""
    flow_grpo.main(["--model", "tiny-flux", "--iterations", "1", "--output-dir", str(tmp_path), *QUICK])
    (line,) = [l for l in capsys.readouterr().out.splitlines() if l.startswith("eval reward ")]
    assert "it checks the code path, not learning, and its reward need not move; --model shapes" in line


def test_a_console_line_comes_every_log_every_iterations_and_after_a_minute_without_one(tmp_path, capsys,
                                                                                     monkeypatch):
    """FLUX's iterations take minutes: at --log-every 10 a log would stay silent for half an hour. An iteration that
    ends a minute or more after the last line prints one too (here the clock of iteration 3 is set back)."""
    from infra.run import Run
    original = Run.log

    def slow_third(self, iteration, metrics):
        if iteration == 2:
            self._last_line -= 61
        return original(self, iteration, metrics)

    monkeypatch.setattr(Run, "log", slow_third)
    flow_grpo.main(["--iterations", "5", "--output-dir", str(tmp_path), "--log-every", "100",
                    "--eval-samples-per-prompt", "2"])
    lines = [l.split()[1] for l in capsys.readouterr().out.splitlines() if l.startswith("it ")]
    assert lines == ["1/5", "3/5", "5/5"]  # the first, the one a minute after it, the last


def test_a_reward_that_cannot_score_the_models_samples_or_prompts_is_refused_with_the_flags(tmp_path):
    """Each of these failed with a traceback in the first reward call, after the model loaded (or pretrained)."""
    (tmp_path / "mixed.txt").write_text("a red circle\nmode 3\n")
    refused = {
        ("--reward", "geneval"): "--reward geneval cannot score the 2D points --model toy2d makes: use toy_mode",
        ("--reward", "pickscore"): "--reward pickscore cannot score the 2D points",
        ("--model", "tiny-flux", "--reward", "toy_mode"): "--reward toy_mode cannot score the images --model tiny-flux",
        ("--model", "tiny-flux", "--reward", "mean_color:1,geneval:0.5"):
            "--reward geneval cannot score the tiny-flux prompts: not a shapes prompt: 'a photo of red'",
        ("--model", "shapes", "--reward", "mean_color"):
            "--reward mean_color cannot score the shapes prompts: mean_color prompts end in one of",
        ("--model", "shapes", "--eval-prompts", str(tmp_path / "mixed.txt")):
            f"--reward geneval cannot score the prompts of --eval-prompts {tmp_path / 'mixed.txt'}: not a shapes "
            f"prompt: 'mode 3'",
        ("--train-prompts", str(tmp_path / "mixed.txt")): "--reward toy_mode cannot score the prompts of "
                                                          "--train-prompts",
    }
    for argv, message in refused.items():
        with pytest.raises(SystemExit) as e:
            parse(*argv)
        assert message in str(e.value), (argv, str(e.value))
    # what fits is accepted: every default pairing, a colour prompt file on tiny-flux, a weighted sum of image rewards
    (tmp_path / "colours.txt").write_text("a photo of red\na car in orange\n")
    for model in ("toy2d", "tiny-flux", "shapes"):
        parse("--model", model)
    parse("--model", "tiny-flux", "--train-prompts", str(tmp_path / "colours.txt"), "--reward", "mean_color:2")
    parse("--model", "tiny-flux", "--reward", "mean_color,pickscore")  # pickscore's weights load later, not here


def test_runs_without_output_dir_started_in_the_same_second_get_a_directory_each(tmp_path, monkeypatch):
    """A sweep started in a shell loop: the same script, model and seed in the same second. The default directory is
    claimed when the run starts, so the second run takes <name>-2 instead of writing into the first's."""
    import time
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    first = flow_grpo.main(["--iterations", "1", "--learning-rate", "1e-3", *QUICK])
    second = flow_grpo.main(["--iterations", "1", "--learning-rate", "2e-3", *QUICK])
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["flow_grpo_toy2d_s0_20260101-000000",
                                                      "flow_grpo_toy2d_s0_20260101-000000-2"]
    for name, summary, lr in (("flow_grpo_toy2d_s0_20260101-000000", first, 1e-3),
                              ("flow_grpo_toy2d_s0_20260101-000000-2", second, 2e-3)):
        assert json.loads((runs / name / "summary.json").read_text()) == summary
        assert json.loads((runs / name / "config.json").read_text())["learning_rate"] == lr
        assert json.loads((runs / name / "config.json").read_text())["output_dir"] == str(Path("runs") / name)


def test_a_run_without_output_dir_that_fails_before_writing_leaves_no_directory(tmp_path):
    """The default directory is claimed (created) as the run starts; a run that then fails (here a reward model whose
    weights are missing, found as the task loads) removes it at exit, one that wrote into it keeps it."""
    script = str(ROOT / "flow_grpo.py")
    failed = subprocess.run([sys.executable, script, "--model", "tiny-flux", "--reward", "pickscore", "--reward-dir",
                             str(tmp_path / "no_rewards"), "--iterations", "1"], cwd=tmp_path, capture_output=True,
                            text=True)
    assert failed.returncode == 1 and "PickScore weights: " in failed.stderr and "not found" in failed.stderr
    assert "runs/flow_grpo_tiny-flux_s0_" in failed.stdout  # the run had started: its directory was claimed
    assert list((tmp_path / "runs").iterdir()) == []
    done = subprocess.run([sys.executable, script, "--iterations", "1", *QUICK], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (kept,) = (tmp_path / "runs").iterdir()
    assert (kept / "summary.json").is_file()
