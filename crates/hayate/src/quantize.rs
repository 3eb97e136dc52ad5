//! `hayate quantize`: writes a quantized copy of a model directory.
//!
//! The copy is assembled in a temporary sibling directory and renamed into
//! place only when complete; `config.json` is written last, so an
//! interrupted run never leaves a directory that loads.

use crate::common::{FormatArg, QuantArgs, mib};
use anyhow::{Context, Result, bail};
use clap::Args;
use hayate_engine::{LoadOptions, Model};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct QuantizeArgs {
    /// Model directory with float weights (as published on Hugging Face).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Format of the linear layers.
    #[arg(long, value_name = "FORMAT")]
    format: FormatArg,
    #[command(flatten)]
    quant: QuantArgs,
    /// Output directory (a model directory that loads like any other).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Replace the output directory if it exists.
    #[arg(long)]
    force: bool,
    /// Threads (default: one per core).
    #[arg(long, value_name = "N", default_value_t = 0)]
    threads: usize,
}

/// Removes the temporary directory unless the run completed.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let spec = args.quant.spec(args.format);
    spec.validate()?;
    if args.out.exists() && !args.force {
        bail!(
            "{} already exists (use --force to replace it)",
            args.out.display()
        );
    }
    let source = args
        .model
        .canonicalize()
        .with_context(|| format!("cannot read {}", args.model.display()))?;
    if args.out.canonicalize().ok().as_deref() == Some(source.as_path()) {
        bail!("--out must differ from --model");
    }
    let start = Instant::now();
    let calibration = args.quant.calibration(&args.model, args.format)?;
    let mut model = Model::load(
        &args.model,
        &LoadOptions {
            threads: args.threads,
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("cannot load the model in {}", args.model.display()))?;

    let name = args
        .out
        .file_name()
        .with_context(|| format!("{} is not a directory name", args.out.display()))?;
    let parent = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut guard = TempDir(Some(tmp.clone()));

    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("quantize [{wide_bar}] {pos}/{len} matrices, eta {eta}")?
                .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let report = model
        .write_quantized(
            &spec,
            calibration.as_ref(),
            &tmp.join("model.safetensors"),
            &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        )
        .context("cannot write the quantized weights")?;
    bar.finish_and_clear();

    copy_side_files(&args.model, &tmp)?;
    // config.json last: until it exists the directory does not load.
    let config_path = args.model.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let object = config
        .as_object_mut()
        .context("config.json is not a JSON object")?;
    object.insert(
        "quantization".into(),
        spec.config_section(&report.quantized, calibration.as_ref()),
    );
    let written = tmp.join("config.json");
    std::fs::write(&written, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("cannot write {}", written.display()))?;

    if args.out.exists() {
        std::fs::remove_dir_all(&args.out)
            .with_context(|| format!("cannot replace {}", args.out.display()))?;
    }
    std::fs::rename(&tmp, &args.out)
        .with_context(|| format!("cannot move the result to {}", args.out.display()))?;
    guard.0 = None;

    let quantized = Model::load(&args.out, &LoadOptions::default())
        .with_context(|| format!("the written model in {} does not load", args.out.display()))?;
    for name in &report.kept {
        eprintln!("kept as stored (no group of 32 fits): {name}");
    }
    for name in &report.adapted {
        eprintln!("smaller group or no rotation (shape): {name}");
    }
    let calibrated = match &calibration {
        Some(c) => format!(", calibrated on {} tokens", c.tokens()),
        None => String::new(),
    };
    println!(
        "wrote {} ({}, group {}, {}, embeddings {}{calibrated}): {} matrices quantized in {:.1} s",
        args.out.display(),
        spec.format.name(),
        spec.group_size,
        if spec.rotation {
            "rotated"
        } else {
            "not rotated"
        },
        spec.embeddings.name(),
        report.quantized.len(),
        start.elapsed().as_secs_f64()
    );
    println!(
        "weights {} -> {}; {:.2} -> {:.2} bits per weight",
        mib(model.info.weight_bytes as u64),
        mib(quantized.info.weight_bytes as u64),
        model.info.bits_per_weight(),
        quantized.info.bits_per_weight()
    );
    Ok(())
}

/// Copies the tokenizer, generation config and other side files (not the
/// weights, not config.json).
fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        let text = name.to_string_lossy();
        let skip = text == "config.json"
            || text.ends_with(".safetensors")
            || text == "model.safetensors.index.json";
        if skip || !entry.file_type()?.is_file() {
            continue;
        }
        std::fs::copy(entry.path(), to.join(&name))
            .with_context(|| format!("cannot copy {}", entry.path().display()))?;
    }
    Ok(())
}
