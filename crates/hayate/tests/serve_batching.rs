//! `hayate serve` batching requests on every architecture fixture (each
//! given a small character-level tokenizer and a chat template): a
//! 20-turn conversation prefills only each new turn, and a seeded request
//! gives the same text alone and among eight at once.

mod common;

use common::{Server, fixture_names, fixtures, request, shared_model};
use std::path::Path;
use std::process::Command;

/// A template with nothing but the messages' contents between markers, so
/// that 20 turns fit the fixtures' 512 positions.
const TEMPLATE: &str = "{% for m in messages %}{{ '<|im_start|>' + m['content'] + '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>' }}{% endif %}";

/// The characters of the tokenizer, one token each after the three markers.
const CHARS: &str =
    "ĠĊabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()-_/";

/// A model directory for fixture `name`: its files, and a byte-level
/// tokenizer of the fixture's vocabulary (the markers, single characters,
/// then pairs of letters that encoding never produces).
fn fixture_model(name: &str, dir: &Path) {
    let from = fixtures().join(name);
    for entry in std::fs::read_dir(&from).unwrap() {
        let file = entry.unwrap().file_name();
        if file != "reference_logits.safetensors" {
            std::fs::copy(from.join(&file), dir.join(&file)).unwrap();
        }
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(from.join("config.json")).unwrap()).unwrap();
    let text = config.get("text_config").unwrap_or(&config);
    let vocab_size = text["vocab_size"].as_u64().unwrap() as usize;
    let pystd = shared_model("pystd-qwen3-7m");
    let mut tokenizer: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pystd.join("tokenizer.json")).unwrap()).unwrap();
    let mut vocab = serde_json::Map::new();
    for (i, marker) in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .enumerate()
    {
        vocab.insert((*marker).into(), i.into());
    }
    let letters: Vec<char> = ('a'..='z').collect();
    let pairs = letters
        .iter()
        .flat_map(|a| letters.iter().map(move |b| format!("{a}{b}")));
    for (i, token) in CHARS.chars().map(String::from).chain(pairs).enumerate() {
        if 3 + i == vocab_size {
            break;
        }
        vocab.insert(token, (3 + i).into());
    }
    assert_eq!(vocab.len(), vocab_size, "{name}");
    tokenizer["model"]["vocab"] = vocab.into();
    tokenizer["model"]["merges"] = serde_json::json!([]);
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pystd.join("tokenizer_config.json")).unwrap())
            .unwrap();
    config["chat_template"] = TEMPLATE.into();
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

/// The reply to a request that must succeed.
fn post(server: &Server, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let (status, reply) = server.request("POST", path, &body.to_string());
    assert_eq!(status, 200, "{reply}");
    serde_json::from_str(&reply).unwrap()
}

/// A value of `/metrics`.
fn metric(server: &Server, name: &str) -> f64 {
    let (_, text) = server.request("GET", "/metrics", "");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name}"))
        .parse()
        .unwrap()
}

