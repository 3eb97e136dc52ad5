#!/usr/bin/env python3
"""Write a random-weight bf16 Hugging Face checkpoint with the exact shapes of a real model.

For speed benchmarks only: the tensor names, shapes, dtype and config.json match the published
checkpoint, the weight values are random (normal(0, 0.02) for matrices, 1 + normal(0, 0.02) for
RMSNorm weights; see KIND_STATS for the other kinds). The tokenizer is a small byte-level BPE trained on the shared pystd corpus, so
its vocab is much smaller than the model's; bos/eos ids in the configs point at the small
tokenizer's special tokens, not at the real model's ids.

    python3 tools/speedmodels/make_speed_model.py --shape qwen3-0.6b --out models/qwen3-0.6b-speed

Dependencies: numpy and tokenizers (see requirements.txt). No torch, no network.

To add a shape of an existing family, add an entry to SHAPES. A new architecture also needs a
tensor-list function registered in FAMILIES (llama, qwen3, and qwen3_5_text: the Qwen3.5 hybrid of
Gated DeltaNet and gated full attention).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_CORPUS = Path("/work/shared/data/pystd-calib.txt")

# ---------------------------------------------------------------------------------------------
# Shapes (data). Every "config" is the published config.json of the real model; the token ids
# written under bos_token_id / eos_token_id / pad_token_id are replaced by the small
# tokenizer's ids for the tokens named in "token_roles" (the published ids are kept in
# speedmodel.json for reference).
# ---------------------------------------------------------------------------------------------

# Pre-tokenizer split regexes, as in the real tokenizer.json files.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The Llama-3 instruct header template (as in Meta-Llama-3-8B-Instruct).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SHAPES: dict[str, dict] = {
    "qwen3-0.6b": {
        "family": "qwen3",
        "source": "Qwen/Qwen3-0.6B",
        "config": {
            "architectures": ["Qwen3ForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": 1024,
            "initializer_range": 0.02,
            "intermediate_size": 3072,
            "max_position_embeddings": 40960,
            "max_window_layers": 28,
            "model_type": "qwen3",
            "num_attention_heads": 16,
            "num_hidden_layers": 28,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 1000000,
            "sliding_window": None,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.51.0",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": 151936,
        },
        "generation_config": {
            "bos_token_id": 151643,
            "do_sample": True,
            "eos_token_id": [151645, 151643],
            "pad_token_id": 151643,
            "temperature": 0.6,
            "top_k": 20,
            "top_p": 0.95,
            "transformers_version": "4.51.0",
        },
        "tokenizer": {
            # Special tokens, in id order; they get the ids right after the BPE vocab
            # (real Qwen tokenizers put them after the BPE vocab too).
            "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "split_regex": QWEN2_SPLIT,
            "prepend_bos": False,
            "chat_template": CHATML_TEMPLATE,
            "model_max_length": 131072,
        },
        # Which special token each id field refers to (ids are resolved against the small
        # tokenizer). A list means a list of ids.
        "token_roles": {
            "config": {"bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>"},
            "generation_config": {
                "bos_token_id": "<|endoftext|>",
                "eos_token_id": ["<|im_end|>", "<|endoftext|>"],
                "pad_token_id": "<|endoftext|>",
            },
            "tokenizer_config": {
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
            },
        },
    },
    "llama-3.2-1b": {
        "family": "llama",
        "source": "meta-llama/Llama-3.2-1B",
        "config": {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 128000,
            "eos_token_id": 128001,
            "head_dim": 64,
            "hidden_act": "silu",
            "hidden_size": 2048,
            "initializer_range": 0.02,
            "intermediate_size": 8192,
            "max_position_embeddings": 131072,
            "mlp_bias": False,
            "model_type": "llama",
            "num_attention_heads": 32,
            "num_hidden_layers": 16,
            "num_key_value_heads": 8,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "rope_theta": 500000.0,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.45.0.dev0",
            "use_cache": True,
            "vocab_size": 128256,
        },
        "generation_config": {
            "_from_model_config": True,
            "bos_token_id": 128000,
            "do_sample": True,
            # The published base-model file has only 128001; <|eot_id|> is added here so that
            # chat-template prompts can stop too.
            "eos_token_id": [128001, 128009],
            "temperature": 0.6,
            "top_p": 0.9,
            "transformers_version": "4.45.0.dev0",
        },
        "tokenizer": {
            "specials": [
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
            "split_regex": LLAMA3_SPLIT,
            # The real Llama-3 tokenizer.json prepends <|begin_of_text|> in its post-processor.
            "prepend_bos": True,
            "chat_template": LLAMA3_TEMPLATE,
            "model_max_length": 131072,
        },
        "token_roles": {
            "config": {"bos_token_id": "<|begin_of_text|>", "eos_token_id": "<|end_of_text|>"},
            "generation_config": {
                "bos_token_id": "<|begin_of_text|>",
                "eos_token_id": ["<|end_of_text|>", "<|eot_id|>"],
            },
            "tokenizer_config": {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|end_of_text|>",
                "pad_token": None,
            },
        },
    },
    "qwen3.5-0.8b": {
        "family": "qwen3_5_text",
        # The published Qwen/Qwen3.5-0.8B repository is multimodal (model_type "qwen3_5",
        # Qwen3_5ForConditionalGeneration, text weights under model.language_model.*, plus
        # model.visual.* and mtp.*). This shape is its TEXT PART written as a plain
        # qwen3_5_text / Qwen3_5ForCausalLM checkpoint (model.layers.*, no vision tower, no MTP
        # head); the config below is its text_config. No real file could be downloaded here.
        "source": "Qwen/Qwen3.5-0.8B (text part only, as qwen3_5_text)",
        # Values below are the text_config as given by third-party code that loads the real model
        # (layer counts, widths, heads, linear-attention dims, rope 1e7 / 0.25 / [11,11,10],
        # tie_word_embeddings true): hidden 1024, 24 layers (3 linear + 1 full, x6),
        # intermediate 3584, 8 heads / 2 kv / head_dim 256, linear 16 k-heads / 16 v-heads x 128,
        # conv kernel 4, vocab 248320, max positions 262144.
        "assumed": [
            "special token ids 248044 <|endoftext|> / 248045 <|im_start|> / 248046 <|im_end|> "
            "(Qwen3 order after the BPE vocab; only 248044 seen in third-party code)",
            "generation_config sampling values (copied from Qwen3-0.6B)",
            "initializer_range 0.02, transformers_version",
            "mtp_num_hidden_layers / mtp_use_dedicated_embeddings left out: no mtp.* tensors are written",
        ],
        "config": {
            "architectures": ["Qwen3_5ForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "attn_output_gate": True,
            "bos_token_id": 248044,
            "dtype": "bfloat16",
            "eos_token_id": 248046,
            "full_attention_interval": 4,
            "head_dim": 256,
            "hidden_act": "silu",
            "hidden_size": 1024,
            "initializer_range": 0.02,
            "intermediate_size": 3584,
            "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 6,
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 128,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 16,
            "linear_value_head_dim": 128,
            "mamba_ssm_dtype": "float32",
            "max_position_embeddings": 262144,
            "model_type": "qwen3_5_text",
            "num_attention_heads": 8,
            "num_hidden_layers": 24,
            "num_key_value_heads": 2,
            "pad_token_id": None,
            "rms_norm_eps": 1e-06,
            "rope_parameters": {
                "mrope_interleaved": True,
                "mrope_section": [11, 11, 10],
                "partial_rotary_factor": 0.25,
                "rope_theta": 10000000,
                "rope_type": "default",
            },
            "tie_word_embeddings": True,
            "transformers_version": "5.23.0",
            "use_cache": True,
            "vocab_size": 248320,
        },
        "generation_config": {
            "bos_token_id": 248044,
            "do_sample": True,
            "eos_token_id": [248046, 248044],
            "pad_token_id": 248044,
            "temperature": 0.6,
            "top_k": 20,
            "top_p": 0.95,
            "transformers_version": "5.23.0",
        },
        "tokenizer": {
            "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "split_regex": QWEN2_SPLIT,
            "prepend_bos": False,
            "chat_template": CHATML_TEMPLATE,
            "model_max_length": 262144,
        },
        "token_roles": {
            "config": {"bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>"},
            "generation_config": {
                "bos_token_id": "<|endoftext|>",
                "eos_token_id": ["<|im_end|>", "<|endoftext|>"],
                "pad_token_id": "<|endoftext|>",
            },
            "tokenizer_config": {
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
            },
        },
    },
}

# ---------------------------------------------------------------------------------------------
# Tensor lists per family. Each entry: (name, shape, kind); kind selects the value distribution
# (see KIND_STATS): "matrix", "norm" (y = x_hat * w), "norm1p" (y = x_hat * (1 + w), stored
# centred on 0: Qwen3.5 / Gemma-style), "conv" (depthwise conv kernels), "A_log" / "dt_bias"
# (Gated DeltaNet decay parameters).
# ---------------------------------------------------------------------------------------------


def _llama_like_tensors(cfg: dict, qk_norm: bool) -> list[tuple[str, tuple[int, ...], str]]:
    h = cfg["hidden_size"]
    inter = cfg["intermediate_size"]
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // n_heads
    vocab = cfg["vocab_size"]
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise SystemExit("biases are not implemented in this generator")

    out = [("model.embed_tokens.weight", (vocab, h), "matrix")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "self_attn.q_proj.weight", (n_heads * hd, h), "matrix"),
            (p + "self_attn.k_proj.weight", (n_kv * hd, h), "matrix"),
            (p + "self_attn.v_proj.weight", (n_kv * hd, h), "matrix"),
            (p + "self_attn.o_proj.weight", (h, n_heads * hd), "matrix"),
        ]
        if qk_norm:
            out += [
                (p + "self_attn.q_norm.weight", (hd,), "norm"),
                (p + "self_attn.k_norm.weight", (hd,), "norm"),
            ]
        out += [
            (p + "post_attention_layernorm.weight", (h,), "norm"),
            (p + "mlp.gate_proj.weight", (inter, h), "matrix"),
            (p + "mlp.up_proj.weight", (inter, h), "matrix"),
            (p + "mlp.down_proj.weight", (h, inter), "matrix"),
        ]
    out.append(("model.norm.weight", (h,), "norm"))
    if not cfg.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (vocab, h), "matrix"))
    return out


def qwen3_5_layer_types(cfg: dict) -> list[str]:
    """layer_types, or the transformers default from full_attention_interval (default 4)."""
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    interval = cfg.get("full_attention_interval", 4)
    return [
        "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(cfg["num_hidden_layers"])
    ]


def _qwen3_5_text_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """Qwen3.5 dense text model (Qwen3_5ForCausalLM): Gated DeltaNet + gated full attention."""
    h = cfg["hidden_size"]
    inter = cfg["intermediate_size"]
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // n_heads
    vocab = cfg["vocab_size"]
    nk, dk = cfg["linear_num_key_heads"], cfg["linear_key_head_dim"]
    nv, dv = cfg["linear_num_value_heads"], cfg["linear_value_head_dim"]
    kernel = cfg["linear_conv_kernel_dim"]
    key_dim, value_dim = nk * dk, nv * dv
    conv_dim = 2 * key_dim + value_dim  # channels of in_proj_qkv: [q | k | v]
    if cfg.get("attention_bias"):
        raise SystemExit("biases are not implemented in this generator")
    layer_types = qwen3_5_layer_types(cfg)
    if len(layer_types) != cfg["num_hidden_layers"]:
        raise SystemExit("layer_types length != num_hidden_layers")

    out = [("model.embed_tokens.weight", (vocab, h), "matrix")]
    for i, kind in enumerate(layer_types):
        p = f"model.layers.{i}."
        out.append((p + "input_layernorm.weight", (h,), "norm1p"))
        if kind == "linear_attention":
            la = p + "linear_attn."
            out += [
                (la + "in_proj_qkv.weight", (conv_dim, h), "matrix"),
                (la + "in_proj_z.weight", (value_dim, h), "matrix"),
                (la + "in_proj_b.weight", (nv, h), "matrix"),
                (la + "in_proj_a.weight", (nv, h), "matrix"),
                (la + "conv1d.weight", (conv_dim, 1, kernel), "conv"),  # depthwise, no bias
                (la + "dt_bias", (nv,), "dt_bias"),
                (la + "A_log", (nv,), "A_log"),
                (la + "norm.weight", (dv,), "norm"),  # gated RMSNorm: plain w
                (la + "out_proj.weight", (h, value_dim), "matrix"),
            ]
        elif kind == "full_attention":
            sa = p + "self_attn."
            out += [
                (sa + "q_proj.weight", (n_heads * hd * 2, h), "matrix"),  # per head [query | gate]
                (sa + "k_proj.weight", (n_kv * hd, h), "matrix"),
                (sa + "v_proj.weight", (n_kv * hd, h), "matrix"),
                (sa + "o_proj.weight", (h, n_heads * hd), "matrix"),
                (sa + "q_norm.weight", (hd,), "norm1p"),
                (sa + "k_norm.weight", (hd,), "norm1p"),
            ]
        else:
            raise SystemExit(f"unknown layer type {kind!r}")
        out += [
            (p + "post_attention_layernorm.weight", (h,), "norm1p"),
            (p + "mlp.gate_proj.weight", (inter, h), "matrix"),
            (p + "mlp.up_proj.weight", (inter, h), "matrix"),
            (p + "mlp.down_proj.weight", (h, inter), "matrix"),
        ]
    out.append(("model.norm.weight", (h,), "norm1p"))
    if not cfg.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (vocab, h), "matrix"))
    return out


FAMILIES = {
    "llama": lambda cfg: _llama_like_tensors(cfg, qk_norm=False),
    "qwen3": lambda cfg: _llama_like_tensors(cfg, qk_norm=True),
    "qwen3_5_text": _qwen3_5_text_tensors,
}

# ---------------------------------------------------------------------------------------------
# safetensors writer (streaming, bf16)
# ---------------------------------------------------------------------------------------------

MATRIX_STD = 0.02
NORM_STD = 0.02
CONV_STD = 0.25
# A_log = log(A), A ~ uniform(A_LOW, A_HIGH) (transformers' Qwen3.5 init draws A ~ uniform(0, 16));
# dt_bias = 1 + normal(0, 0.02) (transformers init: ones).
A_LOW, A_HIGH = 1.0, 16.0
CHUNK_ELEMS = 1 << 24  # 16M elements per generated chunk (64 MiB of float32)


def _log_uniform_stats(lo: float, hi: float) -> tuple[float, float]:
    # E[log U] and sd[log U] for U ~ uniform(lo, hi)
    f1 = lambda x: x * np.log(x) - x
    f2 = lambda x: x * (np.log(x) ** 2 - 2 * np.log(x) + 2)
    m1 = (f1(hi) - f1(lo)) / (hi - lo)
    m2 = (f2(hi) - f2(lo)) / (hi - lo)
    return float(m1), float(np.sqrt(m2 - m1 * m1))


# kind -> (mean, std) of the generated values (verify_speed_model.py checks these).
KIND_STATS = {
    "matrix": (0.0, MATRIX_STD),
    "norm": (1.0, NORM_STD),
    "norm1p": (0.0, NORM_STD),
    "conv": (0.0, CONV_STD),
    "dt_bias": (1.0, NORM_STD),
    "A_log": _log_uniform_stats(A_LOW, A_HIGH),
}


def generate_values(rng: np.random.Generator, kind: str, m: int) -> np.ndarray:
    if kind == "A_log":
        return np.log(rng.uniform(A_LOW, A_HIGH, m)).astype(np.float32)
    x = rng.standard_normal(m, dtype=np.float32)
    if kind == "matrix":
        x *= np.float32(MATRIX_STD)
    elif kind == "norm":
        x *= np.float32(NORM_STD)
        x += np.float32(1.0)
    elif kind == "norm1p":
        x *= np.float32(NORM_STD)
    elif kind == "conv":
        x *= np.float32(CONV_STD)
    elif kind == "dt_bias":
        x *= np.float32(NORM_STD)
        x += np.float32(1.0)
    else:
        raise ValueError(kind)
    return x


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit pattern (uint16), round to nearest even. Inputs are finite."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors, seed: int, metadata: dict[str, str]) -> int:
    """Write all tensors as BF16, generating data chunk by chunk. Returns total file size."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape, _ in tensors:
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((-len(hjson)) % 8)

    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for idx, (name, shape, kind) in enumerate(tensors):
            # One independent stream per tensor, so a tensor's values depend only on (seed, index).
            rng = np.random.default_rng([seed, idx])
            n = int(np.prod(shape))
            done = 0
            while done < n:
                m = min(CHUNK_ELEMS, n - done)
                x = generate_values(rng, kind, m)
                f.write(f32_to_bf16_bits(x).astype("<u2", copy=False).tobytes())
                done += m
        size = f.tell()
    expected = 8 + len(hjson) + offset
    if size != expected:
        raise RuntimeError(f"wrote {size} bytes, expected {expected}")
    os.replace(tmp, path)
    return size


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def train_tokenizer(tok_spec: dict, corpus: Path, vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = tok_spec["specials"]
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tok_spec["split_regex"]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train([str(corpus)], trainer)
    # Specials go right after the BPE vocab, as in the real Qwen / Llama-3 tokenizers.
    tok.add_special_tokens(specials)
    ids = {s: tok.token_to_id(s) for s in specials}

    byte_level = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if tok_spec.get("prepend_bos"):
        bos = specials[0]
        tok.post_processor = processors.Sequence(
            [
                byte_level,
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0",
                    pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, ids[bos])],
                ),
            ]
        )
    else:
        tok.post_processor = byte_level
    return tok, ids


