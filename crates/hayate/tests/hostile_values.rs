//! Hostile values in `config.json` and on the command line, across float,
//! quantized, sliding-window, DeltaNet and short-convolution checkpoints:
//! every one must end in exit code 1 and one `error:` line that names the
//! problem: never a panic, an abort, or a result computed from nonsense.

mod common;
use common::*;
use serde_json::{Map, Value, json};
use std::fs;
use std::path::Path;
use std::process::Output;

const FLOAT: &str = "qwen3-gqa-qknorm";
const LLAMA3_ROPE: &str = "llama-gqa-rope-llama3";
const SLIDING: &str = "gemma3-text-sliding";
const DELTANET: &str = "qwen3_5-text-gdn";
const SHORT_CONV: &str = "lfm2-conv-attn";

type Edit = fn(&mut Map<String, Value>);

/// `(fixture, what the edit does to config.json, words the error must contain)`.
const CONFIG_CASES: &[(&str, Edit, &[&str])] = &[
    // Sizes: zero, absurd, negative, fractional, beyond 64 bits.
    (
        FLOAT,
        |c| set(c, "max_position_embeddings", json!(0)),
        &["max_position_embeddings", "is 0"],
    ),
    (
        FLOAT,
        |c| set(c, "max_position_embeddings", json!(1u64 << 40)),
        &["max_position_embeddings", "1099511627776"],
    ),
    (
        FLOAT,
        |c| set(c, "max_position_embeddings", json!(-1)),
        &["max_position_embeddings", "-1"],
    ),
    (
        FLOAT,
        |c| set(c, "vocab_size", json!(0)),
        &["vocab_size", "is 0"],
    ),
    (
        FLOAT,
        |c| set(c, "vocab_size", json!(320.5)),
        &["vocab_size", "320.5"],
    ),
    (
        FLOAT,
        |c| set(c, "num_hidden_layers", json!(1_000_000_000)),
        &["num_hidden_layers", "1000000000"],
    ),
    (
        FLOAT,
        |c| set(c, "num_hidden_layers", json!(0)),
        &["num_hidden_layers", "is 0"],
    ),
    (
        FLOAT,
        |c| set(c, "hidden_size", json!(1u64 << 40)),
        &["hidden_size", "1099511627776"],
    ),
    (
        FLOAT,
        |c| set(c, "hidden_size", json!(18446744073709551615u64)),
        &["hidden_size", "18446744073709551615"],
    ),
    (
        FLOAT,
        |c| set(c, "num_attention_heads", json!(0)),
        &["num_attention_heads", "is 0"],
    ),
    (
        FLOAT,
        |c| set(c, "num_key_value_heads", json!(100_000)),
        &["num_key_value_heads", "100000"],
    ),
    (
        FLOAT,
        |c| set(c, "head_dim", json!(1_000_000_000_000u64)),
        &["head_dim", "1000000000000"],
    ),
    (
        FLOAT,
        |c| set(c, "head_dim", json!(15)),
        &["head_dim", "even"],
    ),
    (
        FLOAT,
        |c| set(c, "intermediate_size", json!(1u64 << 62)),
        &["intermediate_size", "4611686018427387904"],
    ),
    // Norm epsilons and rotary parameters that would give NaN or infinities.
    (
        FLOAT,
        |c| set(c, "rms_norm_eps", json!(0)),
        &["rms_norm_eps", "is 0"],
    ),
    (
        FLOAT,
        |c| set(c, "rms_norm_eps", json!(-1e-6)),
        &["rms_norm_eps", "-1e-6"],
    ),
    (
        FLOAT,
        |c| set(c, "rms_norm_eps", json!(1e-300)),
        &["rms_norm_eps", "underflows"],
    ),
    (
        FLOAT,
        |c| c["rope_parameters"]["rope_theta"] = json!(1e-300),
        &["rope_theta", "at least 1"],
    ),
    (
        FLOAT,
        |c| c["rope_parameters"] = json!({"rope_type": "linear", "factor": 0}),
        &["factor", "is 0"],
    ),
    (
        LLAMA3_ROPE,
        |c| c["rope_parameters"]["high_freq_factor"] = json!(1.0),
        &["high_freq_factor", "low_freq_factor"],
    ),
    (
        FLOAT,
        |c| c["rope_parameters"] = json!({"rope_type": "yarn", "factor": 4.0}),
        &["yarn"],
    ),
    // Sliding-window attention.
    (
        SLIDING,
        |c| set(c, "sliding_window", json!(1u64 << 63)),
        &["sliding_window", "9223372036854775808"],
    ),
    (
        SLIDING,
        |c| set(c, "sliding_window", json!(0)),
        &["sliding_window", "is 0"],
    ),
    (
        SLIDING,
        |c| set(c, "query_pre_attn_scalar", json!(0)),
        &["query_pre_attn_scalar", "is 0"],
    ),
    (
        SLIDING,
        |c| set(c, "final_logit_softcapping", json!(-30.0)),
        &["final_logit_softcapping", "-30"],
    ),
    (
        SLIDING,
        |c| {
            c.remove("layer_types");
            set(c, "sliding_window_pattern", json!(0));
        },
        &["sliding_window_pattern", "is 0"],
    ),
    (
        SLIDING,
        |c| c["layer_types"][1] = json!("chunked_attention"),
        &["layer 1", "chunked_attention", "sliding_attention"],
    ),
    (
        SLIDING,
        |c| set(c, "layer_types", json!(["full_attention"])),
        &["layer_types", "1 entries", "4 layers"],
    ),
    // Gated DeltaNet.
    (
        DELTANET,
        |c| set(c, "linear_num_value_heads", json!(5)),
        &["linear_num_value_heads", "linear_num_key_heads"],
    ),
    (
        DELTANET,
        |c| set(c, "linear_key_head_dim", json!(0)),
        &["linear_key_head_dim", "is 0"],
    ),
    (
        DELTANET,
        |c| set(c, "linear_num_key_heads", json!(1u64 << 33)),
        &["linear_num_key_heads", "8589934592"],
    ),
    (
        DELTANET,
        |c| set(c, "linear_conv_kernel_dim", json!(1_000_000)),
        &["linear_conv_kernel_dim", "1000000"],
    ),
    (
        DELTANET,
        |c| c["rope_parameters"]["partial_rotary_factor"] = json!(0.01),
        &["rotary", "head_dim"],
    ),
    (
        DELTANET,
        |c| {
            c.remove("layer_types");
            set(c, "full_attention_interval", json!(0));
        },
        &["full_attention_interval", "is 0"],
    ),
    // Short convolutions.
    (
        SHORT_CONV,
        |c| {
            c.remove("layer_types");
            set(c, "full_attn_idxs", json!([2, 99]));
        },
        &["full_attn_idxs", "99"],
    ),
    (
        SHORT_CONV,
        |c| set(c, "conv_L_cache", json!(0)),
        &["conv_L_cache", "is 0"],
    ),
    (
        SHORT_CONV,
        |c| set(c, "block_ffn_dim_multiplier", json!(-2.0)),
        &["block_ffn_dim_multiplier", "-2"],
    ),
    (
        SHORT_CONV,
        |c| set(c, "block_multiple_of", json!(0)),
        &["block_multiple_of", "is 0"],
    ),
];

