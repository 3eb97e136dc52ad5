#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600), one after another,
# from fresh seeds plus whatever corpus earlier runs left. Needs the nightly
# toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Usage: fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(safetensors config_geometry quant_metadata chat_template stream_decoder)
fi
python3 make_seeds.py
# -O: optimised; -a: debug assertions and overflow checks on.
cargo +nightly fuzz build -O -a
for t in "${targets[@]}"; do
    echo "== $t: ${seconds}s"
    cargo +nightly fuzz run -O -a "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=30 -max_len=65536 \
        -print_final_stats=1 2>&1 | tee "logs/$t.log" | grep -E "^(#[0-9]+ *DONE|Done|stat::|==|SUMMARY)|panicked" || true
done
