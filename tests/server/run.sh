#!/usr/bin/env bash
# The server's API suite: drives `hayate serve` with the official `openai`
# Python package (pinned in requirements.txt, installed into a venv here).
#   tests/server/run.sh [path/to/hayate]   (default: target/release/hayate)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
binary="${1:-$root/target/release/hayate}"
if [ ! -x "$binary" ]; then
    echo "no hayate binary at $binary: run cargo build --release first" >&2
    exit 1
fi
venv="$root/target/server-tests-venv"
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$here/requirements.txt" "$venv/requirements.txt"; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    cp "$here/requirements.txt" "$venv/requirements.txt"
fi
HAYATE_BIN="$binary" "$venv/bin/python" -m unittest discover -s "$here" -p 'test_*.py' -v
