//! The engine thread: it owns the model and one generator, takes requests
//! from a bounded queue one at a time, and streams each reply back as
//! events. The generator keeps its state between requests, so a request
//! that repeats the previous one's conversation prefills only what is new.
//! With speculative decoding, one speculation serves every request (a
//! draft model keeps its own cache, the suffix speculator its counts).

use crate::metrics::Metrics;
use hayate_chat::TextTokenizer;
use hayate_chat::grammar::Constraint;
use hayate_chat::stop::StopMatcher;
use hayate_engine::speculate::Speculation;
use hayate_engine::{
    Generator, Model, Rules, Sampler, SamplingParams, StateOptions, StopReason, TokenConstraint,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
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
    /// What `/metrics` reports (tokens, latencies), over all requests.
    pub metrics: Arc<Metrics>,
    /// Tokens the context holds.
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
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.queue.try_send(job).map_err(|e| {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            match e {
                TrySendError::Full(_) => SubmitError::Full,
                TrySendError::Disconnected(_) => SubmitError::Gone,
            }
        })
    }
}

/// Makes the engine's speculation, on its thread, from the model and the
/// draft model: for every request (each sets its own sampling).
pub type MakeSpeculation =
    Box<dyn for<'m> FnOnce(&'m Model, Option<&'m Model>) -> Result<Speculation<'m>, String> + Send>;

/// Speculative decoding for the engine.
pub struct SpeculationSetup {
    /// The draft model, when the speculator is one.
    pub draft: Option<Model>,
    /// Makes the speculation.
    pub make: MakeSpeculation,
}

/// Starts the engine thread over `model`; `queue` jobs may wait at once.
/// Fails when the state for `options` cannot be made (a context the
/// machine cannot hold) or the speculation cannot.
pub fn start(
    model: Model,
    tokenizer: Arc<TextTokenizer>,
    options: StateOptions,
    stop_ids: Vec<u32>,
    queue: usize,
    speculation: Option<SpeculationSetup>,
) -> std::io::Result<EngineHandle> {
    let (send, receive) = std::sync::mpsc::sync_channel(queue);
    let pending = Arc::new(AtomicUsize::new(0));
    let metrics = Arc::new(Metrics::default());
    let counters = Counters {
        pending: pending.clone(),
        metrics: metrics.clone(),
    };
    let vocab = model.info.vocab;
    let thread_tokenizer = tokenizer.clone();
    let thread_stops = stop_ids.clone();
    // The thread makes its state and says how large it is, or why it cannot.
    let (ready, started) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("hayate-engine".into())
        .spawn(move || {
            let mut generator = match Generator::new(&model, &options) {
                Ok(g) => g,
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                    return;
                }
            };
            let (draft, make) = match speculation {
                Some(s) => (s.draft, Some(s.make)),
                None => (None, None),
            };
            let mut speculation = match make.map(|make| make(&model, draft.as_ref())) {
                Some(Err(e)) => {
                    let _ = ready.send(Err(e));
                    return;
                }
                Some(Ok(s)) => Some(s),
                None => None,
            };
            let _ = ready.send(Ok(generator.state.capacity()));
            let engine = Engine {
                model: &model,
                tokenizer: &thread_tokenizer,
                stop_ids: &thread_stops,
            };
            engine.serve(&mut generator, speculation.as_mut(), receive, &counters);
        })?;
    let capacity = started
        .recv()
        .map_err(|_| std::io::Error::other("the engine thread ended at start"))?
        .map_err(std::io::Error::other)?;
    Ok(EngineHandle {
        queue: send,
        pending,
        metrics,
        capacity,
        vocab,
        tokenizer,
        stop_ids,
    })
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

