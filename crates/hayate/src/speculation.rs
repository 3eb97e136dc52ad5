//! Speculative decoding options shared by `run`, `chat` and `bench`: which
//! speculator, how many tokens per pass, which noise the draft samples with.

use crate::common::ModelArgs;
use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use hayate_chat::TextTokenizer;
use hayate_engine::speculate::{
    Coupling, DEFAULT_MAX_DRAFT, DraftLength, DraftModel, MAX_WIDTH, PromptLookup, Speculation,
    SpeculationStats, SuffixSpeculator,
};
use hayate_engine::{GenerationStats, Model, SamplingParams, StateOptions};
use serde::Serialize;
use std::path::PathBuf;

/// How to speculate.
#[derive(Args, Clone, Debug)]
pub struct SpeculationArgs {
    /// A draft model sharing the model's tokenizer (any supported
    /// architecture, quantized or not), for `--speculate draft`.
    #[arg(long, value_name = "DIR")]
    pub draft: Option<PathBuf>,
    /// Kernel threads of the draft model (default: the model's). A small
    /// draft may run faster on one: it takes turns with the model, and its
    /// products are too short to share.
    #[arg(long, value_name = "N")]
    pub draft_threads: Option<usize>,
    /// Which speculator guesses the next tokens: a draft model, n-gram
    /// lookup in the prompt and output so far, counted continuations of
    /// everything the session saw (suffix), or none (default: `draft` with
    /// `--draft`, else `ngram`). The output is the same whichever.
    #[arg(long, value_name = "S")]
    pub speculate: Option<SpeculateArg>,
    /// Tokens drafted per model pass (default: adaptive, up to 10, from the
    /// measured acceptance and costs).
    #[arg(long, value_name = "K")]
    pub draft_tokens: Option<usize>,
    /// Noise the draft samples with: the model's own (`shared`), or
    /// independent noise accepted by equality (`independent`, what
    /// llama.cpp does; for comparisons).
    #[arg(long, value_name = "C", default_value = "shared")]
    pub coupling: CouplingArg,
    /// Candidates per drafted position: with more than 1, a draft model
    /// also proposes its runners-up where they come close to its pick, and
    /// the model verifies the tree in one pass (models whose layers are all
    /// attention; others verify chains).
    #[arg(long, value_name = "W", default_value_t = 1)]
    pub tree_width: usize,
}

/// A speculator on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpeculateArg {
    /// Plain decoding, one token per model pass.
    None,
    /// The model given by `--draft`.
    Draft,
    /// Continuations of n-gram matches in the prompt and output.
    Ngram,
    /// The continuations seen most often in everything this session saw
    /// (in `chat`, earlier turns too).
    Suffix,
}

/// A coupling on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CouplingArg {
    /// The draft samples under the model's noise.
    Shared,
    /// The draft samples under noise of its own.
    Independent,
}

/// Most tokens `--draft-tokens` takes: a pass over more costs more than a
/// token, and states keep that many positions to roll back.
const MAX_DRAFT_TOKENS: usize = 32;

impl SpeculationArgs {
    /// No speculation unless `--speculate` or `--draft` asks for it (the
    /// server's default: it batches requests instead).
    pub fn only_when_asked(&mut self) {
        if self.draft.is_none() {
            self.speculate.get_or_insert(SpeculateArg::None);
        }
    }

    /// The speculator these arguments ask for.
    pub fn kind(&self) -> Result<SpeculateArg> {
        let kind = self.speculate.unwrap_or(if self.draft.is_some() {
            SpeculateArg::Draft
        } else {
            SpeculateArg::Ngram
        });
        match (kind, &self.draft) {
            (SpeculateArg::Draft, None) => bail!("--speculate draft needs --draft DIR"),
            (SpeculateArg::None | SpeculateArg::Ngram | SpeculateArg::Suffix, Some(_)) => {
                bail!("--draft is only used with --speculate draft")
            }
            _ => Ok(kind),
        }
    }

    /// The draft length setting.
    pub fn length(&self) -> Result<DraftLength> {
        match self.draft_tokens {
            None => Ok(DraftLength::Adaptive {
                max: DEFAULT_MAX_DRAFT,
            }),
            Some(k) if (1..=MAX_DRAFT_TOKENS).contains(&k) => Ok(DraftLength::Fixed(k)),
            Some(k) => bail!("--draft-tokens must be between 1 and {MAX_DRAFT_TOKENS}, not {k}"),
        }
    }

    /// Candidates per position (checked).
    pub fn width(&self) -> Result<usize> {
        match self.tree_width {
            w @ 1..=MAX_WIDTH => Ok(w),
            w => bail!("--tree-width must be between 1 and {MAX_WIDTH}, not {w}"),
        }
    }

    /// State options for `model` that can roll back a whole draft (a whole
    /// tree, where the model branches).
    pub fn state_options(&self, model: &Model, mut options: StateOptions) -> Result<StateOptions> {
        if self.kind()? != SpeculateArg::None {
            let depth = self.length()?.max();
            let nodes = match model.can_branch() {
                true => depth * self.width()?,
                false => depth,
            };
            options.rollback = options.rollback.max(nodes);
        }
        Ok(options)
    }

