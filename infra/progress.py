"""Progress of long work (evaluation, embedding a prompt set): a tqdm bar on a terminal; in a job's log, where a bar
would be one unreadable line, a line every `interval` seconds with what is done and an ETA."""

from __future__ import annotations

import time
from typing import Callable, Optional

LOG_INTERVAL = 60.0  # seconds: at most this long between lines in a job's log (also the training loop's, infra/run.py)


def duration(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """`update(n)` after each piece of `total`. On a terminal a bar; otherwise `log` gets a line at most every
    `interval` seconds (none for work that ends sooner, none after the last piece). `quiet`: neither (the other
    processes of a multi-process run)."""

    def __init__(self, total: int, what: str, unit: str, log: Optional[Callable] = None,
                 interval: float = LOG_INTERVAL, quiet: bool = False):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, desc=what, unit=unit, leave=False, disable=True if quiet else None,
                        dynamic_ncols=True)  # disable=None: off when the output is not a terminal
        self.log = log if (self.bar.disable and not quiet) else None
        self.total, self.what, self.unit, self.interval = total, what, unit, interval
        self.done, self.t0 = 0, time.time()
        self.last = self.t0

    def update(self, n: int):
        self.bar.update(n)
        self.done += n
        now = time.time()
        if self.log is not None and now - self.last >= self.interval and 0 < self.done < self.total:
            self.last, spent = now, now - self.t0
            self.log(f"  {self.what}: {self.done}/{self.total} {self.unit}s, {duration(spent)} spent, "
                     f"ETA {duration(spent / self.done * (self.total - self.done))}")

    def close(self):
        self.bar.close()
