//! `hayate chat`: an interactive conversation in the terminal, and an agent
//! loop when tools are offered (`--mcp`, `--tools`): the model's calls are
//! run on MCP servers and their results fed back until it answers. The KV
//! cache is kept across turns, so each reply prefills only what is new.

use crate::agent::{CallResult, Source, Toolbox};
use crate::common::{ModelArgs, SamplingArgs, stop_ids};
use crate::speculation::{JsonStats, SpeculationArgs, stats_text};
use anyhow::{Result, bail};
use clap::Args;
use hayate_chat::grammar::{Constraint, GrammarCompiler};
use hayate_chat::reply::{Part, ReplySplitter, marker_ids};
use hayate_chat::tools::{ToolCall, ToolSyntax, ToolTemplate, Turn};
use hayate_chat::{RenderOptions, TextTokenizer};
use hayate_engine::speculate::Speculation;
use hayate_engine::{
    GenerationStats, Generator, KvFormat, Rules, Sampler, SamplingParams, StopReason,
    TokenConstraint,
};
use serde_json::Value;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

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
    /// Also print each reply's statistics as one JSON object on stderr.
    #[arg(long)]
    json_stats: bool,
    /// Start this MCP server (a command line, spoken to over stdio) and let
    /// the model call its tools. Repeatable.
    #[arg(long = "mcp", value_name = "COMMAND")]
    mcp: Vec<String>,
    /// Run the model's tool calls without asking first.
    #[arg(long)]
    yes: bool,
    /// Offer the tools in this file (an OpenAI `tools` array) without running
    /// them: the model's calls to them are printed.
    #[arg(long, value_name = "FILE.json")]
    tools: Option<PathBuf>,
    /// auto: the model decides; required: the first reply to each message is
    /// a tool call (forced by a grammar); none: tools are not offered; or the
    /// name of a tool to call first.
    #[arg(long, value_name = "CHOICE", default_value = "auto")]
    tool_choice: String,
    /// Most replies to one message while tools are being called.
    #[arg(long, value_name = "N", default_value_t = 8)]
    max_tool_rounds: usize,
    /// Seconds an MCP server may take to start or to answer a call.
    #[arg(long, value_name = "S", default_value_t = 120)]
    tool_timeout: u64,
    /// Print each prompt on stderr as the chat template renders it.
    #[arg(long)]
    verbose_prompt: bool,
}

/// What `--tool-choice` asks of the first reply to each message.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// The tools of a session and how calls to them are forced.
struct Agent {
    toolbox: Toolbox,
    listing: Value,
    choice: Choice,
    /// Grammars over the model's vocabulary (none when it has no usable tokenizer.json).
    compiler: Option<GrammarCompiler>,
    /// The grammar that forces a first call, when `choice` asks for one.
    forced: Option<String>,
    /// The grammar of later (or `auto`) replies: free text until a call opens.
    auto: Option<String>,
    ask: bool,
    calls_made: usize,
}