fn set(c: &mut Map<String, Value>, key: &str, value: Value) {
    c.insert(key.to_owned(), value);
}

/// Applies `edit` to `dir/config.json`.
fn edit_config(dir: &Path, edit: Edit) {
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

/// `hayate logits` on `model`; the output must not be written on failure.
fn logits(model: &Path, extra: &[&str]) -> (Output, bool) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("l.safetensors");
    let run = hayate(&logits_args(model, "1,2,3", &out, extra));
    (run, out.exists())
}

#[test]
fn hostile_config_values_in_float_sliding_deltanet_and_conv_checkpoints() {
    assert!(CONFIG_CASES.len() >= 30);
    for (i, (fixture, edit, needles)) in CONFIG_CASES.iter().enumerate() {
        let dir = copy_fixture(fixture);
        edit_config(dir.path(), *edit);
        let (run, written) = logits(dir.path(), &[]);
        eprintln!(
            "case {i} ({fixture}): {}",
            String::from_utf8_lossy(&run.stderr).trim_end()
        );
        assert_one_error_line(&run, needles);
        assert!(!written, "case {i}: output written despite the error");
    }
}

#[test]
fn hostile_config_values_in_a_quantized_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    for fixture in [FLOAT, DELTANET] {
        let quantized = tmp.path().join(fixture);
        let run = hayate(&[
            "quantize",
            "--model",
            fixtures().join(fixture).to_str().unwrap(),
            "--format",
            "q4",
            "--out",
            quantized.to_str().unwrap(),
        ]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let cases: [(Edit, &[&str]); 4] = [
            (
                |c| set(c, "num_hidden_layers", json!(1_000_000_000)),
                &["num_hidden_layers", "1000000000"],
            ),
            (|c| set(c, "vocab_size", json!(0)), &["vocab_size", "is 0"]),
            // Sizes that pass the bounds but disagree with the stored matrices.
            (|c| set(c, "intermediate_size", json!(96)), &["mlp", "96"]),
            (
                |c| set(c, "max_position_embeddings", json!(0)),
                &["max_position_embeddings", "is 0"],
            ),
        ];
        for (edit, needles) in cases {
            let copy = tempfile::tempdir().unwrap();
            for entry in fs::read_dir(&quantized).unwrap() {
                let entry = entry.unwrap();
                fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
            }
            edit_config(copy.path(), edit);
            let (run, written) = logits(copy.path(), &[]);
            assert_one_error_line(&run, needles);
            assert!(!written);
        }
    }
}

