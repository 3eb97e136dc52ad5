//! A persistent thread pool whose workers park when idle.
//!
//! Kernels call [`ThreadPool::run`] many times per token, so starting a job
//! must be cheap; but these machines are shared and small, so an idle worker
//! must not burn a core. Workers therefore spin for a few microseconds after
//! a job (the next one usually follows at once) and then park on a futex.
//!
//! # Why no data race is possible
//!
//! The pool shares one job slot with its workers. It is safe to call
//! [`ThreadPool::run`] from any number of threads at once because:
//!
//! 1. **One job at a time.** `run` holds the pool's `turn` mutex from before
//!    it writes the slot until every worker has finished the job. A second
//!    caller waits for the mutex, so the slot is never written while a worker
//!    may read it, and never by two callers.
//! 2. **Publication.** The slot (job pointer and caller handle) is written
//!    before the epoch counter is incremented with `Release`; a worker reads
//!    the slot only after it has seen the new epoch with `Acquire`, so it sees
//!    the slot's new contents.
//! 3. **Lifetime.** The job is a borrowed closure whose lifetime is erased to
//!    store it. `run` does not return (nor unwind: the caller's own share runs
//!    under `catch_unwind`) until `pending` has dropped to 0, which each worker
//!    decrements with `Release` after its last use of the job, and `run` reads
//!    with `Acquire`. So the closure outlives every use.
//! 4. **Nesting.** A job that itself calls `run` (on this pool or another)
//!    runs the inner job on its own thread, as a pool of one: waiting for the
//!    mutex there would deadlock, since the outer job holds it. (A thread a
//!    job *starts* is not inside the job: if the job waited for it while it
//!    called `run` on the same pool, that would deadlock. Kernels start no
//!    threads.)
//!
//! What a job does with the data it borrows is the job's business: the
//! kernels split outputs into disjoint ranges per thread index.

use std::cell::{Cell, UnsafeCell};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long a waiting thread polls before it parks.
const SPIN_FOR: Duration = Duration::from_micros(30);

type Job = dyn Fn(usize, usize) + Sync;

thread_local! {
    /// Whether this thread is running its share of some pool's job.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as inside a job until dropped (also on unwind).
struct InJob {
    was: bool,
}

impl InJob {
    fn enter() -> Self {
        InJob {
            was: IN_JOB.replace(true),
        }
    }
}

impl Drop for InJob {
    fn drop(&mut self) {
        IN_JOB.set(self.was);
    }
}

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

// SAFETY: `job` and `caller` are written only by the thread that holds the
// pool's `turn` mutex inside `run`, before it publishes a new epoch
// (Release), and read by workers after they observe that epoch (Acquire);
// `run` keeps the mutex, and does not return or invalidate them, until every
// worker has decremented `pending` (see the module docs).
unsafe impl Sync for Shared {}
// SAFETY: see above; the raw job pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

/// A fixed set of worker threads that run data-parallel jobs, one job at a
/// time; any number of threads may share one pool (see the module docs).
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n_threads: usize,
    /// Held for the whole of a job: callers on other threads wait their turn.
    turn: Mutex<()>,
    /// Jobs run so far, nested ones included (for benchmarks).
    jobs: AtomicU64,
}

