//! `hayate eval`: a model's perplexity on a text file and, against a
//! reference model, how far its next-token distributions are from the
//! reference's (KL divergence, top-1 agreement).
//!
//! The method is the one `../shared/models/README.md` describes: tokenize the
//! whole file without special tokens, cut the token stream into consecutive
//! windows of `--context` input tokens, each with a fresh context (no BOS, no
//! overlap), and score every token but the first. Window `k` feeds inputs
//! `t[kC..kC+C]` and scores targets `t[kC+1..kC+C+1]`, so the last input of a
//! window predicts the first input of the next and no token goes unscored.
//!
//! With `--teacher-generate N` the reference writes the text scored: each
//! window takes `C - N + 1` tokens of the data as a prompt, the reference
//! samples `N` tokens after it, and the `N` positions that predict them are
//! scored (the KL on answers the unquantized model wrote, as Mirai measures it).

use crate::common::{FormatArg, ModelArgs};
use anyhow::{Context, Result, bail};
use clap::Args;
use hayate_chat::TextTokenizer;
use hayate_engine::{
    InferenceState, KvFormat, LoadOptions, Logits, Model, Sampler, SamplingParams,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of `hayate eval`.
#[derive(Args)]
// `--ctx-size` comes with the shared model options but has no meaning here:
// `--context` sets the window length. Hidden from the help, refused if given.
#[command(mut_arg("ctx_size", |a| a.hide(true)))]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Reference model directory: also report its perplexity, the KL
    /// divergence KL(reference || model) and the top-1 agreement.
    #[arg(long, value_name = "DIR")]
    reference: Option<PathBuf>,
    /// Quantize the reference in memory too (with the same group size,
    /// rotation and embedding options as the model).
    #[arg(long, value_name = "FORMAT", requires = "reference")]
    reference_quantize: Option<FormatArg>,
    /// Text file to score, tokenized whole with the model's tokenizer;
    /// repeat for several files, each scored and reported on its own.
    #[arg(long, value_name = "FILE", required = true)]
    data: Vec<PathBuf>,
    /// Input tokens per window; each window starts from an empty context.
    #[arg(long, value_name = "N", default_value_t = 512)]
    context: usize,
    /// Keep only the first N tokens of each data file.
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,
    /// Score the reference's own continuations: each window's last N
    /// inputs are sampled by the reference after a prompt from the data, and
    /// only the N positions predicting them are scored.
    #[arg(long, value_name = "N", requires = "reference")]
    teacher_generate: Option<usize>,
    /// Temperature of the reference's continuations (0: greedy).
    #[arg(
        long,
        value_name = "T",
        default_value_t = 1.0,
        requires = "teacher_generate"
    )]
    teacher_temperature: f32,
    /// Seed of the noise the reference samples its continuations with.
    #[arg(
        long,
        value_name = "S",
        default_value_t = 0,
        requires = "teacher_generate"
    )]
    teacher_seed: u64,
    /// Temperatures to measure the total-variation distance between the
    /// two models' next-token distributions at (with --reference; at most
    /// 4): TV bounds how often a draft's sample equals the model's.
    #[arg(
        long,
        value_name = "T",
        value_delimiter = ',',
        default_value = "1",
        requires = "reference"
    )]
    tv_temperature: Vec<f32>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Most `--tv-temperature` values.
const MAX_TV: usize = 4;

/// Total-variation distance at one temperature, and the acceptance it
/// bounds for a draft (the reference) proposing to the model.
#[derive(Serialize)]
struct TvReport {
    temperature: f32,
    /// Mean over positions of TV = ½ Σ |p_i − q_i|.
    mean: f64,
    /// Mean of (1 − TV) / (1 + TV): the acceptance per drafted token that
    /// shared-noise (Gumbel) coupling guarantees at least.
    shared_noise_bound: f64,
    /// Mean of 1 − TV: what rejection sampling accepts.
    rejection_sampling: f64,
}