/// Runs `hayate` with `args` and asserts a clean error naming every needle.
fn fails(args: &[&str], needles: &[&str]) {
    let run = hayate(args);
    assert_one_error_line(&run, needles);
}

#[test]
fn hostile_command_line_values() {
    let float = fixtures().join(FLOAT);
    let float = float.to_str().unwrap();
    let pystd = shared_model("pystd-qwen3-7m");
    let pystd = pystd.to_str().unwrap();
    let run = |extra: &[&'static str]| {
        let mut args = vec!["run", "--model", pystd, "--raw", "--prompt", "def f(x):"];
        args.extend_from_slice(extra);
        args
    };
    // Sampling values, negative ones written with a space.
    fails(&run(&["--temperature", "-1"]), &["temperature", "-1"]);
    fails(&run(&["--temperature", "nan"]), &["temperature", "NaN"]);
    fails(&run(&["--top-p", "1.5"]), &["top-p", "1.5"]);
    fails(&run(&["--min-p", "-0.1"]), &["min-p", "-0.1"]);
    fails(&run(&["--repeat-penalty", "0"]), &["repeat-penalty", "0"]);
    fails(&run(&["--top-k", "-3"]), &["--top-k", "-3"]);
    fails(&run(&["--seed", "18446744073709551616"]), &["--seed"]);
    // Sizes.
    fails(&run(&["--ctx-size", "0"]), &["context size 0"]);
    fails(
        &run(&["--ctx-size", "1099511627776"]),
        &["1099511627776", "2048"],
    );
    fails(&run(&["--threads", "-1"]), &["--threads", "-1"]);
    fails(&run(&["--threads", "1,2"]), &["--threads", "comma lists"]);
    fails(&run(&["--max-tokens", "x"]), &["--max-tokens", "x"]);
    fails(&run(&["--no-such-flag"]), &["--no-such-flag"]);
    // bench: nothing to measure, repetitions out of range.
    let bench = |extra: &[&'static str]| {
        let mut args = vec!["bench", "--model", float];
        args.extend_from_slice(extra);
        args
    };
    fails(&bench(&["-p", "0", "-n", "0"]), &["nothing to measure"]);
    fails(&bench(&["-r", "0"]), &["--repetitions", "0"]);
    fails(&bench(&["-r", "100000"]), &["--repetitions", "100000"]);
    fails(&bench(&["-p", "100000"]), &["100000", "512"]);
    fails(&bench(&["-d", "100000"]), &["100000 of depth"]);
    fails(&bench(&["-d", "18446744073709551615"]), &["of depth"]);
    fails(&bench(&["-d", "0,100000"]), &["100000 of depth"]);
    fails(&bench(&["-p", "0,0", "-n", "0"]), &["nothing to measure"]);
    fails(&bench(&["-p", "1,x"]), &["x"]);
    // logits and quantize.
    let (out, written) = logits(&fixtures().join(FLOAT), &["--chunk", "0"]);
    assert_one_error_line(&out, &["--chunk"]);
    assert!(!written);
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    fails(
        &[
            "quantize",
            "--model",
            float,
            "--format",
            "q4",
            "--group-size",
            "7",
            "--out",
            q.to_str().unwrap(),
        ],
        &["group size 7"],
    );
    fails(
        &[
            "quantize", "--model", float, "--format", "q5", "--out", "/tmp/x",
        ],
        &["q5"],
    );
    assert!(!q.exists());
}

#[test]
fn more_threads_than_cores_are_capped_with_a_warning() {
    let (run, written) = logits(&fixtures().join(FLOAT), &["--threads", "100000"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(written);
    assert!(
        stderr.contains("100000 threads asked for") && stderr.contains("cores"),
        "{stderr}"
    );
}

#[test]
fn a_zero_token_limit_prefills_and_reports_a_true_rate() {
    let model = shared_model("pystd-qwen3-7m");
    let out = hayate(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--raw",
        "--prompt",
        "def fibonacci(n):",
        "--max-tokens",
        "0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "\n");
    assert!(stderr.contains("generated 0 tok"), "{stderr}");
    assert!(stderr.contains("first token -"), "{stderr}");
    assert!(stderr.contains("stop: token limit"), "{stderr}");
    let rate: f64 = stderr
        .split("prefill ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no prefill rate: {stderr}"));
    // A prompt of a few tokens on a 7M model: fast, but not the billions
    // of tokens per second an unmeasured time gives.
    assert!(rate > 0.0 && rate < 1e7, "prefill {rate} tok/s");
}
