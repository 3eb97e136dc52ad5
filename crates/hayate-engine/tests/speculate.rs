//! Speculative decoding gives exactly the tokens plain decoding gives, for
//! every speculator, coupling, draft length, temperature, filter setting,
//! seed and architecture fixture, as chains or as trees; a draft that is
//! the model itself under shared noise is always accepted.

mod common;

use common::fixtures;

use hayate_engine::speculate::{
    Coupling, DraftLength, DraftModel, PromptLookup, Speculation, SpeculationStats, Speculator,
    SuffixSpeculator,
};
use hayate_engine::{
    Generator, LoadOptions, Model, QuantSpec, Sampler, SamplingParams, StateOptions, StopReason,
};
use hayate_kernels::QuantFormat;
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

fn fixture_names() -> Vec<(String, usize)> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("MANIFEST.json")).unwrap()).unwrap();
    manifest
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let name = f["name"].as_str().unwrap().to_owned();
            (name, f["vocab_size"].as_u64().unwrap() as usize)
        })
        .collect()
}

/// One kernel thread: these models are tiny, and waking a second thread
/// per product would cost more than the product.
fn load(dir: &Path, quantize: Option<QuantFormat>) -> Model {
    let options = LoadOptions {
        threads: 1,
        quantize: quantize.map(QuantSpec::new),
        ..LoadOptions::default()
    };
    Model::load(dir, &options).unwrap()
}

fn options(rollback: usize) -> StateOptions {
    StateOptions {
        context: Some(120),
        rollback,
        // Small chunks so that sliding-window rings wrap.
        prefill_chunk: 16,
        // Rollbacks and kept branches cross pages.
        kv_page: 16,
        ..StateOptions::default()
    }
}

/// A prompt that repeats itself, so that prompt lookup finds matches.
fn prompt(vocab: usize) -> Vec<u32> {
    let part: Vec<u32> = (0..12).map(|i| ((i * 37 + 5) % vocab) as u32).collect();
    [&part[..], &[3], &part[..], &part[..6]].concat()
}

const MAX_TOKENS: usize = 40;

fn plain(model: &Model, params: &SamplingParams) -> (Vec<u32>, StopReason) {
    let mut g = Generator::new(model, &options(16)).unwrap();
    g.set_prompt(&prompt(model.info.vocab)).unwrap();
    let mut sampler = Sampler::new(params.clone(), model.info.vocab);
    let mut out = Vec::new();
    let stats = g
        .generate(&mut sampler, MAX_TOKENS, &[1], |t| {
            out.push(t);
            Ok::<_, hayate_engine::EngineError>(true)
        })
        .unwrap();
    (out, stats.stop)
}

fn speculative(
    model: &Model,
    params: &SamplingParams,
    speculation: &mut Speculation<'_>,
) -> (Vec<u32>, StopReason) {
    let mut g = Generator::new(model, &options(16)).unwrap();
    g.set_prompt(&prompt(model.info.vocab)).unwrap();
    let mut sampler = Sampler::new(params.clone(), model.info.vocab);
    let mut out = Vec::new();
    let stats = g
        .generate_with(&mut sampler, Some(speculation), MAX_TOKENS, &[1], |t| {
            out.push(t);
            Ok::<_, hayate_engine::EngineError>(true)
        })
        .unwrap();
    let spec = stats.speculation.unwrap();
    assert!(spec.accepted <= spec.drafted);
    assert!(spec.passes <= out.len() + 1);
    (out, stats.stop)
}

/// Every temperature, with and without filters and penalties, at three seeds.
fn settings() -> Vec<SamplingParams> {
    let mut all = Vec::new();
    for temperature in [0.0, 0.7, 1.0, 1.5] {
        for seed in [0, 7, 123_456_789] {
            all.push(SamplingParams {
                temperature,
                seed,
                ..SamplingParams::default()
            });
            all.push(SamplingParams {
                temperature,
                seed,
                top_k: 40,
                top_p: 0.9,
                min_p: 0.02,
                repetition_penalty: 1.2,
                presence_penalty: 0.5,
                frequency_penalty: 0.3,
            });
        }
    }
    all
}

const LENGTHS: [DraftLength; 4] = [
    DraftLength::Fixed(1),
    DraftLength::Fixed(3),
    DraftLength::Fixed(6),
    DraftLength::Adaptive { max: 8 },
];

/// Every temperature with and without filters, the seed changing throughout.
fn some_settings() -> Vec<SamplingParams> {
    settings().into_iter().skip(1).step_by(3).collect()
}

/// The speculators of `make` against plain decoding, over `settings` and every length.
fn check_identity<'a>(
    model: &Model,
    (label, settings): (&str, Vec<SamplingParams>),
    make: impl FnMut(&SamplingParams, DraftLength) -> Box<dyn Speculator + 'a>,
) -> (usize, usize) {
    let stats = check_trees(model, (label, settings), 1, make);
    (stats.drafted, stats.accepted)
}

/// [`check_identity`] with trees of up to `width` candidates per position.
fn check_trees<'a>(
    model: &Model,
    (label, settings): (&str, Vec<SamplingParams>),
    width: usize,
    mut make: impl FnMut(&SamplingParams, DraftLength) -> Box<dyn Speculator + 'a>,
) -> SpeculationStats {
    let mut total = SpeculationStats::default();
    for params in settings {
        let want = plain(model, &params);
        for length in LENGTHS {
            let mut s = Speculation::new(make(&params, length), length).with_width(width);
            let got = speculative(model, &params, &mut s);
            assert_eq!(got, want, "{label}: {params:?} {length:?} width {width}");
            total.drafted += s.stats.drafted;
            total.accepted += s.stats.accepted;
            total.tree_passes += s.stats.tree_passes;
            total.passes += s.stats.passes;
        }
    }
    total
}

