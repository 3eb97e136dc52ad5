//! What a sequence's state is sized for, and the memory it may take.

use crate::layers::KvPool;
use crate::{EngineError, Result};

/// The sizes every layer's per-sequence state and scratch follow.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StateShape {
    /// Most tokens the sequence holds.
    pub capacity: usize,
    /// Most tokens one step of the forward pass processes.
    pub chunk: usize,
    /// Tokens that can be rolled back at once (1 ..= capacity).
    pub rollback: usize,
    /// Kernel threads (each gets its own work buffers).
    pub threads: usize,
    /// How attention caches store keys and values.
    pub kv: crate::layers::KvFormat,
    /// Positions per page of a growing attention cache (a multiple of 16).
    pub page: usize,
}

/// The memory a new state may take, checked buffer by buffer before each is
/// allocated: asking for a context the machine cannot hold is an error
/// naming the sizes, not an allocation failure that aborts the process.
/// Attention caches grow later, in pages from `pool`.
pub(crate) struct Budget {
    context: usize,
    left: usize,
    total: usize,
    /// Where the state's attention caches take their pages.
    pub pool: KvPool,
}

impl Budget {
    /// A budget of this machine's physical memory, for a context of
    /// `context` tokens whose attention pages come from `pool`.
    pub(crate) fn for_context(context: usize, pool: KvPool) -> Self {
        let total = physical_memory().unwrap_or(isize::MAX as usize);
        Budget {
            context,
            left: total,
            total,
            pool,
        }
    }

    /// Takes `bytes` of the budget for a buffer the caller allocates.
    pub(crate) fn take(&mut self, bytes: usize) -> Result<()> {
        if bytes > self.left {
            return Err(self.exceeded());
        }
        self.left -= bytes;
        Ok(())
    }

    fn exceeded(&self) -> EngineError {
        EngineError::State(format!(
            "a state for {} tokens of context needs more memory than this machine has ({:.1} GiB); lower --ctx-size",
            self.context,
            self.total as f64 / f64::from(1u32 << 30)
        ))
    }

    /// Bytes taken so far.
    pub(crate) fn used(&self) -> usize {
        self.total - self.left
    }

    /// A zeroed buffer of `n` floats, if the budget allows it. Zeroed
    /// allocations come from fresh pages, so memory is only committed as
    /// the buffer is written.
    pub(crate) fn floats(&mut self, n: usize) -> Result<Vec<f32>> {
        self.zeroed(n)
    }

    /// A buffer of `n` zero (default) values, if the budget allows it.
    pub(crate) fn zeroed<T: Clone + Default>(&mut self, n: usize) -> Result<Vec<T>> {
        let bytes = n.saturating_mul(size_of::<T>());
        self.take(bytes)?;
        Ok(vec![T::default(); n])
    }
}

/// Total physical memory in bytes (Linux: `MemTotal`), read once.
pub(crate) fn physical_memory() -> Option<usize> {
    static TOTAL: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *TOTAL.get_or_init(read_mem_total)
}

fn read_mem_total() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}
