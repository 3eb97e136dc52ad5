//! A persistent thread pool whose workers park when idle.
//!
//! Kernels call [`ThreadPool::run`] many times per token, so starting a job
//! must be cheap; but these machines are shared and small, so an idle worker
//! must not burn a core. Workers therefore spin for a few microseconds after
//! a job (the next one usually follows at once) and then park on a futex.

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long a waiting thread polls before it parks.
const SPIN_FOR: Duration = Duration::from_micros(30);

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    /// The job of the current epoch, its lifetime erased; valid while `pending > 0`.
    job: UnsafeCell<Option<*const Job>>,
    /// The thread that called `run`, woken by the last worker to finish.
    caller: UnsafeCell<Option<Thread>>,
    epoch: AtomicU64,
    pending: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
}

// SAFETY: `job` and `caller` are written only by the thread inside `run`
// before it publishes a new epoch (Release) and read by workers after they
// observe that epoch (Acquire); `run` does not return, and so does not
// invalidate them, until every worker has decremented `pending`.
unsafe impl Sync for Shared {}
// SAFETY: see above; the raw job pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

/// A fixed set of worker threads that run data-parallel jobs.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n_threads: usize,
}

impl ThreadPool {
    /// A pool of `n_threads` threads in all: the caller of [`run`](Self::run)
    /// is thread 0, so `n_threads - 1` workers are started.
    pub fn new(n_threads: usize) -> Self {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(None),
            caller: UnsafeCell::new(None),
            epoch: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
        });
        let workers = (1..n_threads)
            .map(|index| {
                let shared = Arc::clone(&shared);
                thread::Builder::new()
                    .name(format!("hayate-worker-{index}"))
                    .spawn(move || worker_loop(&shared, index, n_threads))
                    .expect("failed to spawn a worker thread")
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            n_threads,
        }
    }

    /// Threads that take part in each job, the caller included.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `job(thread_index, n_threads)` once on every thread of the pool
    /// and returns when all have finished. Panics if any of them panicked.
    pub fn run(&self, job: &(dyn Fn(usize, usize) + Sync)) {
        if self.n_threads == 1 {
            job(0, 1);
            return;
        }
        let shared = &*self.shared;
        // SAFETY: no worker reads these until the epoch below is published,
        // and the previous job has fully finished (we waited for it).
        unsafe {
            let erased: *const Job =
                std::mem::transmute::<&(dyn Fn(usize, usize) + Sync + '_), &'static Job>(job);
            *shared.job.get() = Some(erased);
            *shared.caller.get() = Some(thread::current());
        }
        shared.pending.store(self.n_threads - 1, Ordering::Relaxed);
        shared.epoch.fetch_add(1, Ordering::AcqRel);
        for worker in &self.workers {
            // Cheap when the worker is not parked: it only sets a token.
            worker.thread().unpark();
        }
        // Wait for the workers even if our own share panics, so the job
        // reference they hold stays valid.
        let mine = catch_unwind(AssertUnwindSafe(|| job(0, self.n_threads)));
        wait_until(|| shared.pending.load(Ordering::Acquire) == 0);
        if let Err(payload) = mine {
            std::panic::resume_unwind(payload);
        }
        if shared.panicked.swap(false, Ordering::AcqRel) {
            panic!("a worker thread panicked while running a kernel");
        }
    }
}

/// Polls `done` for a short while, then parks between polls.
fn wait_until(done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        if start.elapsed() < SPIN_FOR {
            std::hint::spin_loop();
        } else {
            thread::park_timeout(Duration::from_millis(1));
        }
    }
}

fn worker_loop(shared: &Shared, index: usize, n_threads: usize) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        loop {
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            let epoch = shared.epoch.load(Ordering::Acquire);
            if epoch != seen {
                seen = epoch;
                break;
            }
            if start.elapsed() < SPIN_FOR {
                std::hint::spin_loop();
            } else {
                // `run` unparks after publishing the epoch, so a wake-up is never lost.
                thread::park();
            }
        }
        // SAFETY: the epoch we observed was published after `job` and `caller`
        // were set, and they stay valid until we decrement `pending`.
        let (job, caller) = unsafe {
            let job = (*shared.job.get()).expect("job published with the epoch");
            (&*job, (*shared.caller.get()).clone())
        };
        if catch_unwind(AssertUnwindSafe(|| job(index, n_threads))).is_err() {
            shared.panicked.store(true, Ordering::Release);
        }
        if shared.pending.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(caller) = caller
        {
            caller.unpark();
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        for worker in self.workers.drain(..) {
            worker.thread().unpark();
            let _ = worker.join();
        }
    }
}

/// Splits `0..n` into `parts` contiguous ranges whose bounds are multiples of
/// `align` (except the end), and returns part `index`.
pub fn split_range(n: usize, parts: usize, index: usize, align: usize) -> std::ops::Range<usize> {
    let blocks = n.div_ceil(align);
    let per = blocks / parts;
    let extra = blocks % parts;
    let start_block = index * per + index.min(extra);
    let end_block = start_block + per + usize::from(index < extra);
    (start_block * align).min(n)..(end_block * align).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_thread_runs_each_job_once() {
        let pool = ThreadPool::new(3);
        for round in 0..200 {
            let hits = [
                AtomicUsize::new(0),
                AtomicUsize::new(0),
                AtomicUsize::new(0),
            ];
            pool.run(&|i, n| {
                assert_eq!(n, 3);
                hits[i].fetch_add(round + 1, Ordering::Relaxed);
            });
            for h in &hits {
                assert_eq!(h.load(Ordering::Relaxed), round + 1);
            }
            if round % 50 == 0 {
                // Let the workers fall asleep so the parked path is exercised too.
                thread::sleep(Duration::from_millis(2));
            }
        }
    }

    #[test]
    fn worker_panic_reaches_the_caller_and_the_pool_survives() {
        let pool = ThreadPool::new(2);
        let result = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|i, _| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(result.is_err());
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn split_range_covers_everything_once() {
        for n in [0, 1, 15, 16, 17, 100, 1000] {
            for parts in 1..5 {
                let mut next = 0;
                for i in 0..parts {
                    let r = split_range(n, parts, i, 16);
                    assert_eq!(r.start, next);
                    assert!(r.start == n || r.start.is_multiple_of(16));
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }
}
