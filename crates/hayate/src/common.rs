//! Options and helpers shared by the commands.

use anyhow::{Context, Result, bail};
use clap::Args;
use clap::ValueEnum;
use hayate_chat::TextTokenizer;
use hayate_engine::calibrate::Objective;
use hayate_engine::refine::Refinement;
use hayate_engine::{
    Calibration, EmbeddingFormat, KvFormat, LoadOptions, Model, QuantSpec, SamplingParams,
    StateOptions,
};
use hayate_kernels::{ActPrecision, QuantFormat};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Which model to load and how to run it.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model directory as published on Hugging Face (config.json, *.safetensors, tokenizer.json, ...).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Threads for the kernels (default: one per core; more than the cores
    /// are capped). `bench` takes a comma list and measures each.
    #[arg(long, value_name = "N", value_delimiter = ',', default_value = "0")]
    pub threads: Vec<usize>,
    /// Context length in tokens (default: the model's maximum, at most 4096).
    #[arg(long, value_name = "N")]
    pub ctx_size: Option<usize>,
    /// Quantize the float weights in memory at load.
    #[arg(long, value_name = "FORMAT")]
    pub quantize: Option<FormatArg>,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// How activations enter products with quantized weights (f32: for accuracy checks).
    #[arg(long, value_name = "P", default_value = "int8")]
    pub activations: ActivationsArg,
    /// How the attention cache stores keys and values (default: bf16; f32 for `logits`).
    #[arg(long, value_name = "F")]
    pub kv_cache: Option<KvCacheArg>,
}

impl ModelArgs {
    /// State options for these arguments: the context, and the KV cache
    /// format (`default` unless `--kv-cache` says otherwise).
    pub fn state_options(&self, context: Option<usize>, default: KvFormat) -> StateOptions {
        StateOptions {
            context,
            kv_cache: self.kv_cache.map_or(default, KvCacheArg::format),
            ..StateOptions::default()
        }
    }
}

/// A KV cache format on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCacheArg {
    /// f32 keys and values: exactly what the projections computed.
    F32,
    /// bf16 keys and values: half the memory and half the bytes read per token.
    Bf16,
    /// int8 keys and values with a scale per position and head: about a quarter of f32's bytes.
    Q8,
}

impl KvCacheArg {
    /// The engine's format.
    pub fn format(self) -> KvFormat {
        match self {
            KvCacheArg::F32 => KvFormat::F32,
            KvCacheArg::Bf16 => KvFormat::Bf16,
            KvCacheArg::Q8 => KvFormat::Q8,
        }
    }
}

/// A quantized format on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatArg {
    /// 4-bit asymmetric codes, 4-bit zero points, bf16 scales.
    Q4,
    /// 8-bit symmetric codes, bf16 scales.
    Q8,
}

impl FormatArg {
    /// The kernels' format.
    pub fn format(self) -> QuantFormat {
        match self {
            FormatArg::Q4 => QuantFormat::Q4,
            FormatArg::Q8 => QuantFormat::Q8,
        }
    }
}

/// Embedding table and output head precision on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbeddingsArg {
    /// Keep them as stored.
    Bf16,
    /// Quantize them to q8.
    Q8,
}

/// Activation precision on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivationsArg {
    /// int8 per block of 32, integer dot products.
    Int8,
    /// f32.
    F32,
}

