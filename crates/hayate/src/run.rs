//! `hayate run`: one prompt, one streamed reply, a stats line.

use crate::common::{ModelArgs, SamplingArgs, mib, peak_rss_bytes, stop_ids};
use crate::speculation::{JsonStats, SpeculationArgs, stats_text};
use anyhow::{Context, Result, bail};
use clap::Args;
use hayate_chat::{Message, TextTokenizer};
use hayate_engine::{Generator, KvFormat, Sampler};
use std::io::Write;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (a user message, or raw text with --raw).
    #[arg(long, value_name = "TEXT")]
    prompt: String,
    /// Most tokens to generate (default: the model's max_new_tokens, else 256).
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    speculation: SpeculationArgs,
    /// Also print the statistics as one JSON object on stderr, after the stats line.
    #[arg(long)]
    json_stats: bool,
}

pub fn run(args: RunArgs) -> Result<()> {
    let model = args.model.load()?;
    let tokenizer = TextTokenizer::load(&args.model.model)?;
    let params = args.sampling.resolve(&model)?;
    let (prompt, stops) = if args.raw {
        (
            tokenizer.encode(&args.prompt, true)?,
            stop_ids(&model, None),
        )
    } else {
        let ids = tokenizer.encode_chat(&[Message::new("user", &args.prompt)], true)?;
        (ids, stop_ids(&model, Some(&tokenizer)))
    };
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let draft = args.speculation.load_draft(&args.model, Some(&tokenizer))?;
    let options = args.speculation.state_options(
        &model,
        args.model
            .state_options(args.model.ctx_size, KvFormat::Bf16),
    )?;
    let mut speculation = args
        .speculation
        .build(&model, draft.as_ref(), &params, &options)?;
    let mut generator = Generator::new(&model, &options)?;
    let capacity = generator.state.capacity();
    if prompt.len() >= capacity {
        bail!(
            "the prompt has {} tokens but the context holds {capacity}; shorten it or raise --ctx-size (model maximum {})",
            prompt.len(),
            model.info.max_positions
        );
    }
    let max_tokens = args
        .max_tokens
        .or(model.generation.max_new_tokens)
        .unwrap_or(256);
    generator.set_prompt(&prompt)?;
    let mut sampler = Sampler::new(params.clone(), model.info.vocab);
    let mut stream = tokenizer.stream();
    let mut out = std::io::stdout().lock();
    let speculating = speculation.as_mut();
    let name = speculating.as_ref().map(|s| s.name());
    let stats = generator.generate_with(
        &mut sampler,
        speculating,
        max_tokens,
        &stops,
        |token| -> Result<bool> {
            if let Some(piece) = stream.push(token)? {
                // A closed pipe (e.g. `| head`) ends generation quietly.
                if out
                    .write_all(piece.as_bytes())
                    .and_then(|_| out.flush())
                    .is_err()
                {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    if let Some(piece) = stream.finish()? {
        let _ = out.write_all(piece.as_bytes());
    }
    let _ = writeln!(out);
    let _ = out.flush();
    let sampling = if params.temperature == 0.0 {
        "greedy".to_owned()
    } else {
        format!("seed {}", params.seed)
    };
    let speculated = match (&stats.speculation, name) {
        (Some(s), Some(name)) => stats_text(name, s, stats.generated),
        _ => String::new(),
    };
    eprintln!(
        "[prompt {} tok | first token {} | prefill {:.1} tok/s | generated {} tok | decode {:.1} tok/s{speculated} | peak RSS {} | {} | stop: {}]",
        stats.prompt_tokens,
        stats
            .time_to_first_token
            .map_or("-".to_owned(), |t| format!(
                "{:.0} ms",
                t.as_secs_f64() * 1e3
            )),
        stats.prefill_rate(),
        stats.generated,
        stats.decode_rate(),
        mib(peak_rss_bytes()),
        sampling,
        stats.stop
    );
    if args.json_stats {
        eprintln!(
            "{}",
            serde_json::to_string(&JsonStats::new(&stats, &params, name))?
        );
    }
    Ok(())
}

/// Parses `1,5,17` into token ids.
pub fn parse_token_list(text: &str) -> Result<Vec<u32>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .with_context(|| format!("`{s}` is not a token id"))
        })
        .collect()
}
