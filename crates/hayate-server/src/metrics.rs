//! What `GET /metrics` reports, in Prometheus' text format: requests by
//! route and status, tokens in and out, prompt tokens served from the
//! cache, speculation's drafted and accepted tokens, the queue, and
//! histograms of time to first token and of the time between tokens.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the latency histograms' buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A histogram over [`BUCKETS`].
#[derive(Default)]
pub struct Histogram {
    /// Per bucket (and one past the last), the sum and the count.
    state: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    /// Counts one observation of `seconds`.
    pub fn observe(&self, seconds: f64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.0.is_empty() {
            state.0 = vec![0; BUCKETS.len() + 1];
        }
        let bucket = BUCKETS.partition_point(|&b| b < seconds);
        state.0[bucket] += 1;
        state.1 += seconds;
        state.2 += 1;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += state.0.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", state.2);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", state.1, state.2);
    }
}

/// The server's counters, shared by the routes and the engine thread.
#[derive(Default)]
pub struct Metrics {
    /// Responses by route and status.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Prompt tokens of finished requests.
    pub prompt_tokens: AtomicU64,
    /// Of those, the ones the cache already held.
    pub cached_tokens: AtomicU64,
    /// Tokens generated (also counted while requests run).
    pub generated_tokens: AtomicU64,
    /// Tokens drafted by speculation, and accepted.
    pub drafted_tokens: AtomicU64,
    /// Drafted tokens the model accepted.
    pub accepted_tokens: AtomicU64,
    /// Time from a request's start on the engine to its first token.
    pub time_to_first_token: Histogram,
    /// Time between consecutive tokens of a reply.
    pub inter_token: Histogram,
    /// Sequences the engine is generating.
    batch_size: AtomicU64,
    /// Engine steps, and the sequences they advanced in all (their
    /// ratio is the mean batch size).
    steps: AtomicU64,
    batch_sequences: AtomicU64,
    /// Requests admitted to no sequence yet.
    waiting: AtomicU64,
    /// Bytes of attention pages the sequences hold, and the most they may.
    kv_used: AtomicU64,
    kv_limit: AtomicU64,
}

/// The routes requests are counted under (others count as `other`).
const ROUTES: [&str; 6] = [
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/apply-template",
];

impl Metrics {
    /// Counts a response with `status` to a request for `path`.
    pub fn count_request(&self, path: &str, status: u16) {
        let route = ROUTES
            .iter()
            .find(|&&r| r == path)
            .copied()
            .unwrap_or("other");
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *requests.entry((route, status)).or_default() += 1;
    }

    /// Counts an engine step over `sequences` sequences.
    pub fn count_step(&self, sequences: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.batch_sequences
            .fetch_add(sequences as u64, Ordering::Relaxed);
    }

    /// What the engine holds now: `active` sequences, `waiting` requests
    /// for a free one.
    pub fn set_load(&self, active: usize, waiting: usize) {
        self.batch_size.store(active as u64, Ordering::Relaxed);
        self.waiting.store(waiting as u64, Ordering::Relaxed);
    }

    /// The KV memory: bytes of pages `(held, limit)`.
    pub fn set_kv_memory(&self, (held, limit): (usize, usize)) {
        self.kv_used.store(held as u64, Ordering::Relaxed);
        self.kv_limit.store(limit as u64, Ordering::Relaxed);
    }

    /// The text `GET /metrics` answers; `queued` jobs wait or run.
    pub fn render(&self, queued: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP hayate_requests_total Responses by route and HTTP status.\n# TYPE hayate_requests_total counter"
        );
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "hayate_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let counters = [
            (
                "hayate_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                &self.prompt_tokens,
            ),
            (
                "hayate_prompt_cached_tokens_total",
                "Prompt tokens the cache already held (not prefilled).",
                &self.cached_tokens,
            ),
            (
                "hayate_generated_tokens_total",
                "Tokens generated.",
                &self.generated_tokens,
            ),
            (
                "hayate_draft_tokens_total",
                "Tokens drafted by speculative decoding.",
                &self.drafted_tokens,
            ),
            (
                "hayate_draft_accepted_tokens_total",
                "Drafted tokens the model accepted.",
                &self.accepted_tokens,
            ),
            (
                "hayate_engine_steps_total",
                "Batched engine steps.",
                &self.steps,
            ),
            (
                "hayate_batch_sequences_total",
                "Sequences advanced by those steps (over the steps: the mean batch size).",
                &self.batch_sequences,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP hayate_queue_depth Requests waiting for the engine or running.\n# TYPE hayate_queue_depth gauge\nhayate_queue_depth {queued}"
        );
        let gauges = [
            (
                "hayate_batch_size",
                "Sequences the engine is generating.",
                &self.batch_size,
            ),
            (
                "hayate_waiting_requests",
                "Requests waiting for a free sequence or KV memory.",
                &self.waiting,
            ),
            (
                "hayate_kv_memory_used_bytes",
                "Bytes of attention-cache pages the sequences hold.",
                &self.kv_used,
            ),
            (
                "hayate_kv_memory_limit_bytes",
                "Most bytes of attention-cache pages (--kv-memory).",
                &self.kv_limit,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        self.time_to_first_token.render(
            "hayate_time_to_first_token_seconds",
            "Time from a request's start on the engine to its first token.",
            &mut out,
        );
        self.inter_token.render(
            "hayate_inter_token_seconds",
            "Time between consecutive tokens of a reply.",
            &mut out,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_count_into_cumulative_buckets() {
        let h = Histogram::default();
        for s in [0.0005, 0.003, 0.003, 40.0] {
            h.observe(s);
        }
        let mut out = String::new();
        h.render("x", "help", &mut out);
        assert!(out.contains("x_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.0025\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"30\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
    }

    #[test]
    fn requests_are_counted_by_known_route_and_status() {
        let m = Metrics::default();
        m.count_request("/v1/completions", 200);
        m.count_request("/v1/completions", 200);
        m.count_request("/secret/../x", 404);
        let out = m.render(3);
        assert!(
            out.contains("hayate_requests_total{route=\"/v1/completions\",status=\"200\"} 2\n")
        );
        assert!(out.contains("hayate_requests_total{route=\"other\",status=\"404\"} 1\n"));
        assert!(out.contains("hayate_queue_depth 3\n"));
    }
}
