//! How fast this machine streams memory: the ceiling of memory-bound decoding.

use crate::cpu::Isa;
use crate::ops::dot;
use crate::pool::{ThreadPool, split_range};
use std::time::Instant;

/// Best read bandwidth in bytes per second over `passes` parallel reads of a
/// fresh `bytes`-sized buffer (larger than the caches, so it measures DRAM).
pub fn read_bandwidth(pool: &ThreadPool, isa: Isa, bytes: usize, passes: usize) -> f64 {
    let n = (bytes / 4).max(1024);
    // Writing every element commits the pages before timing.
    let buffer: Vec<f32> = (0..n).map(|i| (i & 7) as f32).collect();
    let mut best = 0.0f64;
    for _ in 0..passes.max(1) {
        let start = Instant::now();
        pool.run(&|tid, n_threads| {
            let part = &buffer[split_range(n, n_threads, tid, 4096)];
            // `dot(x, x)` reads each element once from memory.
            std::hint::black_box(dot(isa, part, part));
        });
        best = best.max((n * 4) as f64 / start.elapsed().as_secs_f64());
    }
    best
}
