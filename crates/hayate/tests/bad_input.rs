//! Broken models and bad arguments: every one must end in a one-line
//! `error: ...` naming the problem, exit code 1, no panic, and no output file.

mod common;
use common::*;
use serde_json::{Map, Value};
use std::fs;
use std::path::{Path, PathBuf};

/// A single-file fixture the model-breaking tests start from.
const FIXTURE: &str = "qwen3-gqa-qknorm";
/// The sharded fixture.
const SHARDED: &str = "llama-mqa-headdim";
/// A tensor every fixture has.
const UP_PROJ: &str = "model.layers.0.mlp.up_proj.weight";

/// Runs `hayate logits` on `model` and asserts it fails cleanly, mentioning
/// every needle, without creating `--out` or leaving a temporary file beside it.
fn logits_fails(model: &Path, tokens: &str, extra: &[&str], needles: &[&str]) {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("logits.safetensors");
    let run = hayate(&logits_args(model, tokens, &out, extra));
    assert_one_error_line(&run, needles);
    assert!(!out.exists(), "--out was created despite the error");
    let left: Vec<_> = fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "files left beside --out: {left:?}");
}

/// Runs `hayate run` with `args` after `--model model` and asserts it fails cleanly.
fn run_fails(model: &Path, args: &[&str], needles: &[&str]) {
    let mut all = vec!["run", "--model", model.to_str().unwrap()];
    all.extend_from_slice(args);
    let run = hayate(&all);
    assert_one_error_line(&run, needles);
}

fn st_path(dir: &Path) -> PathBuf {
    dir.join("model.safetensors")
}

/// Applies `edit` to the model's config.json.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

// 1
#[test]
fn model_dir_without_config_json() {
    let dir = copy_fixture(FIXTURE);
    fs::remove_file(dir.path().join("config.json")).unwrap();
    logits_fails(dir.path(), "1,2,3", &[], &["config.json"]);
}

// 2
#[test]
fn config_json_that_is_not_json() {
    let dir = copy_fixture(FIXTURE);
    fs::write(
        dir.path().join("config.json"),
        "model_type = \"qwen3\"\nhidden_size = 64\n",
    )
    .unwrap();
    logits_fails(dir.path(), "1,2,3", &[], &["config.json", "JSON"]);
}

// 3
#[test]
fn no_safetensors_and_no_index() {
    let dir = copy_fixture(FIXTURE);
    fs::remove_file(st_path(dir.path())).unwrap();
    logits_fails(dir.path(), "1,2,3", &[], &["safetensors"]);
}

// 4
#[test]
fn truncated_safetensors() {
    let dir = copy_fixture(FIXTURE);
    let path = st_path(dir.path());
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    logits_fails(dir.path(), "1,2,3", &[], &["model.safetensors"]);
}

// 5
#[test]
fn safetensors_header_with_offsets_beyond_the_data() {
    let dir = copy_fixture(FIXTURE);
    let path = st_path(dir.path());
    let (mut header, data) = read_raw(&path);
    // Keep the tensor's size right, but move it past the end of the data.
    let offsets = &header[UP_PROJ]["data_offsets"];
    let size = offsets[1].as_u64().unwrap() - offsets[0].as_u64().unwrap();
    let end = data.len() as u64 + 4096;
    header[UP_PROJ]["data_offsets"] = serde_json::json!([end - size, end]);
    write_raw(&path, &header, &data);
    logits_fails(dir.path(), "1,2,3", &[], &["model.safetensors"]);
}

// 6
#[test]
fn safetensors_with_absurd_header_length() {
    let dir = copy_fixture(FIXTURE);
    let path = st_path(dir.path());
    let original = fs::read(&path).unwrap();
    for prefix in [u64::MAX, original.len() as u64 + 1, 1 << 40] {
        let mut bytes = original.clone();
        bytes[..8].copy_from_slice(&prefix.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        logits_fails(dir.path(), "1,2,3", &[], &["model.safetensors"]);
    }
}

// 7
#[test]
fn empty_safetensors() {
    let dir = copy_fixture(FIXTURE);
    fs::write(st_path(dir.path()), b"").unwrap();
    logits_fails(dir.path(), "1,2,3", &[], &["model.safetensors"]);
}

// 8
#[test]
fn tensor_shape_disagrees_with_config() {
    let dir = copy_fixture(FIXTURE);
    edit_config(dir.path(), |c| {
        c.insert("intermediate_size".into(), 96.into());
    });
    // Whichever MLP projection is checked first must be named.
    logits_fails(
        dir.path(),
        "1,2,3",
        &[],
        &["model.layers.", ".mlp.", "_proj.weight"],
    );
}

// 9
#[test]
fn tensor_with_integer_dtype() {
    let dir = copy_fixture(FIXTURE);
    let path = st_path(dir.path());
    let (mut header, data) = read_raw(&path);
    assert_eq!(header[UP_PROJ]["dtype"], "BF16");
    // I16 has BF16's width, so every size stays consistent.
    header[UP_PROJ]["dtype"] = "I16".into();
    write_raw(&path, &header, &data);
    logits_fails(dir.path(), "1,2,3", &[], &[UP_PROJ, "I16"]);
}

// 10
#[test]
fn missing_tensor() {
    let dir = copy_fixture(FIXTURE);
    let path = st_path(dir.path());
    let bytes = fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != UP_PROJ)
        .collect();
    assert_eq!(kept.len() + 1, st.len());
    let rewritten = safetensors::serialize(kept, None).unwrap();
    fs::write(&path, rewritten).unwrap();
    logits_fails(dir.path(), "1,2,3", &[], &[UP_PROJ]);
}

