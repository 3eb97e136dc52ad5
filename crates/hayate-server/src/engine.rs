//! The engine thread: it owns the model, takes requests from a bounded
//! queue and streams each reply back as events.
//!
//! Requests run together under continuous batching
//! ([`hayate_engine::Batcher`]): each takes one of a fixed number of
//! sequence slots, joins the batch at the next step and leaves it when it
//! ends or its client goes; slots keep their sequences between requests,
//! so a request that continues an earlier conversation prefills only what
//! is new. With speculative decoding, requests run one at a time through
//! one generator, and one speculation serves them all (a draft model keeps
//! its own cache, the suffix speculator its counts).

use crate::metrics::Metrics;
use hayate_chat::StreamDecoder;
use hayate_chat::TextTokenizer;
use hayate_chat::grammar::Constraint;
use hayate_chat::stop::StopMatcher;
use hayate_engine::speculate::Speculation;
use hayate_engine::{
    BatchRequest, Batcher, GenerationStats, Generator, Model, Rules, Sampler, SamplingParams,
    SlotEvent, StateOptions, StopReason, TokenConstraint,
};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// One request for the engine.
pub struct Job {
    /// The prompt's token ids (fits the context, checked by the caller).
    pub prompt: Vec<u32>,
    /// How to sample.
    pub params: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop strings (none empty).
    pub stops: Vec<String>,
    /// Log-probabilities to report per token: `None`, or the number of
    /// alternatives beside the chosen token.
    pub logprobs: Option<usize>,
    /// The grammar the reply must follow (`response_format`, `grammar`).
    pub constraint: Option<Constraint>,
    /// Special tokens the reply's text keeps (markers it is split by).
    pub shown: Vec<u32>,
    /// Where the reply goes; when the receiver is gone (the client left),
    /// generation stops.
    pub events: UnboundedSender<Event>,
}

/// A token's log-probability and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its natural-log probability.
    pub logprob: f32,
    /// The most likely tokens at its position, best first: text and logprob.
    pub top: Vec<(String, f32)>,
}

/// Why a reply ended, as OpenAI's `finish_reason` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens`, or the context is full.
    Length,
}

impl Finish {
    /// OpenAI's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the engine sends back for a job.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// Generated text, with the log-probabilities of the tokens it completes
    /// (when asked for).
    Text {
        /// The text (never part of a stop string).
        text: String,
        /// One entry per token, when log-probabilities were asked for.
        logprobs: Vec<TokenLogprob>,
    },
    /// The end of the reply.
    Done {
        /// Why it ended.
        finish: Finish,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Tokens generated.
        completion_tokens: usize,
        /// Prompt tokens that were already in the cache (not prefilled).
        cached_tokens: usize,
        /// Prefill and decode times, as llama.cpp's server reports them.
        timings: Timings,
    },
    /// The engine failed on this request.
    Failed(String),
}

/// How long a reply took (llama.cpp's `timings` object).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// Prompt tokens prefilled.
    pub prompt_n: usize,
    /// Milliseconds to prefill them.
    pub prompt_ms: f64,
    /// Tokens decoded after the first.
    pub predicted_n: usize,
    /// Milliseconds to decode them.
    pub predicted_ms: f64,
    /// Tokens drafted and accepted, with speculative decoding.
    pub draft: Option<(usize, usize)>,
}

impl Timings {
    /// The JSON object, with rates per second.
    pub fn json(&self) -> serde_json::Value {
        let rate = |n: usize, ms: f64| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
        let mut timings = serde_json::json!({
            "prompt_n": self.prompt_n,
            "prompt_ms": self.prompt_ms,
            "prompt_per_second": rate(self.prompt_n, self.prompt_ms),
            "predicted_n": self.predicted_n,
            "predicted_ms": self.predicted_ms,
            "predicted_per_second": rate(self.predicted_n, self.predicted_ms),
        });
        if let Some((drafted, accepted)) = self.draft {
            timings["draft_n"] = drafted.into();
            timings["draft_n_accepted"] = accepted.into();
        }
        timings
    }
}

