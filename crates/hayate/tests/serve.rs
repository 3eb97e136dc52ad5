//! `hayate serve` over plain HTTP: the routes answer, a completion comes
//! back in OpenAI's shape, and errors are error objects. (The full API
//! suite, with the `openai` package, is tests/server/run.sh.)

mod common;

use common::{Server, shared_model};

/// A server of the trained checkpoint.
fn start(extra: &[&str]) -> Server {
    Server::start(&shared_model("pystd-qwen3-7m"), extra)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn serves_completions_and_answers_errors_with_error_objects() {
    let server = start(&[]);
    let (status, body) = server.request("GET", "/health", "");
    assert_eq!((status, json(&body)["status"].as_str()), (200, Some("ok")));
    let (status, body) = server.request(
        "POST",
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": "Write a loop."}], "max_tokens": 7, "seed": 1}"#,
    );
    assert_eq!(status, 200, "{body}");
    let reply = json(&body);
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["usage"]["completion_tokens"], 7);
    assert_eq!(reply["choices"][0]["finish_reason"], "length");
    assert!(reply["choices"][0]["message"]["content"].as_str().is_some());
    // Greedy completions of the same prompt agree, whole or streamed.
    let ask = r#"{"prompt": "import os\n", "max_tokens": 12, "temperature": 0}"#;
    let (_, whole) = server.request("POST", "/v1/completions", ask);
    let text = json(&whole)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    let streaming = ask.replace('{', r#"{"stream": true, "#);
    let (status, events) = server.request("POST", "/v1/completions", &streaming);
    assert_eq!(status, 200);
    let streamed: String = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            json(d)["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(streamed, text);
    assert!(events.contains("data: [DONE]"));
    for (path, body, status, param) in [
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "top_p": "high"}"#,
            400,
            "top_p",
        ),
        ("/v1/completions", r#"{"prompt": "x", "n": 4}"#, 400, "n"),
        ("/v1/nowhere", "{}", 404, ""),
    ] {
        let (got, reply) = server.request("POST", path, body);
        assert_eq!(got, status, "{path} {body}: {reply}");
        let error = &json(&reply)["error"];
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        if !param.is_empty() {
            assert_eq!(error["param"], param);
        }
    }
}

#[test]
fn an_api_key_is_required_when_set() {
    let server = start(&["--api-key", "k3y"]);
    let (status, body) = server.request("GET", "/v1/models", "");
    assert_eq!(status, 401, "{body}");
    assert_eq!(json(&body)["error"]["code"], "invalid_api_key");
    assert_eq!(server.request("GET", "/health", "").0, 200);
}

#[test]
fn metrics_count_requests_tokens_and_latencies() {
    let server = start(&["--speculate", "ngram", "--draft-tokens", "2"]);
    let ask = r#"{"messages": [{"role": "user", "content": "Write a loop."}], "max_tokens": 9, "seed": 1}"#;
    let (_, first) = server.request("POST", "/v1/chat/completions", ask);
    let (_, second) = server.request("POST", "/v1/chat/completions", ask);
    let (missing, _) = server.request("GET", "/nowhere", "");
    assert_eq!(missing, 404);
    let (status, text) = server.request("GET", "/metrics", "");
    assert_eq!(status, 200);
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    let usage = |body: &str, field: &str| json(body)["usage"][field].as_f64().unwrap();
    assert_eq!(
        value("hayate_requests_total{route=\"/v1/chat/completions\",status=\"200\"}"),
        2.0
    );
    assert_eq!(
        value("hayate_requests_total{route=\"other\",status=\"404\"}"),
        1.0
    );
    assert_eq!(
        value("hayate_prompt_tokens_total"),
        usage(&first, "prompt_tokens") + usage(&second, "prompt_tokens")
    );
    assert_eq!(
        value("hayate_generated_tokens_total"),
        usage(&first, "completion_tokens") + usage(&second, "completion_tokens")
    );
    // The second, identical request found all but its last prompt token cached.
    assert_eq!(
        value("hayate_prompt_cached_tokens_total"),
        json(&second)["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_f64()
            .unwrap()
    );
    assert!(value("hayate_prompt_cached_tokens_total") > 0.0);
    assert_eq!(value("hayate_time_to_first_token_seconds_count"), 2.0);
    // One interval between each two tokens of a reply.
    assert_eq!(value("hayate_inter_token_seconds_count"), 16.0);
    assert_eq!(
        value("hayate_inter_token_seconds_bucket{le=\"+Inf\"}"),
        16.0
    );
    assert!(value("hayate_draft_accepted_tokens_total") <= value("hayate_draft_tokens_total"));
    assert_eq!(value("hayate_queue_depth"), 0.0);
}