/// How to quantize (with `--quantize` or `hayate quantize`).
#[derive(Args, Clone, Debug)]
pub struct QuantArgs {
    /// Inputs per quantization group: 32, 64 or 128.
    #[arg(long, value_name = "G", default_value_t = 32)]
    pub group_size: usize,
    /// Quantize without the block Hadamard rotation (for comparisons).
    #[arg(long)]
    pub no_rotation: bool,
    /// Embedding table and output head: kept as stored, or q8.
    #[arg(long, value_name = "E", default_value = "bf16")]
    pub embeddings: EmbeddingsArg,
    /// Seed of the rotation signs.
    #[arg(long, value_name = "S", default_value_t = hayate_engine::quantize::DEFAULT_SEED)]
    pub rotation_seed: u64,
    /// Calibrate on this text: GPTQ (Hessian-aware rounding) against the
    /// inputs each layer sees on it, layer after layer.
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// Calibration tokens used at most (from the start of the file).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 65536,
        requires = "calibration"
    )]
    pub calibration_tokens: usize,
    /// Tokens per calibration window; each window starts from an empty context.
    #[arg(
        long,
        value_name = "C",
        default_value_t = 512,
        requires = "calibration"
    )]
    pub calibration_context: usize,
    /// Dampening of the calibration Hessians, a share of their mean diagonal.
    #[arg(long, value_name = "D", default_value_t = Calibration::DEFAULT_DAMP, requires = "calibration")]
    pub calibration_damp: f64,
    /// What each calibrated layer reproduces: the float model's outputs of
    /// that layer (`float`, correcting the drift of earlier layers), or the
    /// float layer's on the quantized model's inputs (`layer`, GPTQ as
    /// published); `auto`: `float` for q4, `layer` for q8 (as measured).
    #[arg(
        long,
        value_name = "O",
        default_value = "auto",
        requires = "calibration"
    )]
    pub calibration_objective: ObjectiveArg,
    /// After GPTQ, tune the group scales end to end (codes and zero points
    /// fixed) for this many steps, one calibration window each, toward the
    /// float model's next-token distributions (KL); 0: off.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "calibration")]
    pub refine_steps: usize,
    /// Adam's step size of the refinement, on each scale's relative change.
    #[arg(long, value_name = "LR", default_value_t = Refinement::DEFAULT_LR, requires = "calibration")]
    pub refine_lr: f32,
}

/// A calibration objective on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectiveArg {
    /// `float` for q4, `layer` for q8.
    Auto,
    /// The float model's outputs of each layer.
    Float,
    /// The float layer's outputs on the quantized model's inputs (GPTQ as published).
    Layer,
}

impl ObjectiveArg {
    /// The engine's objective for quantizing to `format`. q8's inputs drift
    /// too little from the float model's for the drift to be worth
    /// estimating: toward the float model, q8 came out worse than
    /// round-to-nearest on some fixtures, and only 3% better on pystd.
    pub fn objective(self, format: QuantFormat) -> Objective {
        match (self, format) {
            (ObjectiveArg::Float, _) | (ObjectiveArg::Auto, QuantFormat::Q4) => Objective::Float,
            (ObjectiveArg::Layer, _) | (ObjectiveArg::Auto, QuantFormat::Q8) => Objective::Layer,
        }
    }
}

impl QuantArgs {
    /// The calibration tokens `--calibration` asks for, tokenized with the
    /// tokenizer of the model in `model_dir`, for quantizing to `format`.
    pub fn calibration(&self, model_dir: &Path, format: FormatArg) -> Result<Option<Calibration>> {
        let Some(path) = &self.calibration else {
            return Ok(None);
        };
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read the calibration file {}", path.display()))?;
        if bytes.is_empty() {
            bail!("the calibration file {} is empty", path.display());
        }
        if bytes.contains(&0) {
            bail!(
                "the calibration file {} holds NUL bytes: it looks binary, not text",
                path.display()
            );
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "the calibration file {} is not UTF-8 text (invalid byte at offset {})",
                path.display(),
                e.utf8_error().valid_up_to()
            )
        })?;
        let tokenizer = TextTokenizer::load(model_dir).with_context(|| {
            format!(
                "calibration tokenizes with the model's tokenizer, which {} lacks",
                model_dir.display()
            )
        })?;
        let tokens = tokenizer.encode(&text, false)?;
        let calibration = Calibration::new(
            &tokens,
            (self.calibration_context, self.calibration_tokens),
            self.calibration_damp,
            self.calibration_objective.objective(format.format()),
        )
        .with_context(|| format!("cannot calibrate on {}", path.display()))?;
        let calibration = match self.refine_steps {
            0 => calibration,
            steps => calibration.with_refinement(Refinement {
                steps,
                lr: self.refine_lr,
            })?,
        };
        tracing::info!(
            "calibrating on {} tokens of {} ({} windows of {})",
            calibration.tokens(),
            path.display(),
            calibration.tokens() / calibration.context(),
            calibration.context()
        );
        Ok(Some(calibration))
    }

    /// The engine's description of the quantization.
    pub fn spec(&self, format: FormatArg) -> QuantSpec {
        QuantSpec {
            format: format.format(),
            group_size: self.group_size,
            rotation: !self.no_rotation,
            seed: self.rotation_seed,
            embeddings: match self.embeddings {
                EmbeddingsArg::Bf16 => EmbeddingFormat::Keep,
                EmbeddingsArg::Q8 => EmbeddingFormat::Q8,
            },
        }
    }
}