pub fn run(args: ChatArgs) -> Result<()> {
    if args.max_tool_rounds == 0 {
        bail!("--max-tool-rounds must be at least 1");
    }
    let model = args.model.load()?;
    let tokenizer = TextTokenizer::load(&args.model.model)?;
    let Some(source) = tokenizer.template_source() else {
        bail!("the model has no chat template; use `hayate run --raw` instead");
    };
    let template = ToolTemplate::of(source);
    let params = args.sampling.resolve(&model)?;
    let stops = stop_ids(&model, Some(&tokenizer));
    let mut agent = match (
        args.mcp.is_empty() && args.tools.is_none(),
        &args.tool_choice,
    ) {
        (true, c) if c == "auto" || c == "none" => None,
        (true, _) => bail!("--tool-choice needs tools (--mcp or --tools)"),
        (false, _) => Some(Agent::start(
            &args,
            (&model, &tokenizer),
            &stops,
            template.syntax,
        )?),
    };
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
    let mut sampler = Sampler::new(params.clone(), model.info.vocab);
    let base: Vec<Turn> = args
        .system
        .iter()
        .map(|s| Turn::text("system", s))
        .collect();
    let mut turns = base.clone();
    let tools_note = match &agent {
        Some(a) if a.choice != Choice::None => format!(
            " Tools: {} ({} syntax).",
            a.toolbox
                .tools()
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            template.syntax.name()
        ),
        _ => String::new(),
    };
    eprintln!(
        "hayate chat: {} ({} tokens of context).{tools_note} Commands: /reset, /exit (or Ctrl-D).",
        args.model.model.display(),
        generator.state.capacity()
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut session = Session {
        args: &args,
        template,
        tokenizer: &tokenizer,
        params: &params,
        stops: &stops,
    };
    loop {
        eprint!("> ");
        let Some(line) = lines.next() else { break };
        let line = line?;
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                turns = base.clone();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        let before = turns.len();
        turns.push(Turn::text("user", text));
        for round in 0..args.max_tool_rounds {
            let outcome = session.reply(
                &mut generator,
                &mut sampler,
                speculation.as_mut(),
                agent.as_mut(),
                &mut turns,
                round == 0,
                &mut lines,
            )?;
            match outcome {
                Outcome::Answered => break,
                Outcome::TooLong if round == 0 => {
                    turns.truncate(before);
                    break;
                }
                Outcome::TooLong => break,
                Outcome::CalledTools if round + 1 == args.max_tool_rounds => eprintln!(
                    "(stopped after {} replies with tool calls: --max-tool-rounds)",
                    args.max_tool_rounds
                ),
                Outcome::CalledTools => {}
            }
        }
    }
    if let Some(agent) = agent {
        agent.toolbox.close();
    }
    Ok(())
}

impl Agent {
    fn start(
        args: &ChatArgs,
        (model, tokenizer): (&hayate_engine::Model, &TextTokenizer),
        stops: &[u32],
        syntax: ToolSyntax,
    ) -> Result<Self> {
        let toolbox = Toolbox::start(
            &args.mcp,
            args.tools.as_deref(),
            Duration::from_secs(args.tool_timeout),
        )?;
        let choice = match args.tool_choice.as_str() {
            "none" => Choice::None,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            name if toolbox.find(name).is_some() => Choice::Named(name.to_owned()),
            name => bail!(
                "--tool-choice `{name}`: not auto, none, required or the name of an offered tool"
            ),
        };
        if toolbox.tools().is_empty() && choice != Choice::None {
            eprintln!("warning: the MCP servers and --tools offer no tools");
        }
        // Calls are forced (`required`, a name) or, once the model opens
        // one, held to the schemas (`auto`) by grammars over the vocabulary.
        let compiler = match std::fs::read_to_string(args.model.model.join("tokenizer.json"))
            .map_err(|e| e.to_string())
            .and_then(|json| {
                GrammarCompiler::new(&json, model.info.vocab, stops).map_err(|e| e.to_string())
            }) {
            Ok(compiler) => Some(compiler),
            Err(e) if matches!(choice, Choice::Required | Choice::Named(_)) => {
                bail!("cannot force tool calls: {e}")
            }
            Err(e) => {
                eprintln!(
                    "warning: tool calls are parsed but not checked against their schemas: {e}"
                );
                None
            }
        };
        let special = |marker: &str| tokenizer.special_token_id(marker);
        let schemas = toolbox.schemas();
        let forced = match &choice {
            Choice::Required => Some(syntax.grammar(&schemas, false, &special)),
            Choice::Named(name) => {
                let one: Vec<_> = schemas
                    .iter()
                    .filter(|t| &t.name == name)
                    .cloned()
                    .collect();
                Some(syntax.grammar(&one, false, &special))
            }
            Choice::None | Choice::Auto => None,
        };
        let auto = match choice {
            Choice::None => None,
            _ => syntax.auto_grammar(&schemas, true, &special),
        };
        if let Some(compiler) = &compiler {
            // Compiled once here, so that a schema llguidance rejects fails now.
            for grammar in forced.iter().chain(&auto) {
                compiler
                    .lark(grammar)
                    .map_err(|e| anyhow::anyhow!("the tools' schemas cannot be compiled: {e}"))?;
            }
        }
        Ok(Agent {
            listing: toolbox.listing(),
            toolbox,
            choice,
            compiler,
            forced,
            auto,
            ask: !args.yes,
            calls_made: 0,
        })
    }
}

/// How a reply ended.
enum Outcome {
    /// With an answer: the next message is the user's.
    Answered,
    /// With tool calls whose results are in the conversation: the model replies again.
    CalledTools,
    /// The conversation no longer fits the context.
    TooLong,
}

/// What every reply of a session shares.
struct Session<'a> {
    args: &'a ChatArgs,
    template: ToolTemplate,
    tokenizer: &'a TextTokenizer,
    params: &'a SamplingParams,
    stops: &'a [u32],
}

