#!/usr/bin/env python3
"""Generate tiny random-weight HF checkpoints + transformers reference logits.

Every fixture is written to tests/fixtures/<name>/ and contains:
  config.json, generation_config.json,
  model.safetensors (bf16)  -- or model-0000X-of-0000N.safetensors + model.safetensors.index.json,
  reference_logits.safetensors: input_ids int64 [1, T], logits float32 [1, T, vocab].

The reference logits are computed by transformers in float32 from the *saved bf16 weights*
(AutoModelForCausalLM.from_pretrained(dir, dtype=float32, attn_implementation="eager"),
no KV cache, one forward over the whole sequence).

Everything is seeded; rerunning with the pinned versions (requirements.txt) reproduces the
files bit-for-bit on x86-64 CPU.

Usage:  python tools/refgen/make_fixtures.py [--out tests/fixtures] [--only NAME ...]
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SEQ_LEN = 40
# Input ids are drawn with seed INPUT_SEED_BASE + k, k = 0, 1, ...; the first k whose reference
# logits have a top1-top2 margin >= MIN_MARGIN at every position is kept (deterministic search).
INPUT_SEED_BASE = 1000
MIN_MARGIN = 0.1
MAX_INPUT_TRIES = 2000

COMMON = dict(
    hidden_size=64,
    hidden_act="silu",
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    use_cache=True,
)

FIXTURES = [
    dict(
        name="llama-gqa-rope-llama3",
        cls=LlamaForCausalLM,
        config_cls=LlamaConfig,
        seed=11,
        config=dict(
            COMMON,
            vocab_size=320,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            # head_dim 16, theta 1e4: wavelengths 6.3, 19.9, 62.8, 199, ... With
            # original_max_position_embeddings=64: high_freq_wavelen=16, low_freq_wavelen=64,
            # so dim pair 0 is unscaled, pairs 1-2 are smoothed, pairs 3-7 are divided by 8.
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        generation=dict(bos_token_id=1, eos_token_id=2),
        features=["llama", "gqa", "untied_lm_head", "rope_llama3", "rope_theta_1e4", "rms_eps_1e-5",
                  "random_norm_weights"],
    ),
    dict(
        name="llama-mha-rope-linear-bias",
        cls=LlamaForCausalLM,
        config_cls=LlamaConfig,
        seed=12,
        config=dict(
            COMMON,
            vocab_size=256,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
        ),
        generation=dict(bos_token_id=1, eos_token_id=2),
        features=["llama", "mha", "tied_embeddings", "rope_linear_factor_2", "attention_bias_qkvo",
                  "mlp_bias", "3_layers", "rms_eps_1e-5", "random_norm_weights"],
    ),
    dict(
        name="llama-mqa-headdim",
        cls=LlamaForCausalLM,
        config_cls=LlamaConfig,
        seed=13,
        config=dict(
            COMMON,
            vocab_size=384,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=24,  # != hidden_size / num_attention_heads (16); q_proj out = 96
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        generation=dict(bos_token_id=1, eos_token_id=2),
        shard_size="120KB",
        features=["llama", "mqa", "explicit_head_dim_24", "untied_lm_head", "rope_default",
                  "sharded_safetensors", "rms_eps_1e-5", "random_norm_weights"],
    ),
    dict(
        name="qwen2-gqa-bias",
        cls=Qwen2ForCausalLM,
        config_cls=Qwen2Config,
        seed=21,
        config=dict(
            COMMON,
            vocab_size=256,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        generation=dict(bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0),
        features=["qwen2", "gqa", "qkv_bias_no_o_bias", "tied_embeddings", "rope_default",
                  "multi_eos_generation_config", "random_norm_weights"],
    ),
    dict(
        name="qwen2-mha-untied",
        cls=Qwen2ForCausalLM,
        config_cls=Qwen2Config,
        seed=22,
        config=dict(
            COMMON,
            vocab_size=384,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        generation=dict(bos_token_id=1, eos_token_id=2),
        features=["qwen2", "mha", "qkv_bias_no_o_bias", "untied_lm_head", "rope_default",
                  "rope_theta_1e6", "random_norm_weights"],
    ),
    dict(
        name="qwen3-gqa-qknorm",
        cls=Qwen3ForCausalLM,
        config_cls=Qwen3Config,
        seed=31,
        config=dict(
            COMMON,
            vocab_size=320,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,  # != 64 / 4
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            attention_bias=False,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        generation=dict(bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0),
        features=["qwen3", "gqa", "qk_norm", "explicit_head_dim_32", "untied_lm_head", "rope_default",
                  "multi_eos_generation_config", "random_norm_weights"],
    ),
    dict(
        name="qwen3-mqa-tied-bias",
        cls=Qwen3ForCausalLM,
        config_cls=Qwen3Config,
        seed=32,
        config=dict(
            COMMON,
            vocab_size=512,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            attention_bias=True,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        generation=dict(bos_token_id=1, eos_token_id=2),
        features=["qwen3", "mqa", "qk_norm", "tied_embeddings", "attention_bias_qkvo", "3_layers",
                  "rope_default", "random_norm_weights"],
    ),
]

# Weight init: matrices and embeddings ~ N(0, INIT_STD); norm weights 1 + NORM_JITTER * N(0, 1);
# biases BIAS_STD * N(0, 1). INIT_STD is also written to config.json as initializer_range.
INIT_STD = 0.35
NORM_JITTER = 0.1
BIAS_STD = 0.2


def randomize_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is yielded once (as embed_tokens)
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                assert name.endswith(".weight"), name
                p.copy_(1.0 + NORM_JITTER * noise)
            elif name.endswith(".bias"):
                p.copy_(BIAS_STD * noise)
            else:
                p.copy_(INIT_STD * noise)


def load_fp32(d):
    model, info = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{d}: loading info not clean: {bad}"
    model.eval()
    return model


@torch.no_grad()
def forward_logits(model, input_ids):
    return model(input_ids=input_ids, use_cache=False).logits.float()


def top2_margin(logits):
    top = logits.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1])


def rope_bands(cfg, model):
    """For llama3 rope: classify every inv_freq into unscaled / smoothed / scaled."""
    rp = cfg.rope_parameters
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    base = rp["rope_theta"]
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    old = rp["original_max_position_embeddings"]
    lo_w, hi_w = old / rp["low_freq_factor"], old / rp["high_freq_factor"]
    got = model.model.rotary_emb.inv_freq.float()
    bands = []
    for i, f in enumerate(inv.tolist()):
        w = 2 * math.pi / f
        band = "unscaled" if w < hi_w else ("scaled" if w > lo_w else "smoothed")
        bands.append(band)
        print(f"    inv_freq[{i}] base={f:.6g} wavelen={w:9.2f} -> {band:8s} model={got[i].item():.6g}"
              f" ratio={f / got[i].item():.4f}")
    assert set(bands) == {"unscaled", "smoothed", "scaled"}, bands
    return bands


def fixture_files(d):
    return sorted(os.listdir(d))


def dir_size(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def make_fixture(spec, out_root):
    name = spec["name"]
    d = os.path.join(out_root, name)
    print(f"== {name}")
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)

    cfg = spec["config_cls"](initializer_range=INIT_STD, **spec["config"])
    torch.manual_seed(spec["seed"])  # construction-time init is overwritten below anyway
    model = spec["cls"](cfg)
    randomize_(model, spec["seed"])
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(**spec["generation"])
    save_kw = {}
    if spec.get("shard_size"):
        save_kw["max_shard_size"] = spec["shard_size"]
    model.save_pretrained(d, **save_kw)
    # Always (re)write generation_config.json explicitly.
    GenerationConfig(**spec["generation"]).save_pretrained(d)
    assert os.path.exists(os.path.join(d, "generation_config.json"))

    files = fixture_files(d)
    if spec.get("shard_size"):
        shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
        assert "model.safetensors.index.json" in files and 2 <= len(shards) <= 3, files
    else:
        assert "model.safetensors" in files, files

    # Check the saved config reflects what we asked for.
    with open(os.path.join(d, "config.json")) as f:
        saved = json.load(f)
    assert saved["model_type"] == cfg.model_type
    assert saved["rope_parameters"] == spec["config"]["rope_parameters"], saved["rope_parameters"]
    assert saved["tie_word_embeddings"] == spec["config"]["tie_word_embeddings"]
    print("    rope_parameters:", json.dumps(saved["rope_parameters"]))

    # All weights must be bf16; tied models must not carry lm_head.weight.
    names = {}
    for fn in files:
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(d, fn), "pt") as sf:
                for k in sf.keys():
                    names[k] = sf.get_slice(k).get_dtype()
    assert all(v == "BF16" for v in names.values()), names
    assert ("lm_head.weight" in names) == (not spec["config"]["tie_word_embeddings"]), sorted(names)

    # Reference logits from the saved bf16 weights, fp32 compute.
    ref = load_fp32(d)
    rt = cfg.rope_parameters["rope_type"]
    if rt == "llama3":
        rope_bands(ref.config, ref)
    elif rt == "linear":
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        base = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        assert torch.allclose(ref.model.rotary_emb.inv_freq.float(), base / 2.0), "linear rope not applied"
        print("    linear rope: inv_freq == default / 2  OK")

    vocab = cfg.vocab_size
    for k in range(MAX_INPUT_TRIES):
        g = torch.Generator().manual_seed(INPUT_SEED_BASE + k)
        input_ids = torch.randint(0, vocab, (1, SEQ_LEN), generator=g, dtype=torch.int64)
        logits = forward_logits(ref, input_ids)
        margins = top2_margin(logits[0])
        if margins.min().item() >= MIN_MARGIN:
            break
    else:
        raise RuntimeError(f"{name}: no input seed reached min margin {MIN_MARGIN}")
    input_seed = INPUT_SEED_BASE + k
    std = logits[0].std(dim=-1)
    print(f"    input seed {input_seed} (try {k}); logit std per position: mean {std.mean():.3f} "
          f"min {std.min():.3f} max {std.max():.3f}; top2 margin min {margins.min():.4f} "
          f"median {margins.median():.4f}; argmax distinct {logits[0].argmax(-1).unique().numel()}")

    # Sensitivity: biases / norm weights must matter.
    sens = {}
    for label, pred in (("bias", lambda n: n.endswith(".bias")), ("norm", lambda n: "norm" in n)):
        sd = {n: p.clone() for n, p in ref.named_parameters() if pred(n)}
        if not sd:
            continue
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if n in sd:
                    p.copy_(torch.zeros_like(p) if label == "bias" else torch.ones_like(p))
        alt = forward_logits(ref, input_ids)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if n in sd:
                    p.copy_(sd[n])
        sens[label] = (alt - logits).abs().max().item()
    assert torch.equal(forward_logits(ref, input_ids), logits)
    print("    max |dlogit| when resetting:", {k: round(v, 3) for k, v in sens.items()})

    save_file(
        {"input_ids": input_ids.contiguous(), "logits": logits.contiguous()},
        os.path.join(d, "reference_logits.safetensors"),
        # A single metadata key: safetensors writes the metadata map in hash order, so several
        # keys would make the file bytes differ from run to run.
        metadata={"refgen": json.dumps({
            "description": "float32 next-token logits of the bf16 checkpoint upcast to fp32, eager "
                           "attention, no KV cache; input_ids are random (seeded)",
            "input_seed": input_seed,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }, sort_keys=True)},
    )

    return dict(
        name=name,
        model_type=cfg.model_type,
        features=spec["features"],
        vocab_size=vocab,
        seq_len=SEQ_LEN,
        logit_std=round(std.mean().item(), 4),
        min_top2_margin=round(margins.min().item(), 4),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_type=rt,
        sharded=bool(spec.get("shard_size")),
        weight_seed=spec["seed"],
        input_seed=input_seed,
    )


def verify(out_root, entry):
    """Reload from disk and recompute; also cross-check against sdpa attention."""
    d = os.path.join(out_root, entry["name"])
    with safe_open(os.path.join(d, "reference_logits.safetensors"), "pt") as sf:
        assert sorted(sf.keys()) == ["input_ids", "logits"]
        ids, ref = sf.get_tensor("input_ids"), sf.get_tensor("logits")
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (1, SEQ_LEN)
    assert ref.dtype == torch.float32 and tuple(ref.shape) == (1, SEQ_LEN, entry["vocab_size"])
    m = load_fp32(d)
    again = forward_logits(m, ids)
    d_eager = (again - ref).abs().max().item()
    m_sdpa = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").eval()
    d_sdpa = (forward_logits(m_sdpa, ids) - ref).abs().max().item()
    du = subprocess.run(["du", "-sk", d], capture_output=True, text=True).stdout.split()[0]
    print(f"   {entry['name']:28s} reload max|d| eager={d_eager:.3g} sdpa={d_sdpa:.3g}  "
          f"bytes={dir_size(d)} du={du}K  files={fixture_files(d)}")
    assert d_eager <= 1e-6, d_eager
    assert d_sdpa <= 1e-4, d_sdpa
    assert dir_size(d) < 400_000


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "..", "tests", "fixtures")))
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")
    os.makedirs(args.out, exist_ok=True)

    manifest_path = os.path.join(args.out, "MANIFEST.json")
    old = {}
    if args.only and os.path.exists(manifest_path):
        with open(manifest_path) as f:
            old = {e["name"]: e for e in json.load(f)}

    entries = []
    for spec in FIXTURES:
        if args.only and spec["name"] not in args.only:
            if spec["name"] in old:
                entries.append(old[spec["name"]])
            continue
        entries.append(make_fixture(spec, args.out))

    with open(manifest_path, "w") as f:
        json.dump(entries, f, indent=2)
        f.write("\n")

    print("== verify")
    for e in entries:
        if not args.only or e["name"] in args.only:
            verify(args.out, e)
    print("all fixtures OK")


if __name__ == "__main__":
    main()
