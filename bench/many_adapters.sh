#!/usr/bin/env bash
# Issue 13's measurement: serving many adapters. Synthesizes N adapters, starts `multilora serve`
# with all of them, and runs `multilora bench serving` over 8 adapters, N uniform and N power-law
# (Poisson arrivals), then prints one row per run: the table of issue 13 / BENCHMARKS.md.
#
#   bench/many_adapters.sh                     # GPU defaults: Llama-2-7B shape, dummy weights
#   N=1000 MAX_LORAS=128 MAX_CPU_LORAS=512 bench/many_adapters.sh
#   bench/many_adapters.sh cpu                 # a short CPU run on the demo model (a smoke test)
#
# Settings (environment): N, MAX_LORAS, MAX_CPU_LORAS, MAX_NUM_SEQS, RANK, TARGETS, RATE (req/s),
# DURATION (s), NUM_TOKENS (output tokens a request), MODEL, DEVICE, LOAD_FORMAT, MAX_MODEL_LEN,
# SCENARIOS ("8:uniform N:uniform N:power-law" by default), PORT, BIN (where `multilora` is),
# WORK (scratch: adapters, reports), OUT (results). A run's JSON summaries, the server log and
# the server's /metrics after each scenario land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = cpu ]; then
  # The demo model (`multilora demo`) and a few hundred tiny adapters; minutes on two cores.
  : "${N:=300}" "${MAX_LORAS:=8}" "${MAX_CPU_LORAS:=32}" "${MAX_NUM_SEQS:=16}" "${RANK:=8}"
  : "${RATE:=4}" "${DURATION:=15}" "${NUM_TOKENS:=16}" "${DEVICE:=cpu}" "${LOAD_FORMAT:=auto}"
  : "${MAX_MODEL_LEN:=256}" "${WORK:=/tmp/multilora-many-cpu}"
  : "${MODEL:=$WORK/demo/model}"
  "${BIN:-target/release}/multilora" demo --dir "$WORK/demo" > /dev/null
fi
BIN=${BIN:-target/release}
N=${N:-1000}
MAX_LORAS=${MAX_LORAS:-128}
MAX_CPU_LORAS=${MAX_CPU_LORAS:-512}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-256}
RANK=${RANK:-8}
TARGETS=${TARGETS:-q_proj,v_proj}
RATE=${RATE:-24}
DURATION=${DURATION:-40}
NUM_TOKENS=${NUM_TOKENS:-128}
MODEL=${MODEL:-config/examples/llama2-7b-dummy/model}
DEVICE=${DEVICE:-cuda}
LOAD_FORMAT=${LOAD_FORMAT:-dummy}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-1024}
PORT=${PORT:-8013}
WORK=${WORK:-/tmp/multilora-many}
OUT=${OUT:-$WORK/out}
SCENARIOS=${SCENARIOS:-"8:uniform $N:uniform $N:power-law"}
mkdir -p "$WORK" "$OUT"

# `serve` needs a tokenizer: a config-only dummy model gets the demo's (its ids are below any
# real vocabulary size), in a copy under $WORK.
if [ ! -f "$MODEL/tokenizer.json" ]; then
  "$BIN/multilora" demo --dir "$WORK/demo" > /dev/null
  mkdir -p "$WORK/model" && cp "$MODEL/config.json" "$WORK/model/" && cp "$WORK/demo/model/"tokenizer*.json "$WORK/model/"
  MODEL="$WORK/model"
fi

adapters="$WORK/adapters-r$RANK-$N"
echo "== $N rank-$RANK adapters on $TARGETS in $adapters"
"$BIN/multilora" adapters synth --model "$MODEL" --out "$adapters" --num "$N" --rank "$RANK" \
  --target-modules "$TARGETS" --prefix many > "$OUT/synth.log"
modules=()
for d in "$adapters"/many-*/; do
  modules+=("$(basename "$d")=$d")
done

