//! The `hayate` command line.

mod agent;
mod bench;
mod chat;
mod common;
mod eval;
mod logits;
mod quantize;
mod run;
mod serve;
mod speculation;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Run open large language models on this machine: fast, private, offline.
#[derive(Parser)]
#[command(name = "hayate", version, about)]
struct Cli {
    /// Log loading and kernel choices to stderr (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a reply to one prompt, streamed to stdout.
    Run(run::RunArgs),
    /// Talk to a model in the terminal, turn by turn.
    Chat(chat::ChatArgs),
    /// Write the next-token logits at every position of a token sequence.
    Logits(logits::LogitsArgs),
    /// Measure prompt-processing and generation speed.
    Bench(bench::BenchArgs),
    /// Score a text file: perplexity, and divergence from a reference model.
    Eval(eval::EvalArgs),
    /// Write a quantized copy (q4 or q8) of a model directory.
    Quantize(quantize::QuantizeArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
}

/// Parses the command line. Every option that takes a value accepts a
/// negative number, so that `--temperature -1` or `--top-k -3` reaches the
/// value's own check and its message rather than being read as a flag.
fn parse() -> Result<Cli, clap::Error> {
    let command = Cli::command().mut_subcommands(|sub| {
        sub.mut_args(|arg| {
            if arg.get_action().takes_values() {
                arg.allow_negative_numbers(true)
            } else {
                arg
            }
        })
    });
    Cli::from_arg_matches(&command.try_get_matches()?)
}

fn main() {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // One `error:` line, like every other failure, with a pointer to the help.
            // The message up to its first blank line (the usage follows),
            // on one line: it names the argument when one is missing.
            let message = e.to_string();
            let lines: Vec<&str> = message
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = match lines.join(" ") {
                joined if joined.is_empty() => "error: bad arguments".to_owned(),
                joined => joined,
            };
            eprintln!("{first} (see `hayate --help`)");
            std::process::exit(1);
        }
    };
    let level = match cli.verbose {
        0 => tracing::Level::WARN,
        1 => tracing::Level::INFO,
        _ => tracing::Level::DEBUG,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Serve(args) => serve::run(args),
    };
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
