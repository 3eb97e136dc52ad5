//! Speculative decoding from the command line: `run` and `chat` print the
//! same text with and without each speculator, report what speculation
//! did, and refuse drafts they cannot use with a clear error.

mod common;
use common::*;

const PROMPT: &str = "import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"";

fn run(extra: &[&str]) -> std::process::Output {
    let target = shared_model("pystd-qwen3-7m");
    let mut args = vec![
        "run",
        "--model",
        target.to_str().unwrap(),
        "--raw",
        "--prompt",
        PROMPT,
        "--max-tokens",
        "96",
    ];
    args.extend_from_slice(extra);
    hayate(&args)
}

fn ok(out: &std::process::Output) -> (String, String) {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (String::from_utf8(out.stdout.clone()).unwrap(), stderr)
}

/// The JSON object `--json-stats` prints (the last stderr line).
fn json_stats(stderr: &str) -> serde_json::Value {
    serde_json::from_str(stderr.trim_end().lines().last().unwrap()).unwrap()
}

#[test]
fn run_prints_the_same_text_with_every_speculator() {
    let draft = shared_model("pystd-qwen3-1m");
    let draft = draft.to_str().unwrap();
    // Drafted and accepted tokens under shared and under independent noise.
    let mut totals = [(0, 0); 2];
    for (temperature, seed) in [("0", "1"), ("0.7", "2"), ("1", "3")] {
        let sampling = ["--temperature", temperature, "--seed", seed];
        let (want, _) = ok(&run(&[&sampling[..], &["--speculate", "none"]].concat()));
        let variants: [&[&str]; 7] = [
            &["--draft", draft],
            &[
                "--draft",
                draft,
                "--tree-width",
                "2",
                "--draft-tokens",
                "3",
                "--draft-threads",
                "1",
            ],
            &["--draft", draft, "--draft-tokens", "4"],
            &[
                "--draft",
                draft,
                "--draft-tokens",
                "4",
                "--coupling",
                "independent",
            ],
            &["--draft", draft, "--draft-threads", "1"],
            &["--speculate", "ngram"],
            &["--speculate", "suffix"],
        ];
        for variant in variants {
            let args = [&sampling[..], variant, &["--json-stats"]].concat();
            let (got, stderr) = ok(&run(&args));
            assert_eq!(got, want, "T={temperature} {variant:?}");
            let stats = json_stats(&stderr);
            let name = if variant[0] == "--draft" {
                "draft"
            } else {
                variant[1]
            };
            assert_eq!(stats["speculator"], name, "{stderr}");
            assert_eq!(stats["generated_tokens"], 96);
            let (drafted, accepted) = (
                stats["drafted"].as_u64().unwrap(),
                stats["accepted"].as_u64().unwrap(),
            );
            assert!(accepted <= drafted, "{stats}");
            let stats_line = stderr.lines().find(|l| l.starts_with("[prompt")).unwrap();
            let counts = format!("{name}: {drafted} drafted, {accepted} accepted");
            for field in [counts.as_str(), "tok/pass"] {
                assert!(stats_line.contains(field), "{stats_line}");
            }
            // Trees only where asked for; the target (Qwen3) can branch.
            let trees = stats["tree_passes"].as_u64().unwrap();
            assert_eq!(trees > 0, variant.contains(&"--tree-width"), "{stats}");
            // The two fixed-length drafts, shared and independent noise,
            // draft on every pass.
            if variant.contains(&"4") {
                assert!(drafted > 0, "{stats}");
                let coupling = usize::from(variant.contains(&"independent"));
                totals[coupling].0 += drafted;
                totals[coupling].1 += accepted;
            }
        }
    }
    // Shared noise accepts a larger share (equal at T = 0).
    let rate = |(d, a): (u64, u64)| a as f64 / d as f64;
    let (shared, independent) = (rate(totals[0]), rate(totals[1]));
    eprintln!("acceptance: shared noise {shared:.3}, independent {independent:.3}");
    assert!(shared > independent, "{totals:?}");
}

