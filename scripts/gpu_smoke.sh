#!/usr/bin/env bash
# Smoke run of the whole training path in bf16, with random tiny weights (nothing downloaded):
#   1. all five scripts on the tiny FLUX (FLUX.1-dev's code path), two iterations, a checkpoint after each;
#   2. --model flux and --model sd3 (the real loading path, with CFG for SD3) on tiny random pipelines written to
#      OUT_DIR/pipelines, Flow-GRPO and DGPO, with LoRA and with full fine-tuning;
#   3. on CUDA only: the FSDP and DeepSpeed ZeRO-2 configs of configs/accelerate, launched with `accelerate launch`
#      on this machine's GPUs (--num_processes = the GPU count): Flow-GRPO and DGPO on the tiny FLUX pipeline
#      with LoRA (bf16 base, fp32 adapters) and full fine-tuning, the other three scripts full fine-tuning,
#      then a resume from each config's checkpoint. DeepSpeed runs when `import deepspeed` works.
# Every run is judged by scripts/check_run.py: it fails unless it finished, its evaluation rewards and every logged
# number are finite, and training changed its weights. (Before that check, a run whose rewards were all NaN printed
# "ok" here.) On a CPU parts 1-2 run with CPU bf16 autocast. Prints the device and one line per run; exits non-zero
# if any run failed (each run's log is OUT_DIR/<name>.log).
#   bash scripts/gpu_smoke.sh [OUT_DIR]
# SMOKE_JOBS=N: runs at a time (default: 4 on a GPU, 1 on a CPU); SMOKE_TIMEOUT=S: a run is killed after S s (1800);
# PYTHON=...: the interpreter (default: the first of `python`, `python3` that imports torch); `accelerate launch` runs
# through it too.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/python.sh  # PY
OUT=${1:-runs/gpu_smoke}
mkdir -p "$OUT"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
JOBS=${SMOKE_JOBS:-$([[ $NGPU -gt 0 ]] && echo 4 || echo 1)}
"$PY" - <<'PY'
import torch
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA)",
      "| torch", torch.__version__, "| bf16 supported:", torch.cuda.is_bf16_supported() if torch.cuda.is_available() else "cpu autocast")
PY

NAMES=()
throttle() { while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done; }
run() {  # name, script, flags...  (in the background, at most $JOBS at a time; judged after `wait`)
  local name=$1 script=$2; shift 2
  throttle
  timeout -k 10 "${SMOKE_TIMEOUT:-1800}" "$PY" "$script" --mixed-precision bf16 --iterations 2 --checkpoint-every 1 \
    --output-dir "$OUT/$name" --log-every 0 "$@" > "$OUT/$name.log" 2>&1 &
  NAMES+=("$name")
}
judge() {  # every run named so far: one line each; the failures' log tails after
  local t0=$1 failed=0
  wait
  echo "(these $(( ${#NAMES[@]} )) runs took $((SECONDS - t0)) s, $JOBS at a time)"
  "$PY" scripts/check_run.py "${NAMES[@]/#/$OUT/}" || failed=1
  if [[ $failed == 1 ]]; then
    for name in "${NAMES[@]}"; do
      "$PY" scripts/check_run.py "$OUT/$name" > /dev/null || { echo "--- $OUT/$name.log"; tail -15 "$OUT/$name.log"; }
    done
    FAILED=1
  fi
  NAMES=()
}
FAILED=0

# 1. the tiny FLUX
t0=$SECONDS
for script in flow_grpo dgpo neighbor_grpo g2rpo pro_grpo; do
  run "${script}_tiny-flux" "$script.py" --model tiny-flux
done

# 2. the real loading path on tiny random pipelines
"$PY" - "$OUT" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from tiny_pipelines import save_tiny_flux_pipeline, save_tiny_sd3_pipeline
out = Path(sys.argv[1]) / "pipelines"
save_tiny_flux_pipeline(out / "flux")
save_tiny_sd3_pipeline(out / "sd3")
(out / "prompts.txt").write_text("a photo of red\na photo of green\na photo of cyan\n")
PY
PIPE=(--preset tiny-flux --train-prompts "$OUT/pipelines/prompts.txt" --reward mean_color --max-sequence-length 16)
for model in flux sd3; do
  for rank in 8 0; do
    for script in flow_grpo dgpo; do
      run "${script}_${model}_r${rank}" "$script.py" "${PIPE[@]}" --model "$model" --pretrained "$OUT/pipelines/$model" \
        --lora-rank "$rank"
    done
  done
done
judge $t0

# 3. FSDP and DeepSpeed through `accelerate launch` (CUDA only)
if [[ $NGPU -gt 0 ]]; then
  CONFIGS=(fsdp)
  if timeout -k 5 300 "$PY" -c "import deepspeed" > /dev/null 2>&1; then CONFIGS+=(deepspeed_zero2); else
    echo "skip deepspeed_zero2: import deepspeed failed or took over 300 s (is it installed?)"; fi
  PORT=29650
  launch() {  # name, config, script, flags...  (in the background, at most $JOBS at a time)
    local name=$1 cfg=$2 script=$3; shift 3
    throttle
    PORT=$((PORT + 1))
    timeout -k 10 "${SMOKE_TIMEOUT:-1800}" "$PY" -m accelerate.commands.launch --config_file "configs/accelerate/$cfg.yaml" \
      --num_processes "$NGPU" --main_process_port $PORT \
      "$script.py" --iterations 2 --checkpoint-every 1 --output-dir "$OUT/$name" --log-every 0 "$@" \
      > "$OUT/$name.log" 2>&1 &
    NAMES+=("$name")
  }
  t0=$SECONDS
  for cfg in "${CONFIGS[@]}"; do
    for rank in 8 0; do
      for script in flow_grpo dgpo; do
        launch "${cfg}_${script}_flux_r${rank}" "$cfg" "$script" "${PIPE[@]}" --model flux \
          --pretrained "$OUT/pipelines/flux" --lora-rank "$rank"
      done
    done
    for script in neighbor_grpo g2rpo pro_grpo; do
      launch "${cfg}_${script}_tiny-flux_r0" "$cfg" "$script" --model tiny-flux --lora-rank 0
    done
  done
  judge $t0
  # resume each config's LoRA Flow-GRPO run from its last checkpoint (accelerate's sharded / DeepSpeed state) and
  # train one more iteration on the loaded state
  t0=$SECONDS
  for cfg in "${CONFIGS[@]}"; do
    name="${cfg}_flow_grpo_flux_r8"
    [[ -d "$OUT/$name/checkpoints" ]] || continue
    mv "$OUT/$name/summary.json" "$OUT/$name/summary.first.json"
    timeout -k 10 "${SMOKE_TIMEOUT:-1800}" "$PY" -m accelerate.commands.launch --config_file "configs/accelerate/$cfg.yaml" \
      --num_processes "$NGPU" flow_grpo.py \
      --resume-from-checkpoint latest --output-dir "$OUT/$name" --iterations 3 --log-every 0 "${PIPE[@]}" \
      --model flux --pretrained "$OUT/pipelines/flux" --lora-rank 8 > "$OUT/$name.resume.log" 2>&1
    grep -q "resumed from" "$OUT/$name.resume.log" || rm -f "$OUT/$name/summary.json"  # not resumed: a failure
    cp "$OUT/$name.resume.log" "$OUT/$name.log"
    NAMES+=("$name")
  done
  echo "resumed:"
  judge $t0
else
  echo "skip part 3 (FSDP, DeepSpeed): no CUDA device"
fi
[[ $FAILED == 0 ]] && echo "all smoke runs passed" || { echo "some smoke runs FAILED"; exit 1; }
