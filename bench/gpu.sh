#!/usr/bin/env bash
# Everything multilora does on the GPU machine, in one device call (see README, "GPU"). Each step's
# timeout is a bound, not its length: check micro bench mlbench took ~110 s on the H200, peer ~90 s.
#   bench/gpu.sh [check] [micro] [bench] [sweep] [ab] [abbuild] [profile] [mlbench] [peer] [prefill]
#                [prefill-profile] [attention] [decode-attention] [itl]
#   default: check micro bench mlbench peer
# Expects the binaries built here in $BIN (default .gpubin): cuda_models, cuda_kernels, cuda_lora,
# cuda_sampling, chunked_prefill (the engine's test targets of those names), peft_check, gpu_bench,
# multilora.
# Writes logs and results under $OUT.
set -uo pipefail
BIN=${BIN:-.gpubin}
OUT=${OUT:-/tmp/multilora-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
export MULTILORA_CACHE_DIR=${MULTILORA_CACHE_DIR:-/tmp/multilora-cache}
WORK=${WORK:-/tmp/multilora-work}
mkdir -p "$WORK"
steps=${*:-check micro bench mlbench peer}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"

for s in $steps; do case $s in
check)
  # One test binary per crates/engine/tests/cuda_*.rs; CHECK_TIMEOUT bounds each.
  : > "$OUT/check.log"
  for t in cuda_models cuda_kernels cuda_lora cuda_sampling; do
    echo "== $t (crates/engine/tests/$t.rs)"
    [ -x "$BIN/$t" ] || { echo "check: no $BIN/$t (README, GPU: build and copy every cuda_* test binary)" | tee -a "$OUT/check.log"; continue; }
    timeout ${CHECK_TIMEOUT:-480} "$BIN/$t" --test-threads=1 --nocapture 2>&1 | tee -a "$OUT/check.log" | grep -E "request|test |result|panicked" | tail -60
  done
  # Chunked prefill on the device (tests/chunked_prefill.rs; its CPU tests run again here too).
  [ -x "$BIN/chunked_prefill" ] && timeout 240 "$BIN/chunked_prefill" --test-threads=1 2>&1 | tee -a "$OUT/check.log" | grep -E "test |result|panicked"
  [ "${CHECK_PEFT:-1}" = 1 ] || continue
  echo "== greedy tokens vs transformers+PEFT on this GPU (mixed-adapter batch)"
  python3 scripts/gpu_check_peft.py make "$WORK/peft" > "$OUT/peft.log" 2>&1 || tail -20 "$OUT/peft.log"
  "$BIN/peft_check" "$WORK/peft/requests.json" "$WORK/peft/ours.json" 2>&1 | tee -a "$OUT/peft.log"
  python3 scripts/gpu_check_peft.py compare "$WORK/peft" 2>&1 | tee -a "$OUT/peft.log"
  ;;
micro)
  echo "== skinny GEMM vs cuBLAS over the 7B projections, by token count"
  "$BIN/gpu_bench" bench/llama-2-7b "$WORK/adapters" /dev/null --micro 2>&1 | tee "$OUT/micro.log"
  ;;
bench)
  echo "== multilora on Llama-2-7B shape (dummy bf16), 32 rank-16 adapters on q,k,v,o"
  timeout 300 "$BIN/gpu_bench" bench/llama-2-7b "$WORK/adapters" "$OUT/bench.jsonl" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  echo "== the same, eager (no CUDA graphs), batch 1 and 32"
  "$BIN/gpu_bench" bench/llama-2-7b "$WORK/adapters" "$WORK/bench_eager.jsonl" --eager --batch-sizes 1,32 2>&1 | tee "$OUT/bench_eager.log"
  ;;
sweep)
  for g in ${SWEEP:-0 1 32}; do
    echo "== skinny GEMM up to $g tokens (cuBLAS above)"
    MULTILORA_SKINNY_MAX_M=$g "$BIN/gpu_bench" bench/llama-2-7b "$WORK/adapters" "$OUT/sweep_$g.jsonl" --batch-sizes ${SWEEP_BATCHES:-1,8,16,32} --series no-lora,distinct 2>&1 | grep -E "no-lora|distinct"
  done 2>&1 | tee "$OUT/sweep.log"
  ;;
ab)
  # A/B of a switch against the bench step, e.g. AB_ENV=MULTILORA_PDL=0 or MULTILORA_SKINNY_MAX_M=1
  echo "== with ${AB_ENV:=MULTILORA_PDL=0}, to compare with bench"
  env $AB_ENV timeout 300 "$BIN/gpu_bench" bench/llama-2-7b "$WORK/adapters" "$WORK/ab.jsonl" \
    --batch-sizes ${AB_BATCHES:-1,8,32} --series no-lora,distinct 2>&1 | tee "$OUT/ab.log" | grep -E "no-lora|distinct"
  ;;
