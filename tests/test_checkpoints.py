"""Save, interrupt, resume: a resumed run continues exactly where an uninterrupted one would be."""

import json
import os
import signal

import pytest
import torch

from infra import tasks
from infra import run
import dgpo
import flow_grpo
import g2rpo
import neighbor_grpo
import pro_grpo

SCRIPTS = {"flow_grpo": flow_grpo, "dgpo": dgpo, "pro_grpo": pro_grpo, "g2rpo": g2rpo, "neighbor_grpo": neighbor_grpo}


def metrics(path):
    rows = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.parametrize("name", SCRIPTS)
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(name, tmp_path, monkeypatch):
    main = SCRIPTS[name].main
    flags = ["--iterations", "6", "--checkpoint-every", "3", "--log-every", "0", "--seed", "5"]
    if name == "dgpo":
        flags += ["--ema-start", "2"]  # so the EMA (restored from the checkpoint) drives rollouts after resuming
    full = main(flags + ["--output-dir", str(tmp_path / "full")])

    original = run.Run.end_iteration

    def crash_at_5(self, iteration, *a, **kw):
        original(self, iteration, *a, **kw)
        if iteration == 4:  # after checkpoint-3 was written and two more iterations logged
            raise KeyboardInterrupt

    monkeypatch.setattr(run.Run, "end_iteration", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        main(flags + ["--output-dir", str(tmp_path / "cut")])
    assert len(metrics(tmp_path / "cut")) == 5
    monkeypatch.setattr(run.Run, "end_iteration", original)
    resumed = main(flags + ["--output-dir", str(tmp_path / "cut"), "--resume-from-checkpoint", "latest"])

    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [r["iteration"] for r in b] == list(range(6))
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["iteration"], k)
    for k in ("eval_reward_before", "eval_reward_after", "nfe_rollout", "nfe_train", "on_manifold_after"):
        assert full[k] == pytest.approx(resumed[k], rel=1e-6), k


def test_sigterm_finishes_the_iteration_checkpoints_it_and_the_resumed_run_matches_an_uninterrupted_one(
        tmp_path, monkeypatch):
    """A scheduler's SIGTERM (preemption, time limit) during iteration 3 of 6, with no periodic checkpoints: the run
    finishes iteration 3, writes checkpoint-3 and stops with exit status 143; resumed, it equals an uninterrupted
    run."""
    flags = ["--iterations", "6", "--checkpoint-every", "0", "--log-every", "0", "--seed", "5",
             "--eval-samples-per-prompt", "2", "--save-weights", "false"]
    full = flow_grpo.main(flags + ["--output-dir", str(tmp_path / "full")])
    original = run.Run.begin_iteration

    def sigterm_in_iteration_3(self, policy):
        original(self, policy)
        if self.iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(run.Run, "begin_iteration", sigterm_in_iteration_3)
    with pytest.raises(run.Interrupted) as e:
        flow_grpo.main(flags + ["--output-dir", str(tmp_path / "cut")])
    assert e.value.code == 143
    assert str(e.value) == (f"stopped by SIGTERM after 3 of 6 iterations; last checkpoint "
                            f"{tmp_path / 'cut' / 'checkpoints' / 'checkpoint-3'}; resume: python "
                            f"flow_grpo.py --resume-from-checkpoint latest --output-dir {tmp_path / 'cut'}")
    assert len(metrics(tmp_path / "cut")) == 3 and not (tmp_path / "cut" / "summary.json").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # given back
    monkeypatch.setattr(run.Run, "begin_iteration", original)
    resumed = flow_grpo.main(flags + ["--output-dir", str(tmp_path / "cut"), "--resume-from-checkpoint", "latest"])
    for ra, rb in zip(metrics(tmp_path / "full"), metrics(tmp_path / "cut"), strict=True):
        assert ra == pytest.approx(rb, rel=1e-5, abs=1e-7), ra["iteration"]
    assert full["eval_reward_after"] == pytest.approx(resumed["eval_reward_after"], rel=1e-6)


