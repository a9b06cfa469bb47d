"""Did a finished run really train? One line per run directory, exit status 1 if any failed:

    python scripts/check_run.py RUN_DIR [RUN_DIR ...]

A run passes when its summary.json exists, its evaluation rewards before and after are finite, every number in its
metrics.jsonl is finite, and training changed its trainable weights (summary key `trainable_tensors_changed`, from a
fingerprint of the weights taken before the first step and after the last). scripts/gpu_smoke.sh reports each of its
runs through this, so a smoke run cannot print "ok" over a NaN reward or weights that never moved.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def check(run_dir: Path) -> tuple[bool, str]:
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        return False, "no summary.json (the run did not finish; see its log)"
    s = json.loads(summary_file.read_text())
    before, after = s.get("eval_reward_before"), s.get("eval_reward_after")
    if not all(isinstance(r, (int, float)) and math.isfinite(r) for r in (before, after)):
        return False, f"evaluation reward not finite: {before} -> {after}"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    for n, line in enumerate(lines):
        row = json.loads(line)
        bad = [k for k, v in row.items() if isinstance(v, (int, float)) and not math.isfinite(v)]
        if bad:
            return False, f"metrics.jsonl line {n + 1} (iteration {row.get('iteration')}): non-finite {bad}"
    if len(lines) < s["iterations"]:
        return False, f"metrics.jsonl has {len(lines)} lines for {s['iterations']} iterations"
    changed, total = s.get("trainable_tensors_changed"), s.get("trainable_tensors")
    if not changed:
        return False, f"training changed none of the {total} trainable tensors"
    return True, (f"reward {before:.3f} -> {after:.3f}  nfe {s['nfe_rollout']}/{s['nfe_train']}  "
                  f"{changed}/{total} trainable tensors changed  {s['num_processes']} proc")


def main(paths: list[str]) -> int:
    failed = 0
    for path in paths:
        ok, what = check(Path(path))
        print(f"{'ok    ' if ok else 'FAILED'} {Path(path).name:42s} {what}")
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
