#!/usr/bin/env bash
# Everything a GPU machine should check, in one command, sized for 8 minutes on one H200 with the installs:
#   0. installs: the GPU image has torch, transformers, accelerate and peft but no diffusers. If diffusers does not
#      import and wheels are in $WHEELS (default .whl; fetch them on a machine with network access:
#      pip download --no-deps diffusers==0.42.1 transformers==5.23.0 peft==0.21.2 -d .whl), they are installed into
#      $OUT_DIR/site, which goes on PYTHONPATH;
#   1. scripts/gpu_smoke.sh: every script in bf16 on the tiny FLUX and on tiny FLUX / SD3 pipelines, its runs in
#      parallel, each judged by scripts/check_run.py (finite rewards and losses, weights that moved);
#   2. benchmarks/timing.py --config flux-dev: all six paper presets at FLUX.1-dev's widths, 2 double + 4 single
#      blocks: seconds per iteration, the share inside the transformer, MFU, peak memory;
#   3. the same at full depth (19 + 38 blocks, 11.9B parameters) for DGPO and Flow-GRPO, LoRA, with gradient
#      checkpointing, at G = 8 and 2 iterations (GPU_CHECK_FULL_FLAGS); the transformer is built on the GPU itself
#      (seconds; on a CPU in fp32 it takes minutes and 48 GB);
#   4-5. not by default: the speed levers, one row each. 4, at the reduced depth (compilation costs the same at any
#      depth: blocks of one class share a graph): DGPO plain, --compile, --merge-lora-rollouts and both; Flow-GRPO
#      plain and --compile. 5, at full depth: DGPO and Flow-GRPO without gradient checkpointing, eager and compiled,
#      and with --fit-memory (batches and checkpointing chosen from free memory; the table lists what it chose).
#      Unmeasured on a GPU; expect several minutes each (each --compile run compiles afresh), so run them as their
#      own calls: GPU_CHECK_PARTS=4 bash scripts/gpu_check.sh OUT_DIR (the report then holds part 4 only);
# then writes OUT_DIR/gpu_check.md: date, device, software versions, the smoke's lines and the timing tables.
#   bash scripts/gpu_check.sh [OUT_DIR]          (default runs/gpu_check; exit status 1 if any part failed)
# GPU_CHECK_PARTS (default "1 2 3") picks the parts. Timeouts (seconds): GPU_CHECK_SMOKE_S (240) for the whole smoke,
# GPU_CHECK_METHOD_S (75) per method at reduced depth, GPU_CHECK_FULL_S (120) per method at full depth,
# GPU_CHECK_LEVER_S (180) per lever run. GPU_CHECK_TIMING_CONFIG=tiny GPU_CHECK_DEPTH="1 1" runs parts 2-5 at
# diffusers' tiny widths (a CPU rehearsal of the script). PYTHON=...: the interpreter (default: the first of `python`,
# `python3` that imports torch).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# no stale tables
rm -f "$OUT"/{timing,timing_full_depth,levers,levers_merged,levers_full_depth}.md "$OUT/smoke_lines.txt"
. scripts/python.sh  # PY
CONFIG=${GPU_CHECK_TIMING_CONFIG:-flux-dev}
DEPTH=${GPU_CHECK_DEPTH:-19 38}
PARTS=" ${GPU_CHECK_PARTS:-1 2 3} "
FAILED=0
T0=$SECONDS

# 0. installs
if ! "$PY" -c "import diffusers" 2> /dev/null; then
  WHEELS=${WHEELS:-.whl}
  if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$OUT/site" \
      "$WHEELS"/*.whl || { echo "installing the wheels in $WHEELS failed"; exit 1; }
    export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "diffusers does not import and no wheels are in $WHEELS (see the header of this script)"; exit 1
  fi
fi
echo "installs: $((SECONDS - T0)) s"

# 1. the smoke
if [[ $PARTS == *" 1 "* ]]; then
  t0=$SECONDS
  SMOKE_JOBS=${SMOKE_JOBS:-8} timeout -k 10 "${GPU_CHECK_SMOKE_S:-240}" bash scripts/gpu_smoke.sh "$OUT/smoke" \
    > "$OUT/smoke.log" 2>&1 || FAILED=1
  grep -E "^(ok|FAILED|device|skip|all smoke|some smoke|\(these)" "$OUT/smoke.log" > "$OUT/smoke_lines.txt"
  echo "smoke: $((SECONDS - t0)) s"; cat "$OUT/smoke_lines.txt"
fi

