//! The memory attention caches grow in: pages of a fixed number of
//! positions ([`KvCache`](super::KvCache) holds every head's keys and
//! values of those positions in each), taken from one pool with a byte
//! limit, so that many sequences share one budget and a short one holds
//! only the pages it fills rather than a whole context.
//!
//! A page goes back to the pool when the last cache holding it lets go of
//! it (caches share the pages of a common prefix and copy one before
//! writing to it), and the pool keeps it for the next cache that grows:
//! after warm-up, growing takes no allocation and the memory held never
//! exceeds the limit.

use super::attention::{KvData, KvFormat};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Positions per page of a growing attention cache (the default of
/// [`crate::StateOptions::kv_page`]).
pub const KV_PAGE: usize = 128;

/// Pages for attention caches, up to a limit in bytes; cheap to clone
/// (clones share the pool).
#[derive(Clone)]
pub struct KvPool {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Most bytes of pages caches may hold.
    limit: usize,
    /// Bytes of the pages caches hold.
    held: usize,
    /// Pages no cache holds, kept for reuse.
    free: Vec<KvData>,
    /// Their bytes.
    free_bytes: usize,
}

/// One page of a cache: every head's entries of its positions. Goes back
/// to its pool when dropped.
pub(crate) struct KvPage {
    pub(crate) data: KvData,
    pool: Weak<Shared>,
}

impl Drop for KvPage {
    fn drop(&mut self) {
        if let Some(shared) = self.pool.upgrade() {
            let data = std::mem::replace(&mut self.data, KvData::empty());
            let bytes = data.bytes();
            let mut inner = shared.lock();
            inner.held -= bytes;
            inner.free_bytes += bytes;
            inner.free.push(data);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while the lock was held left only counts behind.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl KvPool {
    /// A pool of at most `limit` bytes of pages.
    pub fn new(limit: usize) -> Self {
        KvPool {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    limit,
                    ..Inner::default()
                }),
            }),
        }
    }

    /// Most bytes of pages caches may hold at once.
    pub fn limit(&self) -> usize {
        self.shared.lock().limit
    }

    /// Sets the limit (pages already held stay).
    pub(crate) fn set_limit(&self, limit: usize) {
        let mut inner = self.shared.lock();
        inner.limit = limit;
        while inner.held + inner.free_bytes > limit {
            let Some(old) = inner.free.pop() else { break };
            inner.free_bytes -= old.bytes();
        }
    }

    /// Bytes of the pages caches hold now.
    pub fn held(&self) -> usize {
        self.shared.lock().held
    }

    /// A page of `positions` positions of `n_kv_heads` heads of `head_dim`
    /// in `format` (its entries are whatever the last cache left, or
    /// zeros), or `None` when the pool's caches already hold its limit.
    pub(crate) fn take(
        &self,
        format: KvFormat,
        n_kv_heads: usize,
        positions: usize,
        head_dim: usize,
    ) -> Option<KvPage> {
        let values = n_kv_heads.checked_mul(positions)?.checked_mul(head_dim)?;
        let scales = n_kv_heads * positions;
        let bytes = KvData::bytes_of(format, values, scales)?;
        let mut inner = self.shared.lock();
        if inner.held.checked_add(bytes)? > inner.limit {
            return None;
        }
        let reused = inner
            .free
            .iter()
            .position(|d| d.is_shaped(format, values, scales));
        let data = match reused {
            Some(i) => {
                inner.free_bytes -= bytes;
                inner.free.swap_remove(i)
            }
            None => {
                // Pages of another shape make room: what the pool keeps
                // stays within the limit.
                while inner.held + inner.free_bytes + bytes > inner.limit {
                    let Some(old) = inner.free.pop() else { break };
                    inner.free_bytes -= old.bytes();
                }
                KvData::zeroed(format, values, scales)
            }
        };
        inner.held += bytes;
        Some(KvPage {
            data,
            pool: Arc::downgrade(&self.shared),
        })
    }
}

impl KvPage {
    /// A page of its own, outside any pool (a sliding window's ring).
    pub(crate) fn detached(data: KvData) -> Self {
        KvPage {
            data,
            pool: Weak::new(),
        }
    }
}