fn cached(usage: &serde_json::Value) -> u64 {
    usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn a_twenty_turn_conversation_prefills_only_each_new_turn_on_every_fixture() {
    for name in fixture_names() {
        let dir = tempfile::tempdir().unwrap();
        fixture_model(&name, dir.path());
        let server = Server::start(dir.path(), &["--parallel", "2"]);
        let mut messages = Vec::new();
        let (mut previous, mut prompt_sum, mut cached_sum) = (0, 0, 0);
        for turn in 0..20 {
            let letter = char::from(b'a' + turn as u8);
            messages.push(serde_json::json!({"role": "user", "content": letter.to_string()}));
            let reply = post(
                &server,
                "/v1/chat/completions",
                &serde_json::json!({"messages": messages, "max_tokens": 10, "seed": turn}),
            );
            let usage = &reply["usage"];
            let prompt = usage["prompt_tokens"].as_u64().unwrap();
            // Everything up to the previous reply came from the cache.
            assert!(
                cached(usage) >= previous,
                "{name}: turn {turn} took {} of {prompt} tokens from the cache, not the previous {previous}",
                cached(usage)
            );
            (previous, prompt_sum, cached_sum) =
                (prompt, prompt_sum + prompt, cached_sum + cached(usage));
            // The client edits the reply it sends back (drops its first
            // character): the sequence departs from the cached one further
            // back than recurrent layers roll back.
            let content: String = reply["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .chars()
                .skip(1)
                .collect();
            messages.push(serde_json::json!({"role": "assistant", "content": content}));
        }
        assert!(
            previous > 150,
            "{name}: the conversation reached {previous}"
        );
        assert_eq!(
            metric(&server, "hayate_prompt_tokens_total"),
            prompt_sum as f64
        );
        assert_eq!(
            metric(&server, "hayate_prompt_cached_tokens_total"),
            cached_sum as f64
        );
    }
}

#[test]
fn a_seeded_request_gives_the_same_text_alone_and_among_eight_on_every_fixture() {
    for name in fixture_names() {
        let dir = tempfile::tempdir().unwrap();
        fixture_model(&name, dir.path());
        let server = Server::start(dir.path(), &["--parallel", "8"]);
        let body = |i: usize| {
            serde_json::json!({
                "prompt": format!("request {i}: {}", "abc ".repeat(i)),
                "max_tokens": 24,
                "temperature": 1.0,
                "seed": 7 + i,
            })
        };
        let text =
            |reply: &serde_json::Value| reply["choices"][0]["text"].as_str().unwrap().to_owned();
        let alone = text(&post(&server, "/v1/completions", &body(3)));
        let port = server.port;
        let together: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    s.spawn(move || {
                        let (status, reply) =
                            request(port, "POST", "/v1/completions", &body(i).to_string());
                        assert_eq!(status, 200, "{reply}");
                        text(&serde_json::from_str(&reply).unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(together[3], alone, "{name}");
        // Several ran at once (the mean batch was above one).
        let mean = metric(&server, "hayate_batch_sequences_total")
            / metric(&server, "hayate_engine_steps_total");
        assert!(mean > 1.5, "{name}: mean batch {mean}");
    }
}

#[test]
fn cached_sequences_survive_a_restart_with_cache_dir() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    fixture_model("qwen3_5-text-gdn", &model);
    let args = ["--parallel", "2", "--cache-dir", cache.to_str().unwrap()];
    let mut messages = vec![serde_json::json!({"role": "user", "content": "abc"})];
    let ask = |server: &Server, messages: &[serde_json::Value]| {
        post(
            server,
            "/v1/chat/completions",
            &serde_json::json!({"messages": messages, "max_tokens": 12, "seed": 1}),
        )
    };
    let mut server = Server::start(&model, &args);
    let first = ask(&server, &messages);
    let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    // Ctrl-C: the server stops and saves its sequences.
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(server.child.wait().unwrap().success());
    assert!(cache.join("slot-0.seq").exists());
    let content = first["choices"][0]["message"]["content"].as_str().unwrap();
    messages.push(serde_json::json!({"role": "assistant", "content": content}));
    messages.push(serde_json::json!({"role": "user", "content": "de"}));
    let server = Server::start(&model, &args);
    let next = ask(&server, &messages);
    assert!(cached(&next["usage"]) >= prompt, "{next}");
    drop(server);
    // A corrupt file is ignored with a warning; the server still serves.
    std::fs::write(cache.join("slot-0.seq"), b"HAYATSQ\x01 not a sequence").unwrap();
    let server = Server::start(&model, &args);
    let again = ask(&server, &messages);
    assert_eq!(cached(&again["usage"]), 0, "{again}");
}

/// With `--kv-memory` for two pages of the caches (256 tokens), requests
/// that may fill both run one at a time though four sequences are free:
/// the others wait in the queue and all succeed; one that can never fit
/// is answered 400.
#[test]
fn requests_wait_for_kv_memory_and_one_that_never_fits_is_a_400() {
    let dir = tempfile::tempdir().unwrap();
    fixture_model("qwen3-gqa-qknorm", dir.path());
    // 2 layers x keys and values x 2 heads x 32 dimensions x 2 bytes
    // (bf16) x 128 positions: 64 KiB a page.
    let server = Server::start(dir.path(), &["--parallel", "4", "--kv-memory", "128K"]);
    assert_eq!(metric(&server, "hayate_kv_memory_limit_bytes"), 131072.0);
    let port = server.port;
    let body = |i: usize| {
        serde_json::json!({
            "prompt": format!("request {i}"),
            "max_tokens": 200,
            "seed": i,
        })
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                s.spawn(move || request(port, "POST", "/v1/completions", &body(i).to_string()))
            })
            .collect();
        for h in handles {
            let (status, reply) = h.join().unwrap();
            assert_eq!(status, 200, "{reply}");
        }
    });
    // Never two at once: every step advanced one sequence.
    let steps = metric(&server, "hayate_engine_steps_total");
    assert!(steps > 0.0);
    assert_eq!(metric(&server, "hayate_batch_sequences_total"), steps);
    // The idle sequences keep their pages.
    assert!(metric(&server, "hayate_kv_memory_used_bytes") > 0.0);
    // Longer than the KV memory holds, by prompt or by max_tokens.
    for body in [
        serde_json::json!({"prompt": "ab ".repeat(100), "max_tokens": 1}),
        serde_json::json!({"prompt": "ab", "max_tokens": 300}),
    ] {
        let (status, reply) = server.request("POST", "/v1/completions", &body.to_string());
        assert_eq!(status, 400, "{reply}");
        assert!(reply.contains("context_length_exceeded"), "{reply}");
    }
    // Short requests run together again.
    let before = metric(&server, "hayate_engine_steps_total");
    std::thread::scope(|s| {
        let short = |i: usize| serde_json::json!({"prompt": format!("short {i}"), "max_tokens": 40, "seed": i});
        let handles: Vec<_> = (0..2)
            .map(|i| {
                s.spawn(move || request(port, "POST", "/v1/completions", &short(i).to_string()))
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().0, 200);
        }
    });
    let steps = metric(&server, "hayate_engine_steps_total") - before;
    assert!(
        steps < 80.0,
        "two short requests took {steps} steps: they did not share them"
    );
}

/// `--parallel 4 --speculate ngram|suffix`: every sequence speculates
/// inside the batch, and four concurrent seeded requests (greedy and
/// sampled) get the replies plain batched decoding gives; drafts were
/// accepted.
#[test]
fn speculation_inside_the_batch_gives_the_replies_of_plain_decoding() {
    let model = shared_model("pystd-qwen3-7m");
    let code = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef ";
    let body = |i: usize| {
        serde_json::json!({
            "prompt": format!("{code}{}", ["mul", "div", "mod", "pow"][i]),
            "max_tokens": 48,
            "temperature": if i.is_multiple_of(2) { 0.0 } else { 0.8 },
            "seed": i,
        })
    };
    let replies = |server: &Server| -> Vec<String> {
        let port = server.port;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    s.spawn(move || {
                        let (status, reply) =
                            request(port, "POST", "/v1/completions", &body(i).to_string());
                        assert_eq!(status, 200, "{reply}");
                        let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
                        reply["choices"][0]["text"].as_str().unwrap().to_owned()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let plain = replies(&Server::start(&model, &["--parallel", "4"]));
    for speculator in ["ngram", "suffix"] {
        let server = Server::start(&model, &["--parallel", "4", "--speculate", speculator]);
        assert_eq!(replies(&server), plain, "{speculator}");
        assert!(
            metric(&server, "hayate_draft_accepted_tokens_total") > 0.0,
            "{speculator}: no draft was accepted"
        );
    }
}