impl ThreadPool {
    /// A pool of `n_threads` threads in all: the caller of [`run`](Self::run)
    /// is thread 0, so `n_threads - 1` workers are started. An error if the
    /// system refuses to start them.
    pub fn new(n_threads: usize) -> std::io::Result<Self> {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(None),
            caller: UnsafeCell::new(None),
            epoch: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
        });
        let mut pool = ThreadPool {
            shared: Arc::clone(&shared),
            workers: Vec::with_capacity(n_threads - 1),
            n_threads,
            turn: Mutex::new(()),
            jobs: AtomicU64::new(0),
        };
        for index in 1..n_threads {
            let shared = Arc::clone(&shared);
            // On failure, dropping `pool` stops the workers already started.
            let worker = thread::Builder::new()
                .name(format!("hayate-worker-{index}"))
                .spawn(move || worker_loop(&shared, index, n_threads))?;
            pool.workers.push(worker);
        }
        Ok(pool)
    }

    /// Threads that take part in each job, the caller included.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Jobs this pool has run (each [`run`](Self::run) call, nested ones
    /// included): a benchmark divides it by the tokens processed.
    pub fn jobs_run(&self) -> u64 {
        self.jobs.load(Ordering::Relaxed)
    }

    /// Runs `job(thread_index, n_threads)` once on every thread of the pool
    /// and returns when all have finished. Panics if any of them panicked.
    ///
    /// Callers on several threads take turns. Called from inside a job, it
    /// runs `job(0, 1)` on the calling thread.
    pub fn run(&self, job: &(dyn Fn(usize, usize) + Sync)) {
        self.jobs.fetch_add(1, Ordering::Relaxed);
        if self.n_threads == 1 || IN_JOB.get() {
            let _in_job = InJob::enter();
            job(0, 1);
            return;
        }
        // A panic inside a job poisons the mutex, but the pool is intact:
        // every worker finished before the panic was passed on.
        let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        let shared = &*self.shared;
        // SAFETY: we hold `turn`, so no other caller writes these, and no
        // worker reads them until the epoch below is published; the previous
        // job has fully finished (its caller waited for it before unlocking).
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
        let mine = catch_unwind(AssertUnwindSafe(|| {
            let _in_job = InJob::enter();
            job(0, self.n_threads)
        }));
        wait_until(|| shared.pending.load(Ordering::Acquire) == 0);
        // Clear the flag before passing any panic on: it belongs to this job,
        // not to whichever job (maybe another caller's) runs next.
        let worker_panicked = shared.panicked.swap(false, Ordering::AcqRel);
        if let Err(payload) = mine {
            std::panic::resume_unwind(payload);
        }
        if worker_panicked {
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
    // A worker only ever runs inside jobs.
    let _in_job = InJob::enter();
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

/// Splits `0..n` between the threads of a job, each taking its own
/// contiguous share chunk by chunk from the front; a thread that runs out
/// takes chunks from the back of another's share. On a shared machine one
/// core often runs slower than the other: with a fixed split a job would end
/// when the slowest share does, here it ends when the work does, while each
/// thread still streams mostly contiguous memory (which the prefetchers
/// need). Chunk bounds are multiples of `align` (except the end).
pub struct ChunkQueue {
    /// Per owning thread: its remaining chunks `front..back`, packed as
    /// `front | back << 32`.
    shares: [AtomicU64; Self::MAX_SHARES],
    n_shares: usize,
    n: usize,
    chunk: usize,
}

impl ChunkQueue {
    /// Chunks per thread: enough that the threads finish close together,
    /// few enough that taking one costs nothing next to its work.
    pub const PER_THREAD: usize = 8;
    /// Threads beyond this many own no share and only take from others.
    const MAX_SHARES: usize = 64;

    /// Chunks of `0..n` for `n_threads` threads: about [`ChunkQueue::PER_THREAD`]
    /// per thread, each a multiple of `align` and at least `min_chunk` long.
    pub fn new(n: usize, n_threads: usize, align: usize, min_chunk: usize) -> Self {
        let align = align.max(1);
        let n_shares = n_threads.clamp(1, Self::MAX_SHARES);
        let chunk = n
            .div_ceil(n_shares * Self::PER_THREAD)
            .max(min_chunk)
            .div_ceil(align)
            .max(1)
            * align;
        // At most `n_shares * PER_THREAD + 1` chunks: their indices fit in 32 bits.
        let chunks = n.div_ceil(chunk) as u64;
        let shares = std::array::from_fn(|i| {
            let i = i as u64;
            let parts = n_shares as u64;
            let (front, back) = if i < parts {
                (i * chunks / parts, (i + 1) * chunks / parts)
            } else {
                (0, 0)
            };
            AtomicU64::new(front | back << 32)
        });
        ChunkQueue {
            shares,
            n_shares,
            n,
            chunk,
        }
    }

    /// Thread `tid`'s next chunk: from its own share, else from the back of
    /// another's; `None` when every chunk is taken.
    pub fn next_chunk(&self, tid: usize) -> Option<std::ops::Range<usize>> {
        let own = (tid < self.n_shares)
            .then(|| self.take(tid, true))
            .flatten();
        let index = own.or_else(|| {
            (1..=self.n_shares).find_map(|d| self.take((tid + d) % self.n_shares, false))
        })?;
        let start = index * self.chunk;
        Some(start..(start + self.chunk).min(self.n))
    }

    /// Takes the front (owner) or back (anyone else) chunk of share `i`.
    fn take(&self, i: usize, front: bool) -> Option<usize> {
        let share = &self.shares[i];
        let mut packed = share.load(Ordering::Relaxed);
        loop {
            let (f, b) = (packed & 0xffff_ffff, packed >> 32);
            if f >= b {
                return None;
            }
            let (next, index) = if front {
                ((f + 1) | b << 32, f)
            } else {
                (f | (b - 1) << 32, b - 1)
            };
            match share.compare_exchange_weak(packed, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(index as usize),
                Err(now) => packed = now,
            }
        }
    }
}

/// A buffer that the threads of one pool job write in disjoint parts
/// (each its own rows, heads or columns), handed out piece by piece with
/// bounds checked: how the engine shares a `&mut` buffer across a job.
pub struct DisjointMut<'a, T>(*mut T, usize, std::marker::PhantomData<&'a mut [T]>);

// SAFETY: the wrapper only hands out pieces through `piece`, whose contract
// makes the caller keep the pieces of different threads apart.
unsafe impl<T: Send> Sync for DisjointMut<'_, T> {}

impl<'a, T> DisjointMut<'a, T> {
    /// Shares `buffer` for one job; it stays borrowed while the wrapper lives.
    pub fn new(buffer: &'a mut [T]) -> Self {
        DisjointMut(buffer.as_mut_ptr(), buffer.len(), std::marker::PhantomData)
    }

    /// `len` elements from `offset`.
    ///
    /// # Safety
    /// No other live piece (on any thread) overlaps this one. The range is
    /// checked against the buffer.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn piece(&self, offset: usize, len: usize) -> &mut [T] {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.1),
            "piece {offset}+{len} outside a buffer of {}",
            self.1
        );
        // SAFETY: in bounds (checked above); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(offset), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A plain job still runs once on each of the pool's threads.
    fn assert_runs_on_every_thread(pool: &ThreadPool) {
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), pool.n_threads());
    }

    #[test]
    fn a_chunk_queue_hands_out_every_index_once() {
        let pool = ThreadPool::new(3).unwrap();
        for (n, align, min_chunk) in [(1000, 32, 32), (7, 1, 1), (0, 4, 4), (96, 32, 64)] {
            let queue = ChunkQueue::new(n, pool.n_threads(), align, min_chunk);
            let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|tid, _| {
                // One thread sleeps: the others must take over its share.
                if tid == 1 {
                    std::thread::sleep(Duration::from_millis(20));
                }
                while let Some(chunk) = queue.next_chunk(tid) {
                    assert!(chunk.start.is_multiple_of(align) && chunk.end <= n);
                    assert!(chunk.len() >= min_chunk.min(n - chunk.start));
                    for i in chunk {
                        seen[i].fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1), "n={n}");
        }
        // A thread that sleeps through the whole job leaves nothing undone,
        // and the thread that owns a share takes it from the front.
        let queue = ChunkQueue::new(64, 2, 1, 1);
        assert_eq!(queue.next_chunk(0), Some(0..4));
        assert_eq!(queue.next_chunk(1), Some(32..36));
        let rest: Vec<_> = std::iter::from_fn(|| queue.next_chunk(0)).collect();
        assert_eq!(rest.len(), 14);
        assert_eq!(rest[..7].last(), Some(&(28..32)));
        assert_eq!(rest[7], 60..64, "then the back of the other share");
        assert_eq!(queue.next_chunk(1), None);
    }

    #[test]
    fn every_thread_runs_each_job_once() {
        let pool = ThreadPool::new(3).unwrap();
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
        let pool = ThreadPool::new(2).unwrap();
        let result = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|i, _| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(result.is_err());
        assert_runs_on_every_thread(&pool);
    }

    #[test]
    fn callers_on_many_threads_take_turns() {
        let pool = ThreadPool::new(2).unwrap();
        // Each caller checks that every thread saw its own job, many times over.
        thread::scope(|scope| {
            for caller in 0..4usize {
                let pool = &pool;
                scope.spawn(move || {
                    for round in 0..500 {
                        let want = caller * 1000 + round;
                        let seen = [AtomicUsize::new(0), AtomicUsize::new(0)];
                        pool.run(&|i, n| {
                            assert_eq!(n, 2);
                            seen[i].store(want + 1, Ordering::Relaxed);
                        });
                        for s in &seen {
                            assert_eq!(s.load(Ordering::Relaxed), want + 1);
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn a_panic_is_reported_for_its_own_job_only() {
        let pool = ThreadPool::new(2).unwrap();
        // Both the caller's share and the worker's panic.
        let result = catch_unwind(AssertUnwindSafe(|| pool.run(&|_, _| panic!("both"))));
        assert!(result.is_err());
        // The next job is not blamed for the worker's panic.
        assert_runs_on_every_thread(&pool);
    }

    #[test]
    fn a_job_that_runs_a_job_does_not_deadlock() {
        let pool = ThreadPool::new(2).unwrap();
        let inner_calls = AtomicUsize::new(0);
        pool.run(&|_, _| {
            pool.run(&|i, n| {
                assert_eq!((i, n), (0, 1));
                inner_calls.fetch_add(1, Ordering::Relaxed);
            });
        });
        // Each of the two threads ran the inner job alone.
        assert_eq!(inner_calls.load(Ordering::Relaxed), 2);
        // The outer job and the two inner ones are counted.
        assert_eq!(pool.jobs_run(), 3);
        // And the pool still runs ordinary jobs on both threads.
        assert_runs_on_every_thread(&pool);
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
