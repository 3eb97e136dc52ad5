//! `hayate quantize` and `--quantize`: checkpoints on disk equal in-memory
//! quantization, every architecture runs quantized, quality holds on a
//! trained model, and broken quantized files give clear errors.

mod common;
use common::*;
use serde_json::{Value, json};
use std::fs;
use std::path::Path;

fn quantize(model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    hayate(&args)
}

/// Token ids every fixture's vocabulary holds.
const TOKENS: &str = "1,17,20,42,5,79,7,50,3,64";

fn logits(model: &Path, extra: &[&str]) -> Vec<f32> {
    logits_at(model, extra, None)
}

/// Logits of [`TOKENS`], with the kernels forced to `isa` if given.
fn logits_at(model: &Path, extra: &[&str], isa: Option<&str>) -> Vec<f32> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.safetensors");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_hayate"));
    command.args(logits_args(model, TOKENS, &out, extra));
    match isa {
        Some(isa) => command.env("HAYATE_ISA", isa),
        None => command.env_remove("HAYATE_ISA"),
    };
    let run = command.output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    read_tensor(&out, "logits").0
}

#[test]
fn checkpoints_on_disk_give_the_logits_of_in_memory_quantization() {
    let model = shared_model("pystd-qwen3-7m");
    // The largest |Δlogit| from the float model each may cause: about 1.2x
    // what is measured (2.29, 0.352, 2.11); quantization is deterministic.
    let variants: [(&[&str], f32); 3] = [
        (&["--format", "q4"], 2.75),
        (&["--format", "q8", "--no-rotation"], 0.42),
        (
            &[
                "--format",
                "q4",
                "--group-size",
                "128",
                "--embeddings",
                "q8",
            ],
            2.55,
        ),
    ];
    for (flags, max_shift) in variants {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("quantized");
        let run = quantize(&model, &out, flags);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let report = String::from_utf8_lossy(&run.stdout);
        assert!(report.contains("bits per weight"), "{report}");
        for file in [
            "tokenizer.json",
            "generation_config.json",
            "model.safetensors",
        ] {
            assert!(out.join(file).exists(), "{file} missing");
        }
        let config: Value =
            serde_json::from_slice(&fs::read(out.join("config.json")).unwrap()).unwrap();
        let section = &config["quantization"];
        assert_eq!(section["format"], json!(flags[1]));
        assert!(section["quantized_tensors"].as_array().unwrap().len() >= 56);
        // --format q4 -> --quantize q4, the other flags as they are.
        let mut in_memory = vec!["--quantize"];
        in_memory.extend_from_slice(&flags[1..]);
        let from_disk = logits(&out, &[]);
        let from_memory = logits(&model, &in_memory);
        assert_eq!(from_disk, from_memory, "{flags:?}");
        let float = logits(&model, &[]);
        let worst = from_disk
            .iter()
            .zip(&float)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= max_shift,
            "{flags:?}: logits moved by {worst} (at most {max_shift})"
        );
    }
}

#[test]
fn every_fixture_runs_quantized_with_sane_logits_on_every_path() {
    for entry in fs::read_dir(fixtures()).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("config.json").exists() {
            continue;
        }
        let float = logits(&dir, &[]);
        let range = float.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Shapes here are tiny and odd (16-row projections, 160 inputs), so
        // this covers matrices kept unrotated or with a smaller group. The
        // random fixtures amplify any perturbation (bf16 -> q8 without
        // rotation already moves their logits by up to 10%), so closeness is
        // only checked loosely here; quality is measured on a trained model below.
        // Measured over the fixtures: at most 0.17 and 0.93 of the range.
        for (flags, tolerance) in [
            (&["--quantize", "q8", "--group-size", "128"][..], 0.22),
            (&["--quantize", "q4", "--embeddings", "q8"][..], 1.0),
        ] {
            let q = logits(&dir, flags);
            assert!(q.iter().all(|v| v.is_finite()));
            let worst = q
                .iter()
                .zip(&float)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= tolerance * range,
                "{} {flags:?}: {worst} of {range}",
                dir.display()
            );
            // End to end, the scalar and SIMD paths agree. With f32
            // activations: int8 rounding flips from summation order would be
            // amplified by these random models (the int8 kernels are compared
            // exactly in hayate-kernels).
            let f32_flags = [flags, &["--activations", "f32"]].concat();
            let scalar = logits_at(&dir, &f32_flags, Some("scalar"));
            let simd = logits_at(&dir, &f32_flags, None);
            for (a, b) in scalar.iter().zip(&simd) {
                // Measured: at most 4.5e-6 of the range.
                assert!((a - b).abs() <= 5e-5 * range, "scalar vs SIMD: {a} vs {b}");
            }
        }
    }
}