/// What the HTTP side knows of the engine.
pub struct EngineHandle {
    /// The queue of jobs.
    queue: SyncSender<Job>,
    /// Jobs queued or running.
    pub pending: Arc<AtomicUsize>,
    /// Most jobs queued or running at once: the sequences and the queue.
    limit: usize,
    /// What `/metrics` reports (tokens, latencies), over all requests.
    pub metrics: Arc<Metrics>,
    /// Tokens one sequence holds: the context, or less where the KV memory
    /// holds less.
    pub capacity: usize,
    /// Token ids the model knows.
    pub vocab: usize,
    /// The model's tokenizer and template.
    pub tokenizer: Arc<TextTokenizer>,
    /// Ids that end a reply.
    pub stop_ids: Vec<u32>,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full.
    Full,
    /// The engine thread has ended.
    Gone,
}

impl EngineHandle {
    /// Queues `job` without waiting.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if self.pending.fetch_add(1, Ordering::SeqCst) >= self.limit {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Full);
        }
        self.queue.try_send(job).map_err(|e| {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            match e {
                TrySendError::Full(_) => SubmitError::Full,
                TrySendError::Disconnected(_) => SubmitError::Gone,
            }
        })
    }
}

/// Makes a speculation, on the engine's thread, from the model and the
/// draft model: one for every request with `--parallel 1` (each request
/// sets its own sampling), else one per sequence of the batch.
pub type MakeSpeculation =
    Box<dyn for<'m> Fn(&'m Model, Option<&'m Model>) -> Result<Speculation<'m>, String> + Send>;

/// Speculative decoding for the engine.
pub struct SpeculationSetup {
    /// The draft model, when the speculator is one.
    pub draft: Option<Model>,
    /// Makes the speculation.
    pub make: MakeSpeculation,
}

/// How the engine runs requests.
pub struct EngineConfig {
    /// Each sequence's state.
    pub options: StateOptions,
    /// Ids that end a reply.
    pub stop_ids: Vec<u32>,
    /// Jobs that may wait at once for a free sequence.
    pub queue: usize,
    /// Sequences generated together (continuous batching).
    pub parallel: usize,
    /// Speculative decoding: one request at a time with one speculation
    /// (trees, a draft model's cache kept between requests) when
    /// `parallel` is 1, else in the batch, a speculation per sequence.
    pub speculation: Option<SpeculationSetup>,
    /// Where the sequences are kept across restarts, and the fingerprint
    /// of the model they belong to ([`hayate_engine::saved::fingerprint`]).
    pub cache_dir: Option<(PathBuf, u64)>,
    /// Bytes the batched sequences' attention caches share (`None`: the
    /// batcher's default).
    pub kv_memory: Option<usize>,
}

