"""`hayate serve` driven by the official `openai` package (and raw HTTP where
a client library would hide what is checked): shapes, streaming, seeds,
stop strings, log-probabilities, penalties, errors, disconnects.

Run by tests/server/run.sh, which installs the pinned requirements.
"""

import http.client
import itertools
import json
import os
import re
import socket
import subprocess
import threading
import time
import unittest
from pathlib import Path

import jsonschema
import openai

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT.parent / "shared" / "models" / "pystd-qwen3-7m"
DRAFT = ROOT.parent / "shared" / "models" / "pystd-qwen3-1m"
BINARY = os.environ.get("HAYATE_BIN", str(ROOT / "target" / "release" / "hayate"))
PROMPT = [{"role": "user", "content": "Write a function that parses a config file."}]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                    "unit": {"enum": ["C", "F"]},
                },
                "required": ["city", "days", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_code",
            "description": "Search the repository.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string", "maxLength": 30}, "limit": {"type": "integer", "minimum": 1, "maximum": 50}},
                "required": ["query", "limit"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# A chat template in LFM2's tool syntax (tools and calls rendered by the template itself).
LFM2_TEMPLATE = """{%- if tools %}<|im_start|>system
List of tools: <|tool_list_start|>{{ tools | tojson }}<|tool_list_end|><|im_end|>
{% endif %}{%- for message in messages -%}
<|im_start|>{{ message['role'] }}
{% if message.tool_calls %}<|tool_call_start|>[{% for tc in message.tool_calls %}{{ tc.function.name }}({% for k, v in tc.function.arguments | items %}{{ k }}={{ v | tojson }}{% if not loop.last %}, {% endif %}{% endfor %}){% if not loop.last %}, {% endif %}{% endfor %}]<|tool_call_end|>{% endif %}{{ message['content'] }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""


# A chat template in Llama 3.x's JSON tool syntax: results come back as
# `ipython` turns, calls are `{"name": ..., "parameters": ...}`.
LLAMA3_TEMPLATE = """{%- for message in messages -%}
<|im_start|>{% if message['role'] == 'tool' %}ipython{% else %}{{ message['role'] }}{% endif %}
{% if tools and loop.first %}Reply with a JSON object {"name": function name, "parameters": its arguments} to call one of: {{ tools | tojson }}
{% endif %}{% for tc in message.tool_calls or [] %}{"name": "{{ tc.function.name }}", "parameters": {{ tc.function.arguments | tojson }}}{% endfor %}{{ message['content'] }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""


def templated_model(directory, template):
    """pystd-qwen3-7m with another chat template, in `directory`."""
    directory.mkdir()
    for entry in MODEL.iterdir():
        if entry.name != "chat_template.jinja":
            (directory / entry.name).symlink_to(entry)
    (directory / "chat_template.jinja").write_text(template)
    return directory


class Server:
    """A `hayate serve` process on a free loopback port."""

    def __init__(self, *extra, env=None, model=MODEL):
        self.process = subprocess.Popen(
            [BINARY, "serve", "--model", str(model), "--port", "0", "--threads", "2", *extra],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines = []
        deadline = time.time() + 60
        while time.time() < deadline:
            line = self.process.stderr.readline()
            if not line:
                raise RuntimeError("hayate serve exited: " + "".join(self.lines))
            self.lines.append(line)
            found = re.search(r"http://([0-9.]+):(\d+)/v1", line)
            if found:
                self.host, self.port = found.group(1), int(found.group(2))
                break
        else:
            raise RuntimeError("hayate serve did not start")
        # Keep draining stderr so the server never blocks on it.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def url(self):
        return f"http://{self.host}:{self.port}/v1"

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=120)

    def raw(self, method, path, body=None, headers=None):
        """(status, headers, parsed JSON or text) of one plain HTTP request."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return response.status, dict(response.getheaders()), parsed

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stderr.close()


def chat_stream_text(client, **kwargs):
    """The text, finish reason and usage of a streamed chat completion."""
    text, finish, usage, roles = "", None, None, []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish, usage, roles


class Api(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server()
        cls.client = cls.server.client()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def assert_error(self, status, body, want_status, param=None):
        self.assertEqual(status, want_status, body)
        self.assertIsInstance(body, dict, body)
        error = body["error"]
        self.assertTrue(error["message"])
        self.assertIn("type", error)
        if param is not None:
            self.assertEqual(error["param"], param, error)

    def test_models_and_health(self):
        models = self.client.models.list()
        self.assertEqual([m.id for m in models.data], ["pystd-qwen3-7m"])
        status, _, body = self.server.raw("GET", "/health")
        self.assertEqual(status, 200)
        self.assertEqual(body["status"], "ok")

    def test_chat_completion_shape_and_usage(self):
        r = self.client.chat.completions.create(model="pystd-qwen3-7m", messages=PROMPT, max_tokens=24, seed=1)
        self.assertEqual(r.object, "chat.completion")
        self.assertTrue(r.id.startswith("chatcmpl-"))
        self.assertEqual(len(r.choices), 1)
        choice = r.choices[0]
        self.assertEqual(choice.message.role, "assistant")
        self.assertTrue(choice.message.content)
        self.assertEqual(choice.finish_reason, "length")
        self.assertEqual(r.usage.completion_tokens, 24)
        self.assertGreater(r.usage.prompt_tokens, 5)
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens + 24)
        # max_completion_tokens is the newer name of the same limit.
        r = self.client.chat.completions.create(model="m", messages=PROMPT, max_completion_tokens=5, seed=1)
        self.assertEqual(r.usage.completion_tokens, 5)
        self.assertEqual(r.model, "m")

    def test_streaming_equals_non_streaming_at_the_same_seed(self):
        for temperature in (0.0, 0.8, 1.2):
            kwargs = dict(model="m", messages=PROMPT, max_tokens=48, seed=11, temperature=temperature)
            whole = self.client.chat.completions.create(**kwargs)
            text, finish, usage, roles = chat_stream_text(
                self.client, stream_options={"include_usage": True}, **kwargs
            )
            self.assertEqual(text, whole.choices[0].message.content, f"T={temperature}")
            self.assertEqual(finish, whole.choices[0].finish_reason)
            self.assertEqual(roles, ["assistant"])
            self.assertEqual(usage.completion_tokens, whole.usage.completion_tokens)
            self.assertEqual(usage.prompt_tokens, whole.usage.prompt_tokens)
        kwargs = dict(model="m", prompt="import os\n", max_tokens=40, seed=5, temperature=0.9)
        whole = self.client.completions.create(**kwargs)
        streamed = "".join(c.choices[0].text for c in self.client.completions.create(stream=True, **kwargs) if c.choices)
        self.assertEqual(streamed, whole.choices[0].text)

    def test_a_seed_reproduces_and_seeds_differ(self):
        def reply(seed):
            r = self.client.chat.completions.create(model="m", messages=PROMPT, max_tokens=40, seed=seed, temperature=1.0)
            return r.choices[0].message.content

        first = reply(42)
        self.client.chat.completions.create(model="m", messages=PROMPT, max_tokens=10, seed=7)
        self.assertEqual(reply(42), first)
        self.assertNotEqual(reply(43), first)
        # Without a seed every request draws afresh.
        texts = {self.client.chat.completions.create(model="m", messages=PROMPT, max_tokens=30, temperature=1.0).choices[0].message.content for _ in range(3)}
        self.assertGreater(len(texts), 1)

    def test_stop_strings_are_matched_across_tokens_and_never_emitted(self):
        base = dict(model="m", prompt="def main():\n", max_tokens=60, temperature=0)
        full = self.client.completions.create(**base).choices[0].text
        self.assertIn("\n", full.strip("\n"))
        # A stop string that spans tokens: two characters around a token boundary.
        cut = full.find("\n", 1)
        stop = full[cut - 1 : cut + 2]
        r = self.client.completions.create(stop=[stop, "never-there"], **base)
        self.assertEqual(r.choices[0].text, full[: full.find(stop)])
        self.assertEqual(r.choices[0].finish_reason, "stop")
        streamed = "".join(c.choices[0].text for c in self.client.completions.create(stream=True, stop=stop, **base) if c.choices)
        self.assertEqual(streamed, r.choices[0].text)
        chat = self.client.chat.completions.create(model="m", messages=PROMPT, max_tokens=60, temperature=0, stop="\n")
        self.assertNotIn("\n", chat.choices[0].message.content)
        self.assertEqual(chat.choices[0].finish_reason, "stop")

    def test_logprobs(self):
        r = self.client.chat.completions.create(model="m", messages=PROMPT, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
        content = r.choices[0].logprobs.content
        self.assertEqual(len(content), 12)
        self.assertEqual("".join(e.token for e in content), r.choices[0].message.content)
        for e in content:
            self.assertLessEqual(e.logprob, 0.0)
            self.assertEqual(len(e.top_logprobs), 3)
            tops = [t.logprob for t in e.top_logprobs]
            self.assertEqual(tops, sorted(tops, reverse=True))
            # Greedy picks the likeliest token.
            self.assertEqual(e.top_logprobs[0].token, e.token)
            self.assertAlmostEqual(e.top_logprobs[0].logprob, e.logprob, places=5)
            self.assertEqual(bytes(e.bytes).decode(), e.token)
        plain = self.client.chat.completions.create(model="m", messages=PROMPT, max_tokens=4)
        self.assertIsNone(plain.choices[0].logprobs)
        legacy = self.client.completions.create(model="m", prompt="class A:\n", max_tokens=6, temperature=0, logprobs=2)
        lp = legacy.choices[0].logprobs
        self.assertEqual(len(lp.tokens), 6)
        self.assertEqual(len(lp.token_logprobs), 6)
        self.assertEqual(len(lp.top_logprobs), 6)
        self.assertTrue(all(len(t) <= 2 for t in lp.top_logprobs))
        self.assertEqual(lp.text_offset[0], 0)

    def test_completions_take_token_ids_and_echo(self):
        status, _, body = self.server.raw("POST", "/v1/completions", {"prompt": [1, 2, 3, 4], "max_tokens": 3, "temperature": 0})
        self.assertEqual(status, 200, body)
        self.assertEqual(body["usage"]["prompt_tokens"], 4)
        r = self.client.completions.create(model="m", prompt="x = 1\n", max_tokens=4, temperature=0, echo=True)
        self.assertTrue(r.choices[0].text.startswith("x = 1\n"))
        # OpenAI's default limit for completions is 16 tokens.
        r = self.client.completions.create(model="m", prompt="import", temperature=0.5, seed=2)
        self.assertLessEqual(r.usage.completion_tokens, 16)

    def test_penalties_change_the_reply(self):
        base = dict(model="m", prompt="x = [", max_tokens=40, temperature=0)
        plain = self.client.completions.create(**base).choices[0].text
        penalized = self.client.completions.create(frequency_penalty=2.0, presence_penalty=1.0, **base).choices[0].text
        self.assertNotEqual(plain, penalized)
        repeated = self.client.completions.create(extra_body={"repetition_penalty": 1.5}, **base).choices[0].text
        self.assertNotEqual(plain, repeated)

    def test_message_forms(self):
        messages = [
            {"role": "developer", "content": "You write Python."},
            {"role": "user", "content": [{"type": "text", "text": "Write "}, {"type": "text", "text": "a loop."}]},
            {"role": "assistant", "content": "for i in range(3):\n    pass"},
            {"role": "user", "content": "Another."},
        ]
        r = self.client.chat.completions.create(
            model="m", messages=messages, max_tokens=8, seed=3,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}, "some_unknown_field": {"x": 1}},
        )
        self.assertEqual(r.usage.completion_tokens, 8)

    def test_a_follow_up_turn_reuses_the_cache(self):
        first = self.client.chat.completions.create(model="m", messages=PROMPT, max_tokens=20, seed=9)
        turn = PROMPT + [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "Now add tests."},
        ]
        second = self.client.chat.completions.create(model="m", messages=turn, max_tokens=5, seed=9)
        cached = second.usage.prompt_tokens_details.cached_tokens
        self.assertGreaterEqual(cached, first.usage.prompt_tokens)
        self.assertLess(cached, second.usage.prompt_tokens)

    def test_bad_requests_are_400_naming_the_field(self):
        cases = [
            ({"messages": PROMPT, "temperature": "hot"}, "temperature"),
            ({"messages": PROMPT, "max_tokens": -3}, "max_tokens"),
            ({"messages": PROMPT, "temperature": 5}, "temperature"),
            ({"messages": PROMPT, "top_p": 0}, "top_p"),
            ({"messages": PROMPT, "n": 2}, "n"),
            ({"messages": PROMPT, "stop": [""]}, "stop"),
            ({"messages": PROMPT, "stop": 7}, "stop"),
            ({"messages": PROMPT, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
            ({"messages": PROMPT, "presence_penalty": 3}, "presence_penalty"),
            ({"messages": []}, "messages"),
            ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
            ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type"),
            ({"messages": PROMPT, "response_format": {"type": "xml"}}, "response_format.type"),
            ({"messages": PROMPT, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
            ({"messages": PROMPT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/missing"}}}}, "response_format.json_schema.schema"),
            ({"messages": PROMPT, "grammar": "start: (("}, "grammar"),
            ({"messages": PROMPT, "tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
            ({"messages": PROMPT, "tools": [{"type": "retrieval"}]}, "tools[0].type"),
            ({"messages": PROMPT, "tool_choice": "required"}, "tool_choice"),
            ({"messages": PROMPT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
            ({"messages": PROMPT, "tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
            ({"prompt_only": 1}, None),
        ]
        for body, param in cases:
            status, _, reply = self.server.raw("POST", "/v1/chat/completions", body)
            self.assert_error(status, reply, 400, param)
        status, _, reply = self.server.raw("POST", "/v1/chat/completions", b"{not json")
        self.assert_error(status, reply, 400)
        status, _, reply = self.server.raw("POST", "/v1/completions", {"prompt": [999999]})
        self.assert_error(status, reply, 400, "prompt")
        with self.assertRaises(openai.BadRequestError):
            self.client.chat.completions.create(model="m", messages=PROMPT, n=3)

    def test_a_prompt_longer_than_the_context_is_refused_not_truncated(self):
        long = "def f():\n    return 1\n" * 400
        status, _, reply = self.server.raw("POST", "/v1/completions", {"prompt": long, "max_tokens": 1})
        self.assert_error(status, reply, 400, "prompt")
        self.assertEqual(reply["error"]["code"], "context_length_exceeded")
        status, _, reply = self.server.raw("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": long}]})
        self.assert_error(status, reply, 400, "messages")
        status, _, reply = self.server.raw("POST", "/v1/chat/completions", {"messages": PROMPT, "max_tokens": 100000})
        self.assert_error(status, reply, 400, "max_tokens")

    def test_unknown_routes_and_methods(self):
        status, _, reply = self.server.raw("GET", "/v1/nothing")
        self.assert_error(status, reply, 404)
        status, _, reply = self.server.raw("GET", "/v1/chat/completions")
        self.assert_error(status, reply, 405)

    def test_a_client_that_leaves_mid_stream_frees_its_request(self):
        _, _, before = self.server.raw("GET", "/health")
        body = json.dumps({"model": "m", "messages": PROMPT, "max_tokens": 1500, "stream": True, "temperature": 1.0, "seed": 1})
        sock = socket.create_connection((self.server.host, self.server.port))
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        received = b""
        while received.count(b"data:") < 3:
            received += sock.recv(4096)
        sock.close()
        # The engine drops the request: the queue empties long before 1500 tokens.
        deadline = time.time() + 10
        while time.time() < deadline:
            _, _, health = self.server.raw("GET", "/health")
            if health["queued"] == 0:
                break
            time.sleep(0.05)
        self.assertEqual(health["queued"], 0)
        # It stopped soon after the client left, far short of its 1500 tokens.
        self.assertLess(health["tokens_generated"] - before["tokens_generated"], 300)
        r = self.client.chat.completions.create(model="m", messages=PROMPT, max_tokens=4)
        self.assertEqual(r.usage.completion_tokens, 4)


SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "maxLength": 40},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "function": {"type": "string", "maxLength": 30},
            "arguments": {
                "type": "array",
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 16},
                        "kind": {"enum": ["int", "str", "list", "dict"]},
                        "default": {"type": ["number", "null"]},
                    },
                    "required": ["name", "kind"],
                    "additionalProperties": False,
                },
            },
            "returns": {"enum": ["None", "int", "str", "bool"]},
        },
        "required": ["function", "arguments", "returns"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "number", "minimum": -10, "maximum": 10},
                    "y": {"type": "number", "exclusiveMinimum": 0, "maximum": 5},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "labels": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
            "ok": {"type": "boolean"},
        },
        "required": ["point", "labels", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {"type": "integer", "minimum": 1, "maximum": 9},
        "minItems": 2,
        "maxItems": 6,
    },
    {
        "type": "object",
        "properties": {
            "status": {"enum": ["open", "closed", "pending"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 1000},
            "meta": {
                "type": "object",
                "properties": {"owner": {"type": "string", "maxLength": 12}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
                "required": ["owner"],
                "additionalProperties": False,
            },
        },
        "required": ["status", "count", "meta"],
        "additionalProperties": False,
    },
]


class Constrained(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server()
        cls.client = cls.server.client()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def test_json_schema_replies_are_valid_documents(self):
        valid = 0
        for i in range(100):
            schema = SCHEMAS[i % len(SCHEMAS)]
            r = self.client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "Describe the function as JSON."}],
                max_tokens=400,
                seed=i,
                temperature=1.0,
                response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}},
            )
            text = r.choices[0].message.content
            self.assertEqual(r.choices[0].finish_reason, "stop", text)
            jsonschema.validate(json.loads(text), schema)
            valid += 1
        self.assertEqual(valid, 100)

    def test_json_object_and_streaming_under_a_schema(self):
        r = self.client.chat.completions.create(model="m", messages=PROMPT, max_tokens=200, seed=4, response_format={"type": "json_object"})
        self.assertIsInstance(json.loads(r.choices[0].message.content), dict)
        kwargs = dict(
            model="m", messages=PROMPT, max_tokens=300, seed=8, temperature=0.9,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[1]}},
        )
        whole = self.client.chat.completions.create(**kwargs).choices[0].message.content
        streamed, finish, _, _ = chat_stream_text(self.client, **kwargs)
        self.assertEqual(streamed, whole)
        self.assertEqual(finish, "stop")
        jsonschema.validate(json.loads(streamed), SCHEMAS[1])

    def test_reasoning_goes_to_reasoning_content(self):
        grammar = 'start: "<think>" R "</think>" A\nR: /[a-z ]{1,20}/\nA: /[a-z]{1,10}/\n'
        kwargs = dict(model="m", messages=PROMPT, max_tokens=60, seed=2, temperature=1.0, extra_body={"grammar": grammar})
        whole = self.client.chat.completions.create(**kwargs).choices[0].message
        reasoning = whole.model_extra.get("reasoning_content")
        self.assertTrue(reasoning)
        self.assertNotIn("<think>", reasoning + whole.content)
        self.assertRegex(whole.content, r"^[a-z]{1,10}$")
        streamed_reasoning, streamed = "", ""
        for chunk in self.client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                streamed_reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
                streamed += choice.delta.content or ""
        self.assertEqual((streamed_reasoning, streamed), (reasoning, whole.content))

    def test_lark_grammars_and_completions(self):
        for seed in range(5):
            r = self.client.completions.create(
                model="m", prompt="The answer is ", max_tokens=20, seed=seed, temperature=1.0,
                extra_body={"grammar": 'start: ("yes" | "no") "." '},
            )
            self.assertIn(r.choices[0].text, ("yes.", "no."))
            self.assertEqual(r.choices[0].finish_reason, "stop")
        r = self.client.completions.create(
            model="m", prompt="config = ", max_tokens=200, seed=1,
            extra_body={"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMAS[3]}}},
        )
        jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS[3])


def check_calls(test, calls, allowed):
    test.assertTrue(calls)
    for call in calls:
        test.assertEqual(call.type, "function")
        test.assertTrue(call.id)
        test.assertIn(call.function.name, allowed)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


class Tools(unittest.TestCase):
    """Tool calls on the ChatML model (Hermes syntax, taught by a system
    prompt since its template knows no tools) and on the same weights with
    an LFM2-style and a Llama 3-style template (their own syntaxes, rendered
    by the templates)."""

    @classmethod
    def setUpClass(cls):
        import tempfile

        cls.tmp = tempfile.TemporaryDirectory()
        tmp = Path(cls.tmp.name)
        cls.servers = {
            "hermes": Server(),
            "lfm2": Server(model=templated_model(tmp / "lfm2", LFM2_TEMPLATE)),
            "llama3-json": Server(model=templated_model(tmp / "llama3", LLAMA3_TEMPLATE)),
        }

    @classmethod
    def tearDownClass(cls):
        for server in cls.servers.values():
            server.stop()
        cls.tmp.cleanup()

    def test_required_and_named_calls_validate(self):
        for syntax, server in self.servers.items():
            client = server.client()
            for seed in range(6):
                r = client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
                    tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=seed, temperature=1.0, max_tokens=200,
                )
                choice = r.choices[0]
                self.assertEqual(choice.finish_reason, "tool_calls", (syntax, choice.message))
                self.assertEqual(len(choice.message.tool_calls), 1)
                check_calls(self, choice.message.tool_calls, SCHEMA_OF)
                named = client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "Find the parser."}],
                    tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search_code"}},
                    seed=seed, temperature=1.0, max_tokens=200,
                )
                calls = named.choices[0].message.tool_calls
                self.assertEqual([c.function.name for c in calls], ["search_code"], syntax)
                check_calls(self, calls, {"search_code"})

    def test_streamed_calls_equal_whole_ones(self):
        for (syntax, server), parallel in itertools.product(self.servers.items(), (False, True)):
            client = server.client()
            kwargs = dict(
                model="m", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
                tool_choice="required", seed=3, temperature=0.8, max_tokens=300, parallel_tool_calls=parallel,
            )
            whole = client.chat.completions.create(**kwargs).choices[0]
            calls, finish, content, fragments = {}, None, "", 0
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                for choice in chunk.choices:
                    finish = choice.finish_reason or finish
                    content += choice.delta.content or ""
                    for delta in choice.delta.tool_calls or []:
                        entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                        entry["name"] += delta.function.name or ""
                        entry["arguments"] += delta.function.arguments or ""
                        fragments += bool(delta.function.arguments)
            what = (syntax, parallel)
            self.assertEqual(finish, whole.finish_reason, what)
            self.assertEqual(content, whole.message.content or "", what)
            self.assertEqual(
                [calls[i] for i in sorted(calls)],
                [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls or []],
                what,
            )
            if not parallel:
                # One call, complete: a reply cut short by max_tokens would be text.
                self.assertEqual((finish, len(calls)), ("tool_calls", 1), what)
                # JSON calls stream their arguments as they are written (LFM2's
                # pythonic calls come whole, converted to JSON).
                if syntax != "lfm2":
                    self.assertGreater(fragments, 3, what)

    def test_tool_results_round_trip_through_the_template(self):
        for syntax, server in self.servers.items():
            client = server.client()
            ask = [{"role": "user", "content": "Weather in Oslo?"}]
            r = client.chat.completions.create(model="m", messages=ask, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=1, max_tokens=200)
            call = r.choices[0].message.tool_calls[0]
            conversation = ask + [
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "RESULT-17: sunny"},
            ]
            status, _, shown = server.raw("POST", "/apply-template", {"messages": conversation, "tools": TOOLS})
            self.assertEqual(status, 200, shown)
            prompt = shown["prompt"]
            self.assertIn("RESULT-17: sunny", prompt)
            self.assertIn(call.function.name, prompt)
            self.assertIn("get_weather", prompt)
            self.assertEqual(shown["tool_syntax"], syntax)
            marker = {"hermes": "<tool_call>", "lfm2": "<|tool_call_start|>", "llama3-json": '"parameters": {'}[syntax]
            self.assertIn(marker, prompt)
            for key, value in json.loads(call.function.arguments).items():
                self.assertIn(key, prompt)
            # The model answers after the tool's result.
            after = client.chat.completions.create(model="m", messages=conversation, tools=TOOLS, seed=1, max_tokens=10)
            self.assertEqual(after.usage.completion_tokens, 10)
            # tool_choice none hides the tools.
            status, _, hidden = server.raw("POST", "/apply-template", {"messages": ask, "tools": TOOLS, "tool_choice": "none"})
            self.assertNotIn("get_weather", hidden["prompt"])


def without_ids(message):
    """`message` with its tool calls' ids (fresh per reply) left out."""
    calls = [{k: v for k, v in c.items() if k != "id"} for c in message.get("tool_calls") or []]
    return {**message, "tool_calls": calls}


class Speculation(unittest.TestCase):
    """Speculative decoding in the server gives the replies of plain decoding,
    with and without a grammar, and reports what it drafted."""

    REQUESTS = [
        *({"messages": PROMPT, "max_tokens": 60, "seed": 3, "temperature": t} for t in (0.0, 0.8, 1.2)),
        {"messages": PROMPT, "max_tokens": 80, "seed": 4, "temperature": 0.9,
         "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[1]}}},
        {"messages": PROMPT, "max_tokens": 120, "seed": 5, "tools": TOOLS, "tool_choice": "required"},
        {"messages": PROMPT, "max_tokens": 30, "seed": 6, "logprobs": True, "top_logprobs": 2},
    ]

    def replies(self, *extra):
        server = Server(*extra)
        try:
            out = []
            for request in self.REQUESTS:
                status, _, body = server.raw("POST", "/v1/chat/completions", {"model": "m", **request})
                self.assertEqual(status, 200, body)
                out.append(body)
            return out
        finally:
            server.stop()

    def test_speculative_replies_equal_plain_ones(self):
        plain = self.replies("--speculate", "none")
        # A fixed draft length, so that every reply drafts (the adaptive one
        # may stop drafting after poor acceptance).
        for extra in (("--draft", str(DRAFT), "--draft-tokens", "3"), ("--speculate", "suffix"), ("--speculate", "ngram")):
            for request, base, spec in zip(self.REQUESTS, plain, self.replies(*extra)):
                what = f"{extra} {request}"
                self.assertEqual(without_ids(spec["choices"][0]["message"]), without_ids(base["choices"][0]["message"]), what)
                self.assertEqual(spec["usage"]["completion_tokens"], base["usage"]["completion_tokens"], what)
                self.assertNotIn("draft_n", base["timings"])
                if extra[0] == "--draft":
                    self.assertGreater(spec["timings"]["draft_n_accepted"], 0, what)
                    self.assertLessEqual(spec["timings"]["draft_n_accepted"], spec["timings"]["draft_n"])
                if "logprobs" in request:
                    got = [(e["token"], round(e["logprob"], 4)) for e in spec["choices"][0]["logprobs"]["content"]]
                    want = [(e["token"], round(e["logprob"], 4)) for e in base["choices"][0]["logprobs"]["content"]]
                    self.assertEqual(got, want, what)
        jsonschema.validate(json.loads(plain[3]["choices"][0]["message"]["content"]), SCHEMAS[1])


class Limits(unittest.TestCase):
    def test_api_key(self):
        server = Server(env={"HAYATE_API_KEY": "sesame"})
        try:
            with self.assertRaises(openai.AuthenticationError):
                server.client("wrong").models.list()
            status, headers, body = server.raw("GET", "/v1/models")
            self.assertEqual(status, 401)
            self.assertEqual(body["error"]["code"], "invalid_api_key")
            self.assertEqual([m.id for m in server.client("sesame").models.list().data], ["pystd-qwen3-7m"])
            # Health stays open for load balancers.
            self.assertEqual(server.raw("GET", "/health")[0], 200)
        finally:
            server.stop()

    def test_body_limit_and_full_queue(self):
        server = Server("--max-body-bytes", "2000", "--queue", "1")
        try:
            status, _, body = server.raw("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 5000}]})
            self.assertEqual(status, 413, body)
            self.assertIn("error", body)
            results = []

            def ask():
                results.append(server.raw("POST", "/v1/chat/completions", {"messages": PROMPT, "max_tokens": 400, "temperature": 1.0}))

            threads = [threading.Thread(target=ask) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            statuses = sorted(r[0] for r in results)
            self.assertIn(200, statuses)
            self.assertIn(503, statuses)
            busy = next(r for r in results if r[0] == 503)
            self.assertEqual(busy[1].get("retry-after"), "1")
            self.assertIn("error", busy[2])
            # Served again once the queue drains.
            self.assertEqual(server.raw("POST", "/v1/chat/completions", {"messages": PROMPT, "max_tokens": 2})[0], 200)
        finally:
            server.stop()


if __name__ == "__main__":
    unittest.main()