#[test]
fn quantization_keeps_quality_on_a_trained_model() {
    let model = shared_model("pystd-qwen3-7m");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/pystd-valid.txt");
    let kl = |flags: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--reference",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--max-tokens",
            "3000",
            "--json",
        ];
        args.extend_from_slice(flags);
        let run = hayate(&args);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let report: Value = serde_json::from_slice(&run.stdout).unwrap();
        report["kl_mean"].as_f64().unwrap()
    };
    let q8 = kl(&["--quantize", "q8"]);
    assert!(q8 < 1e-3, "q8 KL {q8}");
    let q4 = kl(&["--quantize", "q4"]);
    assert!(q4 < 0.02, "q4 KL {q4}");
    assert!(q8 < q4);
}

#[test]
fn quantize_refuses_to_overwrite_and_leaves_nothing_on_failure() {
    let model = copy_fixture("qwen3-gqa-qknorm");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    fs::create_dir(&out).unwrap();
    let run = quantize(model.path(), &out, &["--format", "q8"]);
    assert_clean_error(&run, &["already exists", "--force"]);
    let run = quantize(model.path(), &out, &["--format", "q8", "--force"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.join("config.json").exists());

    // A quantized model cannot be quantized again.
    let again = dir.path().join("again");
    assert_clean_error(
        &quantize(&out, &again, &["--format", "q4"]),
        &["already quantized"],
    );
    // Nor can a group size the format does not know be used.
    assert_clean_error(
        &quantize(
            model.path(),
            &again,
            &["--format", "q4", "--group-size", "48"],
        ),
        &["group size 48"],
    );
    // A model that does not load leaves nothing behind.
    fs::remove_file(model.path().join("model.safetensors")).unwrap();
    assert_clean_error(
        &quantize(model.path(), &again, &["--format", "q4"]),
        &["model.safetensors"],
    );
    let left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["q".to_string()], "left behind: {left:?}");
}

