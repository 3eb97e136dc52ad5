//! `hayate bench`: prompt-processing and generation speed, like llama-bench.

use crate::common::{ModelArgs, SamplingArgs, mib, peak_rss_bytes};
use crate::speculation::{SpeculationArgs, tokens_per_pass};
use anyhow::{Context, Result, bail};
use clap::Args;
use hayate_chat::TextTokenizer;
use hayate_engine::sampler::argmax;
use hayate_engine::speculate::SpeculationStats;
use hayate_engine::{
    EngineError, Generator, InferenceState, KvFormat, Logits, Model, Sampler, StateOptions,
};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens to process (0 skips the test); a comma list runs one
    /// test per value.
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_name = "N",
        value_delimiter = ',',
        default_value = "512"
    )]
    n_prompt: Vec<usize>,
    /// Tokens to generate (0 skips the test); a comma list runs one test per value.
    #[arg(
        short = 'n',
        long = "n-gen",
        value_name = "N",
        value_delimiter = ',',
        default_value = "128"
    )]
    n_gen: Vec<usize>,
    /// Tokens of context already in the cache when each test starts (not
    /// timed), like llama-bench's `-d`: decode and prefill at depth. A
    /// comma list runs every test at each depth.
    #[arg(
        short = 'd',
        long = "depth",
        value_name = "N",
        value_delimiter = ',',
        default_value = "0"
    )]
    depth: Vec<usize>,
    /// Repetitions of each test.
    #[arg(
        short = 'r',
        long = "repetitions",
        value_name = "N",
        default_value_t = 5
    )]
    repetitions: usize,
    /// Also time exact passes over K tokens (what speculative verification
    /// runs: the last token and K - 1 drafted ones) against one-token passes
    /// at each depth; a comma list runs one test per K.
    #[arg(long, value_name = "K", value_delimiter = ',')]
    verify: Vec<usize>,
    /// Acceptance rates per drafted token to project speculative speedups
    /// at, from the --verify timings (a comma list).
    #[arg(
        long,
        value_name = "A",
        value_delimiter = ',',
        default_value = "0.5,0.7,0.9",
        requires = "verify"
    )]
    acceptance: Vec<f64>,
    /// Speculative generation (with `--draft` or `--speculate`): -n tokens
    /// generated plainly and speculatively from the same prompt, in
    /// alternation, with the speedup, acceptance and tokens per pass.
    #[command(flatten)]
    speculation: SpeculationArgs,
    /// Text whose first -p tokens prompt the speculative test (default:
    /// pseudo-random tokens, which give a speculator little to go by).
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also measure the memory read bandwidth with the same threads, and
    /// report decode speed as a share of the ceiling it implies.
    #[arg(long)]
    bandwidth: bool,
}

/// Most repetitions of a test.
const MAX_REPETITIONS: usize = 1000;

/// Most tokens a `--verify` pass takes.
const MAX_VERIFY: usize = 64;

/// Passes per `--verify` repetition.
const VERIFY_PASSES: usize = 32;

/// A `--verify` measurement: a K-token exact pass against a one-token one.
#[derive(Serialize)]
struct Verify {
    threads: usize,
    depth: usize,
    tokens: usize,
    /// Median seconds of a pass over `tokens` tokens.
    pass_s: f64,
    /// Median seconds of a one-token pass.
    one_token_s: f64,
    /// `pass_s / one_token_s`.
    cost_ratio: f64,
    /// Per acceptance rate: the speedup over plain decoding if `tokens - 1`
    /// drafted tokens cost nothing to draft (n-gram lookup).
    projected: Vec<Projection>,
}

