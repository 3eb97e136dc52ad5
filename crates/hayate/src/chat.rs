//! `hayate chat`: an interactive conversation in the terminal. The KV cache
//! is kept across turns, so each turn prefills only what is new.

use crate::common::{ModelArgs, SamplingArgs, stop_ids};
use crate::speculation::{JsonStats, SpeculationArgs, stats_text};
use anyhow::{Result, bail};
use clap::Args;
use hayate_chat::{Message, TextTokenizer};
use hayate_engine::{Generator, KvFormat, Sampler, StopReason};
use std::io::{BufRead, Write};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A system message to start the conversation with.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    speculation: SpeculationArgs,
    /// Also print each turn's statistics as one JSON object on stderr.
    #[arg(long)]
    json_stats: bool,
}

pub fn run(args: ChatArgs) -> Result<()> {
    let model = args.model.load()?;
    let tokenizer = TextTokenizer::load(&args.model.model)?;
    if !tokenizer.has_template() {
        bail!("the model has no chat template; use `hayate run --raw` instead");
    }
    let params = args.sampling.resolve(&model)?;
    let stops = stop_ids(&model, Some(&tokenizer));
    let draft = args.speculation.load_draft(&args.model, Some(&tokenizer))?;
    let options = args.speculation.state_options(
        &model,
        args.model
            .state_options(args.model.ctx_size, KvFormat::Bf16),
    )?;
    let mut speculation = args
        .speculation
        .build(&model, draft.as_ref(), &params, &options)?;
    let name = speculation.as_ref().map(|s| s.name());
    let mut generator = Generator::new(&model, &options)?;
    let mut sampler = Sampler::new(params.clone(), model.info.vocab);
    let base: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s))
        .collect();
    let mut messages = base.clone();
    eprintln!(
        "hayate chat: {} ({} tokens of context). Commands: /reset, /exit (or Ctrl-D).",
        args.model.model.display(),
        generator.state.capacity()
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let Some(line) = lines.next() else { break };
        let line = line?;
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = base.clone();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", text));
        let prompt = tokenizer.encode_chat(&messages, true)?;
        if prompt.len() >= generator.state.capacity() {
            messages.pop();
            eprintln!(
                "(the conversation needs {} tokens but the context holds {}; /reset to start over)",
                prompt.len(),
                generator.state.capacity()
            );
            continue;
        }
        generator.set_prompt(&prompt)?;
        let mut stream = tokenizer.stream();
        let mut reply = String::new();
        let mut out = std::io::stdout().lock();
        let stats = generator.generate_with(
            &mut sampler,
            speculation.as_mut(),
            args.max_tokens,
            &stops,
            |token| -> Result<bool> {
                if let Some(piece) = stream.push(token)? {
                    reply += &piece;
                    out.write_all(piece.as_bytes())?;
                    out.flush()?;
                }
                Ok(true)
            },
        )?;
        if let Some(piece) = stream.finish()? {
            reply += &piece;
            out.write_all(piece.as_bytes())?;
        }
        writeln!(out)?;
        out.flush()?;
        let speculated = match (&stats.speculation, name) {
            (Some(s), Some(name)) => stats_text(name, s, stats.generated),
            _ => String::new(),
        };
        eprintln!(
            "[{} new prompt tok, {:.1} tok/s | {} tok, {:.1} tok/s{speculated}{}]",
            stats.prompt_tokens,
            stats.prefill_rate(),
            stats.generated,
            stats.decode_rate(),
            if stats.stop == StopReason::ContextFull {
                " | context full"
            } else {
                ""
            }
        );
        if args.json_stats {
            eprintln!(
                "{}",
                serde_json::to_string(&JsonStats::new(&stats, &params, name))?
            );
        }
        messages.push(Message::new("assistant", &reply));
    }
    Ok(())
}
