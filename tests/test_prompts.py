"""Prompt files (--train-prompts / --eval-prompts): the two formats, their errors, and a run that uses them."""

import json

import pytest

from infra.args import parse_args
from infra import tasks
import flow_grpo


def test_txt_skips_blank_and_comment_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# my prompts\nmode 1\n\n  mode 2  \n#mode 3\n", encoding="utf-8")
    assert tasks.read_prompts(f) == ["mode 1", "mode 2"]


def test_jsonl_reads_the_prompt_field_and_ignores_the_rest(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"tag": "counting", "prompt": "a photo of three red squares", "include": [{"class": "square"}]},
            {"prompt": "a photo of a blue circle"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert tasks.read_prompts(f) == ["a photo of three red squares", "a photo of a blue circle"]


@pytest.mark.parametrize("name, text, message", [
    ("p.jsonl", '{"prompt": "a"}\n{"caption": "b"}\n', "p.jsonl:2: each line"),
    ("p.jsonl", '{"prompt": "a"}\nnot json\n', "p.jsonl:2: each line"),
    ("p.txt", "# only a comment\n\n", "has no prompts"),
    ("p.csv", "a,b\n", "use .txt"),
])
def test_bad_prompt_files_fail_with_the_line_and_the_fix(tmp_path, name, text, message):
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    with pytest.raises(SystemExit, match=message):
        tasks.read_prompts(f)
    with pytest.raises(SystemExit, match="not found"):
        tasks.read_prompts(tmp_path / "missing.txt")


def test_a_run_trains_and_evaluates_on_the_files_prompts(tmp_path):
    train, evals = tmp_path / "train.txt", tmp_path / "eval.jsonl"
    train.write_text("mode 3\n")
    evals.write_text(json.dumps({"prompt": "mode 3"}) + "\n")
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS,
                             ["--train-prompts", str(train), "--eval-prompts", str(evals)])
    task = tasks.load_task(args, keep_reference=False, log=lambda *_: None)
    assert (task.train_prompts, task.eval_prompts) == (["mode 3"], ["mode 3"])
    summary = flow_grpo.main(["--train-prompts", str(train), "--eval-prompts", str(evals), "--iterations", "30",
                              "--output-dir", str(tmp_path / "run"), "--log-every", "0", "--no-save-weights",
                              "--eval-samples-per-prompt", "256"])
    # one mode to learn instead of eight: 30 iterations already move the reward for it well up
    assert summary["eval_reward_after"] > summary["eval_reward_before"] + 0.2