/// A speculative generation test against plain generation.
#[derive(Serialize)]
struct Speculative {
    speculator: String,
    temperature: f32,
    seed: u64,
    prompt_tokens: usize,
    tokens: usize,
    /// Median decode speed of plain generation.
    plain_tok_s: f64,
    /// Median decode speed with speculation.
    speculative_tok_s: f64,
    /// Median of the per-repetition speed ratios.
    speedup: f64,
    drafted: usize,
    accepted: usize,
    acceptance: f64,
    tokens_per_pass: f64,
    tree_passes: usize,
}

/// A projected speculative speedup.
#[derive(Serialize)]
struct Projection {
    acceptance: f64,
    tokens_per_pass: f64,
    speedup: f64,
}

#[derive(Serialize)]
struct Rate {
    test: String,
    threads: usize,
    depth: usize,
    tokens: usize,
    mean_tok_s: f64,
    stddev_tok_s: f64,
    samples_tok_s: Vec<f64>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    model_type: String,
    params: usize,
    size_bytes: usize,
    bits_per_weight: f64,
    bytes_per_token: usize,
    /// The thread counts measured, in order.
    threads: Vec<usize>,
    kernels: String,
    /// How the attention cache stores keys and values.
    kv_cache: String,
    results: Vec<Rate>,
    /// `--verify` measurements.
    verify: Vec<Verify>,
    /// The speculative generation test.
    speculative: Option<Speculative>,
    /// Measured memory read bandwidth (with --bandwidth).
    read_bandwidth_bytes_s: Option<f64>,
    /// Decode tok/s the bandwidth allows: bandwidth / bytes per token.
    decode_ceiling_tok_s: Option<f64>,
    /// Per thread count measured, the cost of dispatching work.
    dispatch: Vec<Dispatch>,
    peak_rss_bytes: u64,
}

/// What dispatching work to the pool costs with `threads` threads.
#[derive(Serialize)]
struct Dispatch {
    threads: usize,
    /// Kernel jobs (thread-pool dispatches) one decoded token takes.
    jobs_per_token: Option<f64>,
    /// Time of one empty job on the pool: the fixed cost of a dispatch.
    empty_job_us: f64,
}

fn summarise(test: String, threads: usize, depth: usize, tokens: usize, seconds: &[f64]) -> Rate {
    let samples: Vec<f64> = seconds.iter().map(|s| tokens as f64 / s).collect();
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    let var = if samples.len() > 1 {
        samples.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (samples.len() - 1) as f64
    } else {
        0.0
    };
    Rate {
        test,
        threads,
        depth,
        tokens,
        mean_tok_s: mean,
        stddev_tok_s: var.sqrt(),
        samples_tok_s: samples,
    }
}

/// Deterministic pseudo-random token ids (speed does not depend on them).
fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

/// A state holding `depth` tokens of context, the one in `slot` where it
/// can be cleared or rolled back to that, else a fresh one prefilled
/// (untimed).
fn state_at_depth<'a>(
    model: &Model,
    options: &StateOptions,
    depth: usize,
    slot: &'a mut Option<InferenceState>,
) -> Result<&'a mut InferenceState> {
    match slot {
        Some(state) if depth == 0 => state.clear(),
        Some(state) if state.can_truncate(depth) => state.truncate(depth)?,
        _ => {
            let mut state = model.new_state_with(options)?;
            if depth > 0 {
                model.forward(&mut state, &tokens(depth, model.info.vocab), Logits::None)?;
            }
            *slot = Some(state);
        }
    }
    Ok(slot.as_mut().expect("set above"))
}

fn time_prompt(model: &Model, state: &mut InferenceState, n: usize) -> Result<f64> {
    let prompt = tokens(n, model.info.vocab);
    let start = Instant::now();
    model.forward(state, &prompt, Logits::Last)?;
    Ok(start.elapsed().as_secs_f64())
}

