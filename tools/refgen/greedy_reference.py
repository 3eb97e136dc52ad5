#!/usr/bin/env python3
"""Greedy-decoding references for the trained pystd checkpoints (see /work/shared/models/README.md).

transformers `generate`, fp32 compute from the bf16 weights, eager attention, do_sample=False,
max_new_tokens=48, raw prompts (no chat template, no special tokens added).
Writes tests/fixtures/pystd-greedy.json: a list of
  {model, prompt, prompt_ids, generated_ids, generated_text, min_top2_margin, ...}
generated_text is the decode of the new tokens only (skip_special_tokens=False).

Usage: python tools/refgen/greedy_reference.py [--models-dir /work/shared/models] [--out tests/fixtures/pystd-greedy.json]
"""

import argparse
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

MAX_NEW_TOKENS = 48
RUNS = [
    ("pystd-qwen3-7m", "def fibonacci(n):"),
    ("pystd-qwen3-7m", "class Stack:\n    def __init__(self"),
    ("pystd-qwen3-7m", "    def test_"),
    ("pystd-qwen3-1m", "def fibonacci(n):"),
]
EXPECT_PREFIX = {
    ("pystd-qwen3-7m", "def fibonacci(n):"): " pass\n        self.assertEqual(n, 0)",
    ("pystd-qwen3-7m", "class Stack:\n    def __init__(self"): ", *args, **kwargs):\n        self.__args = args",
    ("pystd-qwen3-7m", "    def test_"): "simple(self):\n        self.assertEqual(self.simple('a', 'a', 'b'",
    ("pystd-qwen3-1m", "def fibonacci(n):"): "  # 1\n    return fibonaccied(n, 1, 2, 3, 4",
}


@torch.no_grad()
def run(model_dir, prompt, tok, model):
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    ids = torch.tensor([prompt_ids], dtype=torch.int64)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        output_logits=True,
        return_dict_in_generate=True,
    )
    gen = out.sequences[0, len(prompt_ids):].tolist()
    step_logits = torch.stack([l[0].float() for l in out.logits])  # [new, vocab]
    top = step_logits.topk(2, dim=-1).values
    margins = (top[:, 0] - top[:, 1])

    # Cross-check the cached greedy path with one no-cache forward over the full sequence.
    full = model(input_ids=out.sequences, use_cache=False).logits[0].float()
    pred = full[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(gen)].argmax(-1).tolist()
    assert pred == gen, f"{model_dir}: cached generate disagrees with full forward"
    max_dlogit = (full[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(gen)] - step_logits).abs().max().item()

    return dict(
        model=os.path.basename(model_dir.rstrip("/")),
        prompt=prompt,
        prompt_ids=prompt_ids,
        generated_ids=gen,
        generated_text=tok.decode(gen, skip_special_tokens=False),
        min_top2_margin=round(margins.min().item(), 4),
        min_top2_margin_step=int(margins.argmin().item()),
        max_new_tokens=MAX_NEW_TOKENS,
        _check_cached_vs_full_forward_max_dlogit=float(f"{max_dlogit:.3g}"),
    )


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", default="/work/shared/models")
    ap.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "..", "tests", "fixtures",
                                                                   "pystd-greedy.json")))
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")

    results, cache = [], {}
    for name, prompt in RUNS:
        d = os.path.join(args.models_dir, name)
        if name not in cache:
            tok = AutoTokenizer.from_pretrained(d)
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
            cache[name] = (tok, model)
        tok, model = cache[name]
        r = run(d, prompt, tok, model)
        print(f"== {name} {prompt!r}\n   prompt_ids={r['prompt_ids']}\n   -> {r['generated_text']!r}\n"
              f"   n={len(r['generated_ids'])} min_top2_margin={r['min_top2_margin']} "
              f"(step {r['min_top2_margin_step']}) cached-vs-full max|d|={r['_check_cached_vs_full_forward_max_dlogit']}")
        exp = EXPECT_PREFIX.get((name, prompt))
        assert exp is None or r["generated_text"].startswith(exp), (exp, r["generated_text"])
        results.append(r)

    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
