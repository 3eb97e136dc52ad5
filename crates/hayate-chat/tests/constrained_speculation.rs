//! Speculative decoding under a grammar, on the real pystd pair: every
//! token is still drawn from the model's masked logits, so the output is
//! exactly plain constrained sampling's; and the draft is masked by the
//! same grammar, so the model drafting for itself under shared noise has
//! every draft accepted at full length.

use hayate_chat::TextTokenizer;
use hayate_chat::grammar::{Constraint, GrammarCompiler};
use hayate_engine::speculate::{
    Coupling, DraftLength, DraftModel, PromptLookup, Speculation, Speculator, SuffixSpeculator,
};
use hayate_engine::{
    GenerationStats, Generator, LoadOptions, Model, Rules, Sampler, SamplingParams, StateOptions,
    TokenConstraint,
};
use std::path::{Path, PathBuf};

fn shared(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models")
        .join(name)
}

fn load(name: &str) -> Model {
    let options = LoadOptions {
        threads: 1,
        ..LoadOptions::default()
    };
    Model::load(&shared(name), &options).unwrap()
}

fn state_options() -> StateOptions {
    StateOptions {
        context: Some(512),
        rollback: 8,
        ..StateOptions::default()
    }
}

const MAX_TOKENS: usize = 120;

struct Setup {
    model: Model,
    compiler: GrammarCompiler,
    prompt: Vec<u32>,
    stops: Vec<u32>,
}

fn setup() -> Setup {
    let model = load("pystd-qwen3-7m");
    let tokenizer = TextTokenizer::load(&shared("pystd-qwen3-7m")).unwrap();
    let mut stops = model.eos_ids();
    stops.extend(tokenizer.end_of_turn_ids());
    let json = std::fs::read_to_string(shared("pystd-qwen3-7m").join("tokenizer.json")).unwrap();
    let compiler = GrammarCompiler::new(&json, model.info.vocab, &stops).unwrap();
    let prompt = tokenizer
        .encode_chat_with(
            &[serde_json::json!({"role": "user", "content": "Describe a Python module as JSON."})],
            &hayate_chat::RenderOptions {
                add_generation_prompt: true,
                ..Default::default()
            },
        )
        .unwrap();
    Setup {
        model,
        compiler,
        prompt,
        stops,
    }
}

fn constraint(compiler: &GrammarCompiler) -> Constraint {
    compiler
        .json_schema(&serde_json::json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "kind": {"enum": ["library", "script", "test"]},
                "lines": {"type": "integer", "minimum": 1, "maximum": 5000},
                "imports": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
            },
            "required": ["name", "kind", "lines", "imports"],
            "additionalProperties": false,
        }))
        .unwrap()
}

fn generate(
    s: &Setup,
    params: &SamplingParams,
    speculation: Option<&mut Speculation<'_>>,
) -> (Vec<u32>, GenerationStats) {
    let mut g = Generator::new(&s.model, &state_options()).unwrap();
    g.set_prompt(&s.prompt).unwrap();
    let mut sampler = Sampler::new(params.clone(), s.model.info.vocab);
    let mut c = constraint(&s.compiler);
    let mut out = Vec::new();
    let rules = Rules {
        speculation,
        constraint: Some(&mut c as &mut dyn TokenConstraint),
        max_tokens: MAX_TOKENS,
        stop_ids: &s.stops,
    };
    let stats = g
        .generate_observed(&mut sampler, rules, |t, _| {
            out.push(t);
            Ok::<_, hayate_engine::EngineError>(true)
        })
        .unwrap();
    assert!(c.is_complete(), "the document is complete");
    (out, stats)
}

fn settings() -> Vec<SamplingParams> {
    [(0.0, 0), (0.8, 1), (1.0, 2), (1.0, 3)]
        .into_iter()
        .map(|(temperature, seed)| SamplingParams {
            temperature,
            seed,
            ..SamplingParams::default()
        })
        .collect()
}

#[test]
fn speculation_under_a_grammar_gives_the_plain_constrained_tokens() {
    let s = setup();
    let draft = load("pystd-qwen3-1m");
    let vocab = s.model.info.vocab;
    for params in settings() {
        let (plain, _) = generate(&s, &params, None);
        let speculators: Vec<(&str, Box<dyn Speculator + '_>)> = vec![
            (
                "draft",
                Box::new(
                    DraftModel::new(&draft, vocab, &params, Coupling::Shared, &state_options())
                        .unwrap(),
                ),
            ),
            ("ngram", Box::new(PromptLookup::default())),
            ("suffix", Box::new(SuffixSpeculator::default())),
        ];
        for (name, speculator) in speculators {
            let mut speculation = Speculation::new(speculator, DraftLength::Fixed(4));
            let (out, stats) = generate(&s, &params, Some(&mut speculation));
            assert_eq!(out, plain, "{name} at {params:?}");
            let spec = stats.speculation.unwrap();
            assert!(spec.accepted <= spec.drafted, "{name}");
            if name == "draft" {
                assert!(spec.accepted > 0, "the 1m draft had nothing accepted");
            }
        }
    }
}

#[test]
fn the_model_drafting_for_itself_under_a_grammar_has_every_full_draft_accepted() {
    let s = setup();
    let vocab = s.model.info.vocab;
    let length = 4;
    for params in settings() {
        let (plain, _) = generate(&s, &params, None);
        let draft =
            DraftModel::new(&s.model, vocab, &params, Coupling::Shared, &state_options()).unwrap();
        let mut speculation = Speculation::new(Box::new(draft), DraftLength::Fixed(length));
        let (out, stats) = generate(&s, &params, Some(&mut speculation));
        assert_eq!(out, plain, "{params:?}");
        let spec = stats.speculation.unwrap();
        assert_eq!(spec.accepted, spec.drafted, "{params:?}");
        // Each pass checks a full draft: an unmasked draft would be cut at
        // its first token the grammar rejects, and need more passes.
        let full = out.len().div_ceil(length + 1) + 1;
        assert!(
            spec.passes <= full,
            "{} passes for {} tokens at {params:?}",
            spec.passes,
            out.len()
        );
    }
}
