//! The batched entry point: sequences of different lengths, states and
//! logits requests in one call give exactly what each gives alone.

use hayate_engine::{LoadOptions, Logits, Model, SequenceStep, StateOptions};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn ids(n: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|t| ((t * 37 + salt * 11 + 3) % vocab) as u32)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// For one model: a 40-token prefill with every logit, a one-token decode
/// after a 9-token prefix, and a 13-token step after a 20-token prefix with
/// logits at three chosen positions (as speculative verification asks).
fn check(dir: &Path) {
    let model = Model::load(dir, &LoadOptions::default()).unwrap();
    let vocab = model.info.vocab;
    let (a, b, c) = (ids(40, 1, vocab), ids(10, 2, vocab), ids(33, 3, vocab));
    let at = [0, 6, 12];

    // Alone, through `forward`.
    let mut alone_a = Vec::new();
    let mut s = model.new_state(Some(64)).unwrap();
    model
        .forward(&mut s, &a, Logits::All(&mut alone_a))
        .unwrap();
    let mut s = model.new_state(Some(64)).unwrap();
    model.forward(&mut s, &b[..9], Logits::None).unwrap();
    let alone_b = model
        .forward(&mut s, &b[9..], Logits::Last)
        .unwrap()
        .to_vec();
    let mut s = model.new_state(Some(64)).unwrap();
    model.forward(&mut s, &c[..20], Logits::None).unwrap();
    let mut alone_c = Vec::new();
    model
        .forward(&mut s, &c[20..], Logits::At(&at, &mut alone_c))
        .unwrap();
    let mut s = model.new_state(Some(64)).unwrap();
    model.forward(&mut s, &c[..20], Logits::None).unwrap();
    let mut all_c = Vec::new();
    model
        .forward(&mut s, &c[20..], Logits::All(&mut all_c))
        .unwrap();

    // Together, through `forward_batch`.
    let mut sa = model.new_state(Some(64)).unwrap();
    let mut sb = model.new_state(Some(64)).unwrap();
    let mut sc = model.new_state(Some(64)).unwrap();
    model.forward(&mut sb, &b[..9], Logits::None).unwrap();
    model.forward(&mut sc, &c[..20], Logits::None).unwrap();
    let (mut out_a, mut out_c) = (Vec::new(), Vec::new());
    let mut batch = [
        SequenceStep {
            state: &mut sa,
            tokens: &a,
            logits: Logits::All(&mut out_a),
        },
        SequenceStep {
            state: &mut sb,
            tokens: &b[9..],
            logits: Logits::Last,
        },
        SequenceStep {
            state: &mut sc,
            tokens: &c[20..],
            logits: Logits::At(&at, &mut out_c),
        },
    ];
    model.forward_batch(&mut batch).unwrap();
    assert_eq!(bits(&out_a), bits(&alone_a), "{dir:?}: prefill");
    assert_eq!(bits(sb.last_logits()), bits(&alone_b), "{dir:?}: decode");
    assert_eq!(bits(&out_c), bits(&alone_c), "{dir:?}: chosen positions");
    // The chosen rows are those rows of all the logits (up to the
    // summation order of a 3-row product against a 13-row one).
    for (k, &i) in at.iter().enumerate() {
        let (got, want) = (
            &out_c[k * vocab..(k + 1) * vocab],
            &all_c[i * vocab..(i + 1) * vocab],
        );
        let d = got
            .iter()
            .zip(want)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        // Measured: at most 2.4e-6.
        assert!(d <= 1e-5, "{dir:?}: row {i} differs by {d}");
    }
    assert_eq!((sa.len(), sb.len(), sc.len()), (40, 10, 33));

    // A bad step anywhere stops the whole batch before any state moves.
    let mut out = Vec::new();
    let mut batch = [
        SequenceStep {
            state: &mut sa,
            tokens: &a[..3],
            logits: Logits::None,
        },
        SequenceStep {
            state: &mut sc,
            tokens: &c[..2],
            logits: Logits::At(&[1, 1], &mut out),
        },
    ];
    let err = model.forward_batch(&mut batch).unwrap_err().to_string();
    assert!(
        err.contains("sequence 1") && err.contains("increase"),
        "{err}"
    );
    let mut batch = [SequenceStep {
        state: &mut sb,
        tokens: &[vocab as u32],
        logits: Logits::Last,
    }];
    assert!(model.forward_batch(&mut batch).is_err());
    assert_eq!((sa.len(), sb.len(), sc.len()), (40, 10, 33));
}

#[test]
fn a_batch_equals_each_sequence_alone_on_every_layer_type() {
    for name in [
        "qwen3_5-text-gdn",
        "gemma3-text-sliding",
        "lfm2-conv-attn",
        "llama-gqa-rope-llama3",
        "qwen2-gqa-bias",
    ] {
        check(&fixture(name));
    }
}

/// Chosen positions spread over several prefill steps of a state that
/// processes 3 tokens per step.
#[test]
fn chosen_positions_across_prefill_steps() {
    for name in ["qwen3_5-text-gdn", "gemma3-text-sliding", "lfm2-conv-attn"] {
        let model = Model::load(&fixture(name), &LoadOptions::default()).unwrap();
        let vocab = model.info.vocab;
        let tokens = ids(13, 4, vocab);
        let options = StateOptions {
            context: Some(32),
            prefill_chunk: 3,
            ..StateOptions::default()
        };
        let at = [0, 2, 3, 7, 12];
        let mut chosen = Vec::new();
        let mut s = model.new_state_with(&options).unwrap();
        model
            .forward(&mut s, &tokens, Logits::At(&at, &mut chosen))
            .unwrap();
        let mut all = Vec::new();
        let mut s = model.new_state_with(&options).unwrap();
        model
            .forward(&mut s, &tokens, Logits::All(&mut all))
            .unwrap();
        assert_eq!(chosen.len(), at.len() * vocab);
        for (k, &i) in at.iter().enumerate() {
            let got = &chosen[k * vocab..(k + 1) * vocab];
            let want = &all[i * vocab..(i + 1) * vocab];
            let d = got
                .iter()
                .zip(want)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            // Measured: at most 2.4e-6.
            assert!(d <= 1e-5, "{name}: position {i} differs by {d}");
        }
    }
}

/// The last token's logits of a step longer than one prefill chunk are the
/// last row of all its logits (the chunk holding it does not start at 0).
#[test]
fn last_logits_of_a_step_over_several_chunks() {
    for name in ["qwen3-gqa-qknorm", "qwen3_5-text-gdn"] {
        let model = Model::load(&fixture(name), &LoadOptions::default()).unwrap();
        let vocab = model.info.vocab;
        let options = StateOptions {
            context: Some(64),
            prefill_chunk: 4,
            ..StateOptions::default()
        };
        for n in [5, 9, 11] {
            let tokens = ids(n, 5, vocab);
            let mut s = model.new_state_with(&options).unwrap();
            let last = model
                .forward(&mut s, &tokens, Logits::Last)
                .unwrap()
                .to_vec();
            let mut all = Vec::new();
            let mut s = model.new_state_with(&options).unwrap();
            model
                .forward(&mut s, &tokens, Logits::All(&mut all))
                .unwrap();
            assert_eq!(
                bits(&last),
                bits(&all[(n - 1) * vocab..]),
                "{name}: {n} tokens"
            );
        }
    }
}