abbuild)
  # Two builds in one call (lent machines differ by up to a few %): BIN_B=dir holds the other
  # build's gpu_bench; both run alternately, AB_ROUNDS times each. AB_ARGS adds gpu_bench flags
  # (e.g. "--prompt-len 2048 --num-tokens 2" for long prefill), AB_MODEL picks the shape.
  [ -x "${BIN_B:-}/gpu_bench" ] || { echo "abbuild: BIN_B=${BIN_B:-} holds no gpu_bench: set it to the other build's directory"; continue; }
  for r in $(seq ${AB_ROUNDS:-2}); do
    for b in "$BIN" "$BIN_B"; do
      echo "== $b/gpu_bench, round $r"
      timeout 300 "$b/gpu_bench" ${AB_MODEL:-bench/llama-2-7b} "$WORK/adapters" /dev/null \
        --batch-sizes ${AB_BATCHES:-1,8,32} --series no-lora,distinct ${AB_ARGS:-} 2>&1 || echo "$b/gpu_bench failed (status $?)"
    done
  done 2>&1 | tee "$OUT/abbuild.log" | grep -E "^==|no-lora|distinct|rror|panic|failed"
  ;;
profile)
  echo "== per-kernel times of one eager decode step (ncu), no-LoRA and distinct, batch 1 and 32"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  [ -n "$NCU" ] || { echo "profile: ncu (Nsight Compute) not found on PATH or in /opt/nvidia/nsight-compute"; continue; }
  timeout 240 "$NCU" --profile-from-start off --clock-control none --cache-control none --metrics gpu__time_duration.sum \
    --csv --print-units base "$BIN/gpu_bench" bench/llama-2-7b "$WORK/adapters" /dev/null --eager \
    --batch-sizes 1,32 --series no-lora,distinct --num-tokens 3 --profile > "$OUT/profile.csv" 2> "$OUT/profile.err"
  python3 bench/profile_summary.py "$OUT/profile.csv" no-lora-1,distinct-1,no-lora-32,distinct-32 3 | tee "$OUT/profile.log"
  ;;
attention)
  echo "== prefill attention variants alone, on each shape's heads"
  for m in ${PREFILL_SHAPES:-bench/llama-2-7b bench/llama-3-8b bench/qwen2-7b}; do
    timeout 120 "$BIN/gpu_bench" "$m" "$WORK/adapters" /dev/null --attention 2>&1 | grep -E "^attention|rror|panic" | sed "s|^|$(basename $m) |"
  done | tee "$OUT/attention.log"
  ;;
decode-attention)
  # Decode attention alone by batch and context: the decode kernel vs the tensor-core prefill
  # kernel with split context (GQA-packed tiles), in % of copy bandwidth.
  echo "== decode attention: decode kernel vs prefill kernel, by batch x context"
  for m in ${PREFILL_SHAPES:-bench/llama-2-7b bench/llama-3-8b bench/qwen2-7b}; do
    timeout 120 "$BIN/gpu_bench" "$m" "$WORK/adapters" /dev/null --decode-attention 2>&1 | grep -E "^decode-attention|rror|panic" | sed "s|^|$(basename $m) |"
  done | tee "$OUT/decode_attention.log"
  ;;
itl)
  # Chunked prefill: 16 streams decode while an 8,000-token prompt arrives, at several
  # max_num_batched_tokens (the largest: no chunking); ITL_ARGS adds gpu_bench flags, e.g.
  # "--long-prefill-token-threshold 128".
  echo "== inter-token latency of 16 streams while an 8k prompt arrives (Llama-2-7B)"
  for mbt in ${ITL_BUDGETS:-16384 2048 512 256}; do
    timeout 120 "$BIN/gpu_bench" bench/llama-2-7b "$WORK/adapters" /dev/null --batch-sizes 16 --prompt-len 128 \
      --itl 8000 --max-num-batched-tokens "$mbt" ${ITL_ARGS:-} 2>&1 | grep -E "^itl|rror|panic"
  done | tee "$OUT/itl.log"
  ;;
