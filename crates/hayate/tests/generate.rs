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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let prefilled = prefilled_per_turn(&stderr);
    assert_eq!(prefilled.len(), 2, "{stderr}");
    // The second turn re-uses the cached first turn: without the cache it
    // would prefill the first prompt and reply again, and more.
    assert!(prefilled[1] < prefilled[0] + 8, "{prefilled:?}");
}
