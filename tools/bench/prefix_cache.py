#!/usr/bin/env python3
"""Time to first token of a chat request that shares a long system prompt
with an earlier one, against the earlier one's, through `hayate serve`.

Starts the server, sends a chat request whose system message is about
--prefix-tokens tokens long, then requests with the same system message and
other user messages; reports each one's time to first token (client side,
streamed), the prompt tokens the server took from its cache (`usage`), and
the ratio of the later ones' to the first's. Then the same for a
conversation: each turn resends the whole conversation so far.

With --concurrent the first request keeps generating (--hold-tokens) while
the later ones are sent, so each runs in another of the server's sequences
and takes the shared prefix from the first's (needs --parallel 2 or more).

    python3 tools/bench/prefix_cache.py --hayate target/release/hayate \\
        --model models/qwen3.5-0.8b-speed-vocab --server-args "--quantize q4 --threads 2"

Python standard library only.
"""

import argparse
import http.client
import json
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT.parent / "shared" / "data" / "pystd-valid.txt"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat(port, messages, max_tokens, on_first=None):
    """Streams one chat request: (time to first token, reply text, usage);
    `on_first()` is called at its first token."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"status {resp.status}: {resp.read()[:300]}")
    first, text, usage = None, "", None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                if first is None:
                    first = time.perf_counter() - start
                    if on_first:
                        on_first()
                text += piece
    conn.close()
    if first is None:
        first = time.perf_counter() - start
    return first, text, usage


def cached(usage):
    return ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hayate", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--server-args", default="")
    ap.add_argument("--prefix-tokens", type=int, default=2000)
    ap.add_argument("--followers", type=int, default=3, help="requests after the first")
    ap.add_argument("--turns", type=int, default=6, help="turns of the conversation test (0: none)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--concurrent", action="store_true", help="send the later requests while the first still runs")
    ap.add_argument("--hold-tokens", type=int, default=256, help="what the first generates with --concurrent")
    args = ap.parse_args()
    words = TEXT.read_text().split()
    port = free_port()
    cmd = [args.hayate, "serve", "--model", args.model, "--port", str(port)] + shlex.split(args.server_args)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        # How many words make the prefix: measured on the same text behind
        # another first word, which shares no cached prefix with it.
        n_words = 400
        for _ in range(3):
            probe = "probe " + " ".join(words[:n_words])
            _, _, usage = chat(port, [{"role": "user", "content": probe}], 1)
            n_words = max(1, round(n_words * args.prefix_tokens / usage["prompt_tokens"]))
        system = " ".join(words[:n_words])
        users = [" ".join(words[n_words + 50 * i : n_words + 50 * i + 12]) for i in range(args.followers + 1)]
        rows = []

        def ask(i, user, max_tokens, on_first=None):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            ttft, _, usage = chat(port, messages, max_tokens, on_first)
            rows.append((i, ttft, usage["prompt_tokens"], cached(usage)))
            print(f"request {i}: {usage['prompt_tokens']} prompt tokens, {cached(usage)} cached, first token after {ttft * 1e3:.0f} ms", flush=True)

        if args.concurrent:
            started = threading.Event()
            first = threading.Thread(target=ask, args=(0, users[0], args.hold_tokens, started.set))
            first.start()
            started.wait()
            for i, user in enumerate(users[1:], 1):
                ask(i, user, args.max_tokens)
            overlapped = first.is_alive()
            first.join()
            if not overlapped:
                raise SystemExit("the first request ended before the later ones: raise --hold-tokens")
        else:
            for i, user in enumerate(users):
                ask(i, user, args.max_tokens)
        rows = [r[1:] for r in sorted(rows)]
        later = statistics.median(r[0] for r in rows[1:])
        report = {
            "prompt_tokens": rows[0][1],
            "first_ttft_ms": round(rows[0][0] * 1e3, 1),
            "later_ttft_ms_median": round(later * 1e3, 1),
            "ratio": round(later / rows[0][0], 3),
            "later_cached_tokens": [r[2] for r in rows[1:]],
        }
        if args.turns:
            messages = [{"role": "system", "content": " ".join(words[n_words * 2 : n_words * 2 + 200])}]
            turns = []
            for t in range(args.turns):
                messages.append({"role": "user", "content": " ".join(words[t * 30 : t * 30 + 20])})
                ttft, reply, usage = chat(port, messages, args.max_tokens)
                messages.append({"role": "assistant", "content": reply})
                turns.append({"prompt": usage["prompt_tokens"], "cached": cached(usage), "ttft_ms": round(ttft * 1e3, 1)})
                print(f"turn {t}: {turns[-1]}", flush=True)
            report["turns"] = turns
        print(json.dumps(report, indent=1))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