/// Makes draft-model speculators over `draft`.
// The lifetime cannot be elided: in the closure's signature `'_` would name its own argument's.
#[allow(clippy::needless_lifetimes)]
fn draft_of<'m>(
    draft: &'m Model,
    vocab: usize,
    coupling: Coupling,
) -> impl FnMut(&SamplingParams, DraftLength) -> Box<dyn Speculator + 'm> {
    move |params, length| {
        let o = options(length.max() + 1);
        Box::new(DraftModel::new(draft, vocab, params, coupling, &o).unwrap())
    }
}

#[test]
fn the_model_drafting_for_itself_is_always_accepted_under_shared_noise() {
    for (name, _) in fixture_names() {
        let model = load(&fixtures().join(&name), None);
        let v = model.info.vocab;
        let (d, a) = check_identity(
            &model,
            (&name, settings()),
            draft_of(&model, v, Coupling::Shared),
        );
        assert_eq!(a, d, "{name}: the model drafting for itself");
        // Under independent noise: the same tokens, fewer accepted.
        let some = (name.as_str(), some_settings());
        let (d, a) = check_identity(&model, some, draft_of(&model, v, Coupling::Independent));
        assert!(a < d, "{name}: independent noise accepted everything");
    }
}

#[test]
fn other_drafts_give_the_plain_tokens() {
    let names = fixture_names();
    for (name, vocab) in &names {
        let model = load(&fixtures().join(name), None);
        let v = model.info.vocab;
        let some = || (name.as_str(), some_settings());
        // The model quantized: a close draft.
        let q4 = load(&fixtures().join(name), Some(QuantFormat::Q4));
        for coupling in [Coupling::Shared, Coupling::Independent] {
            check_identity(&model, some(), draft_of(&q4, v, coupling));
        }
        // Another architecture with the same vocabulary, if any: a poor one.
        if let Some((other, _)) = names.iter().find(|(n, s)| s == vocab && n != name) {
            let other = load(&fixtures().join(other), None);
            check_identity(&model, some(), draft_of(&other, v, Coupling::Shared));
        }
    }
}

#[test]
fn draft_trees_give_the_plain_tokens() {
    for (name, _) in fixture_names() {
        let model = load(&fixtures().join(&name), None);
        let v = model.info.vocab;
        // A close draft (the model quantized) and a poor one (the model
        // under other noise): trees branch where they are unsure.
        let q4 = load(&fixtures().join(&name), Some(QuantFormat::Q4));
        for (label, draft, coupling) in [
            ("q4 draft", &q4, Coupling::Shared),
            ("independent self-draft", &model, Coupling::Independent),
        ] {
            for width in [2, 3] {
                let what = format!("{name} {label}");
                let stats = check_trees(
                    &model,
                    (&what, some_settings()),
                    width,
                    draft_of(draft, v, coupling),
                );
                if model.can_branch() {
                    assert!(stats.tree_passes > 0, "{what}: no tree was verified");
                } else {
                    assert_eq!(
                        stats.tree_passes, 0,
                        "{what}: recurrent layers verify chains"
                    );
                }
            }
        }
    }
}

/// A speculator shared by several generations.
struct Shared(Rc<RefCell<SuffixSpeculator>>);

impl Speculator for Shared {
    fn name(&self) -> &'static str {
        "suffix"
    }
    fn propose(
        &mut self,
        sequence: &[u32],
        max: usize,
        out: &mut Vec<u32>,
    ) -> hayate_engine::Result<()> {
        self.0.borrow_mut().propose(sequence, max, out)
    }
}

#[test]
fn prompt_lookup_and_suffix_speculation_give_the_plain_tokens() {
    for (name, _) in fixture_names() {
        let model = load(&fixtures().join(&name), None);
        let some = (name.as_str(), some_settings());
        let (d, _) = check_identity(&model, some, |_, _| Box::new(PromptLookup::new(3, 1)));
        assert!(d > 0, "{name}: prompt lookup never proposed");
        // One suffix speculator across all runs, as a session shares it:
        // it proposes from what earlier runs generated too.
        let shared = Rc::new(RefCell::new(SuffixSpeculator::new(4, 0.05)));
        let some = (name.as_str(), some_settings());
        let (d, _) = check_identity(&model, some, |_, _| Box::new(Shared(Rc::clone(&shared))));
        assert!(d > 0, "{name}: suffix speculation never proposed");
    }
}

#[test]
fn a_new_prompt_keeps_the_common_prefix_where_the_state_can_go_back() {
    for (name, _) in fixture_names() {
        let model = load(&fixtures().join(&name), None);
        let mut g = Generator::new(&model, &options(4)).unwrap();
        let first = prompt(model.info.vocab);
        assert_eq!(
            g.set_prompt(&first).unwrap(),
            0,
            "{name}: an empty state keeps nothing"
        );
        g.generate(
            &mut Sampler::new(SamplingParams::default(), model.info.vocab),
            3,
            &[],
            |_| Ok::<_, hayate_engine::EngineError>(true),
        )
        .unwrap();
        // The same prompt again: all but its last token are kept where the
        // state rolls back that far; recurrent states start over.
        let kept = g.set_prompt(&first).unwrap();
        let back = g.state.len();
        assert_eq!(back, kept, "{name}: the state holds what was kept");
        if model.can_branch() {
            assert_eq!(kept, first.len() - 1, "{name}");
        } else {
            assert!(kept == 0 || kept == first.len() - 1, "{name}: {kept}");
        }
    }
}