impl Session<'_> {
    /// Generates the model's next reply to `turns`, streams its text, and
    /// runs the calls it makes; `first` is the first reply to a message.
    #[allow(clippy::too_many_arguments)]
    fn reply(
        &mut self,
        generator: &mut Generator<'_>,
        sampler: &mut Sampler,
        speculation: Option<&mut Speculation<'_>>,
        agent: Option<&mut Agent>,
        turns: &mut Vec<Turn>,
        first: bool,
        input: &mut impl Iterator<Item = std::io::Result<String>>,
    ) -> Result<Outcome> {
        let offered = agent.as_deref().filter(|a| a.choice != Choice::None);
        let (messages, template_tools) = self.template.messages(turns, offered.map(|a| &a.listing));
        let rendered = self.tokenizer.render_chat_with(
            &messages,
            &RenderOptions {
                add_generation_prompt: true,
                tools: template_tools,
                extra: None,
            },
        )?;
        if self.args.verbose_prompt {
            eprintln!("--- prompt ---\n{rendered}\n--- end of prompt ---");
        }
        let prompt = self.tokenizer.encode(&rendered, false)?;
        if prompt.len() >= generator.state.capacity() {
            eprintln!(
                "(the conversation needs {} tokens but the context holds {}; /reset to start over)",
                prompt.len(),
                generator.state.capacity()
            );
            return Ok(Outcome::TooLong);
        }
        generator.set_prompt(&prompt)?;
        let syntax = offered.map(|_| self.template.syntax);
        let grammar = offered.and_then(|a| match (&a.forced, first) {
            (Some(forced), true) => Some(forced),
            _ => a.auto.as_ref(),
        });
        let mut constraint: Option<Constraint> =
            match (offered.and_then(|a| a.compiler.as_ref()), grammar) {
                (Some(compiler), Some(grammar)) => Some(
                    compiler
                        .lark(grammar)
                        .map_err(|e| anyhow::anyhow!("cannot constrain a tool call: {e}"))?,
                ),
                _ => None,
            };
        let mut splitter = ReplySplitter::after(&rendered, syntax);
        let mut stream = self
            .tokenizer
            .stream_showing(&marker_ids(self.tokenizer, syntax));
        let mut shown = Shown::default();
        let name = speculation.as_ref().map(|s| s.name());
        let rules = Rules {
            speculation,
            constraint: constraint.as_mut().map(|c| c as &mut dyn TokenConstraint),
            max_tokens: self.args.max_tokens,
            stop_ids: self.stops,
        };
        let stats = generator.generate_observed(sampler, rules, |token, _| -> Result<bool> {
            if let Some(piece) = stream.push(token)? {
                shown.show(splitter.push(&piece))?;
            }
            Ok(true)
        })?;
        if let Some(piece) = stream.finish()? {
            shown.show(splitter.push(&piece))?;
        }
        let (rest, calls) = splitter.finish();
        shown.show(rest)?;
        shown.end()?;
        self.report(&stats, name.filter(|_| stats.speculation.is_some()));
        let reasoning = (!shown.reasoning.is_empty()).then(|| shown.reasoning.trim().to_owned());
        let Some(agent) = agent.filter(|_| !calls.is_empty()) else {
            let mut turn = Turn::text("assistant", &shown.content);
            turn.reasoning = reasoning;
            turns.push(turn);
            return Ok(Outcome::Answered);
        };
        let ids: Vec<String> = (0..calls.len())
            .map(|i| format!("call_{}", agent.calls_made + i))
            .collect();
        agent.calls_made += calls.len();
        turns.push(Turn {
            role: "assistant".into(),
            content: shown.content.trim().to_owned(),
            calls: ids.iter().cloned().map(Some).zip(calls.clone()).collect(),
            reasoning,
            ..Turn::default()
        });
        let mut ran_any = false;
        for (id, call) in ids.into_iter().zip(&calls) {
            let arguments = call.arguments.to_string();
            let result = match agent.toolbox.find(&call.name).map(|t| t.source) {
                Some(Source::File) => {
                    // Offered from --tools: shown, not run, and no result.
                    println!("[tool call] {} {arguments}", call.name);
                    continue;
                }
                Some(Source::Mcp(_)) => {
                    eprintln!("[tool call] {} {arguments}", call.name);
                    if agent.ask && !confirm(call, input)? {
                        CallResult {
                            text: "The user declined to run this call.".into(),
                            is_error: true,
                        }
                    } else {
                        agent.toolbox.run(call)
                    }
                }
                None => {
                    eprintln!("[tool call] {} {arguments}", call.name);
                    agent.toolbox.run(call)
                }
            };
            eprintln!(
                "[tool {}] {}",
                if result.is_error { "error" } else { "result" },
                result.text
            );
            turns.push(Turn {
                role: "tool".into(),
                content: result.text,
                tool_call_id: Some(id),
                name: Some(call.name.clone()),
                ..Turn::default()
            });
            ran_any = true;
        }
        Ok(if ran_any {
            Outcome::CalledTools
        } else {
            Outcome::Answered
        })
    }

    /// One reply's statistics on stderr.
    fn report(&self, stats: &GenerationStats, speculator: Option<&str>) {
        let speculated = match (&stats.speculation, speculator) {
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
        if self.args.json_stats {
            match serde_json::to_string(&JsonStats::new(stats, self.params, speculator)) {
                Ok(line) => eprintln!("{line}"),
                Err(e) => eprintln!("warning: cannot write the statistics: {e}"),
            }
        }
    }
}