/// Median seconds of an exact pass over `n` tokens after `state`'s
/// context, over [`VERIFY_PASSES`] passes each rolled back.
fn time_exact_pass(model: &Model, state: &mut InferenceState, n: usize) -> Result<f64> {
    let depth = state.len();
    let input = tokens(n, model.info.vocab);
    let mut logits = Vec::new();
    let mut times = Vec::with_capacity(VERIFY_PASSES);
    for _ in 0..VERIFY_PASSES {
        let start = Instant::now();
        model.forward_exact(state, &input, Logits::All(&mut logits))?;
        times.push(start.elapsed().as_secs_f64());
        state.truncate(depth)?;
    }
    Ok(median(&mut times))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn time_generation(model: &Model, state: &mut InferenceState, n: usize) -> Result<f64> {
    let mut token = tokens(1, model.info.vocab)[0];
    let start = Instant::now();
    for _ in 0..n {
        token = argmax(model.forward(state, &[token], Logits::Last)?);
    }
    Ok(start.elapsed().as_secs_f64())
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !(1..=MAX_REPETITIONS).contains(&args.repetitions) {
        bail!(
            "--repetitions is {}: it must be between 1 and {MAX_REPETITIONS}",
            args.repetitions
        );
    }
    let prompts: Vec<usize> = args.n_prompt.iter().copied().filter(|&n| n > 0).collect();
    let gens: Vec<usize> = args.n_gen.iter().copied().filter(|&n| n > 0).collect();
    if prompts.is_empty() && gens.is_empty() && args.verify.is_empty() {
        bail!("nothing to measure: -p (prompt tokens) and -n (generated tokens) are both 0");
    }
    if let Some(k) = args
        .verify
        .iter()
        .find(|&&k| !(1..=MAX_VERIFY).contains(&k))
    {
        bail!("--verify takes passes of 1 to {MAX_VERIFY} tokens, not {k}");
    }
    if let Some(a) = args.acceptance.iter().find(|a| !(0.0..1.0).contains(*a)) {
        bail!("--acceptance takes rates in [0, 1), not {a}");
    }
    let speculating = args.speculation.speculate.is_some() || args.speculation.draft.is_some();
    if speculating && gens.is_empty() {
        bail!("speculative generation needs tokens to generate: -n must not be 0");
    }
    let mut verify = Vec::new();
    let mut results = Vec::new();
    let mut dispatch = Vec::new();
    let mut first: Option<(Model, StateOptions)> = None;
    for &threads in &args.model.threads {
        let model = args.model.load_with(threads)?;
        let longest = prompts
            .iter()
            .chain(&gens)
            .chain(&args.verify)
            .copied()
            .max()
            .unwrap_or(1);
        let deepest = args.depth.iter().copied().max().unwrap_or(0);
        let needed = deepest.checked_add(longest);
        let ctx = args.model.ctx_size.or(needed).unwrap_or(usize::MAX);
        if needed.is_none_or(|n| n > ctx) || ctx > model.info.max_positions {
            bail!(
                "the tests need {} tokens of context ({deepest} of depth + {longest}); the model allows {}",
                deepest.saturating_add(longest),
                model.info.max_positions
            );
        }
        let mut options = args.model.state_options(Some(ctx), KvFormat::Bf16);
        // A verification pass is rolled back after it is timed.
        options.rollback = options
            .rollback
            .max(args.verify.iter().copied().max().unwrap_or(0));
        let pool = model.pool();
        // Warm up: fault in the weights and the state's buffers once; the
        // tests reuse that state wherever it can be brought to their depth.
        let mut slot = None;
        let warm_prompt = prompts.first().map_or(1, |&p| p.clamp(1, 16));
        time_prompt(
            &model,
            state_at_depth(&model, &options, 0, &mut slot)?,
            warm_prompt,
        )?;
        let (jobs_before, warm_tokens) = (pool.jobs_run(), gens.first().map_or(0, |&n| n.min(4)));
        time_generation(
            &model,
            state_at_depth(&model, &options, 0, &mut slot)?,
            warm_tokens,
        )?;
        dispatch.push(Dispatch {
            threads: model.n_threads(),
            jobs_per_token: (warm_tokens > 0)
                .then(|| (pool.jobs_run() - jobs_before) as f64 / warm_tokens as f64),
            empty_job_us: empty_job_seconds(&pool) * 1e6,
        });
        for &depth in &args.depth {
            let name = |test: String| match depth {
                0 => test,
                d => format!("{test} @ d{d}"),
            };
            let tests = prompts
                .iter()
                .map(|&p| (true, p))
                .chain(gens.iter().map(|&n| (false, n)));
            for (prompt, n) in tests {
                let secs = (0..args.repetitions)
                    .map(|_| {
                        let state = state_at_depth(&model, &options, depth, &mut slot)?;
                        if prompt {
                            time_prompt(&model, state, n)
                        } else {
                            time_generation(&model, state, n)
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                let test = name(format!("{}{n}", if prompt { "pp" } else { "tg" }));
                results.push(summarise(test, model.n_threads(), depth, n, &secs));
            }
            for &k in &args.verify {
                // One-token and K-token passes interleaved, medians of all.
                let (mut one, mut many) = (Vec::new(), Vec::new());
                for _ in 0..args.repetitions {
                    let state = state_at_depth(&model, &options, depth, &mut slot)?;
                    one.push(time_exact_pass(&model, state, 1)?);
                    many.push(time_exact_pass(&model, state, k)?);
                }
                let (one, many) = (median(&mut one), median(&mut many));
                let projected = args
                    .acceptance
                    .iter()
                    .map(|&a| {
                        let tokens = (1.0 - a.powi(k as i32)) / (1.0 - a);
                        Projection {
                            acceptance: a,
                            tokens_per_pass: tokens,
                            speedup: tokens * one / many,
                        }
                    })
                    .collect();
                verify.push(Verify {
                    threads: model.n_threads(),
                    depth,
                    tokens: k,
                    pass_s: many,
                    one_token_s: one,
                    cost_ratio: many / one,
                    projected,
                });
            }
        }
        first.get_or_insert((model, options));
    }
    let (model, options) = first.expect("--threads has at least one value");
    let speculative = match speculating {
        true => bench_speculation(&args, &model, prompts.first().copied(), gens[0])?,
        false => None,
    };
    // Before the bandwidth probe, whose buffer is not the model's.
    let peak_rss = peak_rss_bytes();
    let bandwidth = args
        .bandwidth
        .then(|| hayate_kernels::bandwidth::read_bandwidth(&model.pool(), model.isa(), 1 << 30, 5));
    let report = Report {
        model: args.model.model.display().to_string(),
        model_type: model.info.model_type.clone(),
        params: model.info.n_params,
        size_bytes: model.info.weight_bytes,
        bits_per_weight: model.info.bits_per_weight(),
        bytes_per_token: model.info.bytes_per_token,
        threads: dispatch.iter().map(|d| d.threads).collect(),
        kernels: model.isa().name().to_owned(),
        kv_cache: options.kv_cache.name().to_owned(),
        results,
        verify,
        speculative,
        read_bandwidth_bytes_s: bandwidth,
        decode_ceiling_tok_s: bandwidth.map(|b| b / model.info.bytes_per_token as f64),
        dispatch,
        peak_rss_bytes: peak_rss,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "| model | size | params | bpw | threads | kernels | kv | test | t/s |\n|---|---|---|---|---|---|---|---|---|"
    );
    for r in &report.results {
        println!(
            "| {} | {} | {:.1} M | {:.2} | {} | {} | {} | {} | {:.2} ± {:.2} |",
            report.model_type,
            mib(report.size_bytes as u64),
            report.params as f64 / 1e6,
            report.bits_per_weight,
            r.threads,
            report.kernels,
            report.kv_cache,
            r.test,
            r.mean_tok_s,
            r.stddev_tok_s
        );
    }
    // Decode figures: the first generation test of each thread count.
    for d in &report.dispatch {
        let Some(tg) = report
            .results
            .iter()
            .find(|r| r.threads == d.threads && r.test.starts_with("tg"))
        else {
            continue;
        };
        println!(
            "\n{} threads, {}: decode reads {} per token: {:.1} GB/s of weights at {:.2} tok/s",
            d.threads,
            tg.test,
            mib(report.bytes_per_token as u64),
            tg.mean_tok_s * report.bytes_per_token as f64 / 1e9,
            tg.mean_tok_s
        );
        if let (Some(bw), Some(ceiling), true) = (
            report.read_bandwidth_bytes_s,
            report.decode_ceiling_tok_s,
            d.threads == report.threads[0],
        ) {
            let share = tg.mean_tok_s / ceiling;
            let verdict = if share <= 1.0 {
                format!("decode reaches {:.0}% of it", 100.0 * share)
            } else {
                format!(
                    "decode is {share:.1}x faster, so the weights are read from cache and the memory ceiling does not apply"
                )
            };
            println!(
                "memory reads at {:.1} GB/s ({} threads): ceiling {ceiling:.2} tok/s; {verdict}",
                bw / 1e9,
                d.threads
            );
        }
        if let Some(jobs) = d.jobs_per_token {
            let share = jobs * d.empty_job_us * 1e-6 * tg.mean_tok_s;
            println!(
                "kernel jobs: {jobs:.0} per decoded token, {:.1} µs each when empty: {:.1}% of a token's time",
                d.empty_job_us,
                100.0 * share
            );
        }
    }
    for v in &report.verify {
        let projected: Vec<String> = v
            .projected
            .iter()
            .map(|p| {
                format!(
                    "{:.0}%: {:.2} tok/pass, {:.2}x",
                    100.0 * p.acceptance,
                    p.tokens_per_pass,
                    p.speedup
                )
            })
            .collect();
        println!(
            "\n{} threads, depth {}: an exact pass over {} tokens takes {:.3} ms, {:.2}x a one-token pass ({:.3} ms); projected speedup with {} drafted tokens at acceptance {}",
            v.threads,
            v.depth,
            v.tokens,
            v.pass_s * 1e3,
            v.cost_ratio,
            v.one_token_s * 1e3,
            v.tokens - 1,
            projected.join(" | ")
        );
    }
    if let Some(s) = &report.speculative {
        let trees = match s.tree_passes {
            0 => String::new(),
            n => format!(", {n} trees"),
        };
        println!(
            "\nspeculative generation ({}, T = {}, seed {}): {} tokens after a {}-token prompt at {:.2} tok/s against {:.2} plainly, {:.2}x (median of {} runs); {} drafted, {} accepted ({:.0}%), {:.2} tok/pass{trees}; the same tokens",
            s.speculator,
            s.temperature,
            s.seed,
            s.tokens,
            s.prompt_tokens,
            s.speculative_tok_s,
            s.plain_tok_s,
            s.speedup,
            args.repetitions,
            s.drafted,
            s.accepted,
            100.0 * s.acceptance,
            s.tokens_per_pass
        );
    }
    println!("peak RSS {}", mib(report.peak_rss_bytes));
    Ok(())
}

/// Generates `n` tokens plainly and speculatively from one prompt (the
/// first `prompt_len` tokens of `--prompt-file`, or pseudo-random ones),
/// alternating which goes first, and checks they agree.
fn bench_speculation(
    args: &BenchArgs,
    model: &Model,
    prompt_len: Option<usize>,
    n: usize,
) -> Result<Option<Speculative>> {
    let prompt_len = prompt_len.unwrap_or(512);
    let tokenizer = match (&args.prompt_file, &args.speculation.draft) {
        (None, None) => None,
        _ => Some(TextTokenizer::load(&args.model.model)?),
    };
    let prompt = match &args.prompt_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the prompt file {}", path.display()))?;
            let mut ids = tokenizer
                .as_ref()
                .expect("loaded above")
                .encode(&text, true)?;
            ids.truncate(prompt_len);
            ids
        }
        None => tokens(prompt_len, model.info.vocab),
    };
    if prompt.is_empty() {
        bail!("the speculative test's prompt encodes to no tokens");
    }
    let params = args.sampling.resolve(model)?;
    let draft = args
        .speculation
        .load_draft(&args.model, tokenizer.as_ref())?;
    let needed = prompt.len() + n + 1;
    let ctx = args.model.ctx_size.unwrap_or(needed);
    if needed > ctx || ctx > model.info.max_positions {
        bail!(
            "the speculative test needs {needed} tokens of context ({} of prompt + {n}); the context allows {}",
            prompt.len(),
            ctx.min(model.info.max_positions)
        );
    }
    let options = args
        .speculation
        .state_options(model, args.model.state_options(Some(ctx), KvFormat::Bf16))?;
    let Some(mut speculation) = args
        .speculation
        .build(model, draft.as_ref(), &params, &options)?
    else {
        return Ok(None);
    };
    let generate = |speculation: Option<&mut hayate_engine::speculate::Speculation<'_>>| -> Result<(Vec<u32>, f64, Option<SpeculationStats>)> {
        let mut generator = Generator::new(model, &options)?;
        generator.set_prompt(&prompt)?;
        let mut sampler = Sampler::new(params.clone(), model.info.vocab);
        let mut out = Vec::with_capacity(n);
        let stats = generator.generate_with(&mut sampler, speculation, n, &[], |t| {
            out.push(t);
            Ok::<_, EngineError>(true)
        })?;
        Ok((out, stats.decode_rate(), stats.speculation))
    };
    // Warm up both, untimed.
    generate(None)?;
    generate(Some(&mut speculation))?;
    let (mut plain, mut fast, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut total = SpeculationStats::default();
    let mut generated = 0;
    for rep in 0..args.repetitions {
        let first_plain = rep % 2 == 0;
        let a = if first_plain {
            Some(generate(None)?)
        } else {
            None
        };
        let (got, rate, stats) = generate(Some(&mut speculation))?;
        let (want, plain_rate, _) = match a {
            Some(a) => a,
            None => generate(None)?,
        };
        if got != want {
            bail!(
                "speculative generation gave other tokens than plain generation: a bug, please report it"
            );
        }
        let stats = stats.expect("a speculative run has speculation statistics");
        total.drafted += stats.drafted;
        total.accepted += stats.accepted;
        total.passes += stats.passes + 1;
        total.tree_passes += stats.tree_passes;
        generated += got.len();
        plain.push(plain_rate);
        fast.push(rate);
        ratios.push(rate / plain_rate);
    }
    // `tokens_per_pass` counts each run's prefill pass itself.
    total.passes -= 1;
    Ok(Some(Speculative {
        speculator: speculation.name().to_owned(),
        temperature: params.temperature,
        seed: params.seed,
        prompt_tokens: prompt.len(),
        tokens: n,
        plain_tok_s: median(&mut plain),
        speculative_tok_s: median(&mut fast),
        speedup: median(&mut ratios),
        drafted: total.drafted,
        accepted: total.accepted,
        acceptance: total.acceptance(),
        tokens_per_pass: tokens_per_pass(&total, generated),
        tree_passes: total.tree_passes,
    }))
}

/// Mean time of an empty job on `pool`, back to back (the workers stay awake
/// between them, as they do between the jobs of one token).
fn empty_job_seconds(pool: &hayate_kernels::ThreadPool) -> f64 {
    const JOBS: u32 = 2000;
    pool.run(&|_, _| {});
    let start = Instant::now();
    for _ in 0..JOBS {
        pool.run(&|_, _| {});
    }
    start.elapsed().as_secs_f64() / f64::from(JOBS)
}
