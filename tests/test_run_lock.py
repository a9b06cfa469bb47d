"""One run at a time in an output directory (infra/run.py's RunLock): a live run's directory is refused, a dead run's
lock is taken over, and a run that ends, however it ends, leaves no lock behind."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import flow_grpo
from infra import run

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--iterations", "2", "--log-every", "0", "--eval-samples-per-prompt", "1", "--save-weights", "false"]


def write_lock(out: Path, host: str, pid: int, age: float = 0.0, space: str = "this") -> Path:
    """A lock as another run writes it; `space`: its pid namespace, "this" for this process's (run.pid_space)."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / "run.lock"
    lock.write_text(json.dumps({"host": host, "pid_space": run.pid_space() if space == "this" else space, "pid": pid,
                                "token": "theirs", "started": "2026-12-07 10:00:00"}))
    os.utime(lock, (time.time() - age, time.time() - age))
    return lock


@pytest.fixture
def quick_clock(monkeypatch):
    """Seconds, not minutes: a holder on another host is watched for 1.5 s, polled every 0.05 s, abandoned after 5 s."""
    monkeypatch.setattr(run.RunLock, "WATCH_SECONDS", 1.5)
    monkeypatch.setattr(run.RunLock, "ABANDONED_SECONDS", 5.0)
    monkeypatch.setattr(run.RunLock, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(run.RunLock, "HEARTBEAT_SECONDS", 0.1)


def test_a_run_that_ends_leaves_no_lock_and_its_heartbeat_refreshed_it_while_it_ran(tmp_path, quick_clock,
                                                                                    monkeypatch):
    seen = []
    original = run.Run.end_iteration

    def look(self, *a, **k):  # the lock while the run trains, after its heartbeat had time to beat
        time.sleep(0.3)
        lock = self.out / "run.lock"
        seen.append((json.loads(lock.read_text()), time.time() - lock.stat().st_mtime))
        return original(self, *a, **k)

    monkeypatch.setattr(run.Run, "end_iteration", look)
    flow_grpo.main(QUICK + ["--output-dir", str(tmp_path)])
    assert [holder["pid"] for holder, _ in seen] == [os.getpid()] * 2
    assert all(age < 0.25 for _, age in seen), seen  # touched every 0.1 s, though the iteration slept 0.3 s
    assert not (tmp_path / "run.lock").exists()


def test_a_directory_a_live_run_holds_is_refused_and_nothing_is_deleted(tmp_path, quick_clock):
    out = tmp_path / "run"
    flow_grpo.main(QUICK + ["--output-dir", str(out)])
    summary = (out / "summary.json").read_text()
    # the other node's run, alive: its heartbeat beats; then a live process of this host whose lock beats
    for host, pid in (("other-node", 4242), (socket_host(), os.getppid())):
        lock = write_lock(out, host, pid)
        with beating(lock):
            with pytest.raises(SystemExit, match=f"run is in use by another run: pid {pid} on {host}, started "
                                                 f"2026-12-07 10:00:00, alive \\(its run.lock was refreshed\\)\\. "
                                                 f".*wait for it to end, stop it, or choose another --output-dir"):
                flow_grpo.main(QUICK + ["--output-dir", str(out), "--overwrite"])
        assert (out / "summary.json").read_text() == summary  # --overwrite deleted nothing of the live run's
        assert json.loads(lock.read_text())["token"] == "theirs"


@contextlib.contextmanager
def beating(lock: Path):
    """A live run's heartbeat on `lock`, every 0.1 s."""
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(0.1):
            os.utime(lock)

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        yield
    finally:
        stop.set()


def test_a_lock_its_run_left_behind_is_taken_over(tmp_path, quick_clock, capsys, monkeypatch):
    # a process of this host that has ended (SIGKILL leaves its lock): taken over at once
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    write_lock(tmp_path / "dead", socket_host(), ended.pid)
    assert flow_grpo.main(QUICK + ["--output-dir", str(tmp_path / "dead")])["iterations"] == 2
    out = capsys.readouterr().out
    dead = tmp_path / "dead" / "run.lock"
    assert f"taking over {dead}: its run (pid {ended.pid} on {socket_host()}) has ended" in out
    assert "watching" not in out  # at once
    # another host's, older than ABANDONED_SECONDS: taken over at once
    write_lock(tmp_path / "stale", "other-node", 4242, age=600.0)
    flow_grpo.main(QUICK + ["--output-dir", str(tmp_path / "stale")])
    assert "its run (pid 4242 on other-node) gave no heartbeat for 10 min" in capsys.readouterr().out
    # fresh when the run comes to write, silent from then on: watched WATCH_SECONDS, then taken over. Another host's;
    # this host's of a pid that lives but is no run now (the pids of a restarted container repeat); and the lock of a
    # twin container (the same host name, another pid namespace) whose pid is gone from this one: not taken at once
    acquire = run.RunLock.acquire
    for name, host, pid, space in (("silent", "other-node", 4242, "this"),
                                   ("reused", socket_host(), os.getppid(), "this"),
                                   ("twin", socket_host(), ended.pid, "another-boot/4026531836")):
        waited = []

        def found_fresh(self):
            write_lock(self.path.parent, host, pid, space=space)
            t0 = time.time()
            refusal = acquire(self)
            waited.append(time.time() - t0)
            return refusal

        monkeypatch.setattr(run.RunLock, "acquire", found_fresh)
        flow_grpo.main(QUICK + ["--output-dir", str(tmp_path / name)])
        out = capsys.readouterr().out
        assert f"run.lock is held by pid {pid} on {host}: watching it up to 2 s for the heartbeat of a live run" in out
        assert f"its run (pid {pid} on {host}) gave no heartbeat for 2 s" in out and waited[0] >= 1.5
    monkeypatch.setattr(run.RunLock, "acquire", acquire)
    # a lock its run died writing (empty), long ago
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "run.lock").write_text("")
    os.utime(tmp_path / "torn" / "run.lock", (time.time() - 600, time.time() - 600))
    flow_grpo.main(QUICK + ["--output-dir", str(tmp_path / "torn")])
    assert "its run (a run whose lock cannot be read) gave no heartbeat for 10 min" in capsys.readouterr().out
    for name in ("dead", "stale", "silent", "reused", "twin", "torn"):
        assert not (tmp_path / name / "run.lock").exists()


