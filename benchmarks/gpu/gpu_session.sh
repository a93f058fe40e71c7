#!/usr/bin/env bash
# Every open GPU measurement, prepared for one short device session (issues 10 and 11).
#
#   bash benchmarks/gpu/gpu_session.sh memory    # <= 9 min on an H200: issue 11's GPU rows
#   bash benchmarks/gpu/gpu_session.sh quality   # ~5 min: issue 10's LLaMA-60M run (needs the token file)
#   bash benchmarks/gpu/gpu_session.sh precision # ~6 min: issue 22's 16-mixed compressed run (3 seeds) and SDPA's kept outputs
#   bash benchmarks/gpu/gpu_session.sh start     # ~4 min: issue 22's LLaMA-7B start from meta against a host build
#   bash benchmarks/gpu/gpu_session.sh host      # ~2 min: issue 22's Lightning host cost at 1 x 8 tokens, on the GPU
#
# From the development machine, through the device tool (results come back under $OUT):
#   run(command="bash benchmarks/gpu/gpu_session.sh memory", timeout_s=540)
#   python benchmarks/gpu/gpu_quality.py prepare --out benchmarks/data/kjv_wordpiece.pt   # here, first
#   run(command="bash benchmarks/gpu/gpu_session.sh quality", carry=["benchmarks/data"], timeout_s=540)
#
# Each step has its own time limit, so a slow one costs its share and the rest still
# run; every step's log and JSON land in $OUT. Needs only torch, lightning and this
# package (the device machine has no `datasets` or `jsonargparse`).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep the log, print its tail
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "rc=$? for $name"
    tail -n 30 "$OUT/$name.log"
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, lightning; print(torch.__version__, lightning.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"

case "${1:-memory}" in
memory)
    # Step time and peak of every method at the target shape (350M, 32 x 256,
    # bf16-mixed): lean, lean + CompAct, + blocks:0.5 / blocks, checkpointing, liger if installed.
    step compare_350m_32 220 python benchmarks/cpu/compare_methods.py --config recipes/pretrain/llama_350m_c4.yaml \
        --device cuda --batch-size 32 --precision bf16-mixed --steps 5 --out "$OUT/compare_350m_32.json"
    # The lean and checkpointing estimates against max_memory_allocated.
    step validate_lean 200 python benchmarks/gpu/gpu_validate_estimator.py --recipes recipes/pretrain/llama_350m_c4_lean.yaml \
        --batch-size 32 --accumulate 16 --variants lean --out "$OUT/validate_lean.json"
    # The planner's 1B pick at 40 GiB (RESULTS §9): the baseline at 16 x 32 accumulated, estimated 34.26 GiB.
    step validate_plan_1b 110 python benchmarks/gpu/gpu_validate_estimator.py --recipes recipes/pretrain/llama_1b_c4.yaml \
        --batch-size 16 --accumulate 32 --variants recipe --no-compact --out "$OUT/validate_plan_1b.json"
    ;;
quality)
    # LLaMA-60M, WordPiece-tokenized KJV, 2 seeds x 2,000 steps, baseline vs CompAct n/4 (paper: +1.0% ppl).
    step gpu_quality 480 python benchmarks/gpu/gpu_quality.py train --tokens benchmarks/data/kjv_wordpiece.pt \
        --out "$OUT/gpu_quality.json" --plot "$OUT/gpu_quality.png" --time-limit 400
    ;;
precision)
    # Issue 22: 16-mixed + GradScaler in compressed mode against bf16-mixed (loss curves, a forced overflow
    # step), and which attention outputs SDPA keeps on CUDA (o_proj, GPT-2's c_proj with and without dropout).
    step gpu_precision 420 python benchmarks/gpu/gpu_precision.py --steps 300 --seeds 3 --out "$OUT/gpu_precision.json"
    ;;
start)
    # Issue 22: LLaMA-7B with CompAct n/4 built on meta and materialized on the GPU against a build in host
    # memory: seconds to the first step, host peak RSS growth, max_memory_allocated.
    step gpu_meta_init 420 python benchmarks/gpu/gpu_meta_init.py --out "$OUT/gpu_meta_init.json"
    ;;
host)
    # Issue 22: the tiny 24-block shape through the Trainer on the GPU (CPU: 1.19x in both modes, RESULTS).
    step lightning_overhead 240 python benchmarks/cpu/lightning_overhead.py --accelerator gpu --rounds 5 --steps 60 \
        --out "$OUT/lightning_overhead_gpu.json"
    ;;
speed)
    # Eager and fullgraph-compiled tokens/s, the orthogonal projection's QR included.
    step gpu_speed 480 python benchmarks/gpu/gpu_speed.py --out "$OUT/gpu_speed.json"
    ;;
*)
    echo "usage: $0 memory|quality|speed|precision|start|host" >&2
    exit 2
    ;;
esac