/// Asks on the terminal whether to run `call` (no answer is no).
fn confirm(
    call: &ToolCall,
    input: &mut impl Iterator<Item = std::io::Result<String>>,
) -> Result<bool> {
    eprint!("Run {}? [y/N] ", call.name);
    std::io::stderr().flush()?;
    let answer = input.next().transpose()?.unwrap_or_default();
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "Yes"))
}

/// A reply as it has been printed: content on stdout, reasoning on stderr.
#[derive(Default)]
struct Shown {
    content: String,
    reasoning: String,
}

impl Shown {
    fn show(&mut self, parts: Vec<Part>) -> Result<()> {
        for part in parts {
            match part {
                Part::Content(text) => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(text.as_bytes())?;
                    out.flush()?;
                    self.content += &text;
                }
                Part::Reasoning(text) => {
                    eprint!("{text}");
                    self.reasoning += &text;
                }
                // Calls are shown whole once the reply is parsed.
                Part::CallName { .. } | Part::CallArguments { .. } => {}
            }
        }
        Ok(())
    }

    fn end(&self) -> Result<()> {
        if !self.reasoning.is_empty() {
            eprintln!();
        }
        let mut out = std::io::stdout().lock();
        writeln!(out)?;
        out.flush()?;
        Ok(())
    }
}
