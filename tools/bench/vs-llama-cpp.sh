#!/usr/bin/env bash
# Hayate against llama.cpp on this machine, in one run, interleaved.
#
#   tools/bench/vs-llama-cpp.sh [--shape qwen3-0.6b | --model DIR] [--threads 2] [--reps 5]
#                               [-p 512] [-n 128] [-d 0] [--rounds 3] [--formats "bf16 q8 q4"]
#                               [--work DIR] [--hayate PATH]
#
# Everything of llama.cpp is fetched and built under --work (default
# target/vs-llama-cpp, which git ignores); nothing of it is committed:
#   1. the `llama-cpp-python` 0.3.36 source package from PyPI (its
#      vendor/llama.cpp), checked against its sha256;
#   2. llama-bench and llama-quantize, built natively (cmake from PyPI);
#   3. the speed model (tools/speedmodels) converted with llama.cpp's own
#      convert_hf_to_gguf.py (torch and transformers from PyPI, pinned), then
#      quantized to Q8_0, Q4_K_M and Q4_0, and to Hayate's q8 and q4;
#      `--model DIR` takes a Hugging Face checkpoint (e.g.
#      ../shared/models/pystd-qwen3-7m) instead of a speed model.
# Then, --rounds times, each format's pair of benches (llama-bench, then
# `hayate bench` on the matching Hayate format, order alternating by round):
#   bf16 - bf16;  q8 (G32, q8 embeddings) - Q8_0;  q4 (G32, q8 embeddings) - Q4_K_M and
#   Q4_0 (llama.cpp's files quantize the embeddings and output head too).
# Prints one table of medians with the ratios Hayate / llama.cpp, and
# writes every run to --work/results.jsonl.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SHAPE=qwen3-0.6b
THREADS=2
REPS=5
PROMPT=512
GEN=128
DEPTH=0
ROUNDS=3
FORMATS="bf16 q8 q4"
WORK="$ROOT/target/vs-llama-cpp"
HAYATE="$ROOT/target/release/hayate"
MODEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --shape) SHAPE=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    -p) PROMPT=$2; shift 2 ;;
    -n) GEN=$2; shift 2 ;;
    -d) DEPTH=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --formats) FORMATS=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --hayate) HAYATE=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 1 ;;
  esac
done

# shellcheck source=tools/bench/llama-cpp-env.sh
. "$ROOT/tools/bench/llama-cpp-env.sh"
llama_cpp_build llama-bench llama-quantize

# --- The model, both ways ----------------------------------------------------
MODELS="$ROOT/models"
if [ -n "$MODEL" ]; then
  [ -f "$MODEL/config.json" ] || { echo "error: $MODEL/config.json not found" >&2; exit 1; }
  HF=$(cd "$MODEL" && pwd)
  SHAPE=$(basename "$HF")
  QUANTIZED="$MODELS/$SHAPE"
else
  HF="$MODELS/$SHAPE-speed"
  QUANTIZED="$MODELS/$SHAPE-speed"
fi
if [ ! -f "$HF/config.json" ]; then
  log "writing the speed model $HF"
  SPEEDVENV="$WORK/speedvenv"
  [ -x "$SPEEDVENV/bin/python" ] || { python3 -m venv "$SPEEDVENV" &&
    "$SPEEDVENV/bin/pip" install -q -r "$ROOT/tools/speedmodels/requirements.txt"; }
  "$SPEEDVENV/bin/python" "$ROOT/tools/speedmodels/make_speed_model.py" --shape "$SHAPE" --out "$HF"
fi
GGUF="$WORK/gguf/$SHAPE"
mkdir -p "$GGUF"
llama_cpp_convert "$HF" "$GGUF/bf16.gguf"
for q in Q8_0 Q4_K_M Q4_0; do
  [ -f "$GGUF/$q.gguf" ] || "$BUILD/bin/llama-quantize" "$GGUF/bf16.gguf" "$GGUF/$q.gguf" "$q" \
    "$THREADS" > "$WORK/quantize-$q.log" 2>&1