/// Starts the engine thread over `model`; it ends (saving its sequences
/// to the cache directory) once every [`EngineHandle`] is gone and the
/// jobs in hand are done: join the returned thread to wait for that.
/// Fails when the states for `config` cannot be made (a context or a
/// number of sequences the machine cannot hold) or the speculation cannot.
pub fn start(
    model: Model,
    tokenizer: Arc<TextTokenizer>,
    config: EngineConfig,
) -> std::io::Result<(EngineHandle, JoinHandle<()>)> {
    let EngineConfig {
        options,
        stop_ids,
        queue,
        parallel,
        speculation,
        cache_dir,
        kv_memory,
    } = config;
    let one_at_a_time = speculation.is_some() && parallel == 1;
    if one_at_a_time && cache_dir.is_some() {
        return Err(std::io::Error::other(
            "--cache-dir keeps the sequences of batched requests: with speculative decoding it needs --parallel 2 or more",
        ));
    }
    let limit = queue.saturating_add(parallel);
    let (send, receive) = std::sync::mpsc::sync_channel(limit);
    let pending = Arc::new(AtomicUsize::new(0));
    let metrics = Arc::new(Metrics::default());
    let counters = Counters {
        pending: pending.clone(),
        metrics: metrics.clone(),
    };
    let vocab = model.info.vocab;
    let thread_tokenizer = tokenizer.clone();
    let thread_stops = stop_ids.clone();
    // The thread makes its states and says how large they are, or why it cannot.
    let (ready, started) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("hayate-engine".into())
        .spawn(move || {
            let engine = Engine {
                model: &model,
                tokenizer: &thread_tokenizer,
                stop_ids: &thread_stops,
            };
            let setup = match speculation {
                Some(setup) if parallel == 1 => setup,
                speculation => {
                    let batched = (parallel, kv_memory);
                    let made = make_batcher(&model, &options, batched, &thread_stops, &speculation);
                    match made {
                        Ok(mut batcher) => {
                            if let Some((dir, print)) = &cache_dir {
                                load_sequences(&mut batcher, dir, *print);
                            }
                            counters.metrics.set_kv_memory(batcher.kv_memory());
                            let _ = ready.send(Ok(batcher.capacity()));
                            engine.serve_batched(&mut batcher, receive, &counters);
                            if let Some((dir, print)) = &cache_dir {
                                save_sequences(&mut batcher, dir, *print);
                            }
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                    return;
                }
            };
            let mut generator = match Generator::new(&model, &options) {
                Ok(g) => g,
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                    return;
                }
            };
            let mut speculation = match (setup.make)(&model, setup.draft.as_ref()) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let _ = ready.send(Ok(generator.state.capacity()));
            engine.serve_speculating(&mut generator, &mut speculation, receive, &counters);
        })?;
    let capacity = started
        .recv()
        .map_err(|_| std::io::Error::other("the engine thread ended at start"))?
        .map_err(std::io::Error::other)?;
    let handle = EngineHandle {
        queue: send,
        pending,
        limit,
        metrics,
        capacity,
        vocab,
        tokenizer,
        stop_ids,
    };
    Ok((handle, thread))
}

/// The batcher of `parallel` sequences sharing `kv_memory`, each with a
/// speculation of its own when `speculation` asks.
fn make_batcher<'m>(
    model: &'m Model,
    options: &StateOptions,
    (parallel, kv_memory): (usize, Option<usize>),
    stop_ids: &[u32],
    speculation: &'m Option<SpeculationSetup>,
) -> Result<Batcher<'m>, String> {
    let mut batcher = Batcher::new(model, options, parallel, stop_ids.to_vec(), kv_memory)
        .map_err(|e| e.to_string())?;
    if let Some(s) = speculation {
        let draft = s.draft.as_ref();
        batcher
            .speculate(|_| (s.make)(model, draft).map_err(hayate_engine::EngineError::State))
            .map_err(|e| e.to_string())?;
    }
    Ok(batcher)
}

/// Reads the sequences saved in `dir` back into the batcher, warning of
/// each file it skips.
fn load_sequences(batcher: &mut Batcher<'_>, dir: &std::path::Path, model_print: u64) {
    let (loaded, warnings) = batcher.load_from(dir, model_print);
    for w in warnings {
        tracing::warn!("ignoring a saved sequence: {w}");
        eprintln!("warning: ignoring a saved sequence: {w}");
    }
    if loaded > 0 {
        tracing::info!("{loaded} saved sequences read from {}", dir.display());
    }
}

/// Saves the batcher's sequences in `dir`.
fn save_sequences(batcher: &mut Batcher<'_>, dir: &std::path::Path, model_print: u64) {
    match batcher.save_to(dir, model_print) {
        Ok(n) => tracing::info!("{n} sequences saved to {}", dir.display()),
        Err(e) => eprintln!(
            "warning: cannot save the sequences to {}: {e}",
            dir.display()
        ),
    }
}

