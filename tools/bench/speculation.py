#!/usr/bin/env python3
"""Speculative decoding on the trained pair: identity, acceptance and speed.

For prompts cut from held-out Python files, each temperature and seed, runs
`hayate run` plainly and with each speculator (interleaved, so that machine
noise hits all alike), checks that every output is byte-identical to the
plain one, and reports acceptance, tokens per model pass and the decode
speedup (median of per-run ratios). With --llama-speculative (see
tools/bench/speculative-vs-llama-cpp.sh, which builds it), also runs
llama.cpp's `llama-speculative` on the same prompts, seeds and settings and
reports its acceptance beside ours. Standard library only.

    cargo build --release
    python3 tools/bench/speculation.py            # 5 prompts x 3 temperatures x 3 seeds x 256 tokens
    python3 tools/bench/speculation.py --quick    # 2 prompts x 3 temperatures x 1 seed
"""

import argparse
import json
import re
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


def run_llama(args, prompt, temperature, seed):
    """llama-speculative's drafted and accepted counts and decode speed.

    No top-k, top-p or min-p, as for Hayate; its draft proposes the draft
    model's most likely tokens (examples/speculative/speculative.cpp)."""
    cmd = [
        str(args.llama_speculative), "-m", str(args.llama_model), "-md", str(args.llama_draft),
        "-p", prompt, "-n", str(args.tokens), "--temp", str(temperature), "--seed", str(seed),
        "--top-k", "0", "--top-p", "1", "--min-p", "0", "--repeat-penalty", "1",
        "--spec-draft-n-max", str(args.llama_draft_max), "-t", str(args.llama_threads),
        "-c", "2048",
    ]
    done = subprocess.run(cmd, capture_output=True, check=True, text=True)
    log = done.stdout + done.stderr
    field = lambda name: int(re.search(rf"{name}\s*=\s*(\d+)", log).group(1))
    speed = float(re.search(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+)", log).group(1))
    return {"drafted": field("n_drafted"), "accepted": field("n_accept"), "decode_tok_s": speed}


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
    parser.add_argument("--modes", default="draft,draft-tree,draft-independent,ngram,suffix",
                        help="speculators to run (comma list of the names in the table)")
    parser.add_argument("--draft-tokens", type=int, help="fixed draft length (default: adaptive)")
    parser.add_argument("--draft-threads", type=int, default=1,
                        help="kernel threads of the draft model")
    parser.add_argument("--llama-speculative", help="llama.cpp's llama-speculative binary")
    parser.add_argument("--llama-model", help="the model as a GGUF file, for llama.cpp")
    parser.add_argument("--llama-draft", help="the draft as a GGUF file, for llama.cpp")
    parser.add_argument("--llama-draft-max", type=int, default=5, help="llama.cpp's draft length")
    parser.add_argument("--llama-threads", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.seeds = 2, "1"
    draft = ["--draft", str(args.draft), "--draft-threads", str(args.draft_threads)]
    if args.draft_tokens:
        draft += ["--draft-tokens", str(args.draft_tokens)]
    every_mode = {
        "draft": draft,
        "draft-tree": draft + ["--tree-width", "2"],
        "draft-independent": draft + ["--coupling", "independent"],
        "ngram": ["--speculate", "ngram"],
        "suffix": ["--speculate", "suffix"],
    }
    modes = {m: every_mode[m] for m in args.modes.split(",")}
    temperatures = [float(t) for t in args.temperatures.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = {}
    mismatches = 0
    for p, prompt in enumerate(prompts(args.prompts, args.prompt_chars)):
        for t in temperatures:
            for seed in seeds:
                want, plain = run(args.binary, args.model, prompt, t, seed, args.tokens, ["--speculate", "none"])
                plain.update(speedup=1.0, tokens_per_pass=1.0, drafted=0, accepted=0)
                rows.setdefault((t, "none"), []).append(plain)
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
                if args.llama_speculative:
                    stats = run_llama(args, prompt, t, seed)
                    stats["speedup"] = None
                    rows.setdefault((t, f"llama.cpp (K={args.llama_draft_max})"), []).append(stats)
                    if args.json:
                        print(json.dumps({"prompt": p, "mode": "llama.cpp", **stats}))
    print("| T | speculator | runs | drafted | accepted | acceptance (by seed) | tok/pass | decode tok/s | speedup (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (t, name), runs in sorted(rows.items()):
        drafted = sum(r["drafted"] for r in runs)
        accepted = sum(r["accepted"] for r in runs)
        rates = [r["accepted"] / r["drafted"] for r in runs if r["drafted"]]
        spread = f" ({min(rates):.2f}-{max(rates):.2f})" if rates else ""
        per_pass = statistics.mean(r["tokens_per_pass"] for r in runs) if "tokens_per_pass" in runs[0] else None
        speed = statistics.median(r["decode_tok_s"] for r in runs)
        speedups = [r["speedup"] for r in runs if r["speedup"] is not None]
        show = lambda v, f: "-" if v is None else f.format(v)
        print(f"| {t:g} | {name} | {len(runs)} | {drafted} | {accepted} | "
              f"{accepted / max(drafted, 1):.3f}{spread} | {show(per_pass, '{:.2f}')} | {speed:.0f} | "
              f"{show(statistics.median(speedups) if speedups else None, '{:.2f}x')} |")
    total = sum(len(r) for (_, name), r in rows.items() if name in modes)
    print(f"\n{total - mismatches} of {total} speculative outputs byte-identical to plain decoding")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