done
[ -x "$HAYATE" ] || { echo "error: $HAYATE not found; run cargo build --release" >&2; exit 1; }
for f in q8 q4; do
  out="$QUANTIZED-$f-q8emb"
  [ -f "$out/config.json" ] && continue
  "$HAYATE" quantize --model "$HF" --out "$out" --format "$f" --embeddings q8 > /dev/null
done

# --- The benches, interleaved ------------------------------------------------
RESULTS="$WORK/results.jsonl"
: > "$RESULTS"
run_llama() { # name gguf
  local out
  out=$("$BUILD/bin/llama-bench" -m "$2" -t "$THREADS" -p "$PROMPT" -n "$GEN" -d "$DEPTH" -r "$REPS" -o json 2>/dev/null) ||
    { echo "error: llama-bench failed on $2 (exit $?)" >&2; exit 1; }
  echo "$out" |
    "$VENV/bin/python" -c "
import json, sys
for r in json.load(sys.stdin):
    test = 'pp' if r['n_prompt'] else 'tg'
    print(json.dumps({'side': 'llama.cpp', 'format': '$1', 'test': test, 'tok_s': r['avg_ts']}))" >> "$RESULTS"
}
run_hayate() { # name dir
  "$HAYATE" bench --model "$2" --threads "$THREADS" -p "$PROMPT" -n "$GEN" -d "$DEPTH" -r "$REPS" --json |
    "$VENV/bin/python" -c "
import json, sys
for r in json.load(sys.stdin)['results']:
    print(json.dumps({'side': 'hayate', 'format': '$1', 'test': r['test'][:2], 'tok_s': r['mean_tok_s']}))" >> "$RESULTS"
}
for round in $(seq "$ROUNDS"); do
  for f in $FORMATS; do
    case $f in
      bf16) pairs=("bf16:$GGUF/bf16.gguf") ; dir="$HF" ;;
      q8) pairs=("Q8_0:$GGUF/Q8_0.gguf") ; dir="$QUANTIZED-q8-q8emb" ;;
      q4) pairs=("Q4_K_M:$GGUF/Q4_K_M.gguf" "Q4_0:$GGUF/Q4_0.gguf") ; dir="$QUANTIZED-q4-q8emb" ;;
      *) echo "error: unknown format $f" >&2; exit 1 ;;
    esac
    log "round $round: $f"
    if [ $((round % 2)) = 1 ]; then run_hayate "$f" "$dir"; fi
    for pair in "${pairs[@]}"; do run_llama "${pair%%:*}" "${pair#*:}"; done
    if [ $((round % 2)) = 0 ]; then run_hayate "$f" "$dir"; fi
  done
done

"$VENV/bin/python" - "$RESULTS" "$SHAPE" "$THREADS" "$PROMPT" "$GEN" "$DEPTH" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
shape, threads, p, n, d = sys.argv[2:]
def median(side, fmt, test):
    v = [r['tok_s'] for r in rows if (r['side'], r['format'], r['test']) == (side, fmt, test)]
    return statistics.median(v) if v else None
def show(v):
    return '-' if v is None else f"{v:.1f}"
def ratio(a, b):
    return '-' if a is None or b is None else f"{a / b:.2f}"
depth = '' if d == '0' else f", at depth {d}"
print(f"{shape}, {threads} threads{depth}, medians of interleaved rounds (tok/s)\n")
print(f"| Hayate | pp{p} | tg{n} | llama.cpp | pp{p} | tg{n} | ratio pp / tg |")
print("|---|---|---|---|---|---|---|")
against = {'bf16': ['bf16'], 'q8': ['Q8_0'], 'q4': ['Q4_K_M', 'Q4_0']}
names = {'bf16': 'bf16', 'q8': 'q8 G32 + q8 emb', 'q4': 'q4 G32 + q8 emb'}
for f, others in against.items():
    hp, ht = median('hayate', f, 'pp'), median('hayate', f, 'tg')
    if hp is None and ht is None:
        continue
    for o in others:
        lp, lt = median('llama.cpp', o, 'pp'), median('llama.cpp', o, 'tg')
        print(f"| {names[f]} | {show(hp)} | {show(ht)} | {o} | {show(lp)} | {show(lt)} | {ratio(hp, lp)} / {ratio(ht, lt)} |")
EOF