impl Engine<'_> {
    /// One job at a time until the queue closes.
    fn serve(
        &self,
        generator: &mut Generator<'_>,
        mut speculation: Option<&mut Speculation<'_>>,
        jobs: Receiver<Job>,
        counters: &Counters,
    ) {
        for job in jobs {
            // A client that left while its job waited costs nothing.
            if !job.events.is_closed() {
                let events = job.events.clone();
                if let Err(e) = self.run_job(
                    generator,
                    speculation.as_deref_mut(),
                    job,
                    &counters.metrics,
                ) {
                    tracing::error!("request failed: {e}");
                    let _ = events.send(Event::Failed(e));
                }
            }
            counters.pending.fetch_sub(1, Ordering::SeqCst);
        }
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

impl Engine<'_> {
    /// Generates one reply, sending its text as it comes.
    fn run_job(
        &self,
        generator: &mut Generator<'_>,
        mut speculation: Option<&mut Speculation<'_>>,
        job: Job,
        metrics: &Metrics,
    ) -> Result<(), String> {
        let (model, tokenizer, stop_ids) = (self.model, self.tokenizer, self.stop_ids);
        // The generator says how much of the prompt its state still holds.
        let cached = generator
            .set_prompt(&job.prompt)
            .map_err(|e| e.to_string())?;
        let mut sampler = Sampler::new(job.params, model.info.vocab);
        let mut stream = tokenizer.stream_showing(&job.shown);
        let mut matcher = StopMatcher::new(job.stops);
        let mut waiting: Vec<TokenLogprob> = Vec::new();
        let mut stopped_by_string = false;
        let mut client_gone = false;
        let events = &job.events;
        let mut constraint = job.constraint;
        if let Some(s) = speculation.as_deref_mut() {
            s.set_params(&sampler.params);
        }
        let rules = Rules {
            speculation,
            constraint: constraint.as_mut().map(|c| c as &mut dyn TokenConstraint),
            max_tokens: job.max_tokens,
            stop_ids,
        };
        let mut last_token: Option<Instant> = None;
        let stats = generator
            .generate_observed(
                &mut sampler,
                rules,
                |token, logits| -> Result<bool, JobError> {
                    metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    if let Some(previous) = last_token.replace(now) {
                        metrics.inter_token.observe((now - previous).as_secs_f64());
                    }
                    if let Some(top) = job.logprobs {
                        waiting
                            .push(token_logprob(tokenizer, token, logits, top).map_err(JobError)?);
                    }
                    let Some(piece) = stream.push(token).map_err(|e| JobError(e.to_string()))?
                    else {
                        return Ok(true);
                    };
                    let (text, stop) = matcher.push(&piece);
                    let stopped = stop.is_some();
                    if !text.is_empty() || stopped {
                        let logprobs = std::mem::take(&mut waiting);
                        if events.send(Event::Text { text, logprobs }).is_err() {
                            client_gone = true;
                            return Ok(false);
                        }
                    }
                    stopped_by_string = stopped;
                    Ok(!stopped)
                },
            )
            .map_err(|e| e.0)?;
        metrics
            .prompt_tokens
            .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
        metrics
            .cached_tokens
            .fetch_add(cached as u64, Ordering::Relaxed);
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
        if client_gone {
            return Ok(());
        }
        if !stopped_by_string {
            let rest = stream.finish().map_err(|e| e.to_string())?;
            let (mut text, stop) = matcher.push(rest.as_deref().unwrap_or(""));
            let stopped = stop.is_some();
            stopped_by_string = stopped;
            if !stopped {
                text += &matcher.finish();
            }
            if !text.is_empty() || !waiting.is_empty() {
                let logprobs = std::mem::take(&mut waiting);
                let _ = events.send(Event::Text { text, logprobs });
            }
        }
        let finish = match stats.stop {
            _ if stopped_by_string => Finish::Stop,
            StopReason::Stop | StopReason::Cancelled => Finish::Stop,
            StopReason::MaxTokens | StopReason::ContextFull => Finish::Length,
        };
        let _ = events.send(Event::Done {
            finish,
            prompt_tokens: job.prompt.len(),
            completion_tokens: stats.generated,
            cached_tokens: cached,
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
