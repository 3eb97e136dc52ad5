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

/// Next-token logits at every position of `ids`, from `hayate logits`.
fn logits(model: &str, ids: &[u32], tmp: &Path) -> (Vec<f32>, usize) {
    let out = tmp.join("logits.safetensors");
    let tokens: Vec<String> = ids.iter().map(u32::to_string).collect();
    succeed(&[
        "logits",
        "--model",
        model,
        "--tokens",
        &tokens.join(","),
        "--out",
        out.to_str().unwrap(),
    ]);
    let (values, shape) = read_tensor(&out, "logits");
    (values, shape[1])
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold(0, |b, (i, &v)| if v > row[b] { i } else { b }) as u32
}

/// The greedy continuation of `prompt`, one `hayate logits` call per token,
/// up to `n` tokens or an end-of-sequence id.
fn greedy(model: &str, prompt: &[u32], n: usize, eos: &[u32], tmp: &Path) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let (values, vocab) = logits(model, &ids, tmp);
        let next = argmax(&values[values.len() - vocab..]);
        if eos.contains(&next) {
            break;
        }
        ids.push(next);
    }
    ids[prompt.len()..].to_vec()
}

/// Mean negative log-likelihood of `ids[1..]` given what precedes each.
fn nll(model: &str, ids: &[u32], tmp: &Path) -> f64 {
    let (values, vocab) = logits(model, &ids[..ids.len() - 1], tmp);
    let mut total = 0.0;
    for (row, &target) in values.chunks_exact(vocab).zip(&ids[1..]) {
        let max = row.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        total += lse - row[target as usize] as f64;
    }
    total / (ids.len() - 1) as f64
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
        // Exactly the greedy continuation, computed token by token.
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixtures().join(name).join("config.json")).unwrap(),
        )
        .unwrap();
        let eos = config["eos_token_id"]
            .as_u64()
            .or(config["text_config"]["eos_token_id"].as_u64())
            .map(|e| vec![e as u32])
            .unwrap_or_default();
        let want: Vec<String> = greedy(model, &[7, 8, 9, 10], 12, &eos, tmp.path())
            .iter()
            .map(|id| format!("w{id}"))
            .collect();
        assert_eq!(reply.trim_end(), want.join(" "), "{name}");

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
            "24,5",
            "-n",
            "8",
            "-r",
            "2",
            "-d",
            "0,12",
            "--threads",
            "1,2",
        ]);
        // At depth, with a state that cannot roll back that far (every
        // hybrid layer type bounds rollback), so each repetition
        // re-prefills; every combination of the lists, in order.
        let tests: Vec<(&str, &str)> = table
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                (cells.len() > 9 && cells[5] != "threads" && !cells[5].starts_with('-'))
                    .then(|| (cells[5], cells[8]))
            })
            .collect();
        let mut want = Vec::new();
        for threads in ["1", "2"] {
            for test in ["pp24", "pp5", "tg8", "pp24 @ d12", "pp5 @ d12", "tg8 @ d12"] {
                want.push((threads, test));
            }
        }
        assert_eq!(tests, want, "{table}");

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
            "--max-tokens",
            "49",
            // The same exact cache as `logits` (see `nll`): the reference keeps f32.
            "--kv-cache",
            "f32",
            "--json",
        ]);
        let report: serde_json::Value = serde_json::from_str(&report).unwrap();
        // One window of 48 inputs: the perplexity of its 48 targets.
        let ids: Vec<u32> = text
            .split_whitespace()
            .take(49)
            .map(|w| w[1..].parse().unwrap())
            .collect();
        let want = nll(model, &ids, tmp.path()).exp();
        let ppl = report["model_ppl"].as_f64().unwrap();
        assert!((ppl - want).abs() <= 1e-9 * want, "{name}: {ppl} vs {want}");
        assert_eq!(report["kl_max"].as_f64(), Some(0.0), "{name}: {report}");
    }
}
