//! The hybrid architectures (Qwen3.5, Gemma 3, LFM2) through every command:
//! `run`, `chat` (multi-turn, re-using the state), `bench` and `eval`.
//! (`logits` and `quantize` are covered fixture by fixture elsewhere.) The
//! fixtures have no tokenizer, so each test gives its copy a word-level one
//! with one word per token id.

mod common;
use common::*;
use std::path::{Path, PathBuf};

const FIXTURES: [&str; 4] = [
    "qwen3_5-text-gdn",
    "qwen3_5-vl-layout",
    "gemma3-text-sliding",
    "lfm2-conv-attn",
];

/// A copy of fixture `name` with a tokenizer whose words are `w0`, `w1`, ...
fn with_tokenizer(name: &str, dir: &Path) -> PathBuf {
    let src = fixtures().join(name);
    let dst = dir.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dst.join(path.file_name().unwrap())).unwrap();
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    let vocab = config["vocab_size"]
        .as_u64()
        .or(config["text_config"]["vocab_size"].as_u64())
        .unwrap();
    let words: serde_json::Map<String, serde_json::Value> = (0..vocab)
        .map(|i| (format!("w{i}"), serde_json::json!(i)))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "w0"}
    });
    std::fs::write(dst.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let template = "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}\
                    {% if add_generation_prompt %}w5 {% endif %}";
    let tokenizer_config = serde_json::json!({"chat_template": template, "eos_token": "w2"});
    std::fs::write(
        dst.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();
    dst
}

fn succeed(args: &[&str]) -> String {
    let out = hayate(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn run_chat_bench_and_eval_work_on_every_hybrid_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let text: String = (0..600).map(|i| format!("w{} ", 6 + i * 7 % 60)).collect();
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, &text).unwrap();
    for name in FIXTURES {
        let model = with_tokenizer(name, tmp.path());
        let model = model.to_str().unwrap();

        let reply = succeed(&[
            "run",
            "--model",
            model,
            "--raw",
            "--prompt",
            "w7 w8 w9 w10",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
        ]);
        assert!(reply.contains('w'), "{name}: {reply}");

        // Two turns: the second re-renders the conversation and must only
        // prefill what is new (the state rolls back the last few tokens).
        let out = chat(
            &["--model", model, "--temperature", "0", "--max-tokens", "6"],
            b"w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20\nw21 w22\n/exit\n",
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        let prefilled = prefilled_per_turn(&stderr);
        assert_eq!(prefilled.len(), 2, "{name}: {stderr}");
        assert!(
            prefilled[1] < prefilled[0],
            "{name}: the second turn prefilled {prefilled:?}"
        );

        let table = succeed(&[
            "bench",
            "--model",
            model,
            "-p",
            "24",
            "-n",
            "8",
            "-r",
            "1",
            "--threads",
            "2",
        ]);
        assert!(table.contains("pp24") && table.contains("tg8"), "{table}");

        let report = succeed(&[
            "eval",
            "--model",
            model,
            "--reference",
            model,
            "--data",
            data.to_str().unwrap(),
            "--context",
            "48",
            "--json",
        ]);
        let report: serde_json::Value = serde_json::from_str(&report).unwrap();
        let ppl = report["model_ppl"].as_f64().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{name}: {report}");
        assert_eq!(report["kl_max"].as_f64(), Some(0.0), "{name}: {report}");
    }
}
