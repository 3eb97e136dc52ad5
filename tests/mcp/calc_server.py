"""A small MCP server over stdio for the agent-loop tests: newline-delimited
JSON-RPC 2.0, the `initialize` handshake, `tools/list` and `tools/call`.

Its one tool, `add`, takes two integers and returns their sum with a marker
the test looks for. Every call it receives is appended, as one JSON line,
to the file named by the environment variable CALC_SERVER_LOG.
"""

import json
import os
import sys

TOOLS = [
    {
        "name": "add",
        "description": "Add two integers.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    }
]


def answer(request):
    method = request.get("method")
    params = request.get("params") or {}
    if method == "initialize":
        return {
            "protocolVersion": params.get("protocolVersion", "2025-06-18"),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "calc", "version": "1.0"},
        }
    if method == "ping":
        return {}
    if method == "tools/list":
        return {"tools": TOOLS}
    if method == "tools/call":
        args = params.get("arguments") or {}
        log = os.environ.get("CALC_SERVER_LOG")
        if log:
            with open(log, "a") as f:
                f.write(json.dumps({"name": params.get("name"), "arguments": args}) + "\n")
        if params.get("name") != "add":
            return {"content": [{"type": "text", "text": "unknown tool"}], "isError": True}
        a, b = args.get("a"), args.get("b")
        if not isinstance(a, int) or not isinstance(b, int):
            return {"content": [{"type": "text", "text": "a and b must be integers"}], "isError": True}
        return {"content": [{"type": "text", "text": f"SUM-RESULT {a + b}"}]}
    raise LookupError(method)


def main():
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        request = json.loads(line)
        if "id" not in request:
            continue  # a notification (initialized, cancelled)
        try:
            reply = {"jsonrpc": "2.0", "id": request["id"], "result": answer(request)}
        except LookupError as e:
            reply = {"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32601, "message": f"method not found: {e}"}}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