# 2. reduced depth, all presets; 3. full depth, DGPO and Flow-GRPO
FULL=("DGPO" "Flow-GRPO (SD3 preset)")
FIT="--fit-memory"
# Full depth at G = 8 and 2 iterations (1 timed): G = 8 is what the issue measured (14.9 s/it); the presets' G = 24
# is about 3x the work per iteration (~45 s at that pace), and three of them would pass the 120 s timeout.
FULL_FLAGS=${GPU_CHECK_FULL_FLAGS:---group-size 8 --iterations 2}
# (a CPU rehearsal: the tiny config's names, and a budget, as a CPU has no free device memory to read)
[[ $CONFIG == flux-dev ]] || { FULL=("DGPO" "Flow-GRPO"); FIT="--fit-memory --memory-budget-gib 1"; }
if [[ $PARTS == *" 2 "* ]]; then
  t0=$SECONDS
  "$PY" benchmarks/timing.py --config "$CONFIG" --timeout "${GPU_CHECK_METHOD_S:-75}" --out "$OUT/timing.md" \
    > "$OUT/timing.log" 2>&1 || FAILED=1
  echo "timing ($CONFIG): $((SECONDS - t0)) s"
fi
if [[ $PARTS == *" 3 "* ]]; then
  t0=$SECONDS
  # shellcheck disable=SC2086
  "$PY" benchmarks/timing.py --config "$CONFIG" --depth $DEPTH --methods "${FULL[@]}" \
    --extra-flags="--gradient-checkpointing $FULL_FLAGS" --timeout "${GPU_CHECK_FULL_S:-120}" \
    --out "$OUT/timing_full_depth.md" \
    > "$OUT/timing_full_depth.log" 2>&1 || FAILED=1
  echo "timing at depth $DEPTH: $((SECONDS - t0)) s"
fi

# 4. the speed levers
if [[ $PARTS == *" 4 "* ]]; then
  t0=$SECONDS
  LEVER_S=${GPU_CHECK_LEVER_S:-180}
  "$PY" benchmarks/timing.py --config "$CONFIG" --methods "${FULL[@]}" --timeout "$LEVER_S" \
    --variants "plain=" "compile=--compile" --out "$OUT/levers.md" > "$OUT/levers.log" 2>&1 || FAILED=1
  "$PY" benchmarks/timing.py --config "$CONFIG" --methods DGPO --timeout "$LEVER_S" \
    --variants "merged=--merge-lora-rollouts" "compile+merged=--compile --merge-lora-rollouts" \
    --out "$OUT/levers_merged.md" > "$OUT/levers_merged.log" 2>&1 || FAILED=1
  echo "levers: $((SECONDS - t0)) s"
fi

# 5. full depth without gradient checkpointing, eager and compiled (against part 3's checkpointed rows). By
# `benchmarks/memory_estimate.py --activations`, 8 samples at 512 px keep 74 GiB of activations without it: with the
# 22 GiB bf16 base that fits an H200, not an 80 GB H100 (there only the fit-memory row fits).
if [[ $PARTS == *" 5 "* ]]; then
  t0=$SECONDS
  # shellcheck disable=SC2086
  "$PY" benchmarks/timing.py --config "$CONFIG" --depth $DEPTH --methods "${FULL[@]}" --extra-flags="$FULL_FLAGS" \
    --timeout "${GPU_CHECK_LEVER_S:-180}" --variants "no checkpointing=" "no checkpointing, compile=--compile" \
    "fit-memory=$FIT" \
    --out "$OUT/levers_full_depth.md" > "$OUT/levers_full_depth.log" 2>&1 || FAILED=1
  echo "full depth without checkpointing: $((SECONDS - t0)) s"
fi

# the report
{
  echo "# GPU check, $(date -u +%Y-%m-%d)"
  echo
  "$PY" - <<'PY'
import importlib, platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device (CPU rehearsal)"
versions = [f"python {platform.python_version()}", f"torch {torch.__version__}",
            f"CUDA {torch.version.cuda}", f"cuDNN {torch.backends.cudnn.version()}"]
for name in ("diffusers", "transformers", "accelerate", "peft"):
    try:
        versions.append(f"{name} {importlib.import_module(name).__version__}")
    except ImportError:
        versions.append(f"{name} missing")
print(f"`bash scripts/gpu_check.sh` on {gpu}: " + ", ".join(versions) + ".")
PY
  echo
  if [[ -f $OUT/smoke_lines.txt ]]; then echo '```'; cat "$OUT/smoke_lines.txt"; echo '```'; echo; fi
  for part_file in 2:timing.md 3:timing_full_depth.md 4:levers.md 4:levers_merged.md 5:levers_full_depth.md; do
    part=${part_file%%:*} f=${part_file#*:}
    [[ $PARTS == *" $part "* ]] || continue
    if [[ -f $OUT/$f ]]; then sed 's/^## /### /' "$OUT/$f"; else echo "($f: not written; see ${f%.md}.log)"; fi
    echo
  done
  echo "Total: $((SECONDS - T0)) s."
} > "$OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
[[ $FAILED == 0 ]] || { echo "gpu_check: some part FAILED (logs in $OUT)"; exit 1; }