/// What `--json` prints; the field names are stable.
#[derive(Serialize)]
struct Report {
    model: String,
    reference: Option<String>,
    data: String,
    context: usize,
    windows: usize,
    tokens_scored: usize,
    /// Tokens the reference wrote per window (`--teacher-generate`); the
    /// scored positions are those predicting them.
    teacher_generate: Option<usize>,
    teacher_temperature: Option<f32>,
    teacher_seed: Option<u64>,
    /// Mean negative log-likelihood per scored token, nats.
    model_nll: f64,
    model_ppl: f64,
    model_bits_per_weight: f64,
    /// Bits per weight of the blocks' linear layers alone (embedding,
    /// output head and norms excluded): what the quantization format costs.
    model_linear_bits_per_weight: f64,
    /// How the model's attention cache stores keys and values (the
    /// reference's is always f32).
    model_kv_cache: String,
    reference_nll: Option<f64>,
    reference_ppl: Option<f64>,
    reference_bits_per_weight: Option<f64>,
    reference_linear_bits_per_weight: Option<f64>,
    /// KL(reference || model) per position, nats.
    kl_mean: Option<f64>,
    kl_median: Option<f64>,
    kl_p99: Option<f64>,
    kl_max: Option<f64>,
    /// Share of positions where both models' most likely next token is the same.
    top1_agreement: Option<f64>,
    /// Total-variation distances, per `--tv-temperature`.
    tv: Vec<TvReport>,
    threads: usize,
    /// Wall time of the scoring loop (tokenization and loading excluded).
    seconds: f64,
}

/// Loads the reference model the way `ModelArgs::load` loads the model, with
/// the same threads and activations, quantized when `quantize` is given.
fn load_reference(dir: &Path, args: &ModelArgs, quantize: Option<FormatArg>) -> Result<Model> {
    let options = LoadOptions {
        quantize: quantize.map(|f| args.quant.spec(f)),
        ..args.load_options()?
    };
    Model::load(dir, &options)
        .with_context(|| format!("cannot load the reference model in {}", dir.display()))
}

/// Statistics of one logit row, computed in f64.
struct Row {
    /// log Σ exp(logits): the log-softmax of token `i` is `logits[i] - lse`.
    lse: f64,
    /// Index of the largest logit (the first one on ties, as the sampler's argmax).
    argmax: usize,
}

/// Largest logit and its index.
fn max_index(logits: &[f32]) -> (f32, usize) {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    (logits[best], best)
}

/// Log-softmax normaliser and argmax of one row.
fn row(logits: &[f32]) -> Row {
    let (max, argmax) = max_index(logits);
    let max = f64::from(max);
    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    Row {
        lse: max + sum.ln(),
        argmax,
    }
}

/// Rows of the reference (`p`) and the model (`q`) at one position, and
/// KL(p || q) = Σ p_i (log p_i - log q_i) in nats.
///
/// One pass with two exponentials per entry: with `e_i = exp(p_i - max p)`,
/// Σ p_i (log p_i - log q_i) = Σ e_i (p_i - q_i) / Σ e_i - (lse_p - lse_q).
/// Identical rows give exactly 0.
fn compare(p: &[f32], q: &[f32]) -> (Row, Row, f64) {
    let (p_max, p_arg) = max_index(p);
    let (q_max, q_arg) = max_index(q);
    let (p_max, q_max) = (f64::from(p_max), f64::from(q_max));
    let (mut p_sum, mut q_sum, mut weighted) = (0.0f64, 0.0f64, 0.0f64);
    for (&pi, &qi) in p.iter().zip(q) {
        let (pi, qi) = (f64::from(pi), f64::from(qi));
        let e = (pi - p_max).exp();
        p_sum += e;
        q_sum += (qi - q_max).exp();
        weighted += e * (pi - qi);
    }
    let p_row = Row {
        lse: p_max + p_sum.ln(),
        argmax: p_arg,
    };
    let q_row = Row {
        lse: q_max + q_sum.ln(),
        argmax: q_arg,
    };
    let kl = weighted / p_sum - (p_row.lse - q_row.lse);
    // Rounding can leave a tiny negative value where the rows nearly agree;
    // the divergence itself is never negative.
    (p_row, q_row, kl.max(0.0))
}

/// The `q` quantile of sorted values, interpolating linearly between the
/// closest ranks (numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// The scores of one position.
#[derive(Clone, Copy, Default)]
struct Scored {
    model_nll: f64,
    reference_nll: f64,
    /// KL(reference || model), nats.
    kl: f64,
    top1_agrees: bool,
    /// TV distance per `--tv-temperature`.
    tv: [f64; MAX_TV],
}

