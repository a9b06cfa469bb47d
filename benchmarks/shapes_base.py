"""The shapes task's base model: pretrain it (once; cached under $FLOWRL_CACHE), score it per prompt category on the
train and held-out prompts, and draw its sample grid.

    python benchmarks/shapes_base.py        # writes runs/shapes-base/samples.png and scores.json

docs/benchmarks.md's base-model table comes from this command (infra/shapes.py describes the task).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import CommonArgs  # noqa: E402
from infra.shapes import all_prompts  # noqa: E402
from infra.tasks import evaluate, load_task, sample_grid  # noqa: E402


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Pretrain (once; cached) and evaluate the shapes base model.")
    parser.add_argument("--output-dir", default="runs/shapes-base")
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--eval-samples-per-prompt", type=int, default=4)
    parser.add_argument("--eval-seed", type=int, default=12345)
    cli = parser.parse_args(argv)
    # every other flag at the scripts' own default (a hand-made namespace missed the flags added since: --compile)
    args = CommonArgs(model="shapes", lora_rank=0, eval_steps=cli.eval_steps, eval_batch_size=256,
                      eval_samples_per_prompt=cli.eval_samples_per_prompt, eval_seed=cli.eval_seed)
    task = load_task(args, keep_reference=False)
    out = Path(cli.output_dir)
    sample_grid(task, args, out / "samples.png")
    results, held_out = {}, set(task.eval_prompts)
    for category, prompts in all_prompts().items():
        held = [p for p in prompts if p in held_out]
        for split, subset in (("train", [p for p in prompts if p not in held]), ("held-out", held)):
            if subset:
                task.eval_prompts = subset
                results[f"{category}/{split}"] = evaluate(task, args)
                print(f"{category:12s} {split:9s} ({len(subset):3d} prompts) " +
                      "  ".join(f"{k} {v:.3f}" for k, v in results[f"{category}/{split}"].items()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps(results, indent=2))
    print(f"samples: {out / 'samples.png'}; scores: {out / 'scores.json'}")
    return results


if __name__ == "__main__":
    main()