/// A quantized copy of a fixture to break, and the name of one of its matrices.
fn quantized_fixture(format: &str) -> (tempfile::TempDir, &'static str) {
    let model = fixtures().join("qwen3-gqa-qknorm");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    let run = quantize(&model, &out, &["--format", format]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for entry in fs::read_dir(&out).unwrap() {
        let entry = entry.unwrap();
        fs::rename(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    fs::remove_dir(&out).unwrap();
    (dir, "model.layers.0.mlp.up_proj")
}

fn logits_fails(model: &Path, needles: &[&str]) {
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("l.safetensors");
    let run = hayate(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        "1,2,3",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert_clean_error(&run, needles);
    assert!(!path.exists());
}

/// Edits the header of a quantized fixture and checks loading fails naming `needles`.
fn broken(
    format: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>, &str),
    needles: &[&str],
) {
    let (dir, name) = quantized_fixture(format);
    let path = dir.path().join("model.safetensors");
    let (mut header, data) = read_raw(&path);
    edit(&mut header, name);
    write_raw(&path, &header, &data);
    logits_fails(dir.path(), needles);
}

#[test]
fn corrupt_quantized_checkpoints_give_clear_errors() {
    // The quantized fixture itself loads.
    let (dir, _) = quantized_fixture("q4");
    assert_eq!(logits(dir.path(), &[]).len(), 10 * 320);

    broken(
        "q4",
        |h, n| {
            let scales = h.remove(&format!("{n}.scales")).unwrap();
            h.insert(format!("{n}.scale"), scales);
        },
        &["up_proj.scales", "missing"],
    );
    broken(
        "q4",
        |h, n| {
            h["__metadata__"].as_object_mut().unwrap().remove(n);
        },
        &["up_proj", "metadata"],
    );
    broken(
        "q4",
        |h, n| {
            let meta = h["__metadata__"].as_object_mut().unwrap();
            let text = meta[n].as_str().unwrap().replace("\"q4\"", "\"q3\"");
            meta.insert(n.into(), Value::String(text));
        },
        &["unknown format `q3`"],
    );
    broken(
        "q4",
        |h, n| {
            let meta = h["__metadata__"].as_object_mut().unwrap();
            meta.insert(n.into(), Value::String("{not json".into()));
        },
        &["up_proj", "not JSON"],
    );
    broken(
        "q8",
        |h, n| {
            let meta = h["__metadata__"].as_object_mut().unwrap();
            let text = meta[n]
                .as_str()
                .unwrap()
                .replace("\"rows\":128", "\"rows\":96");
            meta.insert(n.into(), Value::String(text));
        },
        &["up_proj", "quantized as 96 x 64"],
    );
    // Same bytes, packed as if the rows were twice as long.
    broken(
        "q4",
        |h, n| {
            h[&format!("{n}.qweight")]["shape"] = json!([64, 64]);
        },
        &["up_proj.qweight", "shape"],
    );
    broken(
        "q4",
        |h, n| {
            h[&format!("{n}.qweight")]["dtype"] = json!("I8");
        },
        &["up_proj.qweight", "I8", "U8"],
    );
    // A sign that is neither 1 nor -1.
    let (dir, name) = quantized_fixture("q8");
    let path = dir.path().join("model.safetensors");
    let (header, mut data) = read_raw(&path);
    let start = header[&format!("{name}.sign_in")]["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    data[start] = 0;
    write_raw(&path, &header, &data);
    logits_fails(dir.path(), &["up_proj.sign_in", "sign 0"]);
}

#[test]
fn gated_queries_are_stored_apart_and_reload_as_quantized_in_memory() {
    // Qwen3.5 interleaves each head's query and output gate in `q_proj`; the
    // translator regroups them at load into two layers, and a quantized
    // checkpoint stores those two, so that it maps them as they are.
    for name in ["qwen3_5-text-gdn", "qwen3_5-vl-layout"] {
        let model = fixtures().join(name);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("quantized");
        let run = quantize(&model, &out, &["--format", "q4"]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let (header, _) = read_raw(&out.join("model.safetensors"));
        let q_proj: Vec<&String> = header.keys().filter(|n| n.contains(".q_proj")).collect();
        let count = |part: &str| q_proj.iter().filter(|n| n.ends_with(part)).count();
        assert!(count(".q_proj.query.qweight") > 0, "{name}: {q_proj:?}");
        assert_eq!(
            count(".q_proj.query.qweight"),
            count(".q_proj.gate.qweight"),
            "{name}"
        );
        assert!(
            q_proj
                .iter()
                .all(|n| n.contains(".q_proj.query.") || n.contains(".q_proj.gate.")),
            "{name}: the interleaved matrix is stored as well: {q_proj:?}"
        );
        assert_eq!(
            logits(&out, &[]),
            logits(&model, &["--quantize", "q4"]),
            "{name}"
        );
    }
}

#[test]
fn gated_query_biases_follow_their_rows_through_a_quantized_checkpoint() {
    // A Qwen3.5 fixture given attention biases: the query/gate bias is
    // interleaved like the rows, stays so in the quantized checkpoint, and
    // must be regrouped with them on both paths.
    let fixture = copy_fixture("qwen3_5-text-gdn");
    let dir = fixture.path();
    let weights = dir.join("model.safetensors");
    let (mut header, mut data) = read_raw(&weights);
    let projections: Vec<(String, usize)> = header
        .iter()
        .filter_map(|(name, info)| {
            let prefix = name.strip_suffix(".weight")?;
            let is_attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
                .iter()
                .any(|p| prefix.ends_with(&format!("self_attn.{p}")));
            is_attention.then(|| {
                (
                    prefix.to_owned(),
                    info["shape"][0].as_u64().unwrap() as usize,
                )
            })
        })
        .collect();
    assert!(projections.len() >= 4, "{projections:?}");
    for (i, (prefix, rows)) in projections.iter().enumerate() {
        let start = data.len();
        for r in 0..*rows {
            let value = 0.05 * (((r * 7 + i * 3) % 11) as f32 - 5.0);
            let bf16 = (value.to_bits() >> 16) as u16;
            data.extend_from_slice(&bf16.to_le_bytes());
        }
        header.insert(
            format!("{prefix}.bias"),
            json!({"dtype": "BF16", "shape": [rows], "data_offsets": [start, data.len()]}),
        );
    }
    write_raw(&weights, &header, &data);
    let config_path = dir.join("config.json");
    let mut config: Value = serde_json::from_slice(&fs::read(&config_path).unwrap()).unwrap();
    config["attention_bias"] = json!(true);
    fs::write(&config_path, config.to_string()).unwrap();

    let biased = logits(dir, &[]);
    assert_ne!(biased, logits(&fixtures().join("qwen3_5-text-gdn"), &[]));
    let out = tempfile::tempdir().unwrap();
    let quantized = out.path().join("q8");
    let run = quantize(dir, &quantized, &["--format", "q8"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(logits(&quantized, &[]), logits(dir, &["--quantize", "q8"]));
}

/// The first `bytes` of the calibration text, in a temporary file.
fn calibration_text(dir: &Path, bytes: usize) -> std::path::PathBuf {
    let text = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/pystd-calib.txt"),
    )
    .unwrap();
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let path = dir.join("calib.txt");
    fs::write(&path, &text[..end]).unwrap();
    path
}

#[test]
fn calibrated_checkpoints_give_the_logits_of_in_memory_calibration() {
    let model = shared_model("pystd-qwen3-7m");
    let dir = tempfile::tempdir().unwrap();
    let calib = calibration_text(dir.path(), 8000);
    let calib = calib.to_str().unwrap();
    let calibrate = [
        "--calibration",
        calib,
        "--calibration-tokens",
        "512",
        "--calibration-context",
        "128",
    ];
    for format in ["q4", "q8"] {
        let out = dir.path().join(format!("calibrated-{format}"));
        let flags = [&["--format", format][..], &calibrate].concat();
        let run = quantize(&model, &out, &flags);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(
            String::from_utf8_lossy(&run.stdout).contains("calibrated on 512 tokens"),
            "{}",
            String::from_utf8_lossy(&run.stdout)
        );
        let config: Value =
            serde_json::from_slice(&fs::read(out.join("config.json")).unwrap()).unwrap();
        let section = &config["quantization"]["calibration"];
        assert_eq!(section["tokens"], json!(512), "{section}");
        assert_eq!(section["context"], json!(128), "{section}");
        let objective = if format == "q4" { "float" } else { "layer" };
        assert_eq!(section["objective"], json!(objective), "{section}");
        let in_memory = [&["--quantize", format][..], &calibrate].concat();
        let from_disk = logits(&out, &[]);
        assert_eq!(from_disk, logits(&model, &in_memory), "{format}");
        // Calibration changed the weights: not the round-to-nearest logits.
        assert_ne!(
            from_disk,
            logits(&model, &["--quantize", format]),
            "{format}"
        );
    }
}

#[test]
fn refined_checkpoints_give_the_logits_of_in_memory_refinement() {
    let model = shared_model("pystd-qwen3-7m");
    let dir = tempfile::tempdir().unwrap();
    let calib = calibration_text(dir.path(), 8000);
    let calibrate = [
        "--calibration",
        calib.to_str().unwrap(),
        "--calibration-tokens",
        "512",
        "--calibration-context",
        "128",
    ];
    let refine = [
        &calibrate[..],
        &["--refine-steps", "4", "--refine-lr", "2e-3"],
    ]
    .concat();
    let out = dir.path().join("refined");
    let run = quantize(&model, &out, &[&["--format", "q4"][..], &refine].concat());
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let config: Value =
        serde_json::from_slice(&fs::read(out.join("config.json")).unwrap()).unwrap();
    let section = &config["quantization"]["calibration"]["refinement"];
    assert_eq!(section["objective"], json!("kl"), "{section}");
    assert_eq!(section["steps"], json!(4), "{section}");
    assert_eq!(
        section["lr"].as_f64().map(|lr| (lr - 2e-3).abs() < 1e-9),
        Some(true),
        "{section}"
    );
    let from_disk = logits(&out, &[]);
    assert_eq!(
        from_disk,
        logits(&model, &[&["--quantize", "q4"][..], &refine].concat())
    );
    // Refinement moved the scales: not GPTQ's logits.
    assert_ne!(
        from_disk,
        logits(&model, &[&["--quantize", "q4"][..], &calibrate].concat())
    );
}

#[test]
fn bad_refinement_options_are_a_clear_error() {
    let model = shared_model("pystd-qwen3-1m");
    let dir = tempfile::tempdir().unwrap();
    let calib = calibration_text(dir.path(), 8000);
    let out = dir.path().join("q");
    let run = |extra: &[&str]| {
        let flags = [
            &["--format", "q4", "--calibration", calib.to_str().unwrap()][..],
            &[
                "--calibration-tokens",
                "256",
                "--calibration-context",
                "128",
            ],
            extra,
        ]
        .concat();
        quantize(&model, &out, &flags)
    };
    assert_clean_error(
        &run(&["--refine-steps", "2", "--refine-lr", "0"]),
        &["refinement step size", "(0, 0.1]", "0"],
    );
    assert_clean_error(
        &run(&["--refine-steps", "2", "--refine-lr", "NaN"]),
        &["refinement step size", "NaN"],
    );
    assert!(!out.exists(), "a failed run left {}", out.display());
    // Refinement tunes calibrated scales: it needs calibration text.
    let plain = quantize(&model, &out, &["--format", "q4", "--refine-steps", "2"]);
    assert_clean_error(&plain, &["--calibration"]);
}

#[test]
fn bad_calibration_input_is_a_clear_error() {
    let model = shared_model("pystd-qwen3-1m");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let run = |calib: &str, extra: &[&str]| {
        let flags = [&["--format", "q4", "--calibration", calib][..], extra].concat();
        quantize(&model, &out, &flags)
    };
    let empty = file("empty.txt", b"");
    assert_clean_error(&run(&empty, &[]), &["empty.txt", "is empty"]);
    let short = file("short.txt", b"def f(x):\n    return x\n");
    assert_clean_error(
        &run(&short, &[]),
        &["short.txt", "fewer than one window of 512"],
    );
    let binary = file("binary.bin", &[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0]);
    assert_clean_error(&run(&binary, &[]), &["binary.bin", "binary"]);
    let latin1 = file("latin1.txt", b"caf\xe9 cr\xe8me\n");
    assert_clean_error(&run(&latin1, &[]), &["latin1.txt", "not UTF-8", "offset 3"]);
    let missing = dir.path().join("missing.txt");
    assert_clean_error(
        &run(missing.to_str().unwrap(), &[]),
        &["missing.txt", "cannot read"],
    );
    let text = calibration_text(dir.path(), 4000);
    let text = text.to_str().unwrap();
    assert_clean_error(
        &run(text, &["--calibration-context", "0"]),
        &["at least one token"],
    );
    assert_clean_error(
        &run(text, &["--calibration-damp", "0"]),
        &["dampening", "(0, 1]"],
    );
    // 4000 bytes (about 1,100 tokens) do not fill a window of 4096; 40,000
    // do, but pystd-qwen3-1m holds only 2048 positions.
    assert_clean_error(
        &run(text, &["--calibration-context", "4096"]),
        &["fewer than one window of 4096"],
    );
    let long = calibration_text(dir.path(), 40_000);
    assert_clean_error(
        &run(long.to_str().unwrap(), &["--calibration-context", "4096"]),
        &["4096 tokens", "2048 positions"],
    );
    // Calibration calibrates a quantization.
    let logits_out = dir.path().join("l.safetensors");
    assert_clean_error(
        &hayate(&[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            "1,2,3",
            "--out",
            logits_out.to_str().unwrap(),
            "--calibration",
            text,
        ]),
        &["--calibration", "--quantize"],
    );
    assert!(!out.exists(), "a failed run left {}", out.display());
    let left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
