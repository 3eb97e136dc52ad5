//! Every fixture against its `transformers` logits under state shapes the
//! command line does not choose: small prefill steps (sliding-window rings
//! that wrap, DeltaNet chunks split across steps) and short rollback depths
//! (fewer tokens through the recurrent form), and attention caches in
//! pages of a few positions.

use hayate_engine::{LoadOptions, Logits, Model, StateOptions};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn reference(dir: &Path) -> (Vec<u32>, Vec<f32>) {
    let bytes = std::fs::read(dir.join("reference_logits.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let ids = ids
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    let logits = st.tensor("logits").unwrap();
    let logits = logits
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (ids, logits)
}

#[test]
fn every_fixture_matches_with_small_prefill_steps_and_rollback_depths() {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("MANIFEST.json")).unwrap()).unwrap();
    for entry in manifest.as_array().unwrap() {
        let dir = fixtures().join(entry["name"].as_str().unwrap());
        // The fixture's tolerance for `hayate logits` (tests/logits.rs).
        let tolerance = entry["logit_tolerance"].as_f64().unwrap() as f32;
        let model = Model::load(&dir, &LoadOptions::default()).unwrap();
        let (ids, want) = reference(&dir);
        let shapes = [
            (5, 1, 7, 16),
            (16, 3, 1000, 32),
            (64, 2, 33, 128),
            (9, 8, 1, 16),
        ];
        for (prefill_chunk, rollback, piece, kv_page) in shapes {
            let mut state = model
                .new_state_with(&StateOptions {
                    context: None,
                    rollback,
                    prefill_chunk,
                    kv_page,
                    ..StateOptions::default()
                })
                .unwrap();
            let mut got = Vec::new();
            let mut logits = Vec::new();
            for p in ids.chunks(piece) {
                model
                    .forward(&mut state, p, Logits::All(&mut logits))
                    .unwrap();
                got.extend_from_slice(&logits);
            }
            let d = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                d <= tolerance,
                "{dir:?} chunk {prefill_chunk} rollback {rollback} pieces of {piece} pages of {kv_page}: max |Δ| {d}"
            );
        }
    }
}

/// States whose buffers the machine cannot hold are refused with an error
/// naming the context, before anything that large is allocated.
#[test]
fn states_larger_than_memory_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("qwen3_5-text-gdn");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    let config = tmp.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    json["max_position_embeddings"] = (1u64 << 24).into();
    std::fs::write(&config, json.to_string()).unwrap();
    let model = Model::load(tmp.path(), &LoadOptions::default()).unwrap();
    let context = 1 << 24;
    // Recurrent states for rolling back the whole context; then scratch
    // buffers for prefilling it in one step.
    for (rollback, prefill_chunk) in [(context, 512), (8, context)] {
        let err = model
            .new_state_with(&StateOptions {
                context: Some(context),
                rollback,
                prefill_chunk,
                ..StateOptions::default()
            })
            .err()
            .expect("the state does not fit in memory");
        let message = err.to_string();
        assert!(
            message.contains("16777216 tokens") && message.contains("memory"),
            "{message}"
        );
    }
}

#[test]
fn every_fixture_counts_each_stored_weight_once() {
    // Translators regroup some matrices at load (Qwen3.5's queries and
    // gates); the sizes still count what the checkpoint stores, once.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("MANIFEST.json")).unwrap()).unwrap();
    for entry in manifest.as_array().unwrap() {
        let name = entry["name"].as_str().unwrap();
        let dir = fixtures().join(name);
        let model = Model::load(&dir, &LoadOptions::default()).unwrap();
        let (mut params, mut bytes) = (0, 0);
        for file in std::fs::read_dir(&dir).unwrap() {
            let path = file.unwrap().path();
            let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !file_name.starts_with("model") || !file_name.ends_with(".safetensors") {
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&data).unwrap();
            for (_, t) in st.tensors() {
                params += t.shape().iter().product::<usize>();
                bytes += t.data().len();
            }
        }
        assert_eq!(model.info.n_params, params, "{name}");
        assert_eq!(model.info.weight_bytes, bytes, "{name}");
    }
}