/// ½ Σ |softmax(p/t) − softmax(q/t)|.
fn total_variation(p: &[f32], q: &[f32], t: f32) -> f64 {
    let inv = 1.0 / f64::from(t);
    let lse = |v: &[f32]| {
        let max = f64::from(max_index(v).0) * inv;
        max + v
            .iter()
            .map(|&x| (f64::from(x) * inv - max).exp())
            .sum::<f64>()
            .ln()
    };
    let (lp, lq) = (lse(p), lse(q));
    let sum: f64 = p
        .iter()
        .zip(q)
        .map(|(&a, &b)| ((f64::from(a) * inv - lp).exp() - (f64::from(b) * inv - lq).exp()).abs())
        .sum();
    0.5 * sum
}

/// Scores one position from the model's logits `q`, the reference's `p`
/// if any, and the token that came next.
fn score(q: &[f32], p: Option<&[f32]>, target: u32, tv_at: &[f32]) -> Scored {
    let t = target as usize;
    match p {
        None => Scored {
            model_nll: row(q).lse - f64::from(q[t]),
            ..Scored::default()
        },
        Some(p) => {
            let (p_row, q_row, kl) = compare(p, q);
            Scored {
                model_nll: q_row.lse - f64::from(q[t]),
                reference_nll: p_row.lse - f64::from(p[t]),
                kl,
                top1_agrees: p_row.argmax == q_row.argmax,
                tv: std::array::from_fn(|i| {
                    tv_at.get(i).map_or(0.0, |&t| total_variation(p, q, t))
                }),
            }
        }
    }
}

/// Scores the positions of one window into `out`, split over `threads`
/// threads: the f64 softmaxes cost about a tenth of the forward passes, and
/// the kernels' threads are idle meanwhile.
fn score_window(
    model_logits: &[f32],
    reference_logits: Option<&[f32]>,
    targets: &[u32],
    (vocab, threads): (usize, usize),
    tv_at: &[f32],
    out: &mut Vec<Scored>,
) {
    out.clear();
    out.resize(targets.len(), Scored::default());
    let per_thread = targets.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        for (i, slots) in out.chunks_mut(per_thread).enumerate() {
            let first = i * per_thread;
            scope.spawn(move || {
                for (position, slot) in (first..).zip(slots) {
                    let at = position * vocab..(position + 1) * vocab;
                    *slot = score(
                        &model_logits[at.clone()],
                        reference_logits.map(|r| &r[at]),
                        targets[position],
                        tv_at,
                    );
                }
            });
        }
    });
}

/// Runs `hayate eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    if args.model.ctx_size.is_some() {
        bail!("--ctx-size does not apply to eval; --context N sets the window length");
    }
    if args.context == 0 {
        bail!("--context must be at least 1");
    }
    if args.tv_temperature.len() > MAX_TV {
        bail!("--tv-temperature takes at most {MAX_TV} temperatures");
    }
    if let Some(t) = args
        .tv_temperature
        .iter()
        .find(|t| !(**t > 0.0 && t.is_finite()))
    {
        bail!("--tv-temperature must be > 0, not {t}");
    }
    if let Some(n) = args.teacher_generate
        && !(1..args.context).contains(&n)
    {
        bail!(
            "--teacher-generate {n}: the reference must write at least 1 token and leave at least 1 of the --context {} for the prompt",
            args.context
        );
    }
    if !(args.teacher_temperature >= 0.0 && args.teacher_temperature.is_finite()) {
        bail!(
            "--teacher-temperature must be >= 0, not {}",
            args.teacher_temperature
        );
    }
    // Every file is read before the models load, so a wrong path fails fast.
    let texts = args
        .data
        .iter()
        .map(|path| {
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the data file {}", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let model = args.model.load()?;
    let reference = args
        .reference
        .as_deref()
        .map(|dir| load_reference(dir, &args.model, args.reference_quantize))
        .transpose()?;
    for (what, m) in
        std::iter::once(("model", &model)).chain(reference.iter().map(|r| ("reference", r)))
    {
        if args.context > m.info.max_positions {
            bail!(
                "--context {} exceeds the {what}'s context of {} (max_position_embeddings)",
                args.context,
                m.info.max_positions
            );
        }
    }
    if let Some(r) = &reference
        && r.info.vocab != model.info.vocab
    {
        bail!(
            "the reference's vocabulary has {} tokens but the model's has {}: they must share a tokenizer",
            r.info.vocab,
            model.info.vocab
        );
    }

    let tokenizer_path = args.model.model.join("tokenizer.json");
    if !tokenizer_path.exists() {
        bail!(
            "{}: not found; eval tokenizes the data with the model's tokenizer",
            tokenizer_path.display()
        );
    }
    let tokenizer = TextTokenizer::load(&args.model.model)?;
    let models = Models {
        model: &model,
        reference: reference.as_ref(),
    };
    let mut reports = Vec::with_capacity(texts.len());
    for (path, text) in args.data.iter().zip(&texts) {
        let start = Instant::now();
        let mut tokens = tokenizer.encode(text, false)?;
        tracing::info!(
            "{}: tokenized {} bytes into {} tokens in {:.0} ms",
            path.display(),
            text.len(),
            tokens.len(),
            start.elapsed().as_secs_f64() * 1e3
        );
        if let Some(n) = args.max_tokens {
            tokens.truncate(n);
        }
        reports.push(evaluate(&args, &models, path, &tokens)?);
    }
    if args.json {
        // One object for one file, an array of them for several.
        match &reports[..] {
            [one] => println!("{}", serde_json::to_string_pretty(one)?),
            all => println!("{}", serde_json::to_string_pretty(all)?),
        }
    } else {
        for (i, report) in reports.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print_table(report);
        }
    }
    Ok(())
}