def test_sigterm_outside_the_training_loop_stops_at_once(tmp_path, monkeypatch):
    original = run.evaluate

    def sigterm_in_the_before_evaluation(task, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(task, *a, **k)

    monkeypatch.setattr(run, "evaluate", sigterm_in_the_before_evaluation)
    with pytest.raises(run.Interrupted) as e:
        flow_grpo.main(["--iterations", "3", "--output-dir", str(tmp_path), "--log-every", "0"])
    assert e.value.code == 143 and str(e.value) == ("interrupted in the evaluation before training; nothing trained, "
                                                    "nothing to resume")
    assert not (tmp_path / "checkpoints").exists()


def test_ctrl_c_while_the_model_loads_is_one_line_and_leaves_no_directory(tmp_path, monkeypatch):
    """The handlers come with the run, not after the model has loaded (FLUX: minutes): Ctrl-C then printed a
    KeyboardInterrupt traceback. A run without --output-dir leaves no directory behind."""
    load = flow_grpo.load_task

    def interrupted_load(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return load(*a, **k)

    monkeypatch.setattr(flow_grpo, "load_task", interrupted_load)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(run.Interrupted) as e:
        flow_grpo.main(["--iterations", "3", "--log-every", "0"])
    assert e.value.code == 130 and str(e.value) == "interrupted before training; nothing trained, nothing to resume"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    (claimed,) = (tmp_path / "runs").iterdir()
    assert list(claimed.iterdir()) == []  # nothing written: removed at exit (_remove_if_empty)


def test_checkpoints_are_pruned_and_hold_loadable_weights(tmp_path):
    flow_grpo.main(["--iterations", "7", "--checkpoint-every", "2", "--checkpoints-total-limit", "2", "--log-every",
                    "0", "--output-dir", str(tmp_path)])
    found = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert found == ["checkpoint-6", "checkpoint-7"]  # every 2 iterations and after the last
    policy = tasks.toy2d_policy(keep_reference=False)
    policy.load(tmp_path / "checkpoints" / "checkpoint-7" / "weights")
    assert any(not torch.equal(v, tasks.toy2d_policy(keep_reference=False).net.state_dict()[k])
               for k, v in policy.net.state_dict().items())


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="output-dir"):
        flow_grpo.main(["--resume-from-checkpoint", "latest", "--iterations", "1"])
    from infra.args import ArgumentError
    with pytest.raises(ArgumentError, match="no checkpoint to resume in .*checkpoints"):  # with the flags
        flow_grpo.main(["--resume-from-checkpoint", "latest", "--output-dir", str(tmp_path), "--iterations", "1"])
    assert list(tmp_path.iterdir()) == []  # a refused resume writes nothing
    # a run's directory or its checkpoints/ folder for a checkpoint: its parent's parent was taken for the run, and
    # the model loaded before the refusal
    run_dir = tmp_path / "run"
    flow_grpo.main(["--iterations", "2", "--checkpoint-every", "1", "--log-every", "0", "--eval-samples-per-prompt",
                    "1", "--save-weights", "false", "--output-dir", str(run_dir)])
    for given, what in ((run_dir, "directory"), (run_dir / "checkpoints", "checkpoints folder")):
        with pytest.raises(ArgumentError, match=f"{given} is a run's {what}, not a checkpoint: resume its last "
                                                f"checkpoint with --resume-from-checkpoint latest --output-dir "
                                                f"{run_dir}$"):
            flow_grpo.main(["--resume-from-checkpoint", str(given), "--iterations", "3"])
    with pytest.raises(ArgumentError, match="no such checkpoint directory"):
        flow_grpo.main(["--resume-from-checkpoint", str(run_dir / "checkpoints" / "checkpoint-7"), "--iterations", "9"])
    (tmp_path / "elsewhere").mkdir()  # a directory that exists but is no checkpoint
    with pytest.raises(SystemExit, match="not a checkpoint of this script"):
        flow_grpo.main(["--resume-from-checkpoint", str(tmp_path / "elsewhere"), "--output-dir", str(tmp_path),
                        "--iterations", "1"])



def test_a_checkpoint_resumes_only_with_as_many_processes_as_wrote_it(tmp_path, monkeypatch):
    """Each process checkpoints its own prompt stream and NFE counters: with fewer processes the others' would be
    lost (the summary's NFE short), with more there is nothing to load (a FileNotFoundError traceback before this
    check). Refused with the flags (the launchers' WORLD_SIZE), and again when the run starts."""
    import shutil
    from infra import args as args_module
    flags = ["--iterations", "4", "--checkpoint-every", "2", "--log-every", "0", "--eval-samples-per-prompt", "1",
             "--output-dir", str(tmp_path)]
    flow_grpo.main(flags)
    resume = flags + ["--iterations", "6", "--resume-from-checkpoint", "latest"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=r"checkpoint-4 was written by 1 process and this run has 2: resume it "
                                         r"with 1 .*or plain python"):
        flow_grpo.main(resume)
    monkeypatch.delenv("WORLD_SIZE")
    checkpoint = tmp_path / "checkpoints" / "checkpoint-4"
    shutil.copy(checkpoint / "run_state_0.pt", checkpoint / "run_state_1.pt")  # as 2 processes would leave it
    with pytest.raises(SystemExit, match=r"written by 2 processes and this run has 1: resume it with 2 "
                                         r"\(accelerate launch --num_processes 2"):
        flow_grpo.main(resume)
    monkeypatch.setattr(args_module, "_check_resume_point", lambda *a: None)  # the check when the run starts
    with pytest.raises(SystemExit, match="written by 2 processes and this run has 1"):
        flow_grpo.main(resume)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4  # the refusals trained nothing


def test_a_checkpoint_resumes_only_with_the_script_that_wrote_it(tmp_path):
    """dgpo.py resuming flow_grpo.py's run failed with a KeyError traceback after the model loaded, and had written
    its own config.json over the run's first: a later flow_grpo.py resume would have read DGPO's flags."""
    flags = ["--iterations", "3", "--checkpoint-every", "1", "--log-every", "0", "--eval-samples-per-prompt", "1",
             "--save-weights", "false", "--output-dir", str(tmp_path)]
    flow_grpo.main(flags)
    config = (tmp_path / "config.json").read_text()
    with pytest.raises(SystemExit, match=r"checkpoint-3 is a checkpoint of flow_grpo.py, not of dgpo.py: resume it "
                                         r"with flow_grpo.py$"):
        dgpo.main(flags + ["--iterations", "4", "--resume-from-checkpoint", "latest"])
    assert (tmp_path / "config.json").read_text() == config
    assert flow_grpo.main(flags + ["--iterations", "4", "--resume-from-checkpoint", "latest"])["iterations"] == 4


def test_a_checkpoint_resumes_in_its_own_runs_directory(tmp_path):
    """Resumed into another --output-dir, a checkpoint ran with the preset's flags, not its run's (the run's
    config.json was looked for in the new directory): here learning rate 1e-3 for the run's 2e-3, silently."""
    import shutil
    from infra.args import ArgumentError
    flags = ["--iterations", "2", "--checkpoint-every", "1", "--log-every", "0", "--eval-samples-per-prompt", "1",
             "--save-weights", "false"]
    flow_grpo.main(flags + ["--learning-rate", "2e-3", "--output-dir", str(tmp_path / "a")])
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint-1"
    with pytest.raises(ArgumentError, match=f"continues the run in {tmp_path / 'a'}, in that directory: leave "
                                            f"--output-dir out"):
        flow_grpo.main(flags + ["--iterations", "3", "--resume-from-checkpoint", str(checkpoint), "--output-dir",
                                str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()
    shutil.copytree(tmp_path / "a", tmp_path / "c")  # what the message advises: the copy resumes as its run
    resumed = flow_grpo.main(flags[2:] + ["--iterations", "3", "--resume-from-checkpoint",
                                          str(tmp_path / "c" / "checkpoints" / "checkpoint-1")])
    assert resumed["iterations"] == 3
    assert json.loads((tmp_path / "c" / "config.json").read_text())["learning_rate"] == 2e-3
    assert [json.loads(l)["iteration"] for l in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()] == \
        [0, 1, 2]


def test_a_prompt_file_edited_since_the_checkpoint_is_refused_at_resume(tmp_path, monkeypatch):
    """A checkpoint records the size and SHA-256 of its train and evaluation prompts (inputs.json). A file edited
    since would make the resumed run draw other prompts than the run it continues and compare its "after"
    evaluation with a "before" taken on other prompts. Refused with the flags, before the model loads, and again
    when the run starts (a registered model's own prompts are known only then); the restored file resumes."""
    from types import SimpleNamespace
    from infra import args as args_module
    from infra.args import ArgumentError
    train, evals = tmp_path / "train.txt", tmp_path / "eval.txt"
    train.write_text("mode 1\nmode 2\nmode 3\n")
    evals.write_text("mode 1\nmode 5\n")
    out = tmp_path / "run"
    flags = ["--iterations", "4", "--checkpoint-every", "2", "--log-every", "0", "--eval-samples-per-prompt", "1",
             "--save-weights", "false", "--output-dir", str(out), "--train-prompts", str(train), "--eval-prompts",
             str(evals)]
    flow_grpo.main(flags)
    recorded = json.loads((out / "checkpoints" / "checkpoint-2" / "inputs.json").read_text())
    assert recorded["train"] == run.prompt_digest(["mode 1", "mode 2", "mode 3"])
    assert recorded["eval"]["prompts"] == 2
    resume = flags + ["--iterations", "6", "--resume-from-checkpoint", "latest"]
    evals.write_text("mode 1\nmode 6\n")  # the same count, another prompt
    with pytest.raises(ArgumentError, match=r"the eval prompts of --eval-prompts .*eval.txt are not those it recorded "
                                         r"\(2 then, 2 now, other prompts\): the resumed run would evaluate on"):
        flow_grpo.main(resume)
    evals.write_text("mode 1\nmode 5\n")
    train.write_text("mode 1\nmode 2\nmode 3\nmode 4\n")
    with pytest.raises(ArgumentError, match=r"train prompts .* \(3 then, 4 now\): the resumed run would train on"):
        flow_grpo.main(resume)
    monkeypatch.setattr(args_module, "_check_resume_point", lambda *a: None)  # the check when the run starts
    with pytest.raises(SystemExit, match=r"train prompts .* \(3 then, 4 now\)"):
        flow_grpo.main(resume)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4  # the refusals trained nothing
    train.write_text("mode 1\nmode 2\n# a comment, which read_prompts skips\nmode 3\n")  # the same prompts
    assert flow_grpo.main(resume)["iterations"] == 6
    # FLUX evaluates on its train file when no --eval-prompts is given: the message names that file
    flux = SimpleNamespace(model="flux", train_prompts="p.txt", eval_prompts=None, pretrained=None, reward="mean_color",
                           reward_dir=None)
    changed = run.inputs_changed(out / "checkpoints" / "checkpoint-6", flux, {"eval": ["mode 1"]})
    assert "the eval prompts of --train-prompts p.txt (FLUX / SD3 evaluate on it) are not those it recorded (2 " \
           "then, 1 now)" in changed
    assert run.inputs_changed(out / "checkpoints" / "checkpoint-6", flux, {"train": None, "eval": None}) is None


def test_a_checkpoint_comes_after_an_iteration_that_ends_checkpoint_minutes_after_the_last(tmp_path, monkeypatch):
    """With --checkpoint-every 0, only time writes one: the clock of the last checkpoint is set back an hour before
    iteration 3 ends (the default --checkpoint-minutes 60), so checkpoint-3 is written, and the clock starts again
    there; --checkpoint-minutes 0 writes none. A resume from it continues."""
    original = run.Run.end_iteration

    def an_hour_later_at_3(self, iteration, *a, **kw):
        if iteration == 2:
            self._last_checkpoint -= 3600
        return original(self, iteration, *a, **kw)

    monkeypatch.setattr(run.Run, "end_iteration", an_hour_later_at_3)
    flags = ["--iterations", "6", "--checkpoint-every", "0", "--log-every", "0", "--eval-samples-per-prompt", "1"]
    flow_grpo.main(flags + ["--output-dir", str(tmp_path / "timed")])
    assert [p.name for p in run.checkpoints(tmp_path / "timed")] == ["checkpoint-3"]
    flow_grpo.main(flags + ["--checkpoint-minutes", "0", "--output-dir", str(tmp_path / "off")])
    assert run.checkpoints(tmp_path / "off") == []
    monkeypatch.setattr(run.Run, "end_iteration", original)
    resumed = flow_grpo.main(flags + ["--iterations", "8", "--resume-from-checkpoint", "latest", "--output-dir",
                                      str(tmp_path / "timed")])
    assert resumed["iterations"] == 8


def test_a_resume_needs_iterations_left(tmp_path, capsys):
    flags = ["--iterations", "5", "--checkpoint-every", "2", "--log-every", "0", "--eval-samples-per-prompt", "1",
             "--save-weights", "false", "--output-dir", str(tmp_path)]
    first = flow_grpo.main(flags)
    assert [p.name for p in run.checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]  # the last one too
    # `latest` of a finished run would evaluate it again and write the same summary over it
    with pytest.raises(SystemExit, match=r"finished its 5 iterations .*nothing to resume.*--iterations above 5 "
                                         r"\(it continues from the last checkpoint, checkpoint-5\)"):
        flow_grpo.main(flags + ["--resume-from-checkpoint", "latest"])
    # a checkpoint past --iterations: the run would end at once, its summary claiming fewer iterations than trained
    with pytest.raises(SystemExit, match=r"checkpoint-4 has trained 4 iterations, more than --iterations 3"):
        flow_grpo.main(flags[2:] + ["--iterations", "3", "--resume-from-checkpoint",
                                    str(tmp_path / "checkpoints" / "checkpoint-4")])
    assert json.loads((tmp_path / "summary.json").read_text()) == first  # the refusals wrote nothing
    # training longer continues from the last iteration: nothing is trained twice
    capsys.readouterr()
    longer = flow_grpo.main(flags[2:] + ["--iterations", "6", "--resume-from-checkpoint", "latest"])
    assert f"resumed from {tmp_path / 'checkpoints' / 'checkpoint-5'} at iteration 5" in capsys.readouterr().out
    assert longer["iterations"] == 6
    assert [json.loads(l)["iteration"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(
        range(6))


def test_a_run_stopped_in_its_final_evaluation_resumes_to_that_evaluation_alone(tmp_path, monkeypatch):
    """The last iteration is checkpointed: a run stopped in its "after" evaluation (many minutes for FLUX) resumes
    there, trains nothing again and ends as the uninterrupted run. Before, it trained again every iteration after
    the last --checkpoint-every multiple below --iterations (at the default 100, the last 100 of a 300-iteration
    FLUX preset)."""
    flags = ["--iterations", "3", "--checkpoint-every", "2", "--log-every", "0", "--eval-samples-per-prompt", "2",
             "--save-weights", "false"]
    whole = flow_grpo.main(flags + ["--output-dir", str(tmp_path / "whole")])
    evaluate, begin = run.Run.evaluate, run.Run.begin_iteration

    def stopped_in_after(self, task, label):
        if label == "after":
            self.evaluating = label
            self._interrupted(signal.SIGINT, None)
        return evaluate(self, task, label)

    monkeypatch.setattr(run.Run, "evaluate", stopped_in_after)
    with pytest.raises(run.Interrupted, match=r"checkpoint-3; resume: python .* --resume-from-checkpoint latest"):
        flow_grpo.main(flags + ["--output-dir", str(tmp_path / "cut")])
    assert not (tmp_path / "cut" / "summary.json").exists()
    trained = []
    monkeypatch.setattr(run.Run, "evaluate", evaluate)
    monkeypatch.setattr(run.Run, "begin_iteration", lambda self, policy: trained.append(1) or begin(self, policy))
    resumed = flow_grpo.main(flags + ["--output-dir", str(tmp_path / "cut"), "--resume-from-checkpoint", "latest"])
    assert trained == []
    for key in ("eval_reward_before", "eval_reward_after", "on_manifold_after", "nfe_rollout", "nfe_train",
                "trainable_tensors_changed"):
        assert resumed[key] == whole[key], key
    assert [json.loads(l)["iteration"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()] == [
        0, 1, 2]


def test_latest_is_the_highest_iteration_not_the_last_name_in_alphabetical_order(tmp_path):
    # checkpoint-10 sorts before checkpoint-9 as text: pruning and `latest` must read the number
    flow_grpo.main(["--iterations", "11", "--checkpoint-every", "1", "--checkpoints-total-limit", "3", "--log-every",
                    "0", "--eval-samples-per-prompt", "1", "--save-weights", "false", "--output-dir", str(tmp_path)])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "checkpoint-10", "checkpoint-11", "checkpoint-9"]
    (tmp_path / "checkpoints" / "checkpoint-12.partial").mkdir()  # an interrupted save is never `latest`
    flow_grpo.main(["--resume-from-checkpoint", "latest", "--output-dir", str(tmp_path), "--iterations", "12"])
    assert [json.loads(l)["iteration"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(
        range(12))


def test_a_resumed_run_counts_the_time_spent_before_its_checkpoint(tmp_path):
    flags = ["--iterations", "4", "--checkpoint-every", "2", "--log-every", "0", "--eval-samples-per-prompt", "1",
             "--output-dir", str(tmp_path)]
    flow_grpo.main(flags)
    # pretend the first half took 1000 s, 400 of them in evaluation: the summary must carry them on
    state_file = tmp_path / "checkpoints" / "checkpoint-2" / "run_state_0.pt"
    saved = torch.load(state_file, weights_only=False)
    saved["progress"].update(elapsed=1000.0, eval_seconds=400.0)
    torch.save(saved, state_file)
    (tmp_path / "samples.png").unlink()
    (tmp_path / "summary.json").unlink()  # as if the run had been cut after checkpoint-2
    resumed = flow_grpo.main(flags + ["--resume-from-checkpoint", str(state_file.parent)])
    assert resumed["wall_seconds"] >= 1000
    assert resumed["wall_seconds"] - resumed["train_seconds"] >= 400  # the evaluation time: 400 + the "after" one
    assert resumed["train_seconds"] >= 600
    # the "before" samples of the toy's picture came back from the checkpoint too
    assert (tmp_path / "samples.png").exists()


def test_eval_every_scores_the_weights_of_that_iteration_and_leaves_the_last_to_the_after_evaluation(tmp_path):
    flags = ["--iterations", "4", "--eval-every", "2", "--checkpoint-every", "2", "--eval-ema", "false",
             "--log-every", "0", "--eval-samples-per-prompt", "2", "--output-dir", str(tmp_path)]
    summary = flow_grpo.main(flags)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "eval/reward" in r] == [1]  # after 2 of 4; the 4th is the "after" one
    # the same evaluation, independently, of the weights checkpoint-2 holds
    args = flow_grpo.parse_args(flow_grpo.Args, flow_grpo.PRESETS, flags)
    task = tasks.load_task(args, keep_reference=False, log=lambda *_: None)
    task.policy.load(tmp_path / "checkpoints" / "checkpoint-2" / "weights")
    expected = tasks.evaluate(task, args)
    assert rows[1]["eval/reward"] == pytest.approx(expected["reward"], rel=1e-5)
    assert rows[1]["eval/on_manifold"] == pytest.approx(expected["on_manifold"], rel=1e-5)
    assert rows[1]["eval/reward"] != pytest.approx(summary["eval_reward_after"], rel=1e-5)
