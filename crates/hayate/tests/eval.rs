//! `hayate eval`: perplexity, KL divergence and top-1 agreement on the shared
//! held-out text, and clean errors on bad input. Runs on the first tokens only,
//! to stay fast.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

/// The held-out text beside the checkout.
fn valid_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/pystd-valid.txt")
}

/// Runs `hayate eval` with `args`.
fn eval(args: &[&str]) -> Output {
    let mut all = vec!["eval"];
    all.extend_from_slice(args);
    hayate(&all)
}

/// Runs `hayate eval --json` on the first 1500 tokens of the held-out text
/// (3 windows of 512) and returns the report; the model keeps an f32 KV
/// cache, so that the pinned figures are the model's alone.
fn eval_json(model: &str, reference: &str) -> Value {
    eval_json_with(model, reference, "f32")
}

/// [`eval_json`] with the model's KV cache in format `kv`.
fn eval_json_with(model: &str, reference: &str, kv: &str) -> Value {
    let model = shared_model(model);
    let reference = shared_model(reference);
    let data = valid_data();
    let out = eval(&[
        "--model",
        model.to_str().unwrap(),
        "--reference",
        reference.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--max-tokens",
        "1500",
        "--context",
        "512",
        "--kv-cache",
        kv,
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

/// Asserts `field` of `report` equals `want` to 4 decimals.
fn pinned(report: &Value, field: &str, want: f64) {
    let got = num(report, field);
    assert!(
        (got - want).abs() < 5e-5,
        "{field} = {got}, pinned at {want}"
    );
}

fn num(report: &Value, field: &str) -> f64 {
    report[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number: {report}"))
}

/// Perplexities of the shared models on the first 1500 tokens of
/// `pystd-valid.txt`, context 512. (On the whole file: 8.6471 and 9.7707,
/// the 8.65 and 9.77 of `../shared/models/README.md`.)
const PPL_7M: f64 = 14.2276;
const PPL_1M: f64 = 17.0647;

#[test]
fn model_against_itself_has_zero_divergence() {
    let r = eval_json("pystd-qwen3-7m", "pystd-qwen3-7m");
    assert_eq!(r["context"], 512);
    assert_eq!(r["windows"], 3);
    // Every token but the first is scored.
    assert_eq!(r["tokens_scored"], 1499);
    for field in ["kl_mean", "kl_median", "kl_p99", "kl_max"] {
        let kl = num(&r, field);
        assert!((0.0..1e-9).contains(&kl), "{field} = {kl}");
    }
    assert_eq!(num(&r, "top1_agreement"), 1.0);
    // Pinned: what this engine measures on these tokens (its logits match
    // transformers to 2e-4, see tests/logits.rs).
    pinned(&r, "model_ppl", PPL_7M);
    let ppl = num(&r, "model_ppl");
    assert_eq!(ppl, num(&r, "reference_ppl"));
    assert!((num(&r, "model_nll").exp() - ppl).abs() < 1e-9 * ppl);
    assert_eq!(num(&r, "model_bits_per_weight"), 16.0);
    assert_eq!(num(&r, "reference_bits_per_weight"), 16.0);
}

/// What a `kv` cache costs, measured against the same model with exact
/// keys and values (the reference always keeps f32): a mean KL within
/// `kl_range` (nonzero, so the cache really is narrower), top-1 agreement
/// above `top1`, the perplexity within `ppl` of the f32 cache's.
fn cache_costs(kv: &str, kl_range: std::ops::Range<f64>, top1: f64, ppl: f64) {
    let r = eval_json_with("pystd-qwen3-7m", "pystd-qwen3-7m", kv);
    assert_eq!(r["model_kv_cache"], kv);
    let kl = num(&r, "kl_mean");
    assert!(kl_range.contains(&kl), "{kv}: kl_mean = {kl}");
    assert!(num(&r, "top1_agreement") > top1);
    let moved = (num(&r, "model_ppl") / PPL_7M - 1.0).abs();
    assert!(moved < ppl, "{kv}: perplexity moved by {moved}");
}

/// Measured: KL 5.15e-6, top-1 agreement 99.87% (q4 weights cost ~8e-3).
#[test]
fn a_bf16_cache_costs_a_small_kl() {
    cache_costs("bf16", 1e-7..3e-5, 0.995, 1e-3);
}

/// Measured: KL 4.13e-5, top-1 agreement 99.47%, perplexity +0.02%: more than bf16's, still
/// below what 8-bit weights cost (~1e-4).
#[test]
fn a_q8_cache_costs_a_small_kl() {
    cache_costs("q8", 1.5e-5..2e-4, 0.99, 1e-3);
}

#[test]
fn small_model_diverges_from_the_large_one() {
    let r = eval_json("pystd-qwen3-7m", "pystd-qwen3-1m");
    assert_eq!(r["tokens_scored"], 1499);
    pinned(&r, "model_ppl", PPL_7M);
    pinned(&r, "reference_ppl", PPL_1M);
    pinned(&r, "kl_mean", 0.6034);
    pinned(&r, "kl_median", 0.4940);
    pinned(&r, "kl_p99", 2.6098);
    pinned(&r, "kl_max", 3.4594);
    // 948 of the 1499 positions.
    pinned(&r, "top1_agreement", 0.6324);
}

#[test]
fn table_without_reference() {
    let model = shared_model("pystd-qwen3-1m");
    let data = valid_data();
    let out = eval(&[
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--max-tokens",
        "300",
        "--context",
        "128",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    for field in [
        "tokens scored",
        "299 in 3 windows",
        "perplexity",
        "bits/weight",
    ] {
        assert!(stdout.contains(field), "table lacks {field}: {stdout}");
    }
    assert!(!stdout.contains("KL"), "KL without a reference: {stdout}");
    // No progress bar when stderr is not a terminal.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `hayate eval` with `args` and asserts a clean one-line error naming every needle.
fn eval_fails(args: &[&str], needles: &[&str]) {
    let out = eval(args);
    assert_clean_error(&out, needles);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().count(),
        1,
        "more than the error line: {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn bad_inputs_fail_cleanly() {
    let m7 = shared_model("pystd-qwen3-7m");
    let m7 = m7.to_str().unwrap();
    let data = valid_data();
    let data = data.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();

    let missing = tmp.path().join("no-such-file.txt");
    eval_fails(
        &["--model", m7, "--data", missing.to_str().unwrap()],
        &["no-such-file.txt"],
    );

    let one_token = tmp.path().join("one-token.txt");
    std::fs::write(&one_token, "a").unwrap();
    eval_fails(
        &["--model", m7, "--data", one_token.to_str().unwrap()],
        &["one-token.txt", "1 token", "at least 2"],
    );
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    eval_fails(
        &["--model", m7, "--data", empty.to_str().unwrap()],
        &["0 token", "at least 2"],
    );
    eval_fails(
        &["--model", m7, "--data", data, "--max-tokens", "1"],
        &["--max-tokens 1", "at least 2"],
    );

    eval_fails(
        &["--model", m7, "--data", data, "--context", "0"],
        &["--context"],
    );
    eval_fails(
        &["--model", m7, "--data", data, "--context", "4096"],
        &["4096", "2048"],
    );

    // stories260K: a 512-token vocabulary, no tokenizer.json.
    let stories = shared_model("stories260K");
    let stories = stories.to_str().unwrap();
    eval_fails(
        &["--model", m7, "--reference", stories, "--data", data],
        &["vocabulary", "512", "4096"],
    );
    eval_fails(
        &["--model", stories, "--data", data, "--context", "64"],
        &["tokenizer.json"],
    );

    // The reference must leave the prompt at least one token of the window.
    eval_fails(
        &[
            "--model",
            m7,
            "--reference",
            m7,
            "--data",
            data,
            "--context",
            "64",
            "--teacher-generate",
            "64",
        ],
        &["--teacher-generate 64", "--context 64"],
    );
    eval_fails(
        &[
            "--model",
            m7,
            "--reference",
            m7,
            "--data",
            data,
            "--context",
            "64",
            "--teacher-generate",
            "0",
        ],
        &["--teacher-generate 0"],
    );
    // A prompt needs context - N + 1 = 49 tokens.
    eval_fails(
        &[
            "--model",
            m7,
            "--reference",
            m7,
            "--data",
            data,
            "--context",
            "64",
            "--teacher-generate",
            "16",
            "--max-tokens",
            "40",
        ],
        &["40 token", "at least 49"],
    );
    eval_fails(
        &[
            "--model",
            m7,
            "--reference",
            m7,
            "--data",
            data,
            "--teacher-generate",
            "8",
            "--teacher-temperature",
            "-1",
        ],
        &["--teacher-temperature", "-1"],
    );
    // A second, missing data file fails before anything is scored.
    eval_fails(
        &[
            "--model",
            m7,
            "--data",
            data,
            "--data",
            missing.to_str().unwrap(),
        ],
        &["no-such-file.txt"],
    );

    let not_a_model = tmp.path().join("not-a-model");
    eval_fails(
        &[
            "--model",
            m7,
            "--reference",
            not_a_model.to_str().unwrap(),
            "--data",
            data,
        ],
        &["reference", "not-a-model"],
    );
}

/// Runs `hayate eval --json` with `args` after the model and reference
/// options, and parses stdout.
fn eval_value(model: &str, reference: &str, args: &[&str]) -> Value {
    let model = shared_model(model);
    let reference = shared_model(reference);
    let mut all = vec![
        "--model",
        model.to_str().unwrap(),
        "--reference",
        reference.to_str().unwrap(),
        "--kv-cache",
        "f32",
        "--json",
    ];
    all.extend_from_slice(args);
    let out = eval(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

#[test]
fn each_data_file_is_scored_on_its_own() {
    let valid = valid_data();
    let calib = valid.with_file_name("pystd-calib.txt");
    let (valid, calib) = (valid.to_str().unwrap(), calib.to_str().unwrap());
    let common = ["--max-tokens", "600", "--context", "256"];
    let both = eval_value(
        "pystd-qwen3-7m",
        "pystd-qwen3-1m",
        &[&common[..], &["--data", valid, "--data", calib]].concat(),
    );
    let both = both.as_array().expect("an array for two files");
    assert_eq!(both.len(), 2);
    for (report, path) in both.iter().zip([valid, calib]) {
        let alone = eval_value(
            "pystd-qwen3-7m",
            "pystd-qwen3-1m",
            &[&common[..], &["--data", path]].concat(),
        );
        assert_eq!(report["data"], path);
        assert_eq!(report["tokens_scored"], 599);
        // Scored exactly as when the file is given alone.
        for field in ["kl_mean", "model_nll", "reference_nll", "top1_agreement"] {
            assert_eq!(report[field], alone[field], "{path}: {field}");
        }
    }
    assert_ne!(both[0]["kl_mean"], both[1]["kl_mean"]);
}

/// pystd-qwen3-7m's blocks: per layer q and o (256 x 256), k and v
/// (128 x 256), gate and up (768 x 256), down (256 x 768).
const LAYER_SHAPES: [(usize, usize); 7] = [
    (256, 256),
    (128, 256),
    (128, 256),
    (256, 256),
    (768, 256),
    (768, 256),
    (256, 768),
];

#[test]
fn linear_bits_per_weight_count_the_blocks_linear_layers_alone() {
    let valid = valid_data();
    let data = ["--data", valid.to_str().unwrap(), "--max-tokens", "300"];
    let bf16 = eval_value("pystd-qwen3-7m", "pystd-qwen3-7m", &data);
    assert_eq!(num(&bf16, "model_linear_bits_per_weight"), 16.0);
    assert_eq!(num(&bf16, "reference_linear_bits_per_weight"), 16.0);

    let weights: usize = LAYER_SHAPES.iter().map(|(r, c)| r * c).sum();
    // One sign byte per input and per output of each rotated layer.
    let signs: usize = LAYER_SHAPES.iter().map(|(r, c)| r + c).sum();
    for (format, group, code_bits) in [("q4", "32", 4.625), ("q8", "32", 8.5), ("q4", "64", 4.3125)]
    {
        let q = eval_value(
            "pystd-qwen3-7m",
            "pystd-qwen3-7m",
            &[&data[..], &["--quantize", format, "--group-size", group]].concat(),
        );
        let want = code_bits + 8.0 * signs as f64 / weights as f64;
        let got = num(&q, "model_linear_bits_per_weight");
        assert!(
            (got - want).abs() < 1e-12,
            "{format} G{group}: {got}, want {want}"
        );
        // The whole model holds a bf16 embedding too.
        assert!(num(&q, "model_bits_per_weight") > got + 1.0);
        assert_eq!(num(&q, "reference_linear_bits_per_weight"), 16.0);
    }
}

#[test]
fn teacher_continuations_are_scored() {
    let valid = valid_data();
    let valid = valid.to_str().unwrap();
    // 1000 tokens in prompts of 128 - 64 + 1 = 65: 15 windows of 64 scored tokens.
    let teacher = |model: &str, temperature: &str, seed: &str| {
        eval_value(
            model,
            "pystd-qwen3-7m",
            &[
                "--data",
                valid,
                "--max-tokens",
                "1000",
                "--context",
                "128",
                "--teacher-generate",
                "64",
                "--teacher-temperature",
                temperature,
                "--teacher-seed",
                seed,
            ],
        )
    };
    let own = teacher("pystd-qwen3-7m", "1", "0");
    assert_eq!(own["windows"], 15);
    assert_eq!(own["tokens_scored"], 15 * 64);
    assert_eq!(own["teacher_generate"], 64);
    assert_eq!(num(&own, "kl_max"), 0.0);

    let mut small = teacher("pystd-qwen3-1m", "1", "0");
    let mut again = teacher("pystd-qwen3-1m", "1", "0");
    for timed in [&mut small, &mut again] {
        timed.as_object_mut().unwrap().remove("seconds");
    }
    assert_eq!(small, again, "seeded, so repeatable");
    let reseeded = teacher("pystd-qwen3-1m", "1", "1");
    assert_ne!(small["kl_mean"], reseeded["kl_mean"]);
    // Greedy continuations are the reference's most likely tokens, far
    // likelier to it than what it samples at temperature 1.
    let greedy = teacher("pystd-qwen3-1m", "0", "0");
    let sampled_nll = num(&small, "reference_nll");
    let greedy_nll = num(&greedy, "reference_nll");
    assert!(
        greedy_nll < 0.5 * sampled_nll,
        "greedy {greedy_nll}, sampled {sampled_nll}"
    );
    assert!(
        num(&small, "kl_mean") > 0.1,
        "the small model differs from the large"
    );
}