#[test]
fn chat_turns_are_the_same_with_a_draft() {
    let target = shared_model("pystd-qwen3-7m");
    let draft = shared_model("pystd-qwen3-1m");
    let base = [
        "--model",
        target.to_str().unwrap(),
        "--max-tokens",
        "40",
        "--temperature",
        "0.8",
        "--seed",
        "9",
    ];
    let input = b"def add(a, b):\nclass Stack:\n/exit\n";
    let plain = chat(&[&base[..], &["--speculate", "none"]].concat(), input);
    let (want, _) = ok(&plain);
    let with = chat(
        &[&base[..], &["--draft", draft.to_str().unwrap()]].concat(),
        input,
    );
    let (got, stderr) = ok(&with);
    assert_eq!(got, want);
    assert_eq!(stderr.matches("draft: ").count(), 2, "{stderr}");
}

#[test]
fn unusable_drafts_and_settings_are_refused() {
    let draft = shared_model("pystd-qwen3-1m");
    let draft = draft.to_str().unwrap();
    assert_one_error_line(
        &run(&["--speculate", "draft"]),
        &["--speculate draft needs --draft"],
    );
    assert_one_error_line(
        &run(&["--draft", draft, "--speculate", "ngram"]),
        &["--draft is only used with --speculate draft"],
    );
    for k in ["0", "33"] {
        assert_one_error_line(
            &run(&["--draft-tokens", k]),
            &["--draft-tokens", "between 1 and 32"],
        );
    }
    for w in ["0", "5"] {
        assert_one_error_line(
            &run(&["--draft", draft, "--tree-width", w]),
            &["--tree-width", "between 1 and 4"],
        );
    }
    assert_one_error_line(
        &run(&["--draft", "/nonexistent/draft"]),
        &["draft model", "tokenizer"],
    );
    // A checkpoint without a tokenizer cannot be checked.
    let stories = shared_model("stories260K");
    assert_one_error_line(
        &run(&["--draft", stories.to_str().unwrap()]),
        &["draft model", "needs its tokenizer"],
    );
    // The same checkpoint with two token ids swapped in its tokenizer.
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(draft).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let path = dir.path().join("tokenizer.json");
    let mut tokenizer: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let vocab = tokenizer["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = (vocab["def"].clone(), vocab["class"].clone());
    vocab.insert("def".into(), b);
    vocab.insert("class".into(), a);
    std::fs::write(&path, serde_json::to_vec(&tokenizer).unwrap()).unwrap();
    assert_one_error_line(
        &run(&["--draft", dir.path().to_str().unwrap()]),
        &["another vocabulary", "2 of 4096 tokens differ", "\"class\""],
    );
}

#[test]
fn bench_measures_speculative_generation_against_plain() {
    let target = shared_model("pystd-qwen3-7m");
    let draft = shared_model("pystd-qwen3-1m");
    let text = shared_model("../data/pystd-valid.txt");
    let base = [
        "bench",
        "--model",
        target.to_str().unwrap(),
        "-p",
        "64",
        "-n",
        "48",
        "-r",
        "2",
        "--json",
        "--prompt-file",
        text.to_str().unwrap(),
    ];
    for (extra, name) in [
        (
            // A fixed length: the adaptive one follows measured times.
            &[
                "--draft",
                draft.to_str().unwrap(),
                "--draft-tokens",
                "4",
                "--temperature",
                "0",
            ][..],
            "draft",
        ),
        (
            &["--speculate", "ngram", "--temperature", "1", "--seed", "5"][..],
            "ngram",
        ),
    ] {
        let (out, _) = ok(&hayate(&[&base[..], extra].concat()));
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        let s = &report["speculative"];
        assert_eq!(s["speculator"], name, "{s}");
        assert_eq!(s["tokens"], 48);
        assert_eq!(s["prompt_tokens"], 64);
        let (drafted, accepted) = (
            s["drafted"].as_u64().unwrap(),
            s["accepted"].as_u64().unwrap(),
        );
        assert!(
            accepted <= drafted && s["speedup"].as_f64().unwrap() > 0.0,
            "{s}"
        );
        // The draft model agrees with the model on most greedy tokens.
        if name == "draft" {
            assert!(s["tokens_per_pass"].as_f64().unwrap() > 2.0, "{s}");
        }
    }
    // Without a speculator there is no speculative test.
    let (out, _) = ok(&hayate(&base));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(report["speculative"].is_null());
}
