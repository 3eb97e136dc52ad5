#!/usr/bin/env python3
"""Speculative decoding on the trained pair: identity, acceptance and speed.

For prompts cut from held-out Python files, each temperature and seed, runs
`hayate run` plainly and with each speculator (interleaved, so that machine
noise hits all alike), checks that every output is byte-identical to the
plain one, and reports acceptance, tokens per model pass and the decode
speedup (median of per-run ratios). Standard library only.

    cargo build --release
    python3 tools/bench/speculation.py            # 5 prompts x 3 temperatures x 3 seeds x 256 tokens
    python3 tools/bench/speculation.py --quick    # 2 prompts x 3 temperatures x 1 seed
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"


def prompts(count, chars):
    """The openings of the first `count` held-out files longer than 4 kB."""
    text = (SHARED / "data" / "pystd-valid.txt").read_text()
    files = [f for f in text.split("\n\n\n") if len(f) > 4000]
    out = []
    for f in files[:count]:
        cut = f[:chars]
        out.append(cut[: cut.rfind("\n") + 1])
    return out


def run(binary, model, prompt, temperature, seed, tokens, extra):
    cmd = [
        str(binary), "run", "--model", str(model), "--raw", "--prompt", prompt,
        "--max-tokens", str(tokens), "--temperature", str(temperature),
        "--seed", str(seed), "--json-stats", *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, check=True)
    stats = json.loads(done.stderr.decode().strip().splitlines()[-1])
    return done.stdout, stats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default=ROOT / "target" / "release" / "hayate")
    parser.add_argument("--model", default=SHARED / "models" / "pystd-qwen3-7m")
    parser.add_argument("--draft", default=SHARED / "models" / "pystd-qwen3-1m")
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--prompt-chars", type=int, default=600)
    parser.add_argument("--temperatures", default="0,0.7,1")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="2 prompts, 1 seed")
    parser.add_argument("--json", action="store_true", help="print every run as JSON lines")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.seeds = 2, "1"
    modes = {
        "draft": ["--draft", str(args.draft)],
        "draft-independent": ["--draft", str(args.draft), "--coupling", "independent"],
        "ngram": ["--speculate", "ngram"],
        "suffix": ["--speculate", "suffix"],
    }
    temperatures = [float(t) for t in args.temperatures.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = {}
    mismatches = 0
    for p, prompt in enumerate(prompts(args.prompts, args.prompt_chars)):
        for t in temperatures:
            for seed in seeds:
                want, plain = run(args.binary, args.model, prompt, t, seed, args.tokens, ["--speculate", "none"])
                for name, extra in modes.items():
                    got, stats = run(args.binary, args.model, prompt, t, seed, args.tokens, extra)
                    same = got == want
                    mismatches += not same
                    stats["speedup"] = stats["decode_tok_s"] / plain["decode_tok_s"]
                    rows.setdefault((t, name), []).append(stats)
                    if args.json:
                        print(json.dumps({"prompt": p, "mode": name, "identical": same, **stats}))
                    if not same:
                        print(f"MISMATCH: prompt {p}, T={t}, seed {seed}, {name}", file=sys.stderr)
    print("| T | speculator | runs | drafted | accepted | acceptance | tok/pass | speedup (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for (t, name), runs in sorted(rows.items()):
        drafted = sum(r["drafted"] for r in runs)
        accepted = sum(r["accepted"] for r in runs)
        per_pass = statistics.mean(r["tokens_per_pass"] for r in runs)
        speedup = statistics.median(r["speedup"] for r in runs)
        print(f"| {t:g} | {name} | {len(runs)} | {drafted} | {accepted} | "
              f"{accepted / max(drafted, 1):.3f} | {per_pass:.2f} | {speedup:.2f}x |")
    total = sum(len(r) for r in rows.values())
    print(f"\n{total - mismatches} of {total} speculative outputs byte-identical to plain decoding")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
