"""One training run: the Accelerator, seeding, logging, checkpoints and resume, the summary every benchmark reads.

Every script drives it the same way: `run = Run(args, name)`, `run.make_optimizer(policy)`, `run.start(task, ...)`
(the evaluation before training, or a resume), `run.begin_iteration` / `run.end_iteration` around each iteration,
`run.evaluate(task, "after")`, `run.finish(...)`. What it writes, from `start` on (a run that fails before writes
nothing; without --output-dir the directory it claimed is removed again at exit): config.json, metrics.jsonl (one
line per iteration), summary.json, final/ (the trained weights), checkpoints/checkpoint-N/, and the pictures
(samples_before/after.png for image tasks, samples.png for the toy).

An --output-dir that holds a run is refused unless the run is resumed or --overwrite is given, and one that a live
run writes into is refused even then (RunLock, run.lock); a run that finds its lock another run's (it was suspended
for minutes) stops before its next write. Ctrl-C stops the run with one line: what it was doing, its last checkpoint
and the command that resumes from it. SIGTERM (a scheduler's preemption or time limit) lets the iteration in progress
finish, writes a checkpoint, then stops the same way, so a resumed run loses nothing. A write that fails (a full disk)
stops it the same way too, with the half-written checkpoint or final/ removed (WriteFailure).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import torch

from common import NonFiniteError, Policy, check_finite, parse_toy_prompt
from infra import attention
from infra.progress import LOG_INTERVAL, duration
from infra.rewards import attention_shapes, reward_digest, reward_dir
from infra.tasks import Task, evaluate, reward_spec, sample_grid

OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "final", "final.partial", "checkpoints", "samples.png",
           "samples_before.png", "samples_after.png")  # what a run writes into its --output-dir (final.partial: a
# run stopped while it wrote final/)


def gathered_state_dict(policy: Policy, masters: bool = True) -> dict[str, torch.Tensor]:
    """The network's whole state dict, keyed as the unwrapped model's. Under FSDP the shards are gathered to
    the main process (a collective: every process must call this; the others may get an empty dict); under
    DeepSpeed the trainable entries are the optimizer's fp32 masters (`masters=False`: the module's own values, e.g.
    an EMA swapped into it)."""
    if policy.accelerator is None:
        return policy.net.state_dict()
    state = policy.accelerator.get_state_dict(policy.net)
    from accelerate.utils import DistributedType
    if masters and policy.accelerator.distributed_type == DistributedType.DEEPSPEED:
        # the engine computes with a bf16 copy; the trained weights are the optimizer's fp32 masters (sharded
        # across processes under ZeRO: gathering them is a collective too)
        from deepspeed.utils import safe_get_full_fp32_param
        for name, p in policy._unwrapped().named_parameters():
            if p.requires_grad:
                state[name] = safe_get_full_fp32_param(p).cpu()
    return state


def weight_fingerprint(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """(len(names), 2) float64: each named tensor's sum and sum of squares. Any real update changes it, and it keeps
    no copy of the weights (12B parameters in fp32 are 48 GB)."""
    return torch.stack([torch.stack([state[n].double().sum(), state[n].double().square().sum()]) for n in names])


class Interrupted(SystemExit):
    """Ctrl-C (exit status 130), SIGTERM (143) or a write that failed (1): the run stops with one line, printed by the
    main process."""

    def __init__(self, message: str, status: int = 130):
        super().__init__(status)
        self.message = message

    def __str__(self):
        return self.message


def checkpoint_iteration(path: Path) -> Optional[int]:
    """N of a complete checkpoint directory `checkpoint-N` (None for anything else, a `.partial` one included)."""
    tail = Path(path).name.split("-")[-1]
    return int(tail) if tail.isdigit() else None


def run_dir_of(resume: str, output_dir: Optional[str]) -> Optional[Path]:
    """The directory of the run a `--resume-from-checkpoint` continues (<run>/checkpoints/checkpoint-N)."""
    return Path(output_dir) if output_dir else (Path(resume).resolve().parent.parent if resume != "latest" else None)


def checkpoints(out: Path) -> list[Path]:
    """A run's complete checkpoint directories, oldest first (a half-written one is still `.partial`)."""
    found = [p for p in (Path(out) / "checkpoints").glob("checkpoint-*") if checkpoint_iteration(p) is not None]
    return sorted(found, key=checkpoint_iteration)


def process_count_mismatch(checkpoint: Path, world: int) -> Optional[str]:
    """Why `checkpoint` cannot continue with `world` processes, or None. Each process wrote its own prompt stream,
    generators and NFE counters (run_state_<rank>.pt), so a resume takes as many processes as wrote it: with fewer
    the others' streams and counts would be lost (the summary's NFE short), with more there is nothing to load."""
    written = len(list(Path(checkpoint).glob("run_state_*.pt")))
    if not written or written == world:
        return None
    return (f"{checkpoint} was written by {written} process{'es' if written > 1 else ''} and this run has {world}: "
            f"resume it with {written} (accelerate launch --num_processes {written}, torchrun --nproc_per_node "
            f"{written}{', or plain python' if written == 1 else ''})")


def not_a_checkpoint(path: Path) -> str:
    """Why `path`, given to --resume-from-checkpoint, is no checkpoint (it holds no run_state_*.pt), and what to
    give instead: a run's directory, or its checkpoints/ folder, resumes its last checkpoint with `latest`."""
    path = Path(path)
    if not path.exists():
        return f"--resume-from-checkpoint {path}: no such checkpoint directory"
    run = path if (path / "checkpoints").is_dir() else path.parent if path.name == "checkpoints" else None
    if run is not None and (run / "config.json").is_file():
        return (f"--resume-from-checkpoint {path} is a run's {'directory' if run == path else 'checkpoints folder'}, "
                f"not a checkpoint: resume its last checkpoint with --resume-from-checkpoint latest --output-dir {run}")
    return (f"{path} is not a checkpoint of this script (no run_state_*.pt); checkpoints live in "
            f"<output_dir>/checkpoints/checkpoint-N")


