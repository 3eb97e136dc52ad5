//! `hayate run` against `transformers`' greedy `generate`.

mod common;
use common::*;

#[test]
fn greedy_run_prints_what_transformers_generates() {
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("pystd-greedy.json")).unwrap())
            .unwrap();
    for case in cases.as_array().unwrap() {
        let model = shared_model(case["model"].as_str().unwrap());
        let prompt = case["prompt"].as_str().unwrap();
        let want = case["generated_text"].as_str().unwrap();
        let n = case["max_new_tokens"].as_u64().unwrap().to_string();
        let out = hayate(&[
            "run",
            "--model",
            model.to_str().unwrap(),
            "--raw",
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--max-tokens",
            &n,
            // transformers keeps f32 keys and values; a bf16 cache (the
            // default) can flip a near-tie of greedy decoding.
            "--kv-cache",
            "f32",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            stdout.strip_suffix('\n').unwrap(),
            want,
            "prompt {prompt:?}"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        for field in [
            "prompt",
            "first token",
            "prefill",
            "generated 48 tok",
            "decode",
            "peak RSS",
        ] {
            assert!(stderr.contains(field), "stats line lacks {field}: {stderr}");
        }
    }
}

#[test]
fn sampling_is_reproducible_with_a_seed_and_varies_without() {
    let model = shared_model("pystd-qwen3-7m");
    let run = |seed: &str| {
        let out = hayate(&[
            "run",
            "--model",
            model.to_str().unwrap(),
            "--raw",
            "--prompt",
            "import os\n",
            "--temperature",
            "1.0",
            "--top-k",
            "40",
            "--top-p",
            "0.95",
            "--min-p",
            "0.02",
            "--repeat-penalty",
            "1.1",
            "--seed",
            seed,
            "--max-tokens",
            "32",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
}

#[test]
fn chat_template_is_applied_and_chat_keeps_the_cache_across_turns() {
    let model = shared_model("pystd-qwen3-7m");
    let tokenizer = hayate_chat::TextTokenizer::load(&model).unwrap();
    let out = chat(
        &[
            "--model",
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-tokens",
            "8",
        ],
        b"hello\nworld\n/exit\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let replies: Vec<&str> = stdout.lines().collect();
    let prefilled = prefilled_per_turn(&stderr);
    assert_eq!(prefilled.len(), 2, "{stderr}");

    // The first turn is the template's rendering of the user message.
    let user = |text: &str| hayate_chat::Message::new("user", text);
    let first = tokenizer.encode_chat(&[user("hello")], true).unwrap();
    assert_eq!(
        tokenizer.decode(&first).unwrap(),
        "user\nhello\nassistant\n",
        "the template's special tokens are skipped in decoding"
    );
    assert_eq!(prefilled[0], first.len(), "{stderr}");
    // The reply to it is what `hayate run` (the same template) gives.
    let run = hayate(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hello",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
    ]);
    assert!(run.status.success());
    let run_reply = String::from_utf8(run.stdout).unwrap();
    assert_eq!(run_reply.lines().next().unwrap_or(""), replies[0]);

    // The second turn re-renders the conversation, which starts with the
    // first prompt; the cache holds it, so at most the rest is prefilled
    // (plus one token should the reply re-tokenize differently).
    let second = tokenizer
        .encode_chat(
            &[
                user("hello"),
                hayate_chat::Message::new("assistant", replies[0]),
                user("world"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(second[..first.len()], first[..]);
    assert!(
        prefilled[1] <= second.len() - first.len() + 1,
        "second turn prefilled {} of {} tokens",
        prefilled[1],
        second.len()
    );
}