/// The model evaluated and the reference it is compared with.
struct Models<'a> {
    model: &'a Model,
    reference: Option<&'a Model>,
}

/// The windows of one data file: the inputs each model runs and which of
/// their positions are scored, against which targets.
struct Window {
    inputs: Vec<u32>,
    /// Position of the first scored input.
    first_scored: usize,
    /// The token each scored position predicts.
    targets: Vec<u32>,
}

/// Cuts `tokens` into the windows of the plain method: consecutive inputs,
/// each scored against the token after it.
fn data_windows(tokens: &[u32], context: usize) -> Vec<Window> {
    let inputs = &tokens[..tokens.len() - 1];
    let targets = &tokens[1..];
    inputs
        .chunks(context)
        .zip(targets.chunks(context))
        .map(|(input, target)| Window {
            inputs: input.to_vec(),
            first_scored: 0,
            targets: target.to_vec(),
        })
        .collect()
}

/// Scores one data file.
fn evaluate(args: &EvalArgs, models: &Models<'_>, path: &Path, tokens: &[u32]) -> Result<Report> {
    let cut = || match args.max_tokens {
        Some(n) => format!(" (kept by --max-tokens {n})"),
        None => String::new(),
    };
    let prompt_len = args.teacher_generate.map(|n| args.context - n + 1);
    let needed = prompt_len.unwrap_or(2);
    if tokens.len() < needed {
        bail!(
            "{} has {} token(s){}; scoring needs at least {needed}",
            path.display(),
            tokens.len(),
            cut()
        );
    }
    let model = models.model;
    let vocab = model.info.vocab;
    let capacity = match args.teacher_generate {
        Some(_) => args.context,
        None => args.context.min(tokens.len() - 1),
    };
    let options = args.model.state_options(Some(capacity), KvFormat::Bf16);
    let mut state = model.new_state_with(&options)?;
    // The reference keeps exact (f32) keys and values: what the model's
    // own cache format costs shows in the KL.
    let mut reference_state = models
        .reference
        .map(|r| r.new_state(Some(capacity)))
        .transpose()?;
    let has_reference = models.reference.is_some();
    let (mut model_logits, mut reference_logits) = (Vec::new(), Vec::new());
    let mut scored = Vec::with_capacity(capacity);
    // Summed in position order, whatever the thread count.
    let (mut n_scored, mut model_nll, mut reference_nll, mut agree) = (0, 0.0, 0.0, 0);
    let mut kl = Vec::new();
    // Per `--tv-temperature`: Σ TV and Σ (1 - TV) / (1 + TV).
    let mut tv_sums = [(0.0f64, 0.0f64); MAX_TV];

    let start = Instant::now();
    let windows = match (prompt_len, models.reference, &mut reference_state) {
        (Some(prompt_len), Some(teacher), Some(teacher_state)) => {
            let n = args.context - prompt_len + 1;
            let params = SamplingParams {
                temperature: args.teacher_temperature,
                seed: args.teacher_seed,
                ..SamplingParams::default()
            };
            let mut sampler = Sampler::new(params, vocab);
            let prompts: Vec<&[u32]> = tokens.chunks_exact(prompt_len).collect();
            let bar = progress_bar(prompts.len() as u64, "writing continuations")?;
            let windows = prompts
                .iter()
                .map(|prompt| {
                    let written = continue_prompt(teacher, teacher_state, &mut sampler, prompt, n)?;
                    bar.inc(1);
                    let mut inputs = prompt.to_vec();
                    inputs.extend_from_slice(&written[..n - 1]);
                    Ok(Window {
                        inputs,
                        first_scored: prompt_len - 1,
                        targets: written,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            bar.finish_and_clear();
            windows
        }
        _ => data_windows(tokens, args.context),
    };
    if has_reference {
        kl.reserve(windows.iter().map(|w| w.targets.len()).sum());
    }
    let bar = progress_bar(windows.len() as u64, "windows")?;
    for window in &windows {
        state.clear();
        model.forward(&mut state, &window.inputs, Logits::All(&mut model_logits))?;
        if let (Some(r), Some(r_state)) = (models.reference, &mut reference_state) {
            r_state.clear();
            r.forward(r_state, &window.inputs, Logits::All(&mut reference_logits))?;
        }
        let from = window.first_scored * vocab;
        score_window(
            &model_logits[from..],
            has_reference.then(|| &reference_logits[from..]),
            &window.targets,
            (vocab, model.n_threads()),
            &args.tv_temperature,
            &mut scored,
        );
        for s in &scored {
            model_nll += s.model_nll;
            reference_nll += s.reference_nll;
            agree += usize::from(s.top1_agrees);
            for (sums, &tv) in tv_sums.iter_mut().zip(&s.tv) {
                sums.0 += tv;
                sums.1 += (1.0 - tv) / (1.0 + tv);
            }
        }
        if has_reference {
            kl.extend(scored.iter().map(|s| s.kl));
        }
        n_scored += window.targets.len();
        bar.set_message(format!("ppl {:.3}", (model_nll / n_scored as f64).exp()));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();

    let n = n_scored as f64;
    kl.sort_unstable_by(f64::total_cmp);
    let kl_stat = |f: &dyn Fn(&[f64]) -> f64| has_reference.then(|| f(&kl));
    let teacher = args.teacher_generate.is_some();
    Ok(Report {
        model: args.model.model.display().to_string(),
        reference: args.reference.as_ref().map(|r| r.display().to_string()),
        data: path.display().to_string(),
        context: args.context,
        windows: windows.len(),
        tokens_scored: n_scored,
        teacher_generate: args.teacher_generate,
        teacher_temperature: teacher.then_some(args.teacher_temperature),
        teacher_seed: teacher.then_some(args.teacher_seed),
        model_nll: model_nll / n,
        model_ppl: (model_nll / n).exp(),
        model_bits_per_weight: model.info.bits_per_weight(),
        model_linear_bits_per_weight: model.info.linear_bits_per_weight(),
        model_kv_cache: options.kv_cache.name().to_owned(),
        reference_nll: has_reference.then(|| reference_nll / n),
        reference_ppl: has_reference.then(|| (reference_nll / n).exp()),
        reference_bits_per_weight: models.reference.map(|r| r.info.bits_per_weight()),
        reference_linear_bits_per_weight: models.reference.map(|r| r.info.linear_bits_per_weight()),
        kl_mean: kl_stat(&|k| k.iter().sum::<f64>() / n),
        kl_median: kl_stat(&|k| quantile(k, 0.5)),
        kl_p99: kl_stat(&|k| quantile(k, 0.99)),
        kl_max: kl_stat(&|k| k[k.len() - 1]),
        top1_agreement: has_reference.then(|| agree as f64 / n),
        tv: if has_reference {
            args.tv_temperature
                .iter()
                .zip(tv_sums)
                .map(|(&temperature, (tv, bound))| TvReport {
                    temperature,
                    mean: tv / n,
                    shared_noise_bound: bound / n,
                    rejection_sampling: 1.0 - tv / n,
                })
                .collect()
        } else {
            Vec::new()
        },
        threads: model.n_threads(),
        seconds,
    })
}

/// The `n` tokens `teacher` samples after `prompt`, from an empty context.
/// Stop tokens are not special: the continuation always has `n` tokens.
fn continue_prompt(
    teacher: &Model,
    state: &mut InferenceState,
    sampler: &mut Sampler,
    prompt: &[u32],
    n: usize,
) -> Result<Vec<u32>> {
    state.clear();
    let mut sequence = prompt.to_vec();
    let mut logits = teacher.forward(state, prompt, Logits::Last)?.to_vec();
    for _ in 0..n {
        let token = sampler.sample(&mut logits, sequence.len(), &sequence);
        sequence.push(token);
        if sequence.len() == prompt.len() + n {
            break;
        }
        logits.copy_from_slice(teacher.forward(state, &[token], Logits::Last)?);
    }
    Ok(sequence.split_off(prompt.len()))
}

/// A bar on stderr advancing per item (`what`); hidden when stderr is not a terminal.
fn progress_bar(items: u64, what: &str) -> Result<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return Ok(ProgressBar::hidden());
    }
    let bar = ProgressBar::new(items);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "eval [{{wide_bar}}] {{pos}}/{{len}} {what}, eta {{eta}}, {{msg}}"
        ))?
        .progress_chars("=> "),
    );
    Ok(bar)
}

