#!/usr/bin/env python3
"""Load test of `hayate serve`: N concurrent streaming clients on loopback.

Starts the server itself (so it knows the process whose memory it samples),
or uses one already running (--url, with --pid for memory). Each client
sends streamed /v1/completions with prompts of mixed lengths; some requests
are cancelled mid-stream (the client closes the connection) and some are
malformed on purpose (they must be answered 4xx). Bounded by a number of
requests and by a duration, whichever comes first.

Reports aggregate generated tokens per second, time to first token and
inter-token latency (p50/p99), failures, /health latency while the queue is
full, and the server's resident memory over time. Python standard library
only.

    python3 tools/bench/loadtest.py --hayate target/release/hayate \\
        --model models/qwen3-0.6b-speed --server-args "--quantize q4 --threads 2 --parallel 16" \\
        --clients 16 --requests 64 --max-tokens 64

Exit status 1 when a request that should have succeeded failed.
"""

import argparse
import http.client
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "pystd-valid.txt"


def percentile(values, p):
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Stats:
    """What the clients measured, under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ttft = []
        self.itl = []
        self.tokens = 0
        self.ok = 0
        self.cancelled = 0
        self.rejected_as_expected = 0
        self.busy = 0
        self.too_long = 0
        self.failures = []

    def add(self, **kw):
        with self.lock:
            for key, value in kw.items():
                current = getattr(self, key)
                if isinstance(current, list):
                    current.extend(value) if isinstance(value, list) else current.append(value)
                else:
                    setattr(self, key, current + value)


def stream_completion(host, port, body, cancel_after, timeout):
    """One streamed completion. Returns (status, ttft, gaps, tokens, error)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode(errors="replace")
            return resp.status, None, [], 0, text[:200]
        ttft, last, gaps, tokens, chunks, finished = None, None, [], 0, 0, False
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                finished = True
                break
            event = json.loads(data)
            if "error" in event:
                return 200, ttft, gaps, tokens, f"stream error: {event['error']}"
            usage = event.get("usage")
            if usage:
                tokens = usage["completion_tokens"]
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - start
                else:
                    gaps.append(now - last)
                last = now
                chunks += 1
                if cancel_after is not None and chunks >= cancel_after:
                    return 200, ttft, gaps, chunks, "cancelled"
        if not finished:
            return 200, ttft, gaps, tokens, "the stream ended without [DONE]"
        return 200, ttft, gaps, tokens, None
    except (OSError, http.client.HTTPException, ValueError) as e:
        return None, None, [], 0, f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def client(args, stats, words, deadline, counter, rng_seed):
    rng = random.Random(rng_seed)
    lengths = args.prompt_words
    while time.monotonic() < deadline:
        with counter["lock"]:
            if counter["left"] == 0:
                return
            counter["left"] -= 1
        roll = rng.random()
        if roll < args.error_fraction:
            # Malformed on purpose: must be a 4xx, not a failure of the server.
            body = {"model": "x", "prompt": "hi", "max_tokens": -5, "stream": True}
            status, *_ , error = stream_completion(args.host, args.port, body, None, args.timeout)
            if status is not None and 400 <= status < 500:
                stats.add(rejected_as_expected=1)
            else:
                stats.add(failures=f"malformed request answered {status}: {error}")
            continue
        n = rng.choice(lengths)
        at = rng.randrange(0, max(1, len(words) - n))
        prompt = " ".join(words[at : at + n])
        cancel = rng.randint(1, 4) if roll < args.error_fraction + args.cancel_fraction else None
        body = {
            "model": "x",
            "prompt": prompt,
            "max_tokens": args.max_tokens,
            "temperature": 0.8,
            "seed": rng.randrange(1 << 30),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        status, ttft, gaps, tokens, error = stream_completion(args.host, args.port, body, cancel, args.timeout)
        if error == "cancelled":
            stats.add(cancelled=1, tokens=tokens)
        elif status == 503:
            # The queue is full: back off as Retry-After says.
            stats.add(busy=1)
            time.sleep(1.0)
        elif status == 400 and "context_length_exceeded" in (error or ""):
            # A prompt cut from the text came out longer than the context:
            # refused as it should be, not a failure of the server.
            stats.add(too_long=1)
        elif error is None:
            stats.add(ok=1, tokens=tokens, ttft=[ttft] if ttft is not None else [], itl=gaps)
        else:
            stats.add(failures=f"{status}: {error}")


def probe_health(args, out, stop):
    """/health latency every half second while the clients run."""
    while not stop.is_set():
        start = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(args.host, args.port, timeout=10)
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            out.append((resp.status, time.perf_counter() - start))
            conn.close()
        except (OSError, http.client.HTTPException) as e:
            out.append((None, time.perf_counter() - start))
            print(f"/health failed: {e}", file=sys.stderr)
        stop.wait(0.5)


def sample_memory(pid, out, stop, t0, every):
    while not stop.is_set():
        rss = rss_bytes(pid)
        if rss is not None:
            out.append((time.monotonic() - t0, rss))
        stop.wait(every)


def fill(args):
    """--fill concurrent requests of --fill-tokens token ids each (one per sequence)."""
    errors = []

    def one(i):
        body = {"model": "x", "prompt": [(7 * t + 13 * i) % 1000 + 10 for t in range(args.fill_tokens)], "max_tokens": 8}
        conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read()
        if resp.status != 200:
            errors.append(f"fill request answered {resp.status}: {text[:200]}")
        conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.fill)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit("; ".join(errors))


