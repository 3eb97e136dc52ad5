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

LLAMA_VERSION=0.3.36
LLAMA_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
mkdir -p "$WORK"
log() { echo "[vs-llama-cpp] $*" >&2; }

# --- Python tools (pinned) ---------------------------------------------------
VENV="$WORK/venv"
if [ ! -f "$VENV/.installed" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q cmake==3.31.10 numpy==2.2.6 sentencepiece==0.2.1 \
    transformers==4.57.6 protobuf==4.25.8 safetensors==0.6.2 tokenizers==0.22.2 torch==2.11.0
  touch "$VENV/.installed"
fi

# --- llama.cpp from the llama-cpp-python source package ----------------------
SRC="$WORK/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
if [ ! -d "$SRC" ]; then
  tarball="$WORK/llama_cpp_python-$LLAMA_VERSION.tar.gz"
  url=$(curl -fsS -H "Accept: application/vnd.pypi.simple.v1+json" \
    https://pypi.org/simple/llama-cpp-python/ | "$VENV/bin/python" -c "
import json, sys
files = json.load(sys.stdin)['files']
print(next(f['url'] for f in files if f['filename'] == 'llama_cpp_python-$LLAMA_VERSION.tar.gz'))")
  log "fetching $url"
  curl -fsSL -o "$tarball" "$url"
  echo "$LLAMA_SHA256  $tarball" | sha256sum -c --quiet
  tar xzf "$tarball" -C "$WORK"
fi
BUILD="$WORK/llama-build"
if [ ! -x "$BUILD/bin/llama-bench" ] || [ ! -x "$BUILD/bin/llama-quantize" ]; then
  log "building llama.cpp (native) in $BUILD"
  # Native, but without AMX: on the Xeon VM this was written on, its AMX path died with SIGILL
  # (an illegal instruction in libggml-cpu on Q8_0), so a user could not run it.
  no_amx=""
  grep -qw amx_tile /proc/cpuinfo && no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  "$VENV/bin/cmake" -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=ON > "$WORK/cmake.log"
  "$VENV/bin/cmake" --build "$BUILD" --config Release -j "$(nproc)" \
    --target llama-bench llama-quantize > "$WORK/build.log"
fi

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
if [ ! -f "$GGUF/bf16.gguf" ]; then
  log "converting to GGUF"
  # Checkpoints written by newer transformers list `extra_special_tokens`,
  # which the pinned one reads as a mapping: convert from a copy (links, and
  # that one file rewritten) where the list is dropped (the same tokens stay
  # in `additional_special_tokens` and the tokenizer itself).
  if python3 -c "import json,sys; sys.exit(not isinstance(json.load(open('$HF/tokenizer_config.json')).get('extra_special_tokens'), list))" 2>/dev/null; then
    fixed="$WORK/hf/$SHAPE"
    rm -rf "$fixed" && mkdir -p "$fixed"
    for f in "$HF"/*; do ln -s "$f" "$fixed/"; done
    rm "$fixed/tokenizer_config.json"
    python3 -c "import json; d=json.load(open('$HF/tokenizer_config.json')); d.pop('extra_special_tokens'); json.dump(d, open('$fixed/tokenizer_config.json','w'))"
    HF_CONVERT=$fixed
  else
    HF_CONVERT=$HF
  fi
  # The speed models' small tokenizer is not one llama.cpp knows by hash;
  # its pre-tokenizer is declared `qwen2` (as for ../shared/anchors), which
  # changes nothing that is timed.
  "$VENV/bin/python" - "$SRC" "$HF_CONVERT" "$GGUF/bf16.gguf" > "$WORK/convert.log" 2>&1 <<'EOF'
import runpy, sys
src, model, out = sys.argv[1:]
sys.path[:0] = [src, f"{src}/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", "bf16", "--outfile", out]
# Qwen3.5 expects multi-token-prediction layers unless told there are none.
import json
if json.load(open(f"{model}/config.json"))["model_type"].startswith("qwen3_5"):
    sys.argv.append("--no-mtp")
runpy.run_path(f"{src}/convert_hf_to_gguf.py", run_name="__main__")
EOF
fi
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