def resolve(role, ids: dict[str, int]):
    if role is None:
        return None
    if isinstance(role, list):
        return [ids[r] for r in role]
    return ids[role]


# ---------------------------------------------------------------------------------------------


def dump_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def pad_vocab(path: Path, size: int, seed: int) -> None:
    """Adds tokens to the BPE vocabulary of `path` until it holds `size`: each
    the text of two trained tokens joined (no merge produces them, so encoding
    is unchanged; decoding and vocabulary tries see them)."""
    doc = json.loads(path.read_text())
    vocab = doc["model"]["vocab"]
    # The specials join the model's vocabulary at their ids, so that they keep
    # them once it is larger (an added token outside it is renumbered past it).
    for token in doc.get("added_tokens", []):
        vocab[token["content"]] = token["id"]
    taken = set(vocab) | {t["content"] for t in doc.get("added_tokens", [])}
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in doc.get("added_tokens", []))])
    words = sorted(vocab, key=vocab.get)
    rng = np.random.default_rng(seed)
    while next_id < size:
        a, b = rng.integers(0, len(words), 2)
        word = words[a] + words[b]
        if word not in taken:
            taken.add(word)
            vocab[word] = next_id
            next_id += 1
    path.write_text(json.dumps(doc, ensure_ascii=False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--out", required=True, type=Path, help="output directory (created)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="text to train the BPE on")
    ap.add_argument("--tokenizer-vocab", type=int, default=4096, help="BPE vocab size incl. specials")
    ap.add_argument(
        "--synthetic-vocab", type=int, default=0,
        help="pad the tokenizer's vocabulary to this many tokens with synthetic ones (two trained tokens "
        "joined), so that costs that grow with the vocabulary (grammar masks) are the real model's",
    )
    args = ap.parse_args()

    spec = SHAPES[args.shape]
    cfg = dict(spec["config"])
    tensors = FAMILIES[spec["family"]](cfg)
    n_params = sum(int(np.prod(s)) for _, s, _ in tensors)
    data_bytes = 2 * n_params

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    # Tokenizer first (fast), so its ids can go into the configs.
    tok, ids = train_tokenizer(spec["tokenizer"], args.corpus, args.tokenizer_vocab)
    tok_vocab = tok.get_vocab_size(with_added_tokens=True)
    if tok_vocab > cfg["vocab_size"]:
        raise SystemExit(f"tokenizer vocab {tok_vocab} > model vocab {cfg['vocab_size']}")
    tok.save(str(out / "tokenizer.json"))
    if args.synthetic_vocab:
        pad_vocab(out / "tokenizer.json", args.synthetic_vocab, args.seed)

    roles = spec["token_roles"]
    for key, role in roles["config"].items():
        cfg[key] = resolve(role, ids)
    gen = dict(spec["generation_config"])
    for key, role in roles["generation_config"].items():
        gen[key] = resolve(role, ids)

    tc_roles = roles["tokenizer_config"]
    tok_cfg = {
        "add_bos_token": bool(spec["tokenizer"].get("prepend_bos")),
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(ids[s]): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for s in spec["tokenizer"]["specials"]
        },
        "bos_token": tc_roles["bos_token"],
        "chat_template": spec["tokenizer"]["chat_template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": tc_roles["eos_token"],
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": spec["tokenizer"]["model_max_length"],
        "pad_token": tc_roles["pad_token"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    specials_map = {k: v for k, v in tc_roles.items() if v is not None}

    dump_json(out / "config.json", cfg)
    dump_json(out / "generation_config.json", gen)
    dump_json(out / "tokenizer_config.json", tok_cfg)
    dump_json(out / "special_tokens_map.json", specials_map)
    (out / "chat_template.jinja").write_text(spec["tokenizer"]["chat_template"], encoding="utf-8")
    provenance = {
        "note": "RANDOM WEIGHTS, for speed benchmarks only. Written by tools/speedmodels/make_speed_model.py.",
        "shape": args.shape,
        "source_shapes": spec["source"],
        "seed": args.seed,
        "parameters": n_params,
        "tensor_bytes": data_bytes,
        "num_tensors": len(tensors),
        "tokenizer_vocab_size": tok_vocab,
        "special_token_ids": ids,
        "published_token_ids": {
            "config": {k: spec["config"][k] for k in roles["config"]},
            "generation_config": {k: spec["generation_config"][k] for k in roles["generation_config"]},
        },
    }
    if spec.get("assumed"):
        provenance["assumed_not_verified"] = spec["assumed"]
    dump_json(out / "speedmodel.json", provenance)
    t_tok = time.time() - t0
    print(f"[{args.shape}] tokenizer: vocab {tok_vocab}, specials {ids} ({t_tok:.1f}s)", flush=True)
    print(
        f"[{args.shape}] writing {len(tensors)} tensors, {n_params:,} params, "
        f"{data_bytes:,} B of bf16 data -> {out / 'model.safetensors'}",
        flush=True,
    )

    size = write_safetensors(
        out / "model.safetensors",
        tensors,
        args.seed,
        {"format": "pt"},
    )
    print(f"[{args.shape}] done: model.safetensors {size:,} B, total {time.time() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
