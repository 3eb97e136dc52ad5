#!/usr/bin/env python3
"""Check a directory written by make_speed_model.py.

    python3 tools/speedmodels/verify_speed_model.py --shape qwen3-0.6b --dir models/qwen3-0.6b-speed

Needs numpy, tokenizers and safetensors (requirements.txt). Checks: the safetensors header parses
with the `safetensors` package and matches the expected names/shapes/dtype exactly, offsets are
contiguous, the file size is right, a few tensors have the intended value statistics, config ids
point at the tokenizer's special tokens, and tokenizer.json loads and round-trips text.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_speed_model as msm  # noqa: E402


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True, choices=sorted(msm.SHAPES))
    ap.add_argument("--dir", required=True, type=Path)
    args = ap.parse_args()
    d: Path = args.dir
    spec = msm.SHAPES[args.shape]
    expected = msm.FAMILIES[spec["family"]](spec["config"])
    n_params = sum(int(np.prod(s)) for _, s, _ in expected)

    # --- safetensors header via the safetensors package
    from safetensors import safe_open

    path = d / "model.safetensors"
    with safe_open(str(path), framework="numpy") as f:
        keys = set(f.keys())
        meta = f.metadata()
        for name, shape, _ in expected:
            sl = f.get_slice(name)
            assert sl.get_dtype() == "BF16", (name, sl.get_dtype())
            assert tuple(sl.get_shape()) == tuple(shape), (name, sl.get_shape(), shape)
    assert keys == {n for n, _, _ in expected}, keys ^ {n for n, _, _ in expected}
    assert meta == {"format": "pt"}, meta

    # --- raw header: offsets contiguous, size right
    with open(path, "rb") as fh:
        hlen = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(hlen))
    assert hlen % 8 == 0
    header.pop("__metadata__")
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    pos = 0
    for a, b in spans:
        assert a == pos, (a, pos)
        pos = b
    size = path.stat().st_size
    assert pos == 2 * n_params and size == 8 + hlen + pos, (pos, size)

    # --- value statistics on a few tensors (memory-mapped): embeddings, final norm, layer 0 and,
    # for hybrid models, the first layer of every other layer type.
    mm = np.memmap(path, dtype="<u2", mode="r", offset=8 + hlen)
    check_layers = {0}
    if spec["family"] == "qwen3_5_text":
        types = msm.qwen3_5_layer_types(spec["config"])
        check_layers |= {types.index(t) for t in set(types)}
    stats = {}
    for name, shape, kind in expected:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if not (name.startswith("model.embed") or name.startswith("model.norm") or (m and int(m[1]) in check_layers)):
            continue
        a, b = header[name]["data_offsets"]
        x = bf16_to_f32(np.asarray(mm[a // 2 : min(b // 2, a // 2 + (1 << 22))]))
        want_mean, want_std = msm.KIND_STATS[kind]
        tol_mean = 1e-3 + 5 * want_std / np.sqrt(x.size)
        tol_std = want_std * (0.05 + 5 / np.sqrt(2 * x.size))
        assert abs(x.mean() - want_mean) < tol_mean and abs(x.std() - want_std) < tol_std, (
            name,
            kind,
            x.mean(),
            x.std(),
        )
        stats[name] = (round(float(x.mean()), 4), round(float(x.std()), 4))

    # --- configs vs tokenizer
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    cfg = json.loads((d / "config.json").read_text())
    gen = json.loads((d / "generation_config.json").read_text())
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    specials = spec["tokenizer"]["specials"]
    ids = {s: tok.token_to_id(s) for s in specials}
    assert all(v is not None for v in ids.values()), ids
    for k, v in spec["config"].items():
        if k not in spec["token_roles"]["config"]:
            assert cfg[k] == v, (k, cfg[k], v)
    for section, obj in (("config", cfg), ("generation_config", gen)):
        for key, role in spec["token_roles"][section].items():
            assert obj[key] == msm.resolve(role, ids), (section, key, obj[key])
    for key, role in spec["token_roles"]["tokenizer_config"].items():
        assert tcfg[key] == role, (key, tcfg[key])
    vocab = tok.get_vocab_size(with_added_tokens=True)
    assert vocab <= cfg["vocab_size"]

    # --- tokenizer round-trip, specials, out-of-range ids
    text = 'def f(x):\n    return {"a": x ** 2}  # héllo 世界 123456\n\tprint(f"{x!r}")\n'
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    chat = specials[-2] + "user" + specials[-1] if args.shape.startswith("llama") else "<|im_start|>user\nhi<|im_end|>"
    enc_chat = tok.encode(chat, add_special_tokens=False)
    special_hits = [i for i in enc_chat.ids if i in ids.values()]
    assert len(special_hits) == 2, enc_chat.tokens
    with_bos = tok.encode("x", add_special_tokens=True).ids
    if spec["tokenizer"].get("prepend_bos"):
        assert with_bos[0] == ids[specials[0]], with_bos
    else:
        assert ids[specials[0]] not in with_bos
    # Random-weight models sample ids >= tokenizer vocab; decode must not fail on them.
    assert tok.decode([enc.ids[0], cfg["vocab_size"] - 1]) == tok.decode([enc.ids[0]])

    print(
        json.dumps(
            {
                "shape": args.shape,
                "parameters": n_params,
                "tensors": len(expected),
                "file_bytes": size,
                "header_bytes": hlen,
                "tokenizer_vocab": vocab,
                "special_ids": ids,
                "roundtrip_tokens": len(enc.ids),
                "encode_with_specials": with_bos,
                "stats(mean,std)": stats,
            },
            indent=1,
        )
    )
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
