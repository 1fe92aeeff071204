#!/usr/bin/env bash
# GPU smoke test of the shipped accelerate configs (docs/distributed.md). Run from anywhere, on one
# machine with 1–8 GPUs, in an environment with mtpo installed (`pip install -e ".[peft,deepspeed]"`):
#
#     bash scripts/gpu_smoke.sh                 # every config; ~5–10 minutes
#     CONFIGS="ddp fsdp2" bash scripts/gpu_smoke.sh
#
# Part 1 — correctness. M-DPO on the tiny example model, float32, plain SGD, a global batch of 8 pairs
# (per-device 8 / #GPUs) and 4 steps, once per config. Every config must reproduce the single-GPU run:
# the logged loss / reward margin of every step, and the saved weights (which also checks that ZeRO-3 /
# FSDP2 gather full weights into model.safetensors). This is what the CPU test-suite cannot check: that
# the LM head, which mtpo calls outside the model's forward, gets its weight gathered and its gradient
# reduced under ZeRO-3 and FSDP2 on GPUs, and that the frozen reference is prepared right (DeepSpeed
# inference engine / FSDP2-sharded). Precomputed reference log-probs (a separate reference copy is
# loaded for them under DeepSpeed/FSDP) must give the same training as a live reference.
# Part 2 — it runs. bf16 mixed precision, KTO, SFT and LoRA under the sharded configs: finite losses and
# a saved model.
#
# Exit status 0 = everything passed; the summary lists each check. Logs: $OUT/<run>.log.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-outputs/gpu-smoke}
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
CONFIGS=${CONFIGS:-"single ddp zero2 zero3 fsdp2"}
GLOBAL_BATCH=8
STEPS=4

if (( NGPU < 1 )); then echo "no GPU found (nvidia-smi -L)"; exit 1; fi
while (( GLOBAL_BATCH % NGPU )); do NGPU=$(( NGPU - 1 )); done  # 1, 2, 4 or 8 processes
PER_DEVICE=$(( GLOBAL_BATCH / NGPU ))
if ! python -c "import deepspeed" 2>/dev/null; then
    echo "deepspeed is not installed: skipping zero2 / zero3 (pip install deepspeed)"
    CONFIGS=$(echo "$CONFIGS" | tr ' ' '\n' | grep -v '^zero' | tr '\n' ' ')
fi
mkdir -p "$OUT"
echo "GPUs used: $NGPU (per-device batch $PER_DEVICE) · configs: $CONFIGS · outputs: $OUT"

EXACT=(--use_cpu=false --dtype=float32 --bf16=false --optim=sgd --learning_rate=0.5 --lr_scheduler_type=constant
       --warmup_steps=0 --max_grad_norm=1.0 --max_steps=$STEPS --logging_steps=1 --eval_strategy=no
       --save_strategy=no --seed=42 --report_to=none --disable_tqdm=true --dataloader_drop_last=true)
FAILED=()

# launch NAME CONFIG NPROC TRAINER [--key=value ...]: one accelerate run, log in $OUT/NAME.log
launch() {
    local name=$1 config=$2 nproc=$3 trainer=$4; shift 4
    local mixed=no
    if printf '%s\n' "$@" | grep -q -- '--bf16=true'; then mixed=bf16; fi
    rm -rf "${OUT:?}/$name"
    echo "--- $name: accelerate launch --config_file configs/accelerate/$config.yaml --num_processes $nproc -m mtpo $trainer"
    if ! accelerate launch --config_file "configs/accelerate/$config.yaml" --num_processes "$nproc" \
            --mixed_precision "$mixed" --main_process_port 0 \
            -m mtpo "$trainer" "examples/$trainer.yaml" --output_dir="$OUT/$name" "$@" > "$OUT/$name.log" 2>&1; then
        echo "    FAILED: tail of $OUT/$name.log"; tail -n 25 "$OUT/$name.log" | sed 's/^/    /'
        FAILED+=("$name")
    fi
}

# ------------------------------------------------------------------ part 1: every config = one GPU
for config in $CONFIGS; do
    nproc=$NGPU; per=$PER_DEVICE
    if [[ $config == single ]]; then nproc=1; per=$GLOBAL_BATCH; fi
    launch "dpo-$config" "$config" "$nproc" dpo "${EXACT[@]}" --per_device_train_batch_size=$per
done
for config in $CONFIGS; do
    [[ $config == zero3 || $config == fsdp2 || $config == ddp ]] || continue
    launch "dpo-$config-precompute" "$config" "$NGPU" dpo "${EXACT[@]}" --per_device_train_batch_size=$PER_DEVICE \
        --per_device_eval_batch_size=$PER_DEVICE --precompute_ref_log_probs=true