    /// Loads the draft model (with the model's threads and in-memory
    /// quantization options), after checking it reads token ids as the
    /// model does. `None` unless `--speculate draft`.
    pub fn load_draft(
        &self,
        model: &ModelArgs,
        tokenizer: Option<&TextTokenizer>,
    ) -> Result<Option<Model>> {
        if self.kind()? != SpeculateArg::Draft {
            return Ok(None);
        }
        let dir = self.draft.as_ref().expect("checked by kind()");
        if let Some(tokenizer) = tokenizer {
            let theirs = TextTokenizer::load(dir).with_context(|| {
                format!(
                    "the draft model in {} needs its tokenizer, to check it matches the model's",
                    dir.display()
                )
            })?;
            if let Some(difference) = tokenizer.vocabulary_difference(&theirs) {
                bail!(
                    "the draft model in {} has another vocabulary than the model: {difference}",
                    dir.display()
                );
            }
        }
        let args = ModelArgs {
            model: dir.clone(),
            threads: self
                .draft_threads
                .map_or_else(|| model.threads.clone(), |n| vec![n]),
            ..model.clone()
        };
        let draft = args.load().context("cannot load the draft model")?;
        Ok(Some(draft))
    }

    /// The speculation for `model` sampling with `params`, drafting with
    /// `draft` when given (see [`Self::load_draft`]); `None` for `--speculate none`.
    pub fn build<'m>(
        &self,
        model: &Model,
        draft: Option<&'m Model>,
        params: &SamplingParams,
        options: &StateOptions,
    ) -> Result<Option<Speculation<'m>>> {
        let length = self.length()?;
        let coupling = match self.coupling {
            CouplingArg::Shared => Coupling::Shared,
            CouplingArg::Independent => Coupling::Independent,
        };
        let speculator: Box<dyn hayate_engine::speculate::Speculator + 'm> = match self.kind()? {
            SpeculateArg::None => return Ok(None),
            SpeculateArg::Ngram => Box::new(PromptLookup::default()),
            SpeculateArg::Suffix => Box::new(SuffixSpeculator::default()),
            SpeculateArg::Draft => {
                let draft = draft.expect("loaded by load_draft");
                if draft.info.vocab < model.info.vocab {
                    tracing::info!(
                        "the draft's output covers {} of the model's {} token ids",
                        draft.info.vocab,
                        model.info.vocab
                    );
                }
                // The draft's context may be shorter than the model's.
                let context = options.context.map(|c| c.min(draft.info.max_positions));
                let draft_options = StateOptions {
                    context,
                    ..options.clone()
                };
                Box::new(
                    DraftModel::new(draft, model.info.vocab, params, coupling, &draft_options)
                        .context("cannot make the draft model's state")?,
                )
            }
        };
        Ok(Some(
            Speculation::new(speculator, length).with_width(self.width()?),
        ))
    }
}

/// The stats line's speculation part: ` | draft: 120 drafted, 96 accepted
/// (80%), 3.1 tok/pass`.
pub fn stats_text(name: &str, s: &SpeculationStats, generated: usize) -> String {
    let trees = match s.tree_passes {
        0 => String::new(),
        n => format!(", {n} trees"),
    };
    format!(
        " | {name}: {} drafted, {} accepted ({:.0}%), {:.2} tok/pass{trees}",
        s.drafted,
        s.accepted,
        100.0 * s.acceptance(),
        tokens_per_pass(s, generated)
    )
}

/// Generated tokens per model pass, the prefill's pass (which gave the
/// first token) included: 1 for plain decoding.
pub fn tokens_per_pass(s: &SpeculationStats, generated: usize) -> f64 {
    generated as f64 / (s.passes + 1) as f64
}

/// One generation's statistics as `--json-stats` prints them.
#[derive(Serialize)]
pub struct JsonStats {
    prompt_tokens: usize,
    generated_tokens: usize,
    time_to_first_token_s: Option<f64>,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    decode_s: f64,
    stop: String,
    seed: u64,
    temperature: f32,
    speculator: Option<String>,
    drafted: Option<usize>,
    accepted: Option<usize>,
    acceptance: Option<f64>,
    model_passes: Option<usize>,
    tree_passes: Option<usize>,
    tokens_per_pass: Option<f64>,
    draft_s: Option<f64>,
    verify_s: Option<f64>,
}

impl JsonStats {
    /// The statistics of one generation with `params` by `speculator`.
    pub fn new(stats: &GenerationStats, params: &SamplingParams, speculator: Option<&str>) -> Self {
        let s = stats.speculation.as_ref();
        JsonStats {
            prompt_tokens: stats.prompt_tokens,
            generated_tokens: stats.generated,
            time_to_first_token_s: stats.time_to_first_token.map(|t| t.as_secs_f64()),
            prefill_tok_s: stats.prefill_rate(),
            decode_tok_s: stats.decode_rate(),
            decode_s: stats.decode_time.as_secs_f64(),
            stop: stats.stop.to_string(),
            seed: params.seed,
            temperature: params.temperature,
            speculator: speculator.map(str::to_owned),
            drafted: s.map(|s| s.drafted),
            accepted: s.map(|s| s.accepted),
            acceptance: s.map(SpeculationStats::acceptance),
            model_passes: s.map(|s| s.passes),
            tree_passes: s.map(|s| s.tree_passes),
            tokens_per_pass: s.map(|s| tokens_per_pass(s, stats.generated)),
            draft_s: s.map(|s| s.draft_time.as_secs_f64()),
            verify_s: s.map(|s| s.verify_time.as_secs_f64()),
        }
    }
}
