//! `hayate logits`: the engine's entry point for correctness checks.

use crate::common::ModelArgs;
use crate::run::parse_token_list;
use anyhow::{Context, Result, bail};
use clap::Args;
use hayate_engine::{KvFormat, Logits};
use safetensors::{Dtype, tensor::TensorView};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids, e.g. 1,5,17.
    #[arg(long, value_name = "IDS")]
    tokens: String,
    /// Output file: one f32 tensor `logits` of shape [tokens, vocab].
    #[arg(long, value_name = "FILE.safetensors")]
    out: PathBuf,
    /// Feed one token at a time through the KV cache.
    #[arg(long, conflicts_with = "chunk")]
    incremental: bool,
    /// Prefill in chunks of N tokens through the KV cache.
    #[arg(long, value_name = "N")]
    chunk: Option<usize>,
}

pub fn run(args: LogitsArgs) -> Result<()> {
    let tokens = parse_token_list(&args.tokens)?;
    if tokens.is_empty() {
        bail!("--tokens is empty");
    }
    if args.chunk == Some(0) {
        bail!("--chunk must be at least 1");
    }
    let model = args.model.load()?;
    let vocab = model.info.vocab;
    if tokens.len() > model.info.max_positions {
        bail!(
            "{} tokens exceed the model's context of {} (max_position_embeddings)",
            tokens.len(),
            model.info.max_positions
        );
    }
    let context = args.model.ctx_size.unwrap_or(tokens.len());
    if context < tokens.len() {
        bail!(
            "--ctx-size {context} is smaller than the {} tokens",
            tokens.len()
        );
    }
    let mut state =
        model.new_state_with(&args.model.state_options(Some(context), KvFormat::F32))?;
    let mut logits = Vec::new();
    let values = tokens.len().checked_mul(vocab);
    if values.is_none_or(|n| logits.try_reserve_exact(n).is_err()) {
        bail!(
            "the logits of {} tokens ({} x {vocab} values) do not fit in memory",
            tokens.len(),
            tokens.len()
        );
    }
    let step = if args.incremental {
        1
    } else {
        args.chunk.unwrap_or(tokens.len())
    };
    let mut piece_logits = Vec::new();
    for piece in tokens.chunks(step) {
        model.forward(&mut state, piece, Logits::All(&mut piece_logits))?;
        logits.extend_from_slice(&piece_logits);
    }
    write_logits(&args.out, &logits, tokens.len(), vocab)
}

/// Writes the tensor to a temporary file beside `out`, then renames it, so
/// an interrupted run never leaves a half-written file.
fn write_logits(out: &Path, logits: &[f32], n: usize, vocab: usize) -> Result<()> {
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![n, vocab], &bytes)?;
    let data = safetensors::serialize([("logits", view)], None)?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = out
        .file_name()
        .context("--out must name a file")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&data).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, out));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", out.display()));
    }
    Ok(())
}