done

# ------------------------------------------------------------------ part 2: it runs
RUNS=(--use_cpu=false --max_steps=3 --logging_steps=1 --eval_strategy=no --save_strategy=no --report_to=none
      --disable_tqdm=true --per_device_train_batch_size=$PER_DEVICE)
for config in $CONFIGS; do
    [[ $config == single ]] && continue
    launch "dpo-$config-bf16" "$config" "$NGPU" dpo "${RUNS[@]}" --dtype=bfloat16 --bf16=true
    launch "kto-$config" "$config" "$NGPU" kto "${RUNS[@]}"
    launch "sft-$config" "$config" "$NGPU" sft "${RUNS[@]}"
done
[[ " $CONFIGS " == *" ddp "* ]] && launch "dpo-ddp-lora" ddp "$NGPU" dpo "${RUNS[@]}" --use_peft=true --lora_r=8

# ------------------------------------------------------------------ compare
OUT="$OUT" CONFIGS="$CONFIGS" python - <<'EOF'
import json, math, os, sys
from safetensors.torch import load_file

out, configs = os.environ["OUT"], os.environ["CONFIGS"].split()
problems, passed = [], []

def logs(run):
    path = os.path.join(out, run, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    return [r for r in map(json.loads, open(path)) if "loss" in r and "train_loss" not in r]

def weights(run):
    path = os.path.join(out, run, "model.safetensors")
    return load_file(path) if os.path.isfile(path) else None

def close(a, b, rel, abs_):
    return abs(a - b) <= abs_ + rel * abs(b)

start = load_file("examples/tiny-model/model.safetensors")
base_name = "dpo-single" if "single" in configs else "dpo-ddp"
base_logs, base_w = logs(base_name), weights(base_name)
if base_logs is None or base_w is None:
    problems.append(f"{base_name}: no metrics.jsonl / model.safetensors — cannot compare")
else:
    moved = math.sqrt(sum(float((base_w[k] - start[k]).double().pow(2).sum()) for k in base_w))
    for run in sorted(d for d in os.listdir(out) if d.startswith("dpo-") and os.path.isdir(os.path.join(out, d))):
        if run == base_name or run.endswith(("-bf16", "-lora")):
            continue
        got_logs, got_w = logs(run), weights(run)
        if got_logs is None or got_w is None:
            problems.append(f"{run}: missing metrics.jsonl or model.safetensors"); continue
        bad = [(i + 1, k, g[k], b[k]) for i, (g, b) in enumerate(zip(got_logs, base_logs))
               for k in ("loss", "rewards/margins") if not close(g[k], b[k], 1e-3, 1e-4)]
        if len(got_logs) != len(base_logs) or bad:
            problems.append(f"{run}: logged values differ from {base_name} (step, key, got, expected): {bad[:4]}")
        if got_w.keys() != base_w.keys() or any(got_w[k].shape != base_w[k].shape for k in base_w):
            problems.append(f"{run}: saved weights have other names/shapes than {base_name} (not gathered?)"); continue
        diff = math.sqrt(sum(float((got_w[k].double() - base_w[k].double()).pow(2).sum()) for k in base_w))
        if diff > 1e-3 * moved:
            problems.append(f"{run}: final weights differ from {base_name}: |Δ| = {diff:.3g} vs update {moved:.3g}")
        else:
            passed.append(f"{run} = {base_name} (loss/margins per step, weights |Δ|/|update| = {diff / moved:.1e})")

for run in sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))):
    if run.startswith("dpo-") and not run.endswith(("-bf16", "-lora")):
        continue
    got = logs(run)
    if not got or not all(math.isfinite(r["loss"]) for r in got):
        problems.append(f"{run}: no finite training loss logged")
    elif not any(os.path.isfile(os.path.join(out, run, f)) for f in ("model.safetensors", "adapter_model.safetensors")):
        problems.append(f"{run}: nothing saved")
    else:
        passed.append(f"{run}: ran, loss {got[0]['loss']:.4f} → {got[-1]['loss']:.4f}, saved")

print("\n".join(["", "PASSED:"] + ["  " + p for p in passed] + (["FAILED:"] + ["  " + p for p in problems] if problems else [])))
sys.exit(1 if problems else 0)
EOF
status=$?
if (( ${#FAILED[@]} )); then echo "launch failures: ${FAILED[*]}"; exit 1; fi
exit $status
