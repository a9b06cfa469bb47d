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
#      checkpointing; the transformer is built on the GPU itself (seconds; on a CPU in fp32 it takes minutes and 48 GB);
#   4. only with GPU_CHECK_LEVERS=1 (several more minutes: compilation alone takes one or two per run): the speed
#      levers at full depth, one row each, for DGPO and Flow-GRPO: gradient checkpointing on and off, regional
#      torch.compile (--compile), LoRA merged for the rollouts (--merge-lora-rollouts, DGPO), both together;
# then writes OUT_DIR/gpu_check.md: date, device, software versions, the smoke's lines and the timing tables.
#   bash scripts/gpu_check.sh [OUT_DIR]          (default runs/gpu_check; exit status 1 if any part failed)
# Timeouts (seconds): GPU_CHECK_SMOKE_S (240) for the whole smoke, GPU_CHECK_METHOD_S (75) per method at reduced
# depth, GPU_CHECK_FULL_S (120) per method at full depth, GPU_CHECK_LEVER_S (240) per lever run. GPU_CHECK_TIMING_CONFIG=tiny GPU_CHECK_DEPTH="1 1" runs parts
# 2-3 at diffusers' tiny widths (a CPU rehearsal of the script); GPU_CHECK_SKIP_SMOKE=1 leaves part 1 out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/{timing,timing_full_depth,levers_dgpo,levers_flow_grpo}.md "$OUT/smoke_lines.txt"  # no stale tables
PY=${PYTHON:-$(command -v python || command -v python3)}
CONFIG=${GPU_CHECK_TIMING_CONFIG:-flux-dev}
DEPTH=${GPU_CHECK_DEPTH:-19 38}
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
if [[ -z ${GPU_CHECK_SKIP_SMOKE:-} ]]; then
  t0=$SECONDS
  SMOKE_JOBS=${SMOKE_JOBS:-8} timeout -k 10 "${GPU_CHECK_SMOKE_S:-240}" bash scripts/gpu_smoke.sh "$OUT/smoke" \
    > "$OUT/smoke.log" 2>&1 || FAILED=1
  grep -E "^(ok|FAILED|device|skip|all smoke|some smoke|\(these)" "$OUT/smoke.log" > "$OUT/smoke_lines.txt"
  echo "smoke: $((SECONDS - t0)) s"; cat "$OUT/smoke_lines.txt"
fi

# 2. reduced depth, all presets; 3. full depth, DGPO and Flow-GRPO
t0=$SECONDS
"$PY" benchmarks/timing.py --config "$CONFIG" --timeout "${GPU_CHECK_METHOD_S:-75}" --out "$OUT/timing.md" \
  > "$OUT/timing.log" 2>&1 || FAILED=1
echo "timing ($CONFIG): $((SECONDS - t0)) s"
FULL=("DGPO" "Flow-GRPO (SD3 preset)")
[[ $CONFIG == flux-dev ]] || FULL=("DGPO" "Flow-GRPO")
t0=$SECONDS
# shellcheck disable=SC2086
"$PY" benchmarks/timing.py --config "$CONFIG" --depth $DEPTH --methods "${FULL[@]}" --extra-flags=--gradient-checkpointing \
  --timeout "${GPU_CHECK_FULL_S:-120}" --out "$OUT/timing_full_depth.md" > "$OUT/timing_full_depth.log" 2>&1 || FAILED=1
echo "timing at depth $DEPTH: $((SECONDS - t0)) s"

# 4. the speed levers (opt-in)
if [[ -n ${GPU_CHECK_LEVERS:-} ]]; then
  t0=$SECONDS
  # shellcheck disable=SC2086
  "$PY" benchmarks/timing.py --config "$CONFIG" --depth $DEPTH --methods DGPO --timeout "${GPU_CHECK_LEVER_S:-240}" \
    --variants "checkpointing=--gradient-checkpointing" "plain=" "compile=--compile" \
    "merged=--merge-lora-rollouts" "compile+merged=--compile --merge-lora-rollouts" \
    --out "$OUT/levers_dgpo.md" > "$OUT/levers_dgpo.log" 2>&1 || FAILED=1
  # shellcheck disable=SC2086
  "$PY" benchmarks/timing.py --config "$CONFIG" --depth $DEPTH --methods "${FULL[1]}" \
    --timeout "${GPU_CHECK_LEVER_S:-240}" --variants "checkpointing=--gradient-checkpointing" "plain=" \
    "compile=--compile" --out "$OUT/levers_flow_grpo.md" > "$OUT/levers_flow_grpo.log" 2>&1 || FAILED=1
  echo "levers at depth $DEPTH: $((SECONDS - t0)) s"
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
  for f in timing.md timing_full_depth.md ${GPU_CHECK_LEVERS:+levers_dgpo.md levers_flow_grpo.md}; do
    if [[ -f $OUT/$f ]]; then sed 's/^## /### /' "$OUT/$f"; else echo "($f: not written; see ${f%.md}.log)"; fi
    echo
  done
  echo "Total: $((SECONDS - T0)) s."
} > "$OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
[[ $FAILED == 0 ]] || { echo "gpu_check: some part FAILED (logs in $OUT)"; exit 1; }