def prompt_digest(prompts: list[str]) -> dict:
    """What a checkpoint records of a prompt set (inputs.json): its size and SHA-256."""
    return {"prompts": len(prompts), "sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}


def base_digest(pretrained: Optional[str]) -> Optional[str]:
    """SHA-256 of the transformer's config.json in a --pretrained pipeline directory, without the keys diffusers
    writes about itself (the architecture: FLUX.1-dev and FLUX.1-schnell differ there); None without one."""
    path = Path(pretrained) / "transformer" / "config.json" if pretrained else None
    if path is None or not path.is_file():
        return None
    config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def inputs_changed(checkpoint: Path, args, prompts: dict[str, Optional[list[str]]]) -> Optional[str]:
    """Why `checkpoint` cannot continue on these train / eval `prompts` (None: unknown, not compared), this
    --pretrained and the reward weights in this --reward-dir, or None. They may move (the flags are resumable) but not
    change: a prompt file edited since the checkpoint would make the resumed run draw other prompts than the one it
    continues and compare its "after" evaluation with a "before" taken on other prompts; another base model would
    carry the trained LoRA onto weights it was not trained on; other reward weights would change the objective. All
    silently."""
    recorded = Path(checkpoint) / "inputs.json"
    if not recorded.is_file():  # (checkpoints written before inputs.json existed)
        return None
    saved = json.loads(recorded.read_text())
    files = {"train": args.train_prompts, "eval": args.eval_prompts}
    for name, what in (("train", "train on"), ("eval", "evaluate on")):
        if prompts.get(name) is None or prompt_digest(prompts[name]) == saved[name]:
            continue
        source = (f"--{name}-prompts {files[name]}" if files[name] else
                  f"--train-prompts {files['train']} (FLUX / SD3 evaluate on it)" if args.model in ("flux", "sd3") else
                  f"--model {args.model}'s built-in set")
        then, now = saved[name]["prompts"], len(prompts[name])
        count = f"{then} then, {now} now" + (", other prompts" if then == now else "")
        return (f"cannot resume {checkpoint}: the {name} prompts of {source} are not those it recorded ({count}): "
                f"the resumed run would {what} other prompts than the run it continues; restore them, or start a "
                f"new run in another --output-dir")
    base = base_digest(args.pretrained)
    if base and saved.get("base") and base != saved["base"]:
        return (f"cannot resume {checkpoint}: --pretrained {args.pretrained} holds another transformer than the run "
                f"trained (its transformer/config.json differs from the one recorded): give the pipeline directory "
                f"the run started from")
    spec = reward_spec(args)
    rewards = reward_digest(spec, args.reward_dir)
    if rewards and saved.get("rewards") and rewards != saved["rewards"]:
        return (f"cannot resume {checkpoint}: the weights of --reward {spec} in {reward_dir(args.reward_dir)} are not "
                f"those the run trained with (their files differ from the ones recorded): the resumed run would "
                f"optimise another reward, and score its \"after\" evaluation with another model than its \"before\"; "
                f"point --reward-dir at the weights the run started with")
    return None


def write_error(e: BaseException, out: Path) -> Optional[str]:
    """What went wrong, if `e` is a write that failed (a full disk, a quota, a file-size limit, a lost mount), with the
    free space left; None for any other error. Not only OSError: torch.save's zip writer says "[enforce fail at
    inline_container.cc] unexpected pos" or "file write failed" (a RuntimeError), safetensors an "I/O error"; FSDP's
    sharded save (torch.distributed.checkpoint) raises a CheckpointException, a BaseException, on every process,
    holding the error of each process that failed."""
    failures = getattr(e, "failures", None)  # (CheckpointException: {rank: (its error, its traceback)})
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        error = failures[rank][0]
        what = write_error(error, out) if isinstance(error, Exception) else None
        return f"process {rank}: {what}" if what else None
    if isinstance(e, OSError):
        what = f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    elif re.search(r"unexpected pos|file write failed|write\(\): fd|I/O error|os error \d+|no space left|quota|"
                   r"file too large", str(e), re.IGNORECASE):  # (the words of torch.save and safetensors)
        what = f"{type(e).__name__}: {str(e).strip()}"
    else:
        return None
    with contextlib.suppress(OSError):
        what += f"; {shutil.disk_usage(out).free / 2 ** 30:.1f} GiB free on the disk of {out}"
    return what


class WriteFailure:
    """`with WriteFailure(out) as writing:` catches a write that failed in its block (write_error) and keeps what
    went wrong in `writing.error` (None: nothing did); any other error goes on, with its traceback."""

    def __init__(self, out: Path):
        self.out, self.error = out, None

    def __enter__(self):
        return self

    def __exit__(self, kind, e, traceback) -> bool:
        if isinstance(e, Exception) or hasattr(e, "failures"):  # (a CheckpointException is a BaseException)
            self.error = write_error(e, self.out)
        return self.error is not None


def _remove_if_empty(path: Path):
    """At exit: the default directory a run claimed, if the run failed before writing into it (a model that did not
    load). A directory that holds anything stays."""
    with contextlib.suppress(OSError):
        path.rmdir()


class RunLock:
    """One run at a time writes into an output directory. Two would interleave their metrics.jsonl lines, overwrite
    each other's checkpoints, and a second one started with --overwrite would delete the first one's outputs while it
    runs: a job submitted twice, or an auto-resume job requeued while the first still runs.

    The main process holds `<output_dir>/run.lock` (host, pid, a token) from its first write to its end, and a thread
    touches it every HEARTBEAT_SECONDS. Another run that finds it refuses while its holder lives, and takes over a
    lock whose holder died without removing it (SIGKILL, a lost node): at once when the holder's pid is gone from
    this host's process space or the lock is over ABANDONED_SECONDS old; else when the lock's time stands still for
    WATCH_SECONDS (watched, not compared with this host's clock, which may differ from the file system's; a pid of
    this host that lives may be another process's since). "This host's process space": the same host name, boot and
    pid namespace (`pid_space`), since two containers may share a host name and a directory but not their pids."""

    HEARTBEAT_SECONDS = 30.0
    WATCH_SECONDS = 120.0
    ABANDONED_SECONDS = 1800.0
    POLL_SECONDS = 5.0

    def __init__(self, out: Path, log=print):
        self.path, self.log = Path(out) / "run.lock", log
        self.me = {"host": socket.gethostname(), "pid_space": pid_space(), "pid": os.getpid(),
                   "token": uuid.uuid4().hex, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop = threading.Event()

    def acquire(self) -> Optional[str]:
        """Take the lock; the reason to refuse when a live run holds it, else None."""
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder, mtime = self._holder()
                alive, why = self._judge(holder, mtime) if holder is not None else (None, "")
                if alive:
                    return (f"{self.path.parent} is in use by another run: {why}. Two runs in one directory would "
                            f"interleave their metrics and overwrite each other's checkpoints: wait for it to end, "
                            f"stop it, or choose another --output-dir")
                if alive is False and self._holder()[0] == holder:  # (still the lock that was judged)
                    self.log(f"note: taking over {self.path}: {why}")
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                continue  # (alive None: the lock changed hands while it was judged)
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            break
        atexit.register(self.release)
        threading.Thread(target=self._beat, name="run.lock heartbeat", daemon=True).start()
        return None

    def _judge(self, holder: dict, mtime: float) -> tuple[Optional[bool], str]:
        """(True, who) if the lock's run lives, (False, why not) if it died, (None, "") if the lock changed hands."""
        who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "a run whose lock cannot be read"
        if holder.get("host") == self.me["host"] and holder.get("pid_space") == self.me["pid_space"]:
            if holder.get("pid") == self.me["pid"]:
                return False, "an earlier run in this process left it"
            if not _alive(holder.get("pid")):
                return False, f"its run ({who}) has ended"
        # a live pid may be another process's now (a container restarted with the same hostname): the heartbeat tells
        age = time.time() - mtime
        if age > self.ABANDONED_SECONDS:
            return False, f"its run ({who}) gave no heartbeat for {age / 60:.0f} min"
        self.log(f"{self.path} is held by {who}: watching it up to {self.WATCH_SECONDS:.0f} s for the heartbeat of "
                 f"a live run")
        deadline = time.monotonic() + self.WATCH_SECONDS
        while time.monotonic() < deadline:
            time.sleep(self.POLL_SECONDS)
            now, now_mtime = self._holder()
            if now != holder:
                return None, ""
            if now_mtime != mtime:
                return True, f"{who}, started {holder.get('started')}, alive (its {self.path.name} was refreshed)"
        return False, f"its run ({who}) gave no heartbeat for {self.WATCH_SECONDS:.0f} s"

    def _holder(self) -> tuple[Optional[dict], Optional[float]]:
        """The lock's content ({} if unreadable: half written) and time; (None, None) without a lock."""
        try:
            mtime, text = self.path.stat().st_mtime, self.path.read_text()
        except OSError:
            return None, None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        return (holder if isinstance(holder, dict) else {}), mtime

    def _beat(self):
        while not self._stop.wait(self.HEARTBEAT_SECONDS) and self.lost() is None:  # (another's lock: never touched)
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def lost(self) -> Optional[str]:
        """None while the lock is this run's; else what became of it. A run that gave no heartbeat for WATCH_SECONDS
        (suspended with Ctrl-Z or SIGSTOP, its file system unreachable) finds its directory another run's when it
        goes on; or the directory was deleted or moved under it."""
        holder, _ = self._holder()
        if holder == self.me:
            return None
        if holder is None:
            return (f"its {self.path} was removed (the directory deleted or moved, or a run that took it over has "
                    f"ended)")
        return (f"another run took over its directory: {self.path} names pid {holder.get('pid')} on "
                f"{holder.get('host')}, started {holder.get('started')} (this run gave no heartbeat for "
                f"{self.WATCH_SECONDS:.0f} s: suspended, or its file system out of reach)")

    def release(self):
        """Stop the heartbeat and remove the lock, if it is still this run's."""
        self._stop.set()
        if self._holder()[0] == self.me:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def pid_space() -> Optional[str]:
    """Where this process's pid means this process: the boot and the pid namespace (Linux), None where unknown. Two
    containers of one host name (`docker run --hostname`, a pod and its restarted twin) differ here, so a pid that is
    gone from one is not taken for a run that ended in the other."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _alive(pid) -> bool:
    """Whether a process of this host has that pid (one of another user counts as alive)."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


class Run:
    """One training run: the Accelerator, per-process seeding, console + jsonl + tracker logging, summary."""

    def __init__(self, args, algorithm: str):
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        self.args, self.algorithm = args, algorithm
        # the script to resume with: the file that built this Run (a copy of flow_grpo.py may have another name), not
        # sys.argv[0], which is pytest's, or a benchmark's that calls the script's main()
        self.script = Path(sys._getframe(1).f_code.co_filename).name
        self._last_line = time.time()  # of the console's metrics lines (log)
        on_main_thread = threading.current_thread() is threading.main_thread()
        for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            handler = signal.getsignal(signum)  # an earlier run in this process that stopped without finishing
            if isinstance(getattr(handler, "__self__", None), Run) and on_main_thread:
                signal.signal(signum, default)
        resume = args.resume_from_checkpoint
        if args.output_dir is None and resume not in (None, "latest"):  # the checkpoint's run, as parse_args found it
            args.output_dir = str(run_dir_of(resume, None))
        default_dir = args.output_dir is None
        if default_dir:  # this process's guess; the main process claims the run's own once the processes can talk
            stamp = time.strftime("%Y%m%d-%H%M%S")
            args.output_dir = str(Path("runs") / f"{algorithm}_{args.model}_s{args.seed}_{stamp}")
        self.out = Path(args.output_dir)
        held = [name for name in OUTPUTS if (self.out / name).exists()] if not default_dir else []
        if held and resume is None and not args.overwrite:
            resume_it = (f"resume it with --resume-from-checkpoint latest --output-dir {self.out}, " if
                         checkpoints(self.out) else "it has no checkpoint to resume; ")
            raise SystemExit(f"{self.out} holds a run ({', '.join(held)}): {resume_it}start over with --overwrite, "
                             f"or choose another --output-dir")
        if args.report_to != "none":  # accelerate skips a tracker whose package is missing, silently
            from accelerate.utils import is_tensorboard_available, is_wandb_available
            if not {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[args.report_to]():
                raise SystemExit(f"--report-to {args.report_to} needs its package: pip install {args.report_to}")
        # Each main() is a run of its own: forget the precision and accumulation state an earlier run left in this
        # process (tests and notebooks call several; accelerate keeps it process-wide). The process group stays.
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state()
        GradientState._reset_state()
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs
        if not torch.cuda.is_available():  # DeepSpeed, which accelerate imports when installed, else warns that it
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # found no GPU: say that it is the CPU
        # trackers write under <output_dir> (tensorboard: <output_dir>/<algorithm>/)
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision,
                                       log_with=None if args.report_to == "none" else args.report_to,
                                       project_dir=str(self.out), cpu=not torch.cuda.is_available(),
                                       kwargs_handlers=[InitProcessGroupKwargs(
                                           timeout=timedelta(minutes=args.dist_timeout_minutes))])
        if default_dir:
            self._claim_default_dir()
        args.mixed_precision = self.accelerator.mixed_precision  # None: what `accelerate launch` configured
        # on a GPU: the kernels asked for (never cuDNN under auto) before any model runs; start() checks them
        attention.preselect(args.attention_backend, self.accelerator.device)
        world = self.accelerator.num_processes
        if args.prompts_per_iteration % world:
            raise SystemExit(f"--prompts-per-iteration {args.prompts_per_iteration} is the batch of the whole "
                             f"iteration and must divide evenly among the {world} processes: use a multiple of {world}")
        self.prompts_per_process = args.prompts_per_iteration // world
        if getattr(args, "merge_lora_rollouts", False) and self._sharded():
            raise SystemExit("--merge-lora-rollouts swaps whole base weights, which FSDP and DeepSpeed ZeRO-3 shard "
                             "over the processes: use it on one GPU or under DDP (configs/ddp.yaml)")
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        set_seed(args.seed + self.accelerator.process_index)  # rollout noise differs per process
        self.is_main = self.accelerator.is_main_process
        self.start_time = time.time()
        self.eval_seconds = 0.0
        self.elapsed_before = 0.0  # wall seconds of the run before a resume
        self.first_iteration = 0
        share = f" ({self.prompts_per_process} per process)" if world > 1 else ""
        precision = args.mixed_precision if args.mixed_precision != "no" else "fp32"
        self.print(f"{algorithm} | model {args.model} | preset {args.preset} | {world} process"
                   f"{'es' if world > 1 else ''} on {self.device} | {args.prompts_per_iteration} prompts per "
                   f"iteration{share} | {precision} | {self.out}")
        if world == 1 and os.environ.get("MASTER_PORT") and "WORLD_SIZE" not in os.environ:
            self.print("warning: this run has ONE process although its launcher set up a process group (accelerate "
                       "launch --num_processes N starts one process on a CPU); on a CPU use torchrun "
                       "--nproc_per_node N")
        self.iteration = None  # the iteration in progress (None: before training)
        self.evaluating = None  # the label of the evaluation in progress
        self._previous_handlers = {}
        self._terminating = False  # SIGTERM came: stop after the iteration in progress, with a checkpoint
        self.toy_samples = {}  # "before" / "after": the toy's evaluation samples, for samples.png
        self.memory_plan = None  # --fit-memory's plan, for summary.json
        self._attention_checked = False
        self.lock = None  # the main process's RunLock on --output-dir, from the first write on
        self._store_prefix = None  # several processes: this run's keys in the process group's key-value store
        NonFiniteError.stopping = self._stopping
        if on_main_thread:  # Ctrl-C from here on, the model's minutes of loading included: one line, not a traceback
            self._previous_handlers = {signal.SIGINT: signal.signal(signal.SIGINT, self._interrupted),
                                       signal.SIGTERM: signal.signal(signal.SIGTERM, self._terminated)}

    def _sharded(self) -> bool:
        """Whether the launch shards the weights themselves over the processes (FSDP, DeepSpeed ZeRO-3)."""
        from accelerate.utils import DistributedType
        kind = self.accelerator.distributed_type
        return kind == DistributedType.FSDP or (kind == DistributedType.DEEPSPEED and
                                                self.accelerator.state.deepspeed_plugin.zero_stage == 3)

    def _claim_default_dir(self):
        """The default --output-dir, runs/<script>_<model>_s<seed>_<time>: the main process creates it at once (a
        name a run launched in the same second took gets -2, -3, ...: a sweep started in a loop) and every process
        takes its choice. Each process's own clock would not do: processes that start on either side of a second
        would split one run between two directories."""
        chosen = [None]
        if self.accelerator.is_main_process:
            base = self.out
            for n in itertools.count(1):
                path = base if n == 1 else base.with_name(f"{base.name}-{n}")
                try:
                    path.mkdir(parents=True, exist_ok=False)
                    atexit.register(_remove_if_empty, path)  # a run that fails before its first write leaves nothing
                    break
                except FileExistsError:
                    continue
                except OSError as e:
                    raise SystemExit(f"cannot create the run directory {path}: {e.strerror}; choose an --output-dir "
                                     f"that can be written") from None
            chosen = [str(path)]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list
            broadcast_object_list(chosen)
        self.args.output_dir, self.out = chosen[0], Path(chosen[0])
        config = self.accelerator.project_configuration  # where trackers and accelerate's own saves go
        config.project_dir = config.logging_dir = chosen[0]

    def _where(self) -> str:
        """What the run was doing, numbered as its console lines ("it 1/N" is the first iteration)."""
        if self.evaluating in ("before", "after"):
            return f"in the evaluation {self.evaluating} training"
        if self.evaluating:  # --eval-every's, labelled "it K"
            return f"in the evaluation after iteration {self.evaluating.split()[-1]}"
        if self.iteration is not None:
            return f"in iteration {self.iteration + 1} of {self.args.iterations}"
        return "before training"

    def _stopping(self) -> str:
        """A non-finite number stops the run (NonFiniteError): it lets go of what it holds, as `_stop` does (a notebook
        that goes on must not keep the lock or this run's Ctrl-C handler), and says where it stands."""
        self._let_go()
        return f" {self._where()}{self._resume_hint()}; no final weights were written"

    def _resume_hint(self) -> str:
        """"; last checkpoint ...; resume: <the command>", or why there is nothing to resume."""
        found = self._checkpoints()
        if found:
            script = self.script if self.script.endswith(".py") else f"{self.algorithm}.py"
            world = self.accelerator.num_processes  # (several: the launcher's command line is not known here)
            launch = f"python {script}" if world == 1 else f"launch {script} on {world} processes as before, with"
            return (f"; last checkpoint {found[-1]}; resume: {launch} --resume-from-checkpoint latest "
                    f"--output-dir {self.out}")
        if self.iteration is None:  # loading the model, or evaluating it before training
            return "; nothing trained, nothing to resume"
        every, minutes = self.args.checkpoint_every, self.args.checkpoint_minutes
        if not every and not minutes:
            return "; no checkpoints (--checkpoint-every 0), nothing to resume"
        when = " or ".join(([f"every --checkpoint-every {every} iterations"] if every else []) +
                           ([f"after --checkpoint-minutes {minutes:g}"] if minutes else []))
        return f"; no checkpoint yet (one {when}), nothing to resume"

    @property
    def device(self):
        return self.accelerator.device

    def print(self, msg: str):
        if self.is_main:
            from tqdm.auto import tqdm
            tqdm.write(msg)

    def start(self, task: Task, eval_ema=None, **state) -> dict[str, float]:
        """Begin training: resume from a checkpoint if asked, else evaluate the base model. Returns the
        "before" evaluation. `state` names whatever else a checkpoint must restore for an exact resume: torch
        Generators and objects with state_dict / load_state_dict (the model, optimizer and RNGs are handled)."""
        self.task, self.state, self.eval_ema = task, state, eval_ema
        if eval_ema is not None:  # evaluation and the final weights use it (Flow-GRPO's and DGPO's configs)
            state["eval_ema"] = eval_ema
        self._configure_attention(task)
        if self.args.resume_from_checkpoint is None:
            self._write_config()
            self.before = self.evaluate(task, "before")
            return self.before
        # every check before the first write: a refused resume must leave the run's config.json as it was
        path = self._resolve_checkpoint(self.args.resume_from_checkpoint)
        changed = inputs_changed(path, self.args, {"train": task.train_prompts, "eval": task.eval_prompts})
        if changed:  # (parse_args compared the prompt files already: here a registered model's own prompts too)
            raise SystemExit(changed)
        saved = torch.load(path / f"run_state_{self.accelerator.process_index}.pt", weights_only=False)
        wrote = saved["progress"].get("algorithm", self.algorithm)
        if wrote != self.algorithm:  # its optimizer and generators are another method's: a KeyError further on
            raise SystemExit(f"{path} is a checkpoint of {wrote}.py, not of {self.algorithm}.py: resume it with "
                             f"{wrote}.py")
        self._write_config()
        self.accelerator.load_state(str(path))
        for name, obj in state.items():
            if isinstance(obj, torch.Generator):
                obj.set_state(saved["state"][name])
            else:
                obj.load_state_dict(saved["state"][name])
        progress = saved["progress"]
        task.policy.nfe = dict(progress["nfe"])
        self.first_iteration, self.before = progress["iteration"], progress["before"]
        self.fingerprint_before = progress["fingerprint_before"]
        if progress.get("toy_samples_before") is not None:
            self.toy_samples["before"] = progress["toy_samples_before"]
        self.elapsed_before, self.eval_seconds = progress["elapsed"], progress["eval_seconds"]
        if self.is_main:  # drop metrics logged after the checkpoint: those iterations run again
            log = self.out / "metrics.jsonl"
            lines = log.read_text().splitlines() if log.exists() else []
            kept = [l for l in lines if json.loads(l)["iteration"] < self.first_iteration]
            log.write_text("".join(l + "\n" for l in kept))
        self.print(f"resumed from {path} at iteration {self.first_iteration}")
        return self.before

    def _configure_attention(self, task: Task):
        """The attention kernel, chosen and checked once (infra/attention.py), before the first model call."""
        if self._attention_checked:
            return
        mp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.args.mixed_precision)
        dtype = mp or next(task.policy._unwrapped().parameters()).dtype  # what the attention inputs are in
        attention.configure(self.args.attention_backend, task.policy.attention_shape(), dtype, self.device,
                            self.print, reward_shapes=attention_shapes(task.reward_fn))
        self._attention_checked = True

    def fit_memory(self, task: Task, **unit):
        """--fit-memory (infra/memory.py): the rollout, evaluation and training micro-batches and gradient
        checkpointing, from free device memory. `unit`: the script's training unit (memory.fit_memory). Call it
        before make_optimizer: the probe runs on the model before accelerate wraps it."""
        if not self.args.fit_memory:
            return
        if task.policy.accelerator is not None:
            raise RuntimeError("Run.fit_memory must come before make_optimizer")
        self._configure_attention(task)  # the probe's call runs on the kernel the run will use
        from infra.memory import fit_memory
        self.memory_plan = fit_memory(self.args, task.policy, self.accelerator, task.train_prompts[0], log=self.print,
                                      **unit)

    def _write_config(self):
        """The run's first writes: only now that the model loaded and the kernels passed their check. --overwrite
        deletes what an earlier run left here first."""
        from accelerate.utils import broadcast_object_list
        args = self.args
        text = json.dumps(dataclasses.asdict(args), indent=2)
        refusal = None
        if self.is_main:
            self.lock = RunLock(self.out, log=self.print)
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                refusal = self.lock.acquire()  # no other run writes here from now on (RunLock)
                if refusal is None:
                    if args.overwrite and args.resume_from_checkpoint is None:
                        for name in OUTPUTS:
                            path = self.out / name
                            if path.is_dir():
                                shutil.rmtree(path)
                            elif path.exists():
                                path.unlink()
                    (self.out / "config.json").write_text(text)
                    if args.resume_from_checkpoint is None:
                        (self.out / "metrics.jsonl").write_text("")
            except OSError as e:  # what parse_args cannot see ahead (/proc, a read-only file system)
                refusal = f"--output-dir {self.out}: {e.strerror} ({e.filename}): choose another --output-dir"
        refusal = self._agree(refusal)  # process 0's, on every process: one that stopped alone would wait
        if refusal:
            raise SystemExit(refusal)
        self.accelerator.wait_for_everyone()
        if self.accelerator.num_processes > 1:  # every process writes its part of each checkpoint into --output-dir
            written, token = broadcast_object_list([text, self.lock.me["token"]] if self.is_main else [None, None])
            self._store_prefix = f"flowrl/{token}/"  # this run's keys in the process group's store (_failed_writes)
            config = self.out / "config.json"
            sees = torch.tensor([float(config.is_file() and config.read_text() == written)], device=self.device)
            blind = [rank for rank, ok in enumerate(self.accelerator.gather(sees).tolist()) if not ok]
            if blind:  # (decided together: a process that stopped alone would leave the others in a collective)
                raise SystemExit(f"--output-dir {self.out} is not one directory for all processes: process"
                                 f"{'es' if len(blind) > 1 else ''} {', '.join(map(str, blind))} cannot read the "
                                 f"config.json process 0 wrote there. Each process writes its part of every "
                                 f"checkpoint into it: on several nodes, put it on a filesystem they all share")
        if args.report_to != "none":
            self.accelerator.init_trackers(self.algorithm, config={k: v for k, v in dataclasses.asdict(args).items()
                                                                   if isinstance(v, (int, float, str, bool))})

    def _reading(self, before: dict, after: dict) -> str:
        """What the numbers mean, in one or two lines."""
        line = f"eval reward {before['reward']:.3f} -> {after['reward']:.3f}"
        if self.args.model == "toy2d":
            if self.args.reward in (None, "toy_mode"):  # the scale of another reward is its own
                line += (" (1 = every sample on the mode its prompt asks for; the base model ignores the prompt and "
                         "scores about 0.13: 1 sample in 8 lands on the right mode)")
            if "on_manifold" in before:
                line += (f"; on_manifold {before['on_manifold']:.3f} -> {after['on_manifold']:.3f} (the fraction of "
                         f"samples still on the ring: a reward hacker loses it)")
            line += f". Picture: {self.out / 'samples.png'}"
        elif self.args.model == "tiny-flux":  # 0.715 -> 0.715 after 50 iterations reads as a broken method
            line += (" (tiny-flux is a random FLUX of 68k parameters: it checks the code path, not learning, and its "
                     "reward need not move; --model shapes is the task that learns on a CPU)")
        elif getattr(self, "task", None) is not None and self.task.grid_prompts:
            line += f". Pictures: {self.out / 'samples_before.png'}, {self.out / 'samples_after.png'}"
        return line

    def _interrupted(self, signum, frame):
        """SIGINT: stop with one line, the iteration reached, the last checkpoint and how to resume."""
        self._stop(f"interrupted {self._where()}", 128 + signum)

    def _terminated(self, signum, frame):
        """SIGTERM: in the training loop, finish the iteration and checkpoint it (end_iteration); before training or
        in the final evaluation, stop at once as Ctrl-C does."""
        if self.iteration is None or self.evaluating == "after":
            return self._interrupted(signum, frame)
        self._terminating = True
        if self.is_main:
            print(f"SIGTERM: finishing the iteration in progress ({self.iteration + 1} of {self.args.iterations}), "
                  f"then a checkpoint", file=sys.stderr)

    def _stop(self, what: str, status: int, then: Optional[str] = None):
        """Stop every process with one line: `what`, then the last checkpoint and the command that resumes from it
        (or the caller's own `then`)."""
        then = self._resume_hint() if then is None else then
        self._let_go()
        if self.is_main:
            print(f"{what}{then}", file=sys.stderr)
        raise Interrupted(f"{what}{then}", status)

    def _agree(self, error: Optional[str]) -> Optional[str]:
        """The first process's error (None: none had one), on every process: all stop on it together, where one that
        stopped alone would leave the others waiting in their next collective. A collective itself: every process
        calls it at the same point."""
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object
            error = next((e for e in gather_object([error]) if e is not None), None)
        return error

    def _let_go(self):
        """The run ends (finished or stopped): SIGINT and SIGTERM go back to the handlers they had before it, its
        output directory's lock goes, and a later non-finite number is not reported as this run's."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
        if self.lock is not None:
            self.lock.release()
        if NonFiniteError.stopping == self._stopping:
            NonFiniteError.stopping = staticmethod(lambda: "")  # (the class's default: no run in progress)

    def _checkpoints(self) -> list[Path]:
        return checkpoints(self.out)

    def _resolve_checkpoint(self, resume: str) -> Path:
        if resume == "latest":
            found = self._checkpoints()
            if not found:
                raise SystemExit(f"no checkpoint to resume in {self.out / 'checkpoints'}")
            path = found[-1]
        else:
            path = Path(resume)
            if not list(path.glob("run_state_*.pt")):
                raise SystemExit(not_a_checkpoint(path))
        mismatch = process_count_mismatch(path, self.accelerator.num_processes)
        if mismatch:
            raise SystemExit(mismatch)
        return path

    @contextlib.contextmanager
    def _failed_writes_watched(self, partial: Path):
        """DeepSpeed, several processes: a checkpoint write that fails on one process alone leaves the others waiting
        in the closing barrier of DeepSpeed's `save_checkpoint`, a collective the failed process never joins, so
        `_agree` cannot reach them (they would wait there for --dist-timeout-minutes). Inside this block, the process
        whose write failed stops alone through the function it yields: it posts its line in the process group's
        key-value store (no collective) and stops. A thread on every process watches that key and stops its process
        with the posted line wherever it waits (os._exit: the barrier never returns); the main process removes the
        half-written checkpoint, lets go of its lock and prints the line first. No process exits before every process
        has read the line (`everyone_knows`). Elsewhere (DDP, FSDP2, whose sharded save raises on every process) it
        yields None: the processes agree (`_agree`)."""
        from accelerate.utils import DistributedType
        if self._store_prefix is None or self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            yield None
            return
        store = torch.distributed.distributed_c10d._get_default_store()
        key = f"{self._store_prefix}write-failed/{partial.name}"
        done = threading.Event()  # set before this process posts: it stops on its own line, not the thread

        def everyone_knows(timeout: float = 30.0):
            """Count this process in, then wait until every process has (at most `timeout` s): one that exited first
            would break the others' wait in the barrier ("Connection closed by peer") before they read the line."""
            with contextlib.suppress(Exception):  # (the store gone with a process that hosted it)
                store.add(f"{key}/known", 1)
                deadline = time.time() + timeout
                while store.add(f"{key}/known", 0) < self.accelerator.num_processes and time.time() < deadline:
                    time.sleep(0.05)

        def watch():
            while not done.wait(0.2):
                try:
                    posted = store.check([key]) and not done.is_set()
                    line = store.get(key).decode() if posted else None
                except Exception:  # (the store gone: a process that hosted it has ended; nothing left to watch)
                    return
                if posted:
                    if self.is_main:
                        shutil.rmtree(partial, ignore_errors=True)
                        if self.lock is not None:
                            self.lock.release()
                        print(line, file=sys.stderr, flush=True)
                    everyone_knows()
                    sys.stdout.flush()
                    os._exit(1)

        def stop_alone(what: str):
            done.set()
            with contextlib.suppress(Exception):  # (no store to post to: the others wait, as without this watch)
                store.set(key, what + self._resume_hint())
            everyone_knows()
            if self.is_main:
                shutil.rmtree(partial, ignore_errors=True)
            self._stop(what, 1)

        thread = threading.Thread(target=watch, name="failed-write watch", daemon=True)
        thread.start()
        try:
            yield stop_alone
        finally:
            done.set()
            thread.join()

    def save_checkpoint(self, iterations_done: int):
        """<output_dir>/checkpoints/checkpoint-N: accelerate's state (model, optimizer, every process's RNGs), each
        process's run state (generators, EMA, counters, the before-evaluation), and the weights in the format
        the policy's `save` writes (for FLUX LoRA: what `FluxPipeline.load_lora_weights` reads)."""
        final = self.out / "checkpoints" / f"checkpoint-{iterations_done}"
        path = final.with_name(final.name + ".partial")  # renamed when complete: an interruption never leaves a
        if self.is_main and path.exists():  # half checkpoint that `latest` would pick
            shutil.rmtree(path)
        self.accelerator.wait_for_everyone()
        with self._failed_writes_watched(path) as stop_alone:  # (DeepSpeed; None elsewhere)
            with WriteFailure(self.out) as writing:  # every process's part (a full disk, a quota: one line, below)
                self.accelerator.save_state(str(path))
                state = {name: obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()
                         for name, obj in self.state.items()}
                progress = {"algorithm": self.algorithm, "iteration": iterations_done,
                            "nfe": dict(self.task.policy.nfe), "before": self.before,
                            "fingerprint_before": self.fingerprint_before,
                            "toy_samples_before": self.toy_samples.get("before"), "eval_seconds": self.eval_seconds,
                            "elapsed": self.elapsed_before + time.time() - self.start_time}
                torch.save({"state": state, "progress": progress},
                           path / f"run_state_{self.accelerator.process_index}.pt")
                if self.is_main:  # what a resume compares its prompts, --pretrained and rewards with (inputs_changed)
                    (path / "inputs.json").write_text(json.dumps({
                        "train": prompt_digest(self.task.train_prompts), "eval": prompt_digest(self.task.eval_prompts),
                        "base": base_digest(self.args.pretrained),
                        "rewards": reward_digest(reward_spec(self.args), self.args.reward_dir)}))
            if writing.error is not None and stop_alone is not None:
                stop_alone(f"could not write checkpoint {final}: process {self.accelerator.process_index}: "
                           f"{writing.error}")
            error = self._agree(writing.error)
        if error is None:
            state = gathered_state_dict(self.task.policy)  # every process: FSDP gathers the weights collectively
            with WriteFailure(self.out) as writing:
                if self.is_main:
                    self.task.policy.save(path / "weights", state)
            error = self._agree(writing.error)  # (also the barrier before the rename)
        if error is not None:  # the half-written checkpoint goes (its space with it); the complete ones stay
            if self.is_main:
                shutil.rmtree(path, ignore_errors=True)
            self._stop(f"could not write checkpoint {final}: {error}", 1)
        # a run suspended while it wrote (past the lock's watch) may find its directory another run's by now: renamed,
        # this checkpoint would join that run's, and the pruning below remove theirs
        lost = self._agree(self.lock.lost() if self.lock is not None else None)
        if lost is not None:
            if self.is_main:
                shutil.rmtree(path, ignore_errors=True)  # (this run's own .partial)
            self._stop(f"stopped before completing checkpoint {final}: {lost}", 1,
                       then="; this run writes nothing more into it")
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(path, final)
            limit = self.args.checkpoints_total_limit
            for p in self._checkpoints()[:-limit] if limit > 0 else []:
                shutil.rmtree(p)
        self.accelerator.wait_for_everyone()
        self._last_checkpoint = time.time()  # --checkpoint-minutes counts from here

    def progress(self, iterations: int):
        from tqdm.auto import tqdm
        # disable=None: a bar on a terminal only; logs get the console lines instead
        return tqdm(range(self.first_iteration, iterations), initial=self.first_iteration, total=iterations,
                    desc=self.algorithm, disable=None if self.is_main else True, dynamic_ncols=True)

    def evaluate(self, task: Task, label: str) -> dict[str, float]:
        t0 = time.time()
        self.evaluating = label
        toy_picture = self.args.model == "toy2d" and label in ("before", "after")  # samples.png at the end
        with self.eval_ema.swapped_in() if self.eval_ema is not None else contextlib.nullcontext():
            result = evaluate(task, self.args, keep_samples=toy_picture, log=self.print)
            if task.grid_prompts and label in ("before", "after"):  # the picture of the weights evaluated
                sample_grid(task, self.args, self.out / f"samples_{label}.png" if self.is_main else None)
        if toy_picture:
            result, samples, prompts = result
            self.toy_samples[label] = (samples, torch.tensor([parse_toy_prompt(p) for p in prompts]))
        self.evaluating = None
        self.eval_seconds += time.time() - t0
        self.print(f"[eval {label}] " + "  ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    def make_optimizer(self, policy: Policy):
        """AdamW over the trainable parameters, handed with the model to accelerate (DDP/FSDP/DeepSpeed, autocast)."""
        a = self.args
        from accelerate.utils import DistributedType
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            self._configure_deepspeed()
        if self.accelerator.num_processes > 1:
            # Every process starts from rank 0's trainable weights. They can differ: LoRA adapters are initialised
            # from each process's own seed. DDP and DeepSpeed broadcast on wrapping; FSDP shards what each holds.
            with torch.no_grad():
                for p in policy.trainable_parameters():
                    torch.distributed.broadcast(p.data, src=0)
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=a.learning_rate, weight_decay=a.weight_decay,
                                      betas=(0.9, a.adam_beta2))
        self.trainable_names = [n for n, p in policy.net.named_parameters() if p.requires_grad]
        self.fingerprint_before = weight_fingerprint(policy.net.state_dict(), self.trainable_names)
        return policy.prepare(self.accelerator, optimizer)

    def _configure_deepspeed(self):
        """The DeepSpeed engine clips and steps by itself, at the accumulation boundary each script marks (see
        `accumulating`). So: its clipping is --max-grad-norm; its own accumulation count stays 1 (a count would also
        divide every loss by it); and it gets the micro-batch sizes it insists on (no dataloader passes through
        accelerate here: each script builds its batches from rollouts)."""
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        if config.get("gradient_accumulation_steps", 1) not in (1, "auto"):
            raise SystemExit(f"DeepSpeed config: set gradient_accumulation_steps to 1 (got "
                             f"{config['gradient_accumulation_steps']}); the scripts accumulate over their own "
                             f"backward passes and mark the optimizer step themselves")
        config.update(gradient_accumulation_steps=1, gradient_clipping=self.args.max_grad_norm,
                      train_micro_batch_size_per_gpu=1, train_batch_size=self.accelerator.num_processes)

    def begin_iteration(self, policy: Policy):
        self._t0, self._nfe0 = time.time(), dict(policy.nfe)
        self.iteration = getattr(self, "_next_iteration", self.first_iteration)
        self._next_iteration = self.iteration + 1
        if self.iteration == self.first_iteration:
            self._loop_start = self._last_line = self._last_checkpoint = self._t0

    def end_iteration(self, iteration: int, task: Task, rewards: torch.Tensor, losses: dict, **extra):
        """Log one iteration: reward statistics of the (gathered) rewards (groups, G), this iteration's NFE
        without and with gradient (every process's, as the rewards are), its time, the loss statistics, any extra
        metric, and an evaluation every `--eval-every` iterations."""
        nfe = task.policy.nfe
        calls = torch.tensor([nfe["no_grad"] - self._nfe0["no_grad"], nfe["grad"] - self._nfe0["grad"]])
        if self.accelerator.num_processes > 1:
            calls = self.accelerator.reduce(calls.to(self.device), reduction="sum").cpu()
        metrics = {"reward/mean": rewards.mean(), "reward/std": rewards.std(),
                   "reward/group_std": rewards.std(dim=-1).mean(),
                   "nfe/rollout": int(calls[0]), "nfe/train": int(calls[1]),
                   "time/iteration_seconds": time.time() - self._t0,
                   **{f"loss/{k}": v for k, v in losses.items()}, **extra}
        every = self.args.eval_every
        if every and (iteration + 1) % every == 0 and iteration + 1 < self.args.iterations:
            metrics.update({f"eval/{k}": v for k, v in self.evaluate(task, f"it {iteration + 1}").items()})
        every, minutes = self.args.checkpoint_every, self.args.checkpoint_minutes
        late = bool(minutes) and time.time() - self._last_checkpoint >= 60 * minutes and self.is_main
        stop, lost = self._terminating, self.lock.lost() if self.lock is not None else None  # (the main process's)
        with WriteFailure(self.out) as writing:  # metrics.jsonl (a full disk)
            if lost is None:  # (a directory that is not this run's any more gets nothing written into it)
                self.log(iteration, metrics)
        failed = writing.error
        if self.accelerator.num_processes > 1:  # every process decides alike: by the main one's clock, lock and
            flags = torch.tensor([late, stop, lost is not None, failed is not None], device=self.device).float()
            late, stop, gone, broke = (self.accelerator.reduce(flags, reduction="sum") > 0).tolist()  # disk, on
            lost = (lost or "process 0 found its run.lock another run's") if gone else None  # anyone's SIGTERM
            failed = (failed or "process 0 could not write metrics.jsonl") if broke else None
        where = f"in iteration {iteration + 1} of {self.args.iterations}"
        if lost is not None:  # before this iteration wrote anything: the directory is not this run's any more
            self._stop(f"stopped {where}: {lost}", 1, then="; this run writes nothing more into it")
        if failed is not None:
            self._stop(f"stopped {where}: could not write its metrics: {failed}", 1)
        for k, v in metrics.items():  # before any checkpoint is written from this state
            if isinstance(v, (float, int, torch.Tensor)):
                check_finite(k, v)
        # --checkpoint-every also checkpoints the last iteration: training longer then continues from it at once, and a
        # run stopped in its final evaluation (minutes for FLUX) resumes to that evaluation alone
        due = bool(every) and ((iteration + 1) % every == 0 or iteration + 1 == self.args.iterations)
        saved = due or late
        if saved:
            self.save_checkpoint(iteration + 1)
        if stop:
            if not saved:
                self.save_checkpoint(iteration + 1)
            self._stop(f"stopped by SIGTERM after {iteration + 1} of {self.args.iterations} iterations", 143)

    def log(self, iteration: int, metrics: dict):
        """One line of metrics.jsonl per iteration, a console line every `log_every` (and after any iteration that
        ends a minute or more after the last line: FLUX's iterations take minutes), and the trackers."""
        metrics = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
            last = iteration == self.args.iterations - 1
            every = self.args.log_every
            if every and (iteration % every == 0 or last or time.time() - self._last_line >= LOG_INTERVAL):
                self._last_line = time.time()
                per_it = (time.time() - self._loop_start) / (iteration + 1 - self.first_iteration)
                shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)) and
                                  k.startswith(("reward/mean", "loss/", "grad_norm", "eval/")))
                self.print(f"it {iteration + 1}/{self.args.iterations}  {shown}  | {per_it:.2f} s/it, "
                           f"{'done' if last else 'ETA ' + duration(per_it * (self.args.iterations - iteration - 1))}")
        if self.args.report_to != "none":
            self.accelerator.log(metrics, step=iteration)

    def finish(self, task: Task, before: dict, after: dict, **extra) -> dict:
        """Write summary.json (keys every benchmark reads) and the trained weights."""
        wall = self.elapsed_before + time.time() - self.start_time
        # NFE totals of the whole run: every process's model calls
        nfe = self.accelerator.reduce(torch.tensor([task.policy.nfe["no_grad"], task.policy.nfe["grad"]],
                                                   device=self.device), reduction="sum").tolist()
        summary = {"algorithm": self.algorithm, "model": self.args.model, "preset": self.args.preset,
                   "iterations": self.args.iterations, "seed": self.args.seed,
                   "eval_reward_before": before["reward"], "eval_reward_after": after["reward"],
                   "nfe_rollout": nfe[0], "nfe_train": nfe[1],
                   "wall_seconds": wall, "train_seconds": wall - self.eval_seconds,
                   "num_processes": self.accelerator.num_processes}
        for k in before:
            if k != "reward":
                summary[f"{k}_before"], summary[f"{k}_after"] = before[k], after[k]
        if self.memory_plan is not None:
            summary["memory_plan"] = self.memory_plan
        summary.update(extra)
        lost = self._agree(self.lock.lost() if self.lock is not None else None)  # (also the barrier it had)
        if lost is not None:
            self._stop(f"stopped before writing the run's outputs: {lost}", 1, then="; this run writes nothing into it")
        state = gathered_state_dict(task.policy)  # every process: FSDP gathers the weights collectively
        if self.is_main:  # did training move the weights? (a smoke run must fail when it did not)
            changed = weight_fingerprint(state, self.trainable_names) != self.fingerprint_before
            summary["trainable_tensors_changed"] = int(changed.any(-1).sum())
            summary["trainable_tensors"] = len(self.trainable_names)
        final, partial = self.out / "final", self.out / "final.partial"  # written whole, then renamed
        if self.args.save_weights:
            summary["weights"] = str(final)
            summary["weights_are_the_evaluation_ema"] = self.eval_ema is not None
        taken = None  # (the main process) its directory found another run's while final/ was written: suspended
        with WriteFailure(self.out) as writing:  # (a full disk, a quota: one line, below)
            if self.args.save_weights:
                # final/ holds the weights that were evaluated: with an evaluation EMA, the EMA. Written inside the
                # swap: a state dict may hold references to the parameters themselves (DDP), which its exit restores.
                with self.eval_ema.swapped_in() if self.eval_ema is not None else contextlib.nullcontext():
                    if self.eval_ema is not None:
                        state = gathered_state_dict(task.policy, masters=False)
                    if self.is_main:  # never half of it in final/
                        shutil.rmtree(partial, ignore_errors=True)
                        task.policy.save(partial, state)
                        # (renamed, it would replace the other run's final/)
                        taken = self.lock.lost() if self.lock is not None else None
                        if taken is None:
                            shutil.rmtree(final, ignore_errors=True)  # (a resumed run's earlier final/)
                            os.replace(partial, final)
                        else:
                            shutil.rmtree(partial, ignore_errors=True)  # (this run's own final.partial)
            if self.is_main and taken is None and set(self.toy_samples) == {"before", "after"}:
                from infra.plots import toy_picture
                toy_picture(self.out / "samples.png", self.toy_samples["before"], self.toy_samples["after"],
                            self.out / "metrics.jsonl", before["reward"], after["reward"])
            if self.is_main and taken is None:
                (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        taken = self._agree(taken)
        if taken is not None:
            self._stop(f"stopped before completing the run's outputs: {taken}", 1,
                       then="; this run writes nothing more into it")
        error = self._agree(writing.error)
        if error is not None:
            if self.is_main:
                shutil.rmtree(partial, ignore_errors=True)  # (its space with it)
            self._stop(f"could not write the run's outputs: {error}", 1)
        if self.is_main:
            self.print(f"summary: {self.out / 'summary.json'}\n" + json.dumps(summary, indent=2))
            self.print(self._reading(before, after))
            ema = self.eval_ema
            if ema is not None and ema.steps < ema.every:  # a short run: the EMA still holds the base weights
                self.print(f"note: the evaluation EMA updates every {ema.every} optimizer steps and this run took "
                           f"{ema.steps}, so the 'after' evaluation scored the base weights"
                           f"{' and final/ holds them' if self.args.save_weights else ''}; --eval-ema false evaluates "
                           f"and saves the trained ones")
        if self.args.report_to != "none":
            self.accelerator.end_training()
        self._let_go()
        return summary
