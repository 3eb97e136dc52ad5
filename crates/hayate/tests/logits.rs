//! `hayate logits` in all three modes against `transformers` reference logits.

mod common;
use common::*;
use std::path::Path;

/// Max |Δlogit| allowed, and the share of positions whose argmax must agree.
const TOLERANCE: f32 = 1e-2;
const ARGMAX_AGREEMENT: f64 = 0.99;

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |b, (i, &v)| if v > row[b] { i } else { b })
}

fn check_model(dir: &Path) {
    let reference = dir.join("reference_logits.safetensors");
    let (ids, _) = read_tensor(&reference, "input_ids");
    let (want, shape) = read_tensor(&reference, "logits");
    let vocab = *shape.last().unwrap();
    let tokens: Vec<String> = ids.iter().map(|&i| (i as u32).to_string()).collect();
    let tokens = tokens.join(",");
    let n = ids.len();
    let modes: [&[&str]; 5] = [
        &[],
        &["--incremental"],
        &["--chunk", "7"],
        &["--chunk", "16"],
        &["--chunk", "1000"],
    ];
    let out_dir = tempfile::tempdir().unwrap();
    for mode in modes {
        let out = out_dir.path().join("logits.safetensors");
        let mut args = vec![
            "logits",
            "--model",
            dir.to_str().unwrap(),
            "--tokens",
            &tokens,
        ];
        args.extend(["--out", out.to_str().unwrap()]);
        args.extend_from_slice(mode);
        let run = hayate(&args);
        assert!(
            run.status.success(),
            "{dir:?} {mode:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let (got, got_shape) = read_tensor(&out, "logits");
        assert_eq!(got_shape, vec![n, vocab], "{dir:?} {mode:?}");
        let max_diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let agree = (0..n)
            .filter(|&t| {
                argmax(&got[t * vocab..(t + 1) * vocab])
                    == argmax(&want[t * vocab..(t + 1) * vocab])
            })
            .count();
        assert!(
            max_diff <= TOLERANCE,
            "{dir:?} {mode:?}: max |Δ| {max_diff}"
        );
        assert!(
            agree as f64 >= ARGMAX_AGREEMENT * n as f64,
            "{dir:?} {mode:?}: argmax agrees at {agree}/{n}"
        );
    }
}

#[test]
fn every_fixture_matches_transformers_in_every_mode() {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("MANIFEST.json")).unwrap()).unwrap();
    let names: Vec<&str> = manifest
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert!(names.len() >= 7, "fixtures missing: {names:?}");
    for name in names {
        check_model(&fixtures().join(name));
    }
}

#[test]
fn pystd_qwen3_7m_matches_transformers_in_every_mode() {
    check_model(&shared_model("pystd-qwen3-7m"));
}

#[test]
fn pystd_qwen3_1m_matches_transformers_in_every_mode() {
    check_model(&shared_model("pystd-qwen3-1m"));
}

#[test]
fn stories260k_matches_transformers_in_every_mode() {
    check_model(&shared_model("stories260K"));
}

#[test]
fn every_kernel_path_gives_the_same_logits() {
    // The scalar reference path end to end, against the best path.
    let dir = shared_model("pystd-qwen3-7m");
    let tokens = "0,100,200,300,400,500,600,700,800,900";
    let tmp = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for isa in ["scalar", "best"] {
        let out = tmp.path().join(format!("{isa}.safetensors"));
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_hayate"))
            .args([
                "logits",
                "--model",
                dir.to_str().unwrap(),
                "--tokens",
                tokens,
                "--out",
                out.to_str().unwrap(),
            ])
            .env("HAYATE_ISA", isa)
            .status()
            .unwrap();
        assert!(status.success());
        results.push(read_tensor(&out, "logits").0);
    }
    let d = results[0]
        .iter()
        .zip(&results[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-3, "scalar vs SIMD: {d}");
}
