//! The batched entry point: sequences of different lengths, states and
//! logits requests in one call give exactly what each gives alone.

mod common;

use common::{fixture, fixture_names};

use hayate_engine::{
    InferenceState, LoadOptions, Logits, Model, QuantSpec, SequenceStep, StateOptions,
};
use hayate_kernels::QuantFormat;
use std::path::Path;

fn ids(n: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|t| ((t * 37 + salt * 11 + 3) % vocab) as u32)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn state(model: &Model) -> InferenceState {
    model
        .new_state_with(&StateOptions {
            context: Some(64),
            prefill_chunk: 16,
            rollback: 16,
            kv_page: 16,
            ..StateOptions::default()
        })
        .unwrap()
}

/// For one model: a 13-token step with every logit after a 9-token
/// prefix, a one-token decode after another, and a 13-token step after a
/// 20-token prefix with logits at three chosen positions (as speculative
/// verification asks), in one batched step and each alone.
fn check(dir: &Path) {
    let model = Model::load(dir, &LoadOptions::default()).unwrap();
    let vocab = model.info.vocab;
    let (a, b, c) = (ids(22, 1, vocab), ids(10, 2, vocab), ids(33, 3, vocab));
    let at = [0, 6, 12];

    // Alone.
    let mut alone_a = Vec::new();
    let mut s = state(&model);
    model.forward(&mut s, &a[..9], Logits::None).unwrap();
    model
        .forward_exact(&mut s, &a[9..], Logits::All(&mut alone_a))
        .unwrap();
    let mut s = state(&model);
    model.forward(&mut s, &b[..9], Logits::None).unwrap();
    let alone_b = model
        .forward(&mut s, &b[9..], Logits::Last)
        .unwrap()
        .to_vec();
    let mut s = state(&model);
    model.forward(&mut s, &c[..20], Logits::None).unwrap();
    let mut alone_c = Vec::new();
    model
        .forward_exact(&mut s, &c[20..], Logits::At(&at, &mut alone_c))
        .unwrap();
    let after_c = model
        .forward(&mut s, &b[..1], Logits::Last)
        .unwrap()
        .to_vec();

    // Together, through `forward_batch`.
    let mut scratch = model.new_batch_scratch(27).unwrap();
    let (mut sa, mut sb, mut sc) = (state(&model), state(&model), state(&model));
    model.forward(&mut sa, &a[..9], Logits::None).unwrap();
    model.forward(&mut sb, &b[..9], Logits::None).unwrap();
    model.forward(&mut sc, &c[..20], Logits::None).unwrap();
    let (mut out_a, mut out_c) = (Vec::new(), Vec::new());
    let mut batch = [
        SequenceStep {
            state: &mut sa,
            tokens: &a[9..],
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
    model.forward_batch(&mut scratch, &mut batch).unwrap();
    assert_eq!(bits(&out_a), bits(&alone_a), "{dir:?}: all logits");
    assert_eq!(bits(sb.last_logits()), bits(&alone_b), "{dir:?}: decode");
    assert_eq!(bits(&out_c), bits(&alone_c), "{dir:?}: chosen positions");
    assert_eq!((sa.len(), sb.len(), sc.len()), (22, 10, 33));
    // What the state keeps is what it keeps alone.
    let next = model.forward(&mut sc, &b[..1], Logits::Last).unwrap();
    assert_eq!(bits(next), bits(&after_c), "{dir:?}: the state after");

    // A bad step anywhere stops the whole batch before any state moves.
    let mut out = Vec::new();
    let mut batch = [
        SequenceStep {
            state: &mut sa,
            tokens: &a[..3],
            logits: Logits::None,
        },
        SequenceStep {
            state: &mut sb,
            tokens: &c[..2],
            logits: Logits::At(&[1, 1], &mut out),
        },
    ];
    let err = model
        .forward_batch(&mut scratch, &mut batch)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sequence 1") && err.contains("increase"),
        "{err}"
    );
    let mut batch = [SequenceStep {
        state: &mut sb,
        tokens: &[vocab as u32],
        logits: Logits::Last,
    }];
    assert!(model.forward_batch(&mut scratch, &mut batch).is_err());
    // More rows than the buffers hold, and more than a state's step.
    let mut batch = [
        SequenceStep {
            state: &mut sa,
            tokens: &c[..14],
            logits: Logits::Last,
        },
        SequenceStep {
            state: &mut sb,
            tokens: &c[..14],
            logits: Logits::Last,
        },
    ];
    let err = model
        .forward_batch(&mut scratch, &mut batch)
        .unwrap_err()
        .to_string();
    assert!(err.contains("28 tokens"), "{err}");
    let mut batch = [SequenceStep {
        state: &mut sa,
        tokens: &c[..17],
        logits: Logits::Last,
    }];
    let err = model
        .forward_batch(&mut scratch, &mut batch)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 to 16"), "{err}");
    assert_eq!((sa.len(), sb.len(), sc.len()), (22, 10, 34));
}

#[test]
fn a_batch_equals_each_sequence_alone_on_every_fixture() {
    for name in fixture_names() {
        check(&fixture(&name));
    }
}

/// Eight sequences decoding side by side, joining and leaving at
/// different steps, each with its own prompt: every step's logits are
/// bit-identical to those of the sequence decoding alone, float and q4.
#[test]
fn eight_sequences_decode_as_each_does_alone() {
    let q4 = LoadOptions {
        quantize: Some(QuantSpec::new(QuantFormat::Q4)),
        ..LoadOptions::default()
    };
    for name in fixture_names() {
        for options in [&LoadOptions::default(), &q4] {
            eight_sequences(&name, options);
        }
    }
}

fn eight_sequences(name: &str, options: &LoadOptions) {
    const STEPS: usize = 24;
    let model = Model::load(&fixture(name), options).unwrap();
    let vocab = model.info.vocab;
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| ids(3 + 2 * i, 10 + i, vocab)).collect();
    // The token fed after the `t`-th logits of sequence `i`.
    let feed = |i: usize, t: usize| ((i * 131 + t * 17 + 5) % vocab) as u32;
    // Sequence `i` decodes `STEPS - i` tokens.
    let alone: Vec<Vec<Vec<u32>>> = (0..8)
        .map(|i| {
            let mut s = state(&model);
            let first = model.forward(&mut s, &prompts[i], Logits::Last).unwrap();
            let mut rows = vec![bits(first)];
            for t in 0..STEPS - i {
                let next = model.forward(&mut s, &[feed(i, t)], Logits::Last).unwrap();
                rows.push(bits(next));
            }
            rows
        })
        .collect();
    let mut scratch = model.new_batch_scratch(8).unwrap();
    let mut states: Vec<InferenceState> = (0..8).map(|_| state(&model)).collect();
    let mut got: Vec<Vec<Vec<u32>>> = vec![Vec::new(); 8];
    // Sequence `i` joins at round `i / 2`.
    for round in 0..STEPS + 8 {
        let mut fed = Vec::new();
        let mut tokens = Vec::new();
        let mut joined = Vec::new();
        for (i, s) in states.iter_mut().enumerate() {
            if round == i / 2 {
                let first = model.forward(s, &prompts[i], Logits::Last).unwrap();
                got[i].push(bits(first));
            } else if round > i / 2 && got[i].len() <= STEPS - i {
                tokens.push([feed(i, got[i].len() - 1)]);
                fed.push(i);
                joined.push(s);
            }
        }
        if fed.is_empty() {
            continue;
        }
        let mut batch: Vec<SequenceStep> = joined
            .into_iter()
            .zip(&tokens)
            .map(|(state, t)| SequenceStep {
                state,
                tokens: t,
                logits: Logits::Last,
            })
            .collect();
        model.forward_batch(&mut scratch, &mut batch).unwrap();
        drop(batch);
        for i in fed {
            got[i].push(bits(states[i].last_logits()));
        }
    }
    for i in 0..8 {
        assert_eq!(got[i].len(), alone[i].len(), "{name}: sequence {i}");
        for (t, (g, a)) in got[i].iter().zip(&alone[i]).enumerate() {
            assert!(g == a, "{name}: sequence {i} differs at step {t}");
        }
    }
}

/// Batch buffers belong to the model that made them.
#[test]
fn batch_buffers_of_another_model_are_refused() {
    let one = Model::load(&fixture("qwen3-gqa-qknorm"), &LoadOptions::default()).unwrap();
    let other = Model::load(&fixture("qwen3-gqa-qknorm"), &LoadOptions::default()).unwrap();
    let mut scratch = other.new_batch_scratch(4).unwrap();
    let mut s = state(&one);
    let mut batch = [SequenceStep {
        state: &mut s,
        tokens: &[1],
        logits: Logits::Last,
    }];
    let err = one
        .forward_batch(&mut scratch, &mut batch)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another model"), "{err}");
    assert!(one.new_batch_scratch(0).is_err());
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