/// Prints rows of cells with every column padded to its widest cell. The
/// last cell of a row runs on: it is not padded and sets no width, so a long
/// note or heading does not push the other columns apart.
fn print_aligned(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter(|r| c + 1 < r.len())
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, &w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// The report as an aligned table: one column per model, then the divergence.
fn print_table(r: &Report) {
    let row = |label: &str, cells: Vec<String>| -> Vec<String> {
        std::iter::once(label.to_owned()).chain(cells).collect()
    };
    let both = |m: String, reference: Option<String>| -> Vec<String> {
        std::iter::once(m).chain(reference).collect()
    };
    let mut rows = vec![
        row("data", vec![r.data.clone()]),
        row(
            "tokens scored",
            vec![match r.teacher_generate {
                None => format!(
                    "{} in {} windows of up to {} tokens",
                    r.tokens_scored, r.windows, r.context
                ),
                Some(n) => format!(
                    "{} in {} windows of {} tokens, the last {n} written by the reference \
                     (temperature {}, seed {})",
                    r.tokens_scored,
                    r.windows,
                    r.context,
                    r.teacher_temperature.unwrap_or_default(),
                    r.teacher_seed.unwrap_or_default()
                ),
            }],
        ),
        row(
            "time",
            vec![format!(
                "{:.1} s ({:.0} tok/s, {} threads)",
                r.seconds,
                r.tokens_scored as f64 / r.seconds,
                r.threads
            )],
        ),
        vec![],
        row(
            "",
            both(
                "model".into(),
                r.reference.as_ref().map(|_| "reference".into()),
            ),
        ),
        row("dir", both(r.model.clone(), r.reference.clone())),
        row(
            "bits/weight",
            both(
                format!("{:.2}", r.model_bits_per_weight),
                r.reference_bits_per_weight.map(|b| format!("{b:.2}")),
            ),
        ),
        row(
            "linear bits/weight",
            both(
                format!("{:.3}", r.model_linear_bits_per_weight),
                r.reference_linear_bits_per_weight
                    .map(|b| format!("{b:.3}")),
            ),
        ),
        row(
            "KV cache",
            both(
                r.model_kv_cache.clone(),
                r.reference.as_ref().map(|_| "f32".into()),
            ),
        ),
        row(
            "perplexity",
            both(
                format!("{:.4}", r.model_ppl),
                r.reference_ppl.map(|p| format!("{p:.4}")),
            ),
        ),
        row(
            "NLL, nats/token",
            both(
                format!("{:.5}", r.model_nll),
                r.reference_nll.map(|p| format!("{p:.5}")),
            ),
        ),
    ];
    if let (Some(mean), Some(median), Some(p99), Some(max), Some(top1)) =
        (r.kl_mean, r.kl_median, r.kl_p99, r.kl_max, r.top1_agreement)
    {
        rows.extend([
            vec![],
            row("KL(reference || model), nats/token", vec![]),
            row("  mean", vec![format!("{mean:.6}")]),
            row("  median", vec![format!("{median:.6}")]),
            row("  p99", vec![format!("{p99:.6}")]),
            row("  max", vec![format!("{max:.6}")]),
            row("top-1 agreement", vec![format!("{top1:.4}")]),
        ]);
        for tv in &r.tv {
            rows.extend([
                vec![],
                row(
                    &format!("total variation at T = {}", tv.temperature),
                    vec![],
                ),
                row("  mean TV", vec![format!("{:.4}", tv.mean)]),
                row(
                    "  mean (1 - TV) / (1 + TV)",
                    vec![format!("{:.4}", tv.shared_noise_bound)],
                ),
                row(
                    "  mean 1 - TV",
                    vec![format!("{:.4}", tv.rejection_sampling)],
                ),
            ]);
        }
    }
    print_aligned(&rows);
}
