#!/usr/bin/env bash
# Smoke run of all five scripts in bf16 on the tiny FLUX (random weights: the FLUX.1-dev code path), two
# iterations each with a checkpoint after each; then --model flux and --model sd3 (the real loading path, with
# CFG for SD3) on tiny random pipelines written to OUT_DIR/pipelines, with LoRA and with full fine-tuning. Meant for a CUDA machine; on a CPU it runs the same commands
# with CPU bf16 autocast. Prints the device and one line per run; exits non-zero on the first failure.
#   bash scripts/gpu_smoke.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_smoke}
mkdir -p "$OUT"
python - <<'PY'
import torch
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA)",
      "| torch", torch.__version__, "| bf16 supported:", torch.cuda.is_bf16_supported() if torch.cuda.is_available() else "cpu autocast")
PY
run() {  # name, script, flags...
  local name=$1 script=$2; shift 2
  local t0=$SECONDS
  python "$script" --mixed-precision bf16 --iterations 2 --checkpoint-every 1 --output-dir "$OUT/$name" \
    --log-every 0 "$@" > "$OUT/$name.log" 2>&1 || { echo "FAILED $name (log: $OUT/$name.log)"; tail -20 "$OUT/$name.log"; exit 1; }
  python -c "import json,sys; s=json.load(open('$OUT/$name/summary.json')); print(f\"ok  {'$name':28s} reward {s['eval_reward_before']:.3f} -> {s['eval_reward_after']:.3f}  nfe {s['nfe_rollout']}/{s['nfe_train']}  $((SECONDS - t0)) s\")"
}
for script in flow_grpo dgpo neighbor_grpo g2rpo pro_grpo; do
  run "${script}_tiny-flux" "$script.py" --model tiny-flux
done
python - "$OUT" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from tiny_pipelines import save_tiny_flux_pipeline, save_tiny_sd3_pipeline
out = Path(sys.argv[1]) / "pipelines"
save_tiny_flux_pipeline(out / "flux")
save_tiny_sd3_pipeline(out / "sd3")
(out / "prompts.txt").write_text("a photo of red\na photo of green\na photo of cyan\n")
PY
for model in flux sd3; do
  for rank in 8 0; do
    for script in flow_grpo dgpo; do
      run "${script}_${model}_r${rank}" "$script.py" --preset tiny-flux --model "$model" \
        --pretrained "$OUT/pipelines/$model" --train-prompts "$OUT/pipelines/prompts.txt" --reward mean_color \
        --max-sequence-length 16 --lora-rank "$rank"
    done
  done
done
echo "all smoke runs passed"
