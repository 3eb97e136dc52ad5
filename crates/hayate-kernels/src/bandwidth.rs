//! How fast this machine streams memory: the ceiling of memory-bound decoding.

use crate::cpu::Isa;
use crate::pool::{ThreadPool, split_range};
use std::time::Instant;

/// Software prefetch distances tried, in bytes (0: the hardware prefetchers alone).
const PREFETCH_DISTANCES: [usize; 4] = [0, 1024, 4096, 8192];

/// Best read bandwidth in bytes per second over `passes` parallel reads of a
/// fresh `bytes`-sized buffer (larger than the caches, so it measures DRAM),
/// for each of several prefetch distances: the ceiling is what the best way
/// of reading reaches, so that a kernel cannot beat its own "ceiling".
pub fn read_bandwidth(pool: &ThreadPool, isa: Isa, bytes: usize, passes: usize) -> f64 {
    let n = (bytes / 64).max(1024) * 64;
    // Writing every byte commits the pages before timing.
    let buffer: Vec<u8> = (0..n).map(|i| i as u8).collect();
    let mut best = 0.0f64;
    for _ in 0..passes.max(1) {
        for distance in PREFETCH_DISTANCES {
            let start = Instant::now();
            pool.run(&|tid, n_threads| {
                let part = &buffer[split_range(n, n_threads, tid, 4096)];
                std::hint::black_box(read_all(isa, part, distance));
            });
            best = best.max(n as f64 / start.elapsed().as_secs_f64());
        }
    }
    best
}

/// Reads every byte of `data` once (a length that is a multiple of 64),
/// prefetching `distance` bytes ahead when it is not 0; returns their XOR
/// folded into 64 bits so the reads cannot be optimised away.
fn read_all(isa: Isa, data: &[u8], distance: usize) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked).
        return unsafe { x86::read_all(data, distance) };
    }
    let _ = (isa, distance);
    data.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .fold(0, |a, v| a ^ v)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::read_all`] with 256-bit loads, a cache line per step.
    ///
    /// # Safety
    /// The CPU supports AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn read_all(data: &[u8], distance: usize) -> u64 {
        let p = data.as_ptr();
        let (mut a, mut b) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for line in 0..data.len() / 64 {
            // SAFETY: the line lies within `data`; prefetch addresses are
            // not dereferenced.
            unsafe {
                if distance > 0 {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line * 64 + distance).cast());
                }
                a = _mm256_xor_si256(a, _mm256_loadu_si256(p.add(line * 64).cast()));
                b = _mm256_xor_si256(b, _mm256_loadu_si256(p.add(line * 64 + 32).cast()));
            }
        }
        let v = _mm256_xor_si256(a, b);
        let x = _mm_xor_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        (_mm_cvtsi128_si64(x) ^ _mm_extract_epi64(x, 1)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_reads_every_byte() {
        let data: Vec<u8> = (0..64 * 37).map(|i| (i * 7 + i / 13) as u8).collect();
        let want = read_all(Isa::Scalar, &data, 0);
        for isa in Isa::supported() {
            for distance in PREFETCH_DISTANCES {
                assert_eq!(read_all(isa, &data, distance), want, "{isa:?} {distance}");
            }
        }
        // One changed byte changes the result on every path.
        let mut other = data.clone();
        other[64 * 20 + 5] ^= 1;
        for isa in Isa::supported() {
            assert_ne!(read_all(isa, &other, 0), want, "{isa:?}");
        }
    }
}
