#!/usr/bin/env bash
# Speculative decoding on the trained pair, Hayate beside llama.cpp's
# `llama-speculative` on the same prompts, seeds and settings.
#
#   tools/bench/speculative-vs-llama-cpp.sh [--work DIR] [speculation.py options...]
#
# Builds llama-speculative from the pinned `llama-cpp-python` source
# package (tools/bench/llama-cpp-env.sh), converts ../shared/models'
# pystd-qwen3-7m (target) and pystd-qwen3-1m (draft) to bf16 GGUF files
# with llama.cpp's converter, then runs tools/bench/speculation.py with them
# (any further options go to it, e.g. --quick or --temperatures 1).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK="$ROOT/target/vs-llama-cpp"
if [ "${1:-}" = "--work" ]; then WORK=$2; shift 2; fi
SHARED="$ROOT/../shared/models"
# shellcheck source=tools/bench/llama-cpp-env.sh
. "$ROOT/tools/bench/llama-cpp-env.sh"
llama_cpp_build llama-speculative
for m in pystd-qwen3-7m pystd-qwen3-1m; do
  llama_cpp_convert "$SHARED/$m" "$WORK/gguf/$m/bf16.gguf"
done
[ -x "$ROOT/target/release/hayate" ] || { echo "error: run cargo build --release first" >&2; exit 1; }
exec python3 "$ROOT/tools/bench/speculation.py" \
  --llama-speculative "$BUILD/bin/llama-speculative" \
  --llama-model "$WORK/gguf/pystd-qwen3-7m/bf16.gguf" \
  --llama-draft "$WORK/gguf/pystd-qwen3-1m/bf16.gguf" "$@"
