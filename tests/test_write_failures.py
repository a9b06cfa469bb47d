"""A write that fails (a full disk, a quota, a file-size limit) stops the run with one line: what could not be
written, why, the free space, and the checkpoint to resume from. Exit status 1, no traceback; the half-written
checkpoint or final/ is removed (its space with it), the complete checkpoints stay, and the run resumes from them.

A full disk cannot be made here without root, so the subprocess test uses the next real thing, a file-size limit
(RLIMIT_FSIZE): the operating system refuses the write as it would on a full disk, and torch.save reports it in its
own words ("[enforce fail at inline_container.cc] unexpected pos", a RuntimeError, not an OSError)."""

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infra import run
from infra.tasks import Toy2DPolicy
import flow_grpo

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--log-every", "0", "--eval-samples-per-prompt", "8"]


def test_a_file_size_limit_the_first_checkpoint_exceeds_stops_the_run_with_one_line(tmp_path):
    """As a user meets it: the operating system refuses the checkpoint's writes (files over 300 kB; the toy's
    optimizer state is larger, its config and metrics are smaller)."""
    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    cmd = [sys.executable, str(ROOT / "flow_grpo.py"), "--iterations", "3", "--checkpoint-every", "1",
           "--output-dir", str(tmp_path), *FLAGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, preexec_fn=limited)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"could not write checkpoint {tmp_path / 'checkpoints' / 'checkpoint-1'}: "), last
    assert "GiB free on the disk of" in last and last.endswith("no checkpoint yet (one every --checkpoint-every 1 "
                                                              "iterations or after --checkpoint-minutes 60), nothing "
                                                              "to resume"), last
    assert list((tmp_path / "checkpoints").iterdir()) == []  # the .partial one is gone
    assert not (tmp_path / "final").exists() and not (tmp_path / "summary.json").exists()
    assert not (tmp_path / "run.lock").exists()


def test_a_full_disk_at_a_later_checkpoint_keeps_the_earlier_one_and_the_run_resumes_from_it(tmp_path, monkeypatch):
    save = torch.save

    def full_at_checkpoint_2(obj, f, *a, **k):
        if "checkpoint-2.partial" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_at_checkpoint_2)
    monkeypatch.setattr(sys, "argv", ["benchmarks/timing.py"])  # a main() called by another program: not its name
    flags = ["--iterations", "3", "--checkpoint-every", "1", "--output-dir", str(tmp_path), *FLAGS]
    with pytest.raises(run.Interrupted) as e:
        flow_grpo.main(flags)
    message = str(e.value)
    assert e.value.code == 1
    assert message.startswith(f"could not write checkpoint {tmp_path / 'checkpoints' / 'checkpoint-2'}: No space "
                              f"left on device ({tmp_path / 'checkpoints' / 'checkpoint-2.partial'}"), message
    assert message.endswith(f"last checkpoint {tmp_path / 'checkpoints' / 'checkpoint-1'}; resume: python "
                            f"flow_grpo.py --resume-from-checkpoint latest --output-dir {tmp_path}"), message
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-1"]
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "run.lock").exists()
    monkeypatch.undo()  # space freed: the command the message gives finishes the run
    summary = flow_grpo.main(flags + ["--resume-from-checkpoint", "latest"])
    assert summary["iterations"] == 3 and (tmp_path / "final" / "model.safetensors").is_file()


