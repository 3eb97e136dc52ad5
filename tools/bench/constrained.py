#!/usr/bin/env python3
"""Decode speed of `hayate serve` with and without a JSON-schema constraint.

Starts the server on MODEL, then alternates completions without and with
`response_format: json_schema` (same prompt, seeds and length limit), reads
each one's decode rate from the server's `timings`, and reports the median
rate of each and the median of the per-pair ratios. Standard library only.

    cargo build --release
    python3 tools/speedmodels/make_speed_model.py --shape qwen3-0.6b \\
        --out models/qwen3-0.6b-speed-vocab --synthetic-vocab 151643
    python3 tools/bench/constrained.py --model models/qwen3-0.6b-speed-vocab --quantize q4
"""

import argparse
import http.client
import json
import re
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Long documents (at least 40 items), so that every constrained reply runs
# to the token limit under the mask.
SCHEMA = {
    "type": "array",
    "minItems": 40,
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "value": {"type": "integer"}},
        "required": ["name", "value"],
        "additionalProperties": False,
    },
}


def complete(host, port, body):
    """(completion tokens, decode tokens per second) of one completion, as
    the server's `timings` report them (tokens after the first)."""
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    reply = json.loads(conn.getresponse().read())
    conn.close()
    return reply["usage"]["completion_tokens"], reply["timings"]["predicted_per_second"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default=ROOT / "target" / "release" / "hayate")
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantize", help="q4 or q8, at load")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--speculate", default="none", help="the server's --speculate (none: the mask's cost alone)")
    args = parser.parse_args()
    cmd = [str(args.binary), "serve", "--model", str(args.model), "--port", "0", "--threads", str(args.threads),
           "--speculate", args.speculate]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        for line in server.stderr:
            found = re.search(r"http://([0-9.]+):(\d+)/v1", line)
            if found:
                host, port = found.group(1), int(found.group(2))
                break
        else:
            raise SystemExit("the server did not start")
        base = {"prompt": "data = ", "max_tokens": args.tokens, "temperature": 1.0}
        rates = {"plain": [], "json_schema": []}
        ratios = []
        complete(host, port, {**base, "seed": 0})  # warm-up
        for r in range(args.rounds):
            plain_tokens, plain = complete(host, port, {**base, "seed": r})
            schema = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
            schema_tokens, constrained = complete(host, port, {**base, "seed": r, "response_format": schema})
            rates["plain"].append(plain)
            rates["json_schema"].append(constrained)
            ratios.append(constrained / plain)
            print(f"round {r}: plain {plain_tokens} tok at {plain:.1f} tok/s, json_schema {schema_tokens} tok at {constrained:.1f} tok/s")
        print(f"median decode: plain {statistics.median(rates['plain']):.1f} tok/s, "
              f"json_schema {statistics.median(rates['json_schema']):.1f} tok/s, "
              f"ratio {statistics.median(ratios):.3f} (median of {len(ratios)} interleaved pairs)")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
