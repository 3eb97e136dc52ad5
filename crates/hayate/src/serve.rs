//! `hayate serve`: the OpenAI-compatible server (see `hayate-server`).

use crate::common::{ModelArgs, SamplingArgs, stop_ids};
use crate::speculation::{SpeculateArg, SpeculationArgs};
use anyhow::{Context, Result, bail};
use clap::Args;
use hayate_chat::TextTokenizer;
use hayate_chat::grammar::GrammarCompiler;
use hayate_engine::KvFormat;
use hayate_server::engine::{EngineConfig, SpeculationSetup};
use hayate_server::{DEFAULT_MAX_BODY_BYTES, ServerConfig};
use std::net::IpAddr;
use std::sync::Arc;

/// Requests generated together unless `--parallel` says otherwise.
const DEFAULT_PARALLEL: usize = 4;

/// Most requests generated together.
const MAX_PARALLEL: usize = 256;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (loopback by default; another address without
    /// an API key is open to the network, and the server warns).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, value_name = "PORT", default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (also from HAYATE_API_KEY).
    #[arg(
        long,
        value_name = "KEY",
        env = "HAYATE_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// Requests that may wait for a free sequence (beyond the --parallel
    /// ones generating); more are answered 503.
    #[arg(long, value_name = "N", default_value_t = 16)]
    queue: usize,
    /// Requests generated together (continuous batching), each in a
    /// sequence of up to --ctx-size tokens whose attention cache takes its
    /// pages from --kv-memory. Default 4, or 1 with speculative decoding
    /// (one request at a time, drafts as trees where --tree-width asks;
    /// with more, each sequence speculates in the batch, in chains).
    #[arg(long, value_name = "N")]
    parallel: Option<usize>,
    /// Memory for the sequences' attention caches, shared by all of them
    /// (e.g. 2G, 512M): caches grow in pages of 128 tokens, so a short
    /// request takes only what it fills. A request is admitted when its
    /// prompt and max_tokens (else the rest of the context) fit beside
    /// what the running ones may take; it waits in the queue otherwise,
    /// and one that can never fit is answered 400. Default: every
    /// sequence's whole context, up to half of the memory left.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    kv_memory: Option<usize>,
    /// Keep the sequences in DIR across restarts: saved when the server
    /// stops (Ctrl-C), read back when it starts, so the first requests
    /// after a restart still find their conversations or system prompt
    /// prefilled. A file that is corrupt or made for another model or
    /// other options is ignored with a warning.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<std::path::PathBuf>,
    /// Most bytes of a request body; larger ones are answered 413.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Defaults for requests that leave sampling fields out.
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Speculative decoding for every request (the replies are the same).
    #[command(flatten)]
    speculation: SpeculationArgs,
}

pub fn run(mut args: ServeArgs) -> Result<()> {
    args.speculation.only_when_asked();
    if args.queue == 0 {
        bail!("--queue must be at least 1");
    }
    let speculating = !matches!(args.speculation.kind()?, SpeculateArg::None);
    let parallel = match args.parallel {
        Some(0) => bail!("--parallel must be at least 1"),
        Some(n) if n > MAX_PARALLEL => bail!("--parallel {n}: at most {MAX_PARALLEL}"),
        Some(n) => n,
        None if speculating => 1,
        None => DEFAULT_PARALLEL,
    };
    if args.kv_memory.is_some() && speculating && parallel == 1 {
        bail!(
            "--kv-memory shares the memory of batched requests: with speculative decoding it needs --parallel 2 or more"
        );
    }
    let model = args.model.load()?;
    let tokenizer =
        TextTokenizer::load(&args.model.model).context("the server needs the model's tokenizer")?;
    let defaults = args.sampling.resolve(&model)?;
    let stops = stop_ids(&model, Some(&tokenizer));
    let options = args.speculation.state_options(
        &model,
        args.model
            .state_options(args.model.ctx_size, KvFormat::Bf16),
    )?;
    let draft = args.speculation.load_draft(&args.model, Some(&tokenizer))?;
    let speculation = match args.speculation.kind()? {
        SpeculateArg::None => None,
        _ => {
            let (speculate, params, state) =
                (args.speculation.clone(), defaults.clone(), options.clone());
            Some(SpeculationSetup {
                draft,
                make: Box::new(move |model, draft| {
                    speculate
                        .build(model, draft, &params, &state)
                        .map_err(|e| format!("{e:#}"))?
                        .ok_or_else(|| "no speculator".to_owned())
                }),
            })
        }
    };
    let model_id = args
        .model
        .model
        .file_name()
        .map_or("model".to_owned(), |n| n.to_string_lossy().into_owned());
    let api_key = args.api_key.filter(|k| !k.is_empty());
    if !args.host.is_loopback() && api_key.is_none() {
        eprintln!(
            "warning: listening on {} without an API key: anyone who can reach this machine can use the model (set --api-key or HAYATE_API_KEY)",
            args.host
        );
    }
    let grammars = match std::fs::read_to_string(args.model.model.join("tokenizer.json"))
        .map_err(|e| e.to_string())
        .and_then(|json| {
            GrammarCompiler::new(&json, model.info.vocab, &stops).map_err(|e| e.to_string())
        }) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("warning: no constrained decoding (response_format, grammar): {e}");
            None
        }
    };
    let cache_dir = match &args.cache_dir {
        None => None,
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot make the cache directory {}", dir.display()))?;
            // What changes the states: the weights, their quantization and
            // the activations' precision.
            let m = &args.model;
            let how = format!(
                "{:?} {:?} {:?} {:?}",
                m.quantize, m.quant, m.activations, m.kv_cache
            );
            let print = hayate_engine::saved::fingerprint(&m.model, &how)
                .with_context(|| format!("cannot read the model in {}", m.model.display()))?;
            Some((dir.clone(), print))
        }
    };
    let config = EngineConfig {
        options,
        stop_ids: stops,
        queue: args.queue,
        parallel,
        speculation,
        cache_dir,
        kv_memory: args.kv_memory,
    };
    let (engine, engine_thread) = hayate_server::engine::start(model, Arc::new(tokenizer), config)
        .context("cannot start the engine")?;
    let capacity = engine.capacity;
    let config = ServerConfig {
        model_id: model_id.clone(),
        api_key,
        max_body_bytes: args.max_body_bytes,
        defaults,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the server's runtime")?;
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host, args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let address = listener.local_addr()?;
        eprintln!(
            "hayate serve: {model_id} ({parallel} x {capacity} tokens of context) on http://{address}/v1 (Ctrl-C stops)"
        );
        hayate_server::serve(listener, hayate_server::router(config, engine, grammars))
            .await
            .context("the server failed")
    });
    // Every handle of the engine is gone with the runtime: it finishes
    // the requests in hand and saves its sequences.
    drop(runtime);
    if engine_thread.join().is_err() {
        bail!("the engine thread panicked");
    }
    served
}

/// A size in bytes: a number with an optional unit, K, M, G or T (powers
/// of 1024; `KiB`, `MB` and the like read the same), e.g. `512M`, `1.5G`.
fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 2G, 512M)"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.trim_end_matches("ib").trim_end_matches('b');
    let scale = match unit {
        "" => 1u64,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("`{text}`: the unit must be K, M, G or T")),
    };
    let bytes = number * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= usize::MAX as f64 {
        return Err(format!("`{text}` is not a size this machine can hold"));
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_read_with_their_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("64 kb"), Ok(64 << 10));
        for bad in ["", "G", "-1G", "0", "2X", "1e400", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