/// What the engine thread counts for the HTTP side.
struct Counters {
    pending: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

/// What every job of the engine thread shares.
struct Engine<'a> {
    model: &'a Model,
    tokenizer: &'a TextTokenizer,
    stop_ids: &'a [u32],
}

/// A reply being generated: its text so far, stop strings, log
/// probabilities, and where it goes.
struct Reply<'t> {
    tokenizer: &'t TextTokenizer,
    stream: StreamDecoder<'t>,
    matcher: StopMatcher,
    /// Log-probabilities of tokens whose text is not out yet.
    waiting: Vec<TokenLogprob>,
    logprobs: Option<usize>,
    events: UnboundedSender<Event>,
    stopped_by_string: bool,
    client_gone: bool,
    last_token: Option<Instant>,
    prompt_tokens: usize,
    cached: usize,
}

impl<'t> Reply<'t> {
    /// The reply to `job` (whose constraint and prompt were taken), `cached`
    /// of whose prompt tokens the state held.
    fn new(tokenizer: &'t TextTokenizer, job: &mut Job, cached: usize) -> Self {
        Reply {
            tokenizer,
            stream: tokenizer.stream_showing(&job.shown),
            matcher: StopMatcher::new(std::mem::take(&mut job.stops)),
            waiting: Vec::new(),
            logprobs: job.logprobs,
            events: job.events.clone(),
            stopped_by_string: false,
            client_gone: false,
            last_token: None,
            prompt_tokens: job.prompt.len(),
            cached,
        }
    }

    /// Takes a generated token (drawn from `logits`); whether generation
    /// goes on (not when a stop string ended the text or the client left).
    fn token(&mut self, token: u32, logits: &[f32], metrics: &Metrics) -> Result<bool, String> {
        metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        if let Some(previous) = self.last_token.replace(now) {
            metrics.inter_token.observe((now - previous).as_secs_f64());
        }
        if let Some(top) = self.logprobs {
            self.waiting
                .push(token_logprob(self.tokenizer, token, logits, top)?);
        }
        let Some(piece) = self.stream.push(token).map_err(|e| e.to_string())? else {
            return Ok(true);
        };
        let (text, stop) = self.matcher.push(&piece);
        let stopped = stop.is_some();
        if !text.is_empty() || stopped {
            let logprobs = std::mem::take(&mut self.waiting);
            if self.events.send(Event::Text { text, logprobs }).is_err() {
                self.client_gone = true;
                return Ok(false);
            }
        }
        self.stopped_by_string = stopped;
        Ok(!stopped)
    }

    /// Sends the rest of the text and the end of the reply.
    fn finish(mut self, stats: &GenerationStats, metrics: &Metrics) -> Result<(), String> {
        metrics
            .prompt_tokens
            .fetch_add(self.prompt_tokens as u64, Ordering::Relaxed);
        metrics
            .cached_tokens
            .fetch_add(self.cached as u64, Ordering::Relaxed);
        if let Some(first) = stats.time_to_first_token {
            metrics.time_to_first_token.observe(first.as_secs_f64());
        }
        if let Some(s) = &stats.speculation {
            metrics
                .drafted_tokens
                .fetch_add(s.drafted as u64, Ordering::Relaxed);
            metrics
                .accepted_tokens
                .fetch_add(s.accepted as u64, Ordering::Relaxed);
        }
        if self.client_gone || self.events.is_closed() {
            return Ok(());
        }
        if !self.stopped_by_string {
            let rest = self.stream.finish().map_err(|e| e.to_string())?;
            let (mut text, stop) = self.matcher.push(rest.as_deref().unwrap_or(""));
            let stopped = stop.is_some();
            self.stopped_by_string = stopped;
            if !stopped {
                text += &self.matcher.finish();
            }
            if !text.is_empty() || !self.waiting.is_empty() {
                let logprobs = std::mem::take(&mut self.waiting);
                let _ = self.events.send(Event::Text { text, logprobs });
            }
        }
        let finish = match stats.stop {
            _ if self.stopped_by_string => Finish::Stop,
            StopReason::Stop | StopReason::Cancelled => Finish::Stop,
            StopReason::MaxTokens | StopReason::ContextFull => Finish::Length,
        };
        let _ = self.events.send(Event::Done {
            finish,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: stats.generated,
            cached_tokens: self.cached,
            timings: Timings {
                prompt_n: stats.prompt_tokens,
                prompt_ms: stats.prefill_time.as_secs_f64() * 1e3,
                predicted_n: stats.generated.saturating_sub(1),
                predicted_ms: stats.decode_time.as_secs_f64() * 1e3,
                draft: stats.speculation.as_ref().map(|s| (s.drafted, s.accepted)),
            },
        });
        Ok(())
    }
}