// 11
#[test]
fn unknown_model_type() {
    let dir = copy_fixture(FIXTURE);
    edit_config(dir.path(), |c| {
        c.insert("model_type".into(), "mamba9".into());
    });
    logits_fails(
        dir.path(),
        "1,2,3",
        &[],
        &["mamba9", "llama", "qwen2", "qwen3"],
    );
}

// 12a
#[test]
fn sharded_index_names_a_missing_shard() {
    let dir = copy_fixture(SHARDED);
    let shard = "model-00002-of-00003.safetensors";
    fs::remove_file(dir.path().join(shard)).unwrap();
    logits_fails(dir.path(), "1,2,3", &[], &[shard]);
}

// 12b
#[test]
fn sharded_index_points_a_tensor_at_the_wrong_shard() {
    let dir = copy_fixture(SHARDED);
    let index_path = dir.path().join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    let right = "model-00002-of-00003.safetensors";
    let wrong = "model-00001-of-00003.safetensors";
    assert_eq!(index["weight_map"][UP_PROJ], right);
    index["weight_map"][UP_PROJ] = wrong.into();
    fs::write(&index_path, serde_json::to_vec_pretty(&index).unwrap()).unwrap();
    logits_fails(dir.path(), "1,2,3", &[], &[UP_PROJ, wrong]);
}

// 13
#[test]
fn logits_token_id_outside_the_vocabulary() {
    // The fixture's vocabulary has 320 tokens.
    logits_fails(&fixtures().join(FIXTURE), "1,5000,3", &[], &["5000"]);
}

// 14
#[test]
fn logits_more_tokens_than_max_position_embeddings() {
    let dir = copy_fixture(FIXTURE);
    edit_config(dir.path(), |c| {
        c.insert("max_position_embeddings".into(), 8.into());
    });
    let tokens: Vec<String> = (1..=20).map(|i| i.to_string()).collect();
    logits_fails(dir.path(), &tokens.join(","), &[], &["20", "8", "context"]);
}

// 15a
#[test]
fn logits_token_that_is_not_a_number() {
    logits_fails(&fixtures().join(FIXTURE), "1,x,3", &[], &["x", "token"]);
}

// 15b
#[test]
fn logits_chunk_zero() {
    logits_fails(
        &fixtures().join(FIXTURE),
        "1,2,3",
        &["--chunk", "0"],
        &["chunk"],
    );
}

// 16
#[test]
fn run_prompt_longer_than_the_context() {
    let prompt = "the quick brown fox jumps over the lazy dog. ".repeat(20);
    run_fails(
        &shared_model("pystd-qwen3-7m"),
        &[
            "--ctx-size",
            "16",
            "--raw",
            "--prompt",
            &prompt,
            "--max-tokens",
            "4",
        ],
        &["context", "16"],
    );
}

// 17
#[test]
fn run_ctx_size_beyond_max_position_embeddings() {
    run_fails(
        &shared_model("pystd-qwen3-7m"),
        &[
            "--ctx-size",
            "100000",
            "--raw",
            "--prompt",
            "def f(x):",
            "--max-tokens",
            "4",
        ],
        &["100000", "2048"],
    );
}

// 18
#[test]
fn run_model_without_tokenizer() {
    let model = shared_model("stories260K");
    assert!(!model.join("tokenizer.json").exists());
    run_fails(
        &model,
        &["--prompt", "Once upon a time", "--max-tokens", "4"],
        &["tokenizer.json"],
    );
}

// 19a
#[test]
fn run_top_p_zero() {
    run_fails(
        &shared_model("pystd-qwen3-7m"),
        &[
            "--raw",
            "--prompt",
            "def f(x):",
            "--max-tokens",
            "4",
            "--seed",
            "1",
            "--top-p",
            "0",
        ],
        &["top-p", "0"],
    );
}

// 19b
#[test]
fn run_negative_temperature() {
    // `--temperature=-1`: with a space, the argument parser would read `-1` as a flag.
    run_fails(
        &shared_model("pystd-qwen3-7m"),
        &[
            "--raw",
            "--prompt",
            "def f(x):",
            "--max-tokens",
            "4",
            "--seed",
            "1",
            "--temperature=-1",
        ],
        &["temperature", "-1"],
    );
}

// 20
#[test]
fn logits_out_in_a_missing_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("no-such-dir/sub/logits.safetensors");
    let run = hayate(&[
        "logits",
        "--model",
        fixtures().join(FIXTURE).to_str().unwrap(),
        "--tokens",
        "1,2,3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_one_error_line(&run, &[out.to_str().unwrap()]);
    assert!(!out.exists());
    assert!(!tmp.path().join("no-such-dir").exists());
}

// 21a
#[test]
fn config_heads_not_a_multiple_of_kv_heads() {
    let dir = copy_fixture(FIXTURE);
    edit_config(dir.path(), |c| {
        c.insert("num_key_value_heads".into(), 3.into());
    });
    logits_fails(
        dir.path(),
        "1,2,3",
        &[],
        &["num_attention_heads", "num_key_value_heads"],
    );
}

// 21b
#[test]
fn config_hidden_size_is_a_string() {
    let dir = copy_fixture(FIXTURE);
    edit_config(dir.path(), |c| {
        c.insert("hidden_size".into(), "64".into());
    });
    logits_fails(dir.path(), "1,2,3", &[], &["hidden_size"]);
}