def socket_host() -> str:
    import socket
    return socket.gethostname()


@pytest.mark.slow
def test_a_second_run_in_the_directory_of_a_running_one_is_refused_and_the_first_goes_on(tmp_path):
    """As a user meets it: the same job submitted twice. The second (here with --overwrite) is refused before it
    writes anything; the first is undisturbed, and Ctrl-C ends it without leaving its lock."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "flow_grpo.py", "--iterations", "100000", "--log-every", "0",
                              "--eval-samples-per-prompt", "1", "--output-dir", str(out)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert time.time() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "flow_grpo.py", "--output-dir", str(out), "--overwrite", *QUICK],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines()[-1].startswith(f"{out} is in use by another run: pid {first.pid} ")
        lines = len((out / "metrics.jsonl").read_text().splitlines())
        time.sleep(1.0)
        assert first.poll() is None and len((out / "metrics.jsonl").read_text().splitlines()) > lines  # going on
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert first.returncode == 130 and not (out / "run.lock").exists()


@pytest.mark.parametrize("when", ["taken over in iteration 2", "removed in iteration 2", "taken over at the end",
                                  "taken over while checkpoint 2 is written"])
def test_a_run_whose_directory_is_not_its_own_any_more_stops_before_its_next_write(when, tmp_path, quick_clock,
                                                                                  monkeypatch):
    """A run suspended (Ctrl-Z, SIGSTOP) for longer than WATCH_SECONDS goes on to find that a second run took its
    silent lock over; or the directory was deleted or moved under it. It must not write into the other run's
    outputs: it stops with one line before the next write, and leaves the other's lock as it is, untouched."""
    lock, taken = tmp_path / "run.lock", []
    original_begin, original_evaluate = run.Run.begin_iteration, run.Run.evaluate
    original_save = run.gathered_state_dict

    def begin(self, policy):
        original_begin(self, policy)
        if self.iteration == 1 and when.endswith("iteration 2"):
            take(self)

    def save(policy):  # the checkpoint's state written, its weights about to be
        if when.endswith("written") and (tmp_path / "checkpoints" / "checkpoint-2.partial").is_dir():
            take(None)
        return original_save(policy)

    def evaluate(self, task, label):
        result = original_evaluate(self, task, label)
        if label == "after" and when.endswith("end"):
            take(self)
        return result

    def take(self):  # what the second run's RunLock.acquire did while this one was suspended
        if when.startswith("removed"):
            lock.unlink()
            return
        write_lock(tmp_path, "other-node", 4242, age=100.0)
        time.sleep(0.3)  # 3 heartbeats of this run: none may touch the other's lock
        taken.append(time.time() - lock.stat().st_mtime)

    monkeypatch.setattr(run.Run, "begin_iteration", begin)
    monkeypatch.setattr(run.Run, "evaluate", evaluate)
    monkeypatch.setattr(run, "gathered_state_dict", save)
    with pytest.raises(run.Interrupted) as e:
        flow_grpo.main(["--iterations", "3", "--checkpoint-every", "1", "--output-dir", str(tmp_path), *QUICK[2:]])
    assert e.value.code == 1
    taken_over = (f"another run took over its directory: {lock} names pid 4242 on other-node, started 2026-12-07 "
                  f"10:00:00 (this run gave no heartbeat for 2 s: suspended, or its file system out of reach)")
    lines = len((tmp_path / "metrics.jsonl").read_text().splitlines())
    if when == "removed in iteration 2":
        assert str(e.value) == (f"stopped in iteration 2 of 3: its {lock} was removed (the directory deleted or "
                                f"moved, or a run that took it over has ended); this run writes nothing more into it")
        assert lines == 1 and not lock.exists()
    elif when == "taken over in iteration 2":
        assert str(e.value) == f"stopped in iteration 2 of 3: {taken_over}; this run writes nothing more into it"
        assert lines == 1 and [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-1"]
    elif when == "taken over while checkpoint 2 is written":  # neither completed nor pruned into the other's
        checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
        assert str(e.value) == (f"stopped before completing checkpoint {checkpoint}: {taken_over}; this run writes "
                                f"nothing more into it")
        assert lines == 2 and [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-1"]
    else:
        assert str(e.value) == f"stopped before writing the run's outputs: {taken_over}; this run writes nothing into it"
        assert lines == 3 and not (tmp_path / "summary.json").exists()
    if when.startswith("taken"):
        assert taken[0] > 99 and json.loads(lock.read_text())["token"] == "theirs"  # untouched, and still there


def test_a_run_whose_directory_is_taken_over_while_it_writes_final_does_not_complete_it(tmp_path, quick_clock,
                                                                                        monkeypatch):
    """Suspended while it wrote final/ (minutes of weights for FLUX), past the lock's watch: renamed, its
    final.partial would replace the other run's final/. It removes it and stops, writing no summary or picture."""
    import common
    save = common.Toy2DPolicy.save

    def taken_while_saving(self, directory, state=None):
        save(self, directory, state)
        if Path(directory).name == "final.partial":
            write_lock(tmp_path, "other-node", 4242, age=100.0)

    monkeypatch.setattr(common.Toy2DPolicy, "save", taken_while_saving)
    with pytest.raises(run.Interrupted) as e:
        flow_grpo.main(["--iterations", "2", "--log-every", "0", "--eval-samples-per-prompt", "1", "--output-dir",
                        str(tmp_path)])
    assert e.value.code == 1
    assert str(e.value).startswith("stopped before completing the run's outputs: another run took over its directory")
    assert str(e.value).endswith("; this run writes nothing more into it")
    for name in ("final", "final.partial", "summary.json", "samples.png"):
        assert not (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == "theirs"  # untouched


@pytest.mark.slow
def test_a_run_suspended_past_the_watch_finds_its_directory_taken_and_stops_without_writing(tmp_path):
    """As it happens, with real processes and the real 2-minute watch: a run suspended (SIGSTOP, as Ctrl-Z) gives no
    heartbeat, so a second run started with --overwrite takes its directory over. When the first goes on (SIGCONT),
    it must stop with one line naming the second, and never append to the second's metrics."""
    out = tmp_path / "run"
    cmd = [sys.executable, "flow_grpo.py", "--iterations", "100000", "--log-every", "0", "--eval-samples-per-prompt",
           "1", "--save-weights", "false", "--checkpoint-every", "0", "--output-dir", str(out)]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        wait_for_metrics(out, first)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.Popen(cmd + ["--overwrite"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        lock = out / "run.lock"
        deadline = time.time() + run.RunLock.WATCH_SECONDS + 240
        while holder(lock) != second.pid:  # watched 2 minutes, silent: taken over
            assert time.time() < deadline and second.poll() is None, second.communicate()
            time.sleep(0.5)
        wait_for_metrics(out, second)  # (--overwrite emptied the first's)
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 1 and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("stopped in iteration ") and (f": another run took over its directory: {lock} names "
                                                              f"pid {second.pid} on {socket_host()}, started ") in last
        assert last.endswith("; this run writes nothing more into it")
        time.sleep(1.0)
        assert second.poll() is None and json.loads(lock.read_text())["pid"] == second.pid
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows] == list(range(len(rows)))  # the second's lines alone
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGINT)
                proc.communicate(timeout=60)
    assert second.returncode == 130 and not (out / "run.lock").exists()


def holder(lock: Path):
    """The pid a run.lock names (None: no lock, or one half written)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads(lock.read_text())["pid"]
    return None


def wait_for_metrics(out: Path, proc: subprocess.Popen, seconds: float = 240.0):
    """Until `out`'s metrics.jsonl holds a line (the run is training), while `proc` lives."""
    deadline = time.time() + seconds
    log = out / "metrics.jsonl"
    while not log.is_file() or not log.read_text():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
