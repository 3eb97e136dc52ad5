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

use crate::common::{FormatArg, ModelArgs};
use anyhow::{Context, Result, bail};
use clap::Args;
use hayate_chat::TextTokenizer;
use hayate_engine::{KvFormat, LoadOptions, Logits, Model};
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
    /// Text file to score, tokenized whole with the model's tokenizer.
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Input tokens per window; each window starts from an empty context.
    #[arg(long, value_name = "N", default_value_t = 512)]
    context: usize,
    /// Keep only the first N tokens of the data.
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
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
    /// Mean negative log-likelihood per scored token, nats.
    model_nll: f64,
    model_ppl: f64,
    model_bits_per_weight: f64,
    /// How the model's attention cache stores keys and values (the
    /// reference's is always f32).
    model_kv_cache: String,
    reference_nll: Option<f64>,
    reference_ppl: Option<f64>,
    reference_bits_per_weight: Option<f64>,
    /// KL(reference || model) per position, nats.
    kl_mean: Option<f64>,
    kl_median: Option<f64>,
    kl_p99: Option<f64>,
    kl_max: Option<f64>,
    /// Share of positions where both models' most likely next token is the same.
    top1_agreement: Option<f64>,
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
}

/// Scores one position from the model's logits `q`, the reference's `p`
/// if any, and the token that came next.
fn score(q: &[f32], p: Option<&[f32]>, target: u32) -> Scored {
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
    vocab: usize,
    threads: usize,
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
    let text = std::fs::read_to_string(&args.data)
        .with_context(|| format!("cannot read the data file {}", args.data.display()))?;
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
    let start = Instant::now();
    let tokenizer = TextTokenizer::load(&args.model.model)?;
    let mut tokens = tokenizer.encode(&text, false)?;
    tracing::info!(
        "tokenized {} bytes into {} tokens in {:.0} ms",
        text.len(),
        tokens.len(),
        start.elapsed().as_secs_f64() * 1e3
    );
    if let Some(n) = args.max_tokens {
        tokens.truncate(n);
    }
    if tokens.len() < 2 {
        let cut = match args.max_tokens {
            Some(n) => format!(" (kept by --max-tokens {n})"),
            None => String::new(),
        };
        bail!(
            "{} has {} token(s){cut}; scoring needs at least 2",
            args.data.display(),
            tokens.len()
        );
    }

    let inputs = &tokens[..tokens.len() - 1];
    let targets = &tokens[1..];
    let windows = inputs.len().div_ceil(args.context);
    let capacity = args.context.min(inputs.len());
    let vocab = model.info.vocab;
    let options = args.model.state_options(Some(capacity), KvFormat::Bf16);
    let mut state = model.new_state_with(&options)?;
    // The reference keeps exact (f32) keys and values: what the model's
    // own cache format costs shows in the KL.
    let mut reference_state = reference
        .as_ref()
        .map(|r| r.new_state(Some(capacity)))
        .transpose()?;
    let (mut model_logits, mut reference_logits) = (Vec::new(), Vec::new());
    let mut scored = Vec::with_capacity(capacity);
    // Summed in position order, whatever the thread count.
    let (mut n_scored, mut model_nll, mut reference_nll, mut agree) = (0, 0.0, 0.0, 0);
    let mut kl = Vec::with_capacity(if reference.is_some() {
        targets.len()
    } else {
        0
    });

    let bar = progress_bar(windows as u64)?;
    let start = Instant::now();
    for (input, target) in inputs
        .chunks(args.context)
        .zip(targets.chunks(args.context))
    {
        state.clear();
        model.forward(&mut state, input, Logits::All(&mut model_logits))?;
        if let (Some(r), Some(r_state)) = (&reference, &mut reference_state) {
            r_state.clear();
            r.forward(r_state, input, Logits::All(&mut reference_logits))?;
        }
        score_window(
            &model_logits,
            reference.is_some().then_some(&reference_logits[..]),
            target,
            vocab,
            model.n_threads(),
            &mut scored,
        );
        for s in &scored {
            model_nll += s.model_nll;
            reference_nll += s.reference_nll;
            agree += usize::from(s.top1_agrees);
        }
        if reference.is_some() {
            kl.extend(scored.iter().map(|s| s.kl));
        }
        n_scored += target.len();
        bar.set_message(format!("ppl {:.3}", (model_nll / n_scored as f64).exp()));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();

    let n = n_scored as f64;
    kl.sort_unstable_by(f64::total_cmp);
    let has_reference = reference.is_some();
    let kl_stat = |f: &dyn Fn(&[f64]) -> f64| has_reference.then(|| f(&kl));
    let report = Report {
        model: args.model.model.display().to_string(),
        reference: args.reference.as_ref().map(|r| r.display().to_string()),
        data: args.data.display().to_string(),
        context: args.context,
        windows,
        tokens_scored: n_scored,
        model_nll: model_nll / n,
        model_ppl: (model_nll / n).exp(),
        model_bits_per_weight: model.info.bits_per_weight(),
        model_kv_cache: options.kv_cache.name().to_owned(),
        reference_nll: has_reference.then(|| reference_nll / n),
        reference_ppl: has_reference.then(|| (reference_nll / n).exp()),
        reference_bits_per_weight: reference.as_ref().map(|r| r.info.bits_per_weight()),
        kl_mean: kl_stat(&|k| k.iter().sum::<f64>() / n),
        kl_median: kl_stat(&|k| quantile(k, 0.5)),
        kl_p99: kl_stat(&|k| quantile(k, 0.99)),
        kl_max: kl_stat(&|k| k[k.len() - 1]),
        top1_agreement: has_reference.then(|| agree as f64 / n),
        threads: model.n_threads(),
        seconds,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// A bar on stderr advancing per window; hidden when stderr is not a terminal.
fn progress_bar(windows: u64) -> Result<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return Ok(ProgressBar::hidden());
    }
    let bar = ProgressBar::new(windows);
    bar.set_style(
        ProgressStyle::with_template("eval [{wide_bar}] {pos}/{len} windows, eta {eta}, {msg}")?
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
            vec![format!(
                "{} in {} windows of up to {} tokens",
                r.tokens_scored, r.windows, r.context
            )],
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
    }
    print_aligned(&rows);
}