def wait_ready(host, port, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection(host, port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hayate", help="the hayate binary to start (with --model)")
    ap.add_argument("--model", help="the model directory to serve")
    ap.add_argument("--server-args", default="", help="more arguments for `hayate serve`")
    ap.add_argument("--url", help="a running server instead, e.g. http://127.0.0.1:8080")
    ap.add_argument("--pid", type=int, help="its process, for memory samples")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64, help="most requests in all")
    ap.add_argument("--duration", type=float, default=600, help="most seconds")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--prompt-words", default="8,64,256", help="comma list of prompt lengths in words, drawn at random"
    )
    ap.add_argument("--prompt-file", default=str(DEFAULT_TEXT), help="text the prompts are cut from")
    ap.add_argument("--cancel-fraction", type=float, default=0.0, help="requests cancelled mid-stream")
    ap.add_argument("--error-fraction", type=float, default=0.0, help="requests malformed on purpose")
    ap.add_argument("--warmup", type=float, default=60, help="seconds before memory growth is counted")
    ap.add_argument(
        "--fill",
        type=int,
        default=0,
        help="before the clients start, this many concurrent requests (the server's --parallel) of "
        "--fill-tokens prompt tokens each, so that every sequence's memory is in use before it is sampled",
    )
    ap.add_argument("--fill-tokens", type=int, default=0, help="prompt tokens of each --fill request")
    ap.add_argument("--timeout", type=float, default=600, help="seconds a request may take")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args()
    args.prompt_words = [int(x) for x in args.prompt_words.split(",")]
    proc = None
    if args.url:
        hostport = args.url.split("//", 1)[-1].rstrip("/")
        args.host, port = hostport.rsplit(":", 1)
        args.port = int(port)
        pid = args.pid
    else:
        if not (args.hayate and args.model):
            ap.error("give --hayate and --model, or --url")
        args.host, args.port = "127.0.0.1", free_port()
        cmd = [args.hayate, "serve", "--model", args.model, "--port", str(args.port)]
        cmd += shlex.split(args.server_args)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        pid = proc.pid
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the load test runs on loopback only")
    try:
        wait_ready(args.host, args.port, proc)
        words = Path(args.prompt_file).read_text().split()
        if args.fill:
            fill(args)
        stats = Stats()
        counter = {"lock": threading.Lock(), "left": args.requests}
        stop = threading.Event()
        health, memory = [], []
        t0 = time.monotonic()
        deadline = t0 + args.duration
        threads = [
            threading.Thread(target=client, args=(args, stats, words, deadline, counter, args.seed * 1000 + i))
            for i in range(args.clients)
        ]
        side = [threading.Thread(target=probe_health, args=(args, health, stop))]
        if pid is not None:
            side.append(threading.Thread(target=sample_memory, args=(pid, memory, stop, t0, 1.0)))
        for t in side + threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        stop.set()
        for t in side:
            t.join()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
    after = [rss for t, rss in memory if t >= args.warmup] or [rss for _, rss in memory]
    ms = lambda v: None if v is None else round(v * 1e3, 1)
    report = {
        "clients": args.clients,
        "seconds": round(wall, 1),
        "requests_ok": stats.ok,
        "cancelled": stats.cancelled,
        "rejected_as_expected": stats.rejected_as_expected,
        "busy_503": stats.busy,
        "prompt_too_long_400": stats.too_long,
        "failures": len(stats.failures),
        "generated_tokens": stats.tokens,
        "aggregate_tok_s": round(stats.tokens / wall, 1) if wall > 0 else None,
        "ttft_ms_p50": ms(percentile(stats.ttft, 50)),
        "ttft_ms_p99": ms(percentile(stats.ttft, 99)),
        "itl_ms_p50": ms(percentile(stats.itl, 50)),
        "itl_ms_p99": ms(percentile(stats.itl, 99)),
        "health_ok": sum(1 for s, _ in health if s == 200),
        "health_failed": sum(1 for s, _ in health if s != 200),
        "health_ms_max": ms(max((d for _, d in health), default=None)),
        "rss_mib_start": round(memory[0][1] / 2**20, 1) if memory else None,
        "rss_mib_after_warmup": round(after[0] / 2**20, 1) if after else None,
        "rss_mib_end": round(memory[-1][1] / 2**20, 1) if memory else None,
        "rss_growth_after_warmup_pct": round(100 * (after[-1] - after[0]) / after[0], 2) if after else None,
    }
    for f in stats.failures[:10]:
        print(f"failure: {f}", file=sys.stderr)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"report": report, "rss": memory}, indent=1))
    return 1 if stats.failures or report["health_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
