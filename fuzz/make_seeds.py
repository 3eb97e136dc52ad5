#!/usr/bin/env python3
"""Writes small seed inputs for the fuzz targets into corpus/<target>/.

Seeds give the fuzzer well-formed starting points: tiny safetensors files
and a sharded checkpoint, the fixtures' config.json files, chat templates
of the shared models and fixtures, and a few token sequences.
Run from fuzz/: python3 make_seeds.py
"""
import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "tests" / "fixtures"
SHARED = HERE.parent.parent / "shared" / "models"
SIZES = {"F32": 4, "BF16": 2, "F16": 2, "U8": 1, "I8": 1, "I64": 8}


def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape)]; data is a byte ramp."""
    header, offset = {}, 0
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(i % 251 for i in range(offset))


def write(target, name, data):
    d = HERE / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def main():
    single = [
        [("a", "F32", [2, 3]), ("b", "BF16", [4]), ("c", "F16", [1, 1])],
        [("w.qweight", "U8", [2, 16]), ("w.scales", "BF16", [2, 1]), ("w.qzeros", "U8", [2, 1])],
        [("x", "I64", [3]), ("y", "I8", [0])],
        [],
    ]
    for i, t in enumerate(single):
        write("safetensors", f"single-{i}", b"\0" + safetensors(t, {"w": "{}"}))
    shards = [[("a", "F32", [2, 2])], [("b", "BF16", [3])]]
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    body = json.dumps(index).encode()
    for s in shards:
        body += b"\0SHARD\0" + safetensors(s)
    write("safetensors", "sharded", b"\1" + body)

    for config in sorted(FIXTURES.glob("*/config.json")) + sorted(SHARED.glob("*/config.json")):
        write("config_geometry", config.parent.name, config.read_bytes())

    messages = "\0".join(["system\1You are terse.", "user\1hi", "assistant\1hello", "user\1def f():"])
    for tokenizer_config in sorted(FIXTURES.glob("*/tokenizer_config.json")) + sorted(
        SHARED.glob("*/tokenizer_config.json")
    ):
        template = json.loads(tokenizer_config.read_text()).get("chat_template")
        if isinstance(template, str):
            write("chat_template", tokenizer_config.parent.name, (template + "\0" + messages).encode())
    for jinja in sorted(SHARED.glob("*/chat_template.jinja")):
        write("chat_template", jinja.parent.name + "-jinja", (jinja.read_text() + "\0" + messages).encode())

    for i, ids in enumerate([[1, 2, 3], [100, 200, 300, 400], [0xFFFF], list(range(60, 90))]):
        data = b"".join(struct.pack("<H", x) for x in ids)
        write("stream_decoder", f"ids-{i}", data)

    for i, control in enumerate([0x0000, 0x0009, 0x0001, 0x0008, 0x0010]):
        meta = b'{"format": "q4", "group_size": 32, "rows": 4, "cols": 64, "rotation": "none"}'
        data = struct.pack("<HBBBBB", control, 3, 0, 1, len(meta), 0) + meta + bytes(range(256))
        write("quant_metadata", f"seed-{i}", data)


if __name__ == "__main__":
    main()