def test_a_full_disk_while_writing_the_final_weights_leaves_no_half_of_them_and_resumes_to_the_evaluation(
        tmp_path, monkeypatch):
    """final/ is written whole or not at all; the last iteration's checkpoint (--checkpoint-every also checkpoints
    it) is there, so the resume trains nothing: it evaluates and writes final/ again."""
    save = Toy2DPolicy.save

    def half_then_full(self, directory, state=None):
        save(self, directory, state)  # the weights file is there, then the disk is full
        if Path(directory).name == "final.partial":  # (a checkpoint's weights/ are written alike, and fit)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / "more.safetensors"))

    monkeypatch.setattr(Toy2DPolicy, "save", half_then_full)
    flags = ["--iterations", "2", "--checkpoint-every", "5", "--output-dir", str(tmp_path), *FLAGS]
    with pytest.raises(run.Interrupted) as e:
        flow_grpo.main(flags)
    message = str(e.value)
    assert message.startswith(f"could not write the run's outputs: No space left on device "
                              f"({tmp_path / 'final.partial' / 'more.safetensors'}); "), message
    assert f"last checkpoint {tmp_path / 'checkpoints' / 'checkpoint-2'}; resume: " in message
    assert not (tmp_path / "final").exists() and not (tmp_path / "final.partial").exists()
    assert not (tmp_path / "summary.json").exists()
    monkeypatch.undo()
    summary = flow_grpo.main(flags + ["--resume-from-checkpoint", "latest"])
    assert summary["weights"] == str(tmp_path / "final") and (tmp_path / "final" / "model.safetensors").is_file()
    assert summary["nfe_train"] > 0  # the totals of the whole run, the 2 iterations trained before the resume


def test_a_full_disk_at_the_metrics_line_stops_the_run_with_one_line(tmp_path, monkeypatch):
    log = run.Run.log

    def full_at_iteration_3(self, iteration, metrics):
        if iteration == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.out / "metrics.jsonl"))
        return log(self, iteration, metrics)

    monkeypatch.setattr(run.Run, "log", full_at_iteration_3)
    with pytest.raises(run.Interrupted) as e:
        flow_grpo.main(["--iterations", "4", "--checkpoint-every", "2", "--output-dir", str(tmp_path), *FLAGS])
    assert e.value.code == 1
    assert str(e.value).startswith(f"stopped in iteration 3 of 4: could not write its metrics: No space left on device "
                                   f"({tmp_path / 'metrics.jsonl'}); "), str(e.value)
    assert f"; last checkpoint {tmp_path / 'checkpoints' / 'checkpoint-2'}; resume: python flow_grpo.py" in str(e.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-2"]  # none from the unlogged one


@pytest.mark.parametrize("flags, hint", [(["--checkpoint-every", "0", "--checkpoint-minutes", "0"],
                                          "no checkpoints (--checkpoint-every 0), nothing to resume"),
                                         (["--checkpoint-every", "0", "--checkpoint-minutes", "30"],
                                          "no checkpoint yet (one after --checkpoint-minutes 30), nothing to resume")])
def test_the_stop_line_says_why_there_is_no_checkpoint_to_resume(flags, hint, tmp_path, monkeypatch):
    def full(self, iteration, metrics):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.out / "metrics.jsonl"))

    monkeypatch.setattr(run.Run, "log", full)
    with pytest.raises(run.Interrupted) as e:
        flow_grpo.main(["--iterations", "2", "--output-dir", str(tmp_path), *flags, *FLAGS])
    assert str(e.value).endswith(f"; {hint}"), str(e.value)


def test_only_a_write_that_failed_is_reported_as_one():
    """Any other error keeps its traceback: a CUDA fault in the middle of a checkpoint is not a full disk."""
    out = Path(".")
    assert run.write_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
                           out).startswith("RuntimeError: [enforce fail at inline_container.cc:672]")
    assert run.write_error(RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed "
                                        "writing file data/3: file write failed"), out) is not None
    assert run.write_error(RuntimeError("write(): fd 3 failed with No space left on device"), out) is not None
    assert run.write_error(Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
                           out) is not None  # (safetensors' SafetensorError)
    assert run.write_error(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "x.pt"), out).startswith(
        "Disk quota exceeded (x.pt); ")
    for other in (RuntimeError("CUDA error: an illegal memory access was encountered"), KeyError("eval_ema"),
                  ValueError("expected a tensor"), RuntimeError("a leaf Variable that requires grad is being used "
                                                                "in an in-place operation; cannot write to it")):
        assert run.write_error(other, out) is None