impl Engine<'_> {
    /// Continuous batching until the queue closes: jobs join the batch as
    /// slots free up, every step advances them all.
    fn serve_batched(&self, batcher: &mut Batcher<'_>, jobs: Receiver<Job>, counters: &Counters) {
        let metrics = &*counters.metrics;
        let done = || {
            counters.pending.fetch_sub(1, Ordering::SeqCst);
        };
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut replies: Vec<Option<Reply<'_>>> = (0..batcher.slots()).map(|_| None).collect();
        let mut open = true;
        while open || batcher.active() > 0 || !waiting.is_empty() {
            // Wait for work only when there is none.
            if batcher.active() == 0 && waiting.is_empty() {
                match jobs.recv() {
                    Ok(job) => waiting.push_back(job),
                    Err(_) => break,
                }
            }
            loop {
                match jobs.try_recv() {
                    Ok(job) => waiting.push_back(job),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            // Clients that left free their slots at once.
            for (slot, reply) in replies.iter_mut().enumerate() {
                if reply.as_ref().is_some_and(|r| r.events.is_closed()) {
                    batcher.cancel(slot);
                    *reply = None;
                    done();
                }
            }
            // In order of arrival, while the next one fits (a free slot,
            // KV memory for its prompt and max_tokens).
            while let Some(next) = waiting.front() {
                // A client that left while its job waited costs nothing.
                if next.events.is_closed() {
                    waiting.pop_front();
                    done();
                    continue;
                }
                // With nothing running to make room it never fits:
                // admitting it says why.
                if !batcher.fits(next.prompt.len(), next.max_tokens) && batcher.active() > 0 {
                    break;
                }
                let Some(mut job) = waiting.pop_front() else {
                    break;
                };
                let request = BatchRequest {
                    prompt: job.prompt.clone(),
                    params: job.params.clone(),
                    max_tokens: job.max_tokens,
                    constraint: job
                        .constraint
                        .take()
                        .map(|c| Box::new(c) as Box<dyn TokenConstraint + Send>),
                };
                match batcher.admit(request) {
                    Ok((slot, cached)) => {
                        replies[slot] = Some(Reply::new(self.tokenizer, &mut job, cached));
                    }
                    Err(e) => {
                        tracing::error!("request failed: {e}");
                        done();
                        let _ = job.events.send(Event::Failed(e.to_string()));
                    }
                }
            }
            metrics.set_load(batcher.active(), waiting.len());
            metrics.set_kv_memory(batcher.kv_memory());
            if batcher.active() == 0 {
                continue;
            }
            metrics.count_step(batcher.active());
            batcher.step(|slot, event| match event {
                SlotEvent::Token { token, logits } => {
                    let Some(reply) = replies[slot].as_mut() else {
                        return false;
                    };
                    match reply.token(token, logits, metrics) {
                        Ok(go_on) => go_on,
                        Err(e) => {
                            tracing::error!("request failed: {e}");
                            let _ = reply.events.send(Event::Failed(e));
                            reply.client_gone = true;
                            false
                        }
                    }
                }
                SlotEvent::Done(stats) => {
                    if let Some(reply) = replies[slot].take() {
                        // No longer pending once its client hears the end.
                        done();
                        let events = reply.events.clone();
                        if let Err(e) = reply.finish(&stats, metrics) {
                            tracing::error!("request failed: {e}");
                            let _ = events.send(Event::Failed(e));
                        }
                    }
                    true
                }
                SlotEvent::Failed(e) => {
                    if let Some(reply) = replies[slot].take() {
                        tracing::error!("request failed: {e}");
                        done();
                        let _ = reply.events.send(Event::Failed(e.to_string()));
                    }
                    true
                }
            });
            metrics.set_load(batcher.active(), waiting.len());
        }
    }

    /// One job at a time until the queue closes, each through the one
    /// generator with speculative decoding.
    fn serve_speculating(
        &self,
        generator: &mut Generator<'_>,
        speculation: &mut Speculation<'_>,
        jobs: Receiver<Job>,
        counters: &Counters,
    ) {
        let metrics = &*counters.metrics;
        for job in jobs {
            // A client that left while its job waited costs nothing.
            if job.events.is_closed() {
                counters.pending.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let events = job.events.clone();
            let outcome = self.run_job(generator, speculation, job, metrics);
            // No longer pending once its client hears the end.
            counters.pending.fetch_sub(1, Ordering::SeqCst);
            let sent = outcome.and_then(|(reply, stats)| reply.finish(&stats, metrics));
            if let Err(e) = sent {
                tracing::error!("request failed: {e}");
                let _ = events.send(Event::Failed(e));
            }
        }
    }

    /// Generates one reply with speculative decoding, sending its text as
    /// it comes; the reply's end is left to send.
    fn run_job(
        &self,
        generator: &mut Generator<'_>,
        speculation: &mut Speculation<'_>,
        mut job: Job,
        metrics: &Metrics,
    ) -> Result<(Reply<'_>, GenerationStats), String> {
        // The generator says how much of the prompt its state still holds.
        let cached = generator
            .set_prompt(&job.prompt)
            .map_err(|e| e.to_string())?;
        let mut sampler = Sampler::new(job.params.clone(), self.model.info.vocab);
        speculation.set_params(&sampler.params);
        let mut constraint = job.constraint.take();
        let mut reply = Reply::new(self.tokenizer, &mut job, cached);
        let rules = Rules {
            speculation: Some(speculation),
            constraint: constraint.as_mut().map(|c| c as &mut dyn TokenConstraint),
            max_tokens: job.max_tokens,
            stop_ids: self.stop_ids,
        };
        let stats = generator
            .generate_observed(&mut sampler, rules, |token, logits| {
                reply.token(token, logits, metrics).map_err(JobError)
            })
            .map_err(|e| e.0)?;
        Ok((reply, stats))
    }
}

/// Why a reply could not be generated.
#[derive(Debug)]
struct JobError(String);

impl From<hayate_engine::EngineError> for JobError {
    fn from(e: hayate_engine::EngineError) -> Self {
        JobError(e.to_string())
    }
}

/// The log-probability of `token` under `logits` (softmax at temperature
/// 1, penalties applied) and the `top` most likely tokens.
fn token_logprob(
    tokenizer: &TextTokenizer,
    token: u32,
    logits: &[f32],
    top: usize,
) -> Result<TokenLogprob, String> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = f64::from(max) + sum.ln();
    let logprob = |l: f32| (f64::from(l) - log_z) as f32;
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() < top || l > best[best.len() - 1].0 {
                let at = best.partition_point(|&(b, _)| b >= l);
                best.insert(at, (l, i as u32));
                best.truncate(top);
            }
        }
    }
    let text = |id: u32| tokenizer.token_text(id).map_err(|e| e.to_string());
    Ok(TokenLogprob {
        token: text(token)?,
        logprob: logprob(
            logits
                .get(token as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY),
        ),
        top: best
            .into_iter()
            .map(|(l, id)| Ok((text(id)?, logprob(l))))
            .collect::<Result<_, String>>()?,
    })
}