impl ModelArgs {
    /// The one thread count these arguments give (a list is for `bench`).
    fn threads(&self) -> Result<usize> {
        match self.threads[..] {
            [n] => Ok(n),
            _ => anyhow::bail!(
                "--threads takes one number here (comma lists are for bench), not {:?}",
                self.threads
            ),
        }
    }

    /// The engine's load options these arguments ask for.
    pub fn load_options(&self) -> Result<LoadOptions> {
        self.load_options_with(self.threads()?)
    }

    /// [`Self::load_options`] with `threads` kernel threads.
    pub fn load_options_with(&self, threads: usize) -> Result<LoadOptions> {
        let calibration = match self.quantize {
            Some(format) => self.quant.calibration(&self.model, format)?,
            None if self.quant.calibration.is_some() => {
                bail!("--calibration calibrates --quantize; give a format to quantize to")
            }
            None => None,
        };
        Ok(LoadOptions {
            threads,
            quantize: self.quantize.map(|f| self.quant.spec(f)),
            activations: match self.activations {
                ActivationsArg::Int8 => ActPrecision::Int8,
                ActivationsArg::F32 => ActPrecision::F32,
            },
            calibration: calibration.map(Arc::new),
        })
    }

    /// Loads the model, reporting the time taken at info level.
    pub fn load(&self) -> Result<Model> {
        self.load_with(self.threads()?)
    }

    /// [`Self::load`] with `threads` kernel threads.
    pub fn load_with(&self, threads: usize) -> Result<Model> {
        let start = Instant::now();
        let model = Model::load(&self.model, &self.load_options_with(threads)?)
            .with_context(|| format!("cannot load the model in {}", self.model.display()))?;
        if let Some(report) = &model.quantization {
            tracing::info!(
                "quantized {} matrices in memory ({} kept as stored, {} with a smaller group or no rotation)",
                report.quantized.len(),
                report.kept.len(),
                report.adapted.len()
            );
        }
        tracing::info!(
            "loaded {} ({} layers, {:.1} M params, {:.2} bits/weight) in {:.0} ms; {} threads, {} kernels, {} activations in quantized products",
            model.info.model_type,
            model.info.n_layers,
            model.info.n_params as f64 / 1e6,
            model.info.bits_per_weight(),
            start.elapsed().as_secs_f64() * 1e3,
            model.n_threads(),
            model.isa().name(),
            model.activations().name()
        );
        Ok(model)
    }
}

/// Sampling options; unset ones come from the model's generation_config.json.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy (default: the model's, greedy if it does not sample).
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold (1: off).
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than P times the most likely (0: off).
    #[arg(long, value_name = "P")]
    pub min_p: Option<f32>,
    /// Penalty for tokens already in the sequence (1: off).
    #[arg(long, value_name = "R")]
    pub repeat_penalty: Option<f32>,
    /// Seed of the sampling noise (default: from the clock; printed with the stats).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The parameters in force, as `transformers` would pick them: the
    /// model's defaults when it samples, greedy when it does not.
    pub fn resolve(&self, model: &Model) -> Result<SamplingParams> {
        let g = &model.generation;
        let samples = g.do_sample.unwrap_or(false);
        let model_temperature = if samples {
            g.temperature.unwrap_or(1.0)
        } else {
            0.0
        };
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(model_temperature),
            top_k: self
                .top_k
                .unwrap_or(if samples { g.top_k.unwrap_or(50) } else { 0 }),
            top_p: self
                .top_p
                .unwrap_or(if samples { g.top_p.unwrap_or(1.0) } else { 1.0 }),
            min_p: self
                .min_p
                .unwrap_or(if samples { g.min_p.unwrap_or(0.0) } else { 0.0 }),
            repetition_penalty: self
                .repeat_penalty
                .unwrap_or(g.repetition_penalty.unwrap_or(1.0)),
            seed,
            ..SamplingParams::default()
        };
        params.validate().map_err(anyhow::Error::msg)?;
        Ok(params)
    }
}

/// Peak resident memory of this process in bytes (Linux; 0 elsewhere).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The ids that end a reply: the model's eos ids, plus, for chat, the end
/// of an assistant turn as the tokenizer and template declare it.
pub fn stop_ids(model: &Model, tokenizer: Option<&hayate_chat::TextTokenizer>) -> Vec<u32> {
    let mut ids = model.eos_ids();
    for id in tokenizer.map(|t| t.end_of_turn_ids()).unwrap_or_default() {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}