tag="n$N-loras$MAX_LORAS-cpu$MAX_CPU_LORAS"
echo "== serve: max_loras $MAX_LORAS, max_cpu_loras $MAX_CPU_LORAS, $DEVICE"
"$BIN/multilora" serve "$MODEL" --served-model-name base --device "$DEVICE" --load-format "$LOAD_FORMAT" \
  --max-loras "$MAX_LORAS" --max-cpu-loras "$MAX_CPU_LORAS" --max-lora-rank "$RANK" \
  --max-num-seqs "$MAX_NUM_SEQS" --max-model-len "$MAX_MODEL_LEN" --port "$PORT" \
  --max-waiting-requests 100000 --lora-modules "${modules[@]}" > "$OUT/serve-$tag.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && break
  kill -0 $server 2>/dev/null || { echo "the server exited:"; tail -20 "$OUT/serve-$tag.log"; exit 1; }
  sleep 1
done

for sc in $SCENARIOS; do
  k=${sc%%:*} pop=${sc#*:}
  echo "== bench serving: $k adapters, $pop, $RATE req/s for $DURATION s, $NUM_TOKENS tokens"
  "$BIN/multilora" bench serving --base-url "http://127.0.0.1:$PORT/v1" --model base \
    --num-adapters "$k" --adapter-popularity "$pop" --request-rate "$RATE" --duration "$DURATION" \
    --num-tokens "$NUM_TOKENS" --report-dir "$WORK/reports" --json > "$OUT/serving-$tag-$k-$pop.json" \
    || echo "(bench serving failed or had failed requests; see the JSON)"
  curl -sf "http://127.0.0.1:$PORT/metrics" > "$OUT/metrics-$tag-$k-$pop.txt" || true
done

python3 - "$OUT" "$tag" "$RATE" $SCENARIOS <<'EOF'
import json, sys
out, tag, rate, scenarios = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
print(f"{tag}, offered {rate:g} req/s\n")
print("| adapters in the load | output tok/s | req/s | e2e p50 / p99 | ITL p99 | adapter loads (p50 / p99) | adapter wait p50 / p99 | failed |")
print("|---|---|---|---|---|---|---|---|")
# (scenario, throughput, e2e p50, ITL p99) of each run, for the ratios to the first below.
ratios = []
for sc in scenarios:
    k, pop = sc.split(":")
    try:
        s = json.load(open(f"{out}/serving-{tag}-{k}-{pop}.json"))["summary"]
    except (OSError, ValueError, KeyError) as e:
        print(f"| {k}, {pop} | no result ({e}) | | | | | | |")
        continue
    e2e, itl = s.get("e2e_ms") or {}, s.get("itl_ms") or {}
    m = s.get("server_adapter_metrics")
    def p50_p99(h, unit=" ms"):
        return f"{h['p50']:.1f} / {h['p99']:.1f}{unit}" if h else "none"
    if m:
        loads = f"{m['num_loads']} ({p50_p99(m['load_time_ms'])})"
        wait = p50_p99(m["adapter_wait_ms"])
    else:
        loads = wait = "not reported by server"
    print(f"| {k}, {pop} | {s['output_token_throughput']:,.0f} | {s['request_throughput']:.1f} "
          f"| {e2e.get('p50', 0) / 1e3:.2f} s / {e2e.get('p99', 0) / 1e3:.2f} s | {itl.get('p99', 0):.1f} ms "
          f"| {loads} | {wait} | {s['num_failed']} / {s['num_requests']} |")
    ratios.append((f"{k}, {pop}", s["output_token_throughput"], e2e.get("p50", 0), itl.get("p99", 0)))
base = ratios[0] if ratios else None
if len(ratios) > 1 and all(base[1:]):
    print(f"\nAgainst {base[0]} (issue 13's targets: uniform >= 95% / <= 1.2x / <= 1.5x; power-law within 5% on all three):")
    for name, tput, e2e50, itl99 in ratios[1:]:
        print(f"- {name}: throughput {100 * tput / base[1]:.1f}%, e2e p50 {e2e50 / base[2]:.2f}x, ITL p99 {itl99 / base[3]:.2f}x")
EOF