prefill-profile)
  echo "== per-kernel times of one prefill step (ncu): Llama-2-7B, 32 x 128 and 4 x 2048 tokens, no-LoRA and distinct"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  [ -n "$NCU" ] || { echo "prefill-profile: ncu (Nsight Compute) not found"; continue; }
  for bp in "32 128" "4 2048"; do set -- $bp
    timeout 240 "$NCU" --profile-from-start off --clock-control none --cache-control none --metrics gpu__time_duration.sum \
      --csv --print-units base "$BIN/gpu_bench" bench/llama-2-7b "$WORK/adapters-pp-$1" /dev/null --eager \
      --batch-sizes "$1" --prompt-len "$2" --num-adapters "$1" --series no-lora,distinct --num-tokens 2 --profile \
      > "$WORK/pprofile-$1.csv" 2> "$WORK/pprofile-$1.err" || tail -5 "$WORK/pprofile-$1.err"
    python3 bench/profile_summary.py "$WORK/pprofile-$1.csv" "no-lora-$1x$2,distinct-$1x$2" 2 first
  done 2>&1 | tee "$OUT/prefill-profile.log"
  ;;
mlbench)
  echo "== multilora bench multi-lora on the Llama-2-7B dummy example (32 output tokens)"
  "$BIN/multilora" adapters synth --model config/examples/llama2-7b-dummy/model --out demo/llama2-7b-adapters \
    --num 32 --rank 16 --target-modules q_proj,k_proj,v_proj,o_proj --prefix llama2-7b-r16 \
    --adapters-json config/examples/llama2-7b-dummy/adapters.json > "$OUT/mlbench.log" 2>&1
  "$BIN/multilora" bench multi-lora --config config/examples/llama2-7b-dummy/common.json --num-tokens 32 \
    --report-dir "$WORK/reports" 2>&1 | tee -a "$OUT/mlbench.log" | tail -40
  cp "$(ls -d "$WORK"/reports/*/ | tail -1)summary.csv" "$OUT/mlbench_summary.csv" 2>/dev/null
  ;;
prefill)
  # Prefill of B prompts x P tokens (one step) on each shape, no-LoRA and with distinct adapters
  # (rank 16 on q,k,v,o; with PREFILL_LORA=1, or =<shape> for one shape, also rank 16 on all
  # seven and rank 64 on q,k,v,o),
  # beside transformers SDPA and the compute floor measured in this call (bench/prefill_peer.py).
  echo "== prefill: multilora vs transformers SDPA vs the compute floor"
  shapes=${PREFILL_SHAPES:-bench/llama-2-7b bench/llama-3-8b bench/qwen2-7b}
  for m in $shapes; do
    n=$(basename "$m")
    pb() { timeout 300 "$BIN/gpu_bench" "$m" "$WORK/adapters-$n-$1-$2" "$WORK/prefill-$n.jsonl.part" --num-tokens 2 \
      --rank "$1" --targets "$2" "${@:3}" >> "$OUT/prefill.log" 2>&1 && cat "$WORK/prefill-$n.jsonl.part" >> "$WORK/prefill-ours.jsonl"; }
    pb 16 qkvo --prompt-len 128 --batch-sizes 1,32 --series no-lora,distinct --num-adapters 32
    pb 16 qkvo --prompt-len 2048 --batch-sizes 4 --series no-lora,distinct --num-adapters 4
    pb 16 qkvo --prompt-len 4096 --batch-sizes 1 --series no-lora --num-adapters 1
    [ "$n" = llama-2-7b ] || pb 16 qkvo --prompt-len 32768 --batch-sizes 1 --series no-lora --num-adapters 1
    if [ "${PREFILL_LORA:-0}" = 1 ] || [ "${PREFILL_LORA:-0}" = "$n" ]; then
      pb 16 all --prompt-len 128 --batch-sizes 32 --series distinct --num-adapters 32
      pb 16 all --prompt-len 2048 --batch-sizes 4 --series distinct --num-adapters 4
      pb 64 qkvo --prompt-len 128 --batch-sizes 32 --series distinct --num-adapters 32
      pb 64 qkvo --prompt-len 2048 --batch-sizes 4 --series distinct --num-adapters 4
    fi
  done
  grep -E "panicked|rror" "$OUT/prefill.log" | head -5
  [ "${PREFILL_PEER:-1}" = 1 ] && python3 bench/prefill_peer.py peer "$OUT/prefill-peer.jsonl" $shapes > "$OUT/prefill-peer.log" 2>&1
  python3 bench/prefill_peer.py table "$OUT/prefill-peer.jsonl" "$WORK/prefill-ours.jsonl" | tee "$OUT/prefill-table.txt"
  cp "$WORK/prefill-ours.jsonl" "$OUT/prefill-ours.jsonl"
  ;;
peer)
  echo "== peer: HF transformers + PEFT, same shapes"
  python3 bench/hf_peer.py "$OUT/peer.jsonl" 2>&1 | tee "$OUT/peer.log"
  ;;
esac; done
