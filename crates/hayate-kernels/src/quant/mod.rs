//! Integer weight formats and their products with activations.
//!
//! Two formats, both grouped along a row's inputs (groups of `G`
//! consecutive inputs, `G` a multiple of 32):
//! - **q4**: unsigned 4-bit codes `q`, a 4-bit zero point `z` and a bf16
//!   scale `s` per group; `w = (q - z)·s`.
//! - **q8**: signed codes in `[-127, 127]` and a bf16 scale per group; `w = q·s`.
//!
//! Layouts (row-major, `rows` outputs x `cols` inputs):
//! - q4 codes: `cols / 2` bytes per row; each block of 32 inputs takes 16
//!   bytes, byte `j` holding input `j` in its low nibble and input `j + 16`
//!   in its high nibble (so one 16-byte load unpacks to 32 ordered codes).
//! - q8 codes: `cols` bytes per row (two's complement).
//! - scales: `rows x cols/G` bf16 values.
//! - q4 zero points: `ceil(cols/G / 2)` bytes per row, group `2i` in the low
//!   nibble of byte `i`, group `2i + 1` in the high one.
//!
//! - strips ([`QuantLayout::Strips`], made at load for the AVX-512 kernels,
//!   never written to files): rows in strips of 16; per strip and block of
//!   32 inputs, the block's code bytes as vectors of 16 rows' 32-bit words
//!   (word `j` of a row holds its block bytes `4j..4j+4`), so that one load
//!   feeds 16 rows' dot products: 4 vectors (256 bytes) for q4, 8 (512) for
//!   q8, whose codes are stored plus 128 (unsigned, as `vpdpbusd` takes
//!   them); per strip and group, the 16 rows' scales, then (q4) their zero
//!   points in 8 bytes (even rows low nibble).
//!
//! Rotation ([`rotate_rows`]): the stored matrix may be `W' = H·S_out·W·S_in·H`
//! with `H` the block-32 Walsh–Hadamard transform and `S` diagonal ±1 signs;
//! then `W·x = S_out·H·(W'·(H·S_in·x))`. The products ([`qmatmul_many`]) apply the
//! input transform once per activation vector and the output one in their epilogue.

mod acts;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod gptq;
mod product;

pub use acts::{ActPrecision, QuantizedActs};
pub use gptq::{CrossMoment, GptqError, GptqFactor, Hessian, gptq_quantize};
pub use product::{QuantJob, qmatmul, qmatmul_many, qmatmul_many_in};

use crate::cpu::Isa;
use crate::hadamard::{BLOCK, hadamard_blocks};
use crate::pool::{DisjointMut, ThreadPool, split_range};
use crate::weights::MatRef;
use half::bf16;

/// Group sizes the formats allow.
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// An integer weight format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 4-bit asymmetric codes with 4-bit zero points and bf16 scales.
    Q4,
    /// 8-bit symmetric codes with bf16 scales.
    Q8,
}

impl QuantFormat {
    /// The name used on the command line and in files (`q4`, `q8`).
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q4 => "q4",
            QuantFormat::Q8 => "q8",
        }
    }

    /// Parses [`QuantFormat::name`].
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "q4" => Some(QuantFormat::Q4),
            "q8" => Some(QuantFormat::Q8),
            _ => None,
        }
    }

    /// Bytes of codes per row of `cols` inputs.
    pub fn code_row_bytes(self, cols: usize) -> usize {
        match self {
            QuantFormat::Q4 => cols / 2,
            QuantFormat::Q8 => cols,
        }
    }

    /// Bytes of zero points per row of `groups` groups.
    pub fn zero_row_bytes(self, groups: usize) -> usize {
        match self {
            QuantFormat::Q4 => groups.div_ceil(2),
            QuantFormat::Q8 => 0,
        }
    }
}

/// How the arrays of a quantized matrix are ordered (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantLayout {
    /// Row by row, as files store them.
    Rows,
    /// In strips of [`STRIP`] rows, for the AVX-512 short-pass kernels.
    Strips,
}

/// Rows per strip of [`QuantLayout::Strips`]: one 16-lane vector.
pub const STRIP: usize = 16;

/// Sizes of the three arrays of a quantized matrix, in elements:
/// (code bytes, bf16 scales, zero-point bytes).
/// Callers check the shape first ([`check_shape`]), which bounds every product.
pub fn layout_sizes(
    format: QuantFormat,
    rows: usize,
    cols: usize,
    group: usize,
) -> (usize, usize, usize) {
    let groups = cols / group;
    (
        rows * format.code_row_bytes(cols),
        rows * groups,
        rows * format.zero_row_bytes(groups),
    )
}

/// Checks that a `rows x cols` matrix can be stored with groups of `group`.
pub fn check_shape(rows: usize, cols: usize, group: usize) -> Result<(), String> {
    if !GROUP_SIZES.contains(&group) {
        return Err(format!("group size {group} is not one of {GROUP_SIZES:?}"));
    }
    if rows == 0 || cols == 0 || !cols.is_multiple_of(group) {
        return Err(format!(
            "a {rows} x {cols} matrix cannot be cut into groups of {group} inputs"
        ));
    }
    // Every size in `layout_sizes` is at most rows * cols.
    if rows
        .checked_mul(cols)
        .is_none_or(|n| n > isize::MAX as usize)
    {
        return Err(format!("a {rows} x {cols} matrix is too large"));
    }
    Ok(())
}

/// A borrowed quantized matrix (see the module docs for the layout).
#[derive(Clone, Copy, Debug)]
pub struct QuantMatRef<'a> {
    /// The format of the codes.
    pub format: QuantFormat,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Inputs per group.
    pub group: usize,
    /// Packed codes.
    pub codes: &'a [u8],
    /// bf16 bit patterns of the scales.
    pub scales: &'a [u16],
    /// Packed zero points (q4), empty for q8.
    pub zeros: &'a [u8],
    /// How the three arrays are ordered.
    pub layout: QuantLayout,
}

impl<'a> QuantMatRef<'a> {
    /// A view of the three arrays; an error names what does not fit.
    pub fn new(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        group: usize,
        codes: &'a [u8],
        scales: &'a [u16],
        zeros: &'a [u8],
    ) -> Result<Self, String> {
        check_shape(rows, cols, group)?;
        let (nc, ns, nz) = layout_sizes(format, rows, cols, group);
        for (what, have, want) in [
            ("code bytes", codes.len(), nc),
            ("scales", scales.len(), ns),
            ("zero-point bytes", zeros.len(), nz),
        ] {
            if have != want {
                return Err(format!(
                    "{} {rows} x {cols} (group {group}) needs {want} {what}, found {have}",
                    format.name()
                ));
            }
        }
        Ok(QuantMatRef {
            format,
            rows,
            cols,
            group,
            codes,
            scales,
            zeros,
            layout: QuantLayout::Rows,
        })
    }

    /// Groups per row.
    pub fn groups(&self) -> usize {
        self.cols / self.group
    }

    /// Bytes of all three arrays.
    pub fn n_bytes(&self) -> usize {
        self.codes.len() + 2 * self.scales.len() + self.zeros.len()
    }

    /// Scale of group `g` of row `r`.
    #[inline]
    pub fn scale(&self, r: usize, g: usize) -> f32 {
        let i = match self.layout {
            QuantLayout::Rows => r * self.groups() + g,
            QuantLayout::Strips => (r / STRIP * self.groups() + g) * STRIP + r % STRIP,
        };
        bf16::from_bits(self.scales[i]).to_f32()
    }

    /// Zero point of group `g` of row `r` (0 for q8).
    #[inline]
    pub fn zero(&self, r: usize, g: usize) -> i32 {
        match (self.format, self.layout) {
            (QuantFormat::Q4, QuantLayout::Rows) => {
                let byte = self.zeros[r * self.format.zero_row_bytes(self.groups()) + g / 2];
                i32::from(group_nibble(byte, g))
            }
            (QuantFormat::Q4, QuantLayout::Strips) => {
                let i = r % STRIP;
                let byte = self.zeros[(r / STRIP * self.groups() + g) * (STRIP / 2) + i / 2];
                i32::from(group_nibble(byte, i))
            }
            (QuantFormat::Q8, _) => 0,
        }
    }

    /// Code of input `c` of row `r` (0..=15 for q4, -127..=127 for q8).
    #[inline]
    pub fn code(&self, r: usize, c: usize) -> i32 {
        match self.format {
            QuantFormat::Q4 => {
                let j = c % 32;
                let byte = self.q4_byte(r, c / 32, j % 16);
                i32::from(if j < 16 { byte & 15 } else { byte >> 4 })
            }
            QuantFormat::Q8 => i32::from(self.q8_byte(r, c) as i8),
        }
    }

    /// The stored byte (two's complement) of q8 input `c` of row `r`,
    /// whatever the layout.
    #[inline]
    fn q8_byte(&self, r: usize, c: usize) -> u8 {
        match self.layout {
            QuantLayout::Rows => self.codes[r * self.cols + c],
            QuantLayout::Strips => {
                let m = c % BLOCK;
                self.codes[self.strip_word(r, c / BLOCK, m / 4, BLOCK) + m % 4] ^ 0x80
            }
        }
    }

    /// q8 codes `k0..k0 + out.len()` of row `r` as stored in rows (two's
    /// complement), whatever the layout; `k0` and the length are whole
    /// words (4 codes), as the block-wise callers ask.
    pub(crate) fn q8_codes(&self, r: usize, k0: usize, out: &mut [u8]) {
        assert!(
            k0.is_multiple_of(4) && out.len().is_multiple_of(4),
            "q8 codes {k0}..+{} are not whole words",
            out.len()
        );
        match self.layout {
            QuantLayout::Rows => {
                out.copy_from_slice(&self.codes[r * self.cols + k0..][..out.len()]);
            }
            QuantLayout::Strips => {
                for (word, dst) in (k0 / 4..).zip(out.chunks_exact_mut(4)) {
                    let at = self.strip_word(r, word / 8, word % 8, BLOCK);
                    let bytes: [u8; 4] = self.codes[at..at + 4].try_into().expect("4 bytes");
                    dst.copy_from_slice(&(u32::from_le_bytes(bytes) ^ 0x8080_8080).to_le_bytes());
                }
            }
        }
    }

    /// Byte `m` (0..16) of q4 block `b` of row `r`: inputs `32b + m` (low
    /// nibble) and `32b + m + 16` (high), whatever the layout.
    #[inline]
    fn q4_byte(&self, r: usize, b: usize, m: usize) -> u8 {
        match self.layout {
            QuantLayout::Rows => self.codes[r * self.cols / 2 + b * 16 + m],
            QuantLayout::Strips => self.codes[self.strip_word(r, b, m / 4, 16) + m % 4],
        }
    }

    /// The 16 bytes of q4 block `b` of row `r` in the row-major order
    /// (see the module docs), whatever the layout.
    pub(crate) fn q4_block(&self, r: usize, b: usize) -> [u8; 16] {
        match self.layout {
            QuantLayout::Rows => self.codes[r * self.cols / 2 + b * 16..][..16]
                .try_into()
                .expect("16 bytes"),
            QuantLayout::Strips => {
                let mut out = [0u8; 16];
                for (j, dst) in out.chunks_exact_mut(4).enumerate() {
                    let at = self.strip_word(r, b, j, 16);
                    dst.copy_from_slice(&self.codes[at..at + 4]);
                }
                out
            }
        }
    }

    /// Where word `j` of block `b` of row `r` starts in strips whose blocks
    /// take `block_bytes` code bytes per row.
    #[inline]
    fn strip_word(&self, r: usize, b: usize, j: usize, block_bytes: usize) -> usize {
        (r / STRIP * (self.cols / BLOCK) + b) * STRIP * block_bytes + (j * STRIP + r % STRIP) * 4
    }

    /// Row `r` of the stored (possibly rotated) matrix, dequantized into `out`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols);
        for g in 0..self.groups() {
            let (s, z) = (self.scale(r, g), self.zero(r, g));
            let start = g * self.group;
            for (i, o) in out[start..start + self.group].iter_mut().enumerate() {
                *o = (self.code(r, start + i) - z) as f32 * s;
            }
        }
    }
}

/// The 32 codes of one q4 block (its 16 bytes) in input order: byte `j`
/// holds input `j` in its low nibble and input `j + 16` in its high one.
#[inline]
pub(crate) fn unpack_q4_block(bytes: &[u8]) -> [u8; BLOCK] {
    let mut codes = [0u8; BLOCK];
    let (lo, hi) = codes.split_at_mut(BLOCK / 2);
    for ((l, h), &byte) in lo.iter_mut().zip(hi.iter_mut()).zip(&bytes[..BLOCK / 2]) {
        *l = byte & 15;
        *h = byte >> 4;
    }
    codes
}

/// The nibble of group `g` in its zero-point byte (even groups low, odd high).
#[inline]
pub(crate) fn group_nibble(byte: u8, g: usize) -> u8 {
    if g & 1 == 0 { byte & 15 } else { byte >> 4 }
}

/// Signs of a rotated matrix: `S_in` (one per input) and `S_out` (one per output).
#[derive(Clone, Copy, Debug)]
pub struct Rotation<'a> {
    /// ±1 per input.
    pub sign_in: &'a [f32],
    /// ±1 per output.
    pub sign_out: &'a [f32],
}

/// Replaces `w` (`rows x cols`, both multiples of 32) by `H·S_out·W·S_in·H`.
pub fn rotate_rows(isa: Isa, w: &mut [f32], cols: usize, rotation: Rotation<'_>) {
    let block_rows = BLOCK.checked_mul(cols).expect("matrix width overflows");
    assert!(cols.is_multiple_of(BLOCK) && w.len().is_multiple_of(block_rows));
    assert_eq!(rotation.sign_in.len(), cols);
    assert!(crate::is_product(w.len(), rotation.sign_out.len(), cols));
    for (row, &so) in w.chunks_exact_mut(cols).zip(rotation.sign_out) {
        for (v, &si) in row.iter_mut().zip(rotation.sign_in) {
            *v *= so * si;
        }
        hadamard_blocks(isa, row);
    }
    for block in w.chunks_exact_mut(BLOCK * cols) {
        hadamard_across_rows(block, cols);
    }
}

/// Undoes [`rotate_rows`]: replaces `w` = `H·S_out·W·S_in·H` by `W`
/// (`H` is symmetric and orthonormal, so `W = S_out·H·w·H·S_in`).
pub fn unrotate_rows(isa: Isa, w: &mut [f32], cols: usize, rotation: Rotation<'_>) {
    let block_rows = BLOCK.checked_mul(cols).expect("matrix width overflows");
    assert!(cols.is_multiple_of(BLOCK) && w.len().is_multiple_of(block_rows));
    assert_eq!(rotation.sign_in.len(), cols);
    assert!(crate::is_product(w.len(), rotation.sign_out.len(), cols));
    for block in w.chunks_exact_mut(BLOCK * cols) {
        hadamard_across_rows(block, cols);
    }
    for (row, &so) in w.chunks_exact_mut(cols).zip(rotation.sign_out) {
        hadamard_blocks(isa, row);
        for (v, &si) in row.iter_mut().zip(rotation.sign_in) {
            *v *= so * si;
        }
    }
}

/// Applies `H` across the 32 rows of `block` (each `cols` long), column by column.
fn hadamard_across_rows(block: &mut [f32], cols: usize) {
    let mut stride = 1;
    while stride < BLOCK {
        for start in (0..BLOCK).step_by(2 * stride) {
            for i in start..start + stride {
                let (head, tail) = block.split_at_mut((i + stride) * cols);
                let a = &mut head[i * cols..(i + 1) * cols];
                let b = &mut tail[..cols];
                for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                    let (p, q) = (*x, *y);
                    *x = p + q;
                    *y = p - q;
                }
            }
        }
        stride *= 2;
    }
    let scale = 1.0 / (BLOCK as f32).sqrt();
    for v in block.iter_mut() {
        *v *= scale;
    }
}

/// An owned quantized matrix.
#[derive(Clone, Debug)]
pub struct QuantizedMatrix {
    /// The format.
    pub format: QuantFormat,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Inputs per group.
    pub group: usize,
    /// Packed codes.
    pub codes: Vec<u8>,
    /// bf16 scales.
    pub scales: Vec<u16>,
    /// Packed zero points (q4).
    pub zeros: Vec<u8>,
    /// How the three arrays are ordered.
    pub layout: QuantLayout,
}

impl QuantizedMatrix {
    /// A borrowed view.
    pub fn view(&self) -> QuantMatRef<'_> {
        QuantMatRef {
            format: self.format,
            rows: self.rows,
            cols: self.cols,
            group: self.group,
            codes: &self.codes,
            scales: &self.scales,
            zeros: &self.zeros,
            layout: self.layout,
        }
    }

    /// `w` (row-major, rows a multiple of [`STRIP`]) in strips, the layout
    /// of the AVX-512 short-pass kernels, made on the pool; `None` for other
    /// matrices. `copied` is called with each range of rows once they are
    /// copied (so that a mapped source can hand its pages back as it goes,
    /// and memory never holds both copies of a large matrix).
    pub fn strips_of(
        pool: &ThreadPool,
        w: &QuantMatRef<'_>,
        copied: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) -> Option<Self> {
        if w.layout != QuantLayout::Rows || !w.rows.is_multiple_of(STRIP) {
            return None;
        }
        let q4 = w.format == QuantFormat::Q4;
        let block_bytes = w.format.code_row_bytes(BLOCK);
        let (groups, nb, n_strips) = (w.groups(), w.cols / BLOCK, w.rows / STRIP);
        let strip_codes = nb * STRIP * block_bytes;
        let strip_zeros = if q4 { groups * STRIP / 2 } else { 0 };
        let mut codes = vec![0u8; w.codes.len()];
        let mut scales = vec![0u16; w.scales.len()];
        let mut zeros = vec![0u8; n_strips * strip_zeros];
        {
            let (c, sc, z) = (
                DisjointMut::new(&mut codes),
                DisjointMut::new(&mut scales),
                DisjointMut::new(&mut zeros),
            );
            // Strips between two calls of `copied`: 1 MiB of q8 codes at 4096 inputs.
            const PIECE: usize = 16;
            pool.run(&|tid, n_threads| {
                let mine = split_range(n_strips, n_threads, tid, 1);
                for s in mine.clone() {
                    // SAFETY: strip `s` belongs to this thread alone.
                    let (codes, scales, zeros) = unsafe {
                        (
                            c.piece(s * strip_codes, strip_codes),
                            sc.piece(s * groups * STRIP, groups * STRIP),
                            z.piece(s * strip_zeros, strip_zeros),
                        )
                    };
                    for (b, dst) in codes.chunks_exact_mut(STRIP * block_bytes).enumerate() {
                        for i in 0..STRIP {
                            let r = s * STRIP + i;
                            let mut src = [0u8; BLOCK];
                            if q4 {
                                src[..16].copy_from_slice(&w.q4_block(r, b));
                            } else {
                                w.q8_codes(r, b * BLOCK, &mut src);
                                src.iter_mut().for_each(|c| *c ^= 0x80);
                            }
                            for (word, bytes) in src[..block_bytes].chunks_exact(4).enumerate() {
                                dst[(word * STRIP + i) * 4..][..4].copy_from_slice(bytes);
                            }
                        }
                    }
                    for g in 0..groups {
                        for i in 0..STRIP {
                            let r = s * STRIP + i;
                            scales[g * STRIP + i] = w.scales[r * groups + g];
                            if q4 {
                                let z = w.zero(r, g) as u8;
                                zeros[g * STRIP / 2 + i / 2] |= if i % 2 == 0 { z } else { z << 4 };
                            }
                        }
                    }
                    let done = s + 1 - mine.start;
                    if done.is_multiple_of(PIECE) || s + 1 == mine.end {
                        let first = mine.start + (done - 1) / PIECE * PIECE;
                        copied(first * STRIP..(s + 1) * STRIP);
                    }
                }
            });
        }
        Some(QuantizedMatrix {
            format: w.format,
            rows: w.rows,
            cols: w.cols,
            group: w.group,
            codes,
            scales,
            zeros,
            layout: QuantLayout::Strips,
        })
    }
}

/// The arrays of a batch of rows of a matrix being written, row-major as in
/// [`QuantLayout::Rows`] (see [`QuantizedMatrix::build_rows`]).
pub(crate) struct RowArrays<'a> {
    pub codes: &'a mut [u8],
    pub scales: &'a mut [u16],
    pub zeros: &'a mut [u8],
}

impl QuantizedMatrix {
    /// A matrix in [`QuantLayout::Rows`] whose rows the pool's threads
    /// write, each its own share in batches of up to `batch` rows:
    /// `fill(rows, arrays)` per batch. The shape was checked ([`check_shape`]).
    pub(crate) fn build_rows(
        pool: &ThreadPool,
        format: QuantFormat,
        (rows, cols, group): (usize, usize, usize),
        batch: usize,
        fill: &(dyn Fn(std::ops::Range<usize>, RowArrays<'_>) + Sync),
    ) -> Self {
        let (nc, ns, nz) = layout_sizes(format, rows, cols, group);
        let mut out = QuantizedMatrix {
            format,
            rows,
            cols,
            group,
            codes: vec![0; nc],
            scales: vec![0; ns],
            zeros: vec![0; nz],
            layout: QuantLayout::Rows,
        };
        let groups = cols / group;
        let (code_row, zero_row) = (format.code_row_bytes(cols), format.zero_row_bytes(groups));
        let codes = DisjointMut::new(&mut out.codes);
        let scales = DisjointMut::new(&mut out.scales);
        let zeros = DisjointMut::new(&mut out.zeros);
        pool.run(&|tid, n_threads| {
            let mine = split_range(rows, n_threads, tid, batch);
            let mut r0 = mine.start;
            while r0 < mine.end {
                let n = batch.min(mine.end - r0);
                // SAFETY: rows `r0..r0+n` are this thread's alone (`split_range`).
                let arrays = unsafe {
                    RowArrays {
                        codes: codes.piece(r0 * code_row, n * code_row),
                        scales: scales.piece(r0 * groups, n * groups),
                        zeros: zeros.piece(r0 * zero_row, n * zero_row),
                    }
                };
                fill(r0..r0 + n, arrays);
                r0 += n;
            }
        });
        out
    }
}

/// Quantizes `w` (rotating it first when `rotation` is given) on the pool.
///
/// The caller checks the shape with [`check_shape`] (and, with a rotation,
/// that `rows` is a multiple of 32); this panics otherwise.
pub fn quantize_matrix(
    pool: &ThreadPool,
    isa: Isa,
    format: QuantFormat,
    group: usize,
    w: MatRef<'_>,
    rotation: Option<Rotation<'_>>,
) -> QuantizedMatrix {
    let (rows, cols) = (w.rows, w.cols);
    check_shape(rows, cols, group).expect("shape checked by the caller");
    if rotation.is_some() {
        assert!(
            rows.is_multiple_of(BLOCK),
            "rotated rows must be a multiple of 32"
        );
    }
    let groups = cols / group;
    let (code_row, zero_row) = (format.code_row_bytes(cols), format.zero_row_bytes(groups));
    QuantizedMatrix::build_rows(pool, format, (rows, cols, group), BLOCK, &|batch, out| {
        let (r0, n) = (batch.start, batch.len());
        let mut block = vec![0f32; n * cols];
        for (i, row) in block.chunks_exact_mut(cols).enumerate() {
            w.widen_row(r0 + i, row);
        }
        if let Some(rot) = rotation {
            let signs = Rotation {
                sign_in: rot.sign_in,
                sign_out: &rot.sign_out[batch.clone()],
            };
            rotate_rows(isa, &mut block, cols, signs);
        }
        for i in 0..n {
            quantize_row(
                isa,
                format,
                group,
                &block[i * cols..(i + 1) * cols],
                &mut out.codes[i * code_row..(i + 1) * code_row],
                &mut out.scales[i * groups..(i + 1) * groups],
                &mut out.zeros[i * zero_row..(i + 1) * zero_row],
            );
        }
    })
}

/// Quantizes one row into its codes, scales and zero points.
pub fn quantize_row(
    isa: Isa,
    format: QuantFormat,
    group: usize,
    row: &[f32],
    codes: &mut [u8],
    scales: &mut [u16],
    zeros: &mut [u8],
) {
    let mut q = [0u8; 128];
    for (g, values) in row.chunks_exact(group).enumerate() {
        let params = match format {
            QuantFormat::Q8 => (q8_group(values, &mut q[..group]), 0),
            QuantFormat::Q4 => q4_group(isa, values, &mut q[..group]),
        };
        pack_group(format, group, g, &q[..group], params, codes, scales, zeros);
    }
}

/// Stores group `g`'s codes `q` (q8 as two's-complement bytes) and its
/// scale and zero point into one row's arrays.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_group(
    format: QuantFormat,
    group: usize,
    g: usize,
    q: &[u8],
    (scale, zero): (bf16, u8),
    codes: &mut [u8],
    scales: &mut [u16],
    zeros: &mut [u8],
) {
    scales[g] = scale.to_bits();
    match format {
        QuantFormat::Q8 => codes[g * group..(g + 1) * group].copy_from_slice(q),
        QuantFormat::Q4 => {
            let byte = &mut zeros[g / 2];
            *byte = if g.is_multiple_of(2) {
                zero
            } else {
                (*byte & 15) | (zero << 4)
            };
            let dst = &mut codes[g * group / 2..(g + 1) * group / 2];
            for (b, block) in q.chunks_exact(32).enumerate() {
                for j in 0..16 {
                    dst[b * 16 + j] = block[j] | (block[j + 16] << 4);
                }
            }
        }
    }
}

/// The bf16 scale of a symmetric 8-bit group: its largest magnitude / 127.
pub(crate) fn q8_scale(values: &[f32]) -> bf16 {
    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    bf16::from_f32(amax / 127.0)
}

/// Symmetric 8-bit codes (as two's-complement bytes) and the bf16 scale.
fn q8_group(values: &[f32], q: &mut [u8]) -> bf16 {
    let scale = q8_scale(values);
    let s = scale.to_f32();
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    for (c, &v) in q.iter_mut().zip(values) {
        *c = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
    }
    scale
}

/// Rounds to the nearest integer, ties to even, for `|x| < 2^22`; larger
/// values come back as large values (callers clamp them). Adding and
/// removing 1.5·2^23 lets the FPU's own rounding do the work, which keeps the
/// loops vectorisable (`round_ties_even` is a libm call on baseline x86-64).
#[inline(always)]
pub(crate) fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// Codes of `values` for scale `s` and zero point `z`.
fn q4_codes(values: &[f32], s: f32, z: i32, q: &mut [u8]) {
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    for (c, &v) in q.iter_mut().zip(values) {
        *c = (round_even(v * inv) + z as f32).clamp(0.0, 15.0) as u8;
    }
}

/// For scale `s` and zero point `z`: the squared error, and `Σ v·d`, `Σ d²`
/// over the centred codes `d = q - z` (for a least-squares refit of `s`).
/// Accumulated in 8 lanes, summed in lane order, without fused multiply-adds:
/// the AVX2 path computes exactly the same values, so a checkpoint does not
/// depend on the machine that quantized it. `values.len()` is a multiple of 32.
fn q4_trial(isa: Isa, values: &[f32], s: f32, z: i32) -> (f32, f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked); the length is a multiple of 8.
        return unsafe { avx2::q4_trial(values, s, z) };
    }
    let _ = isa;
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    let zf = z as f32;
    let (mut err, mut num, mut den) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    for chunk in values.chunks_exact(8) {
        for i in 0..8 {
            let v = chunk[i];
            let d = (round_even(v * inv) + zf).clamp(0.0, 15.0) - zf;
            let e = v - d * s;
            err[i] += e * e;
            num[i] += v * d;
            den[i] += d * d;
        }
    }
    (err.iter().sum(), num.iter().sum(), den.iter().sum())
}

/// Asymmetric 4-bit codes, the bf16 scale and the zero point.
///
/// Searches zero points around the min-max fit and a range of clipped
/// scales, each also refitted by least squares, keeping whichever
/// reconstructs the group with the least squared error.
pub(crate) fn q4_group(isa: Isa, values: &[f32], q: &mut [u8]) -> (bf16, u8) {
    // The grid (q - z)·s always contains 0, so the range must too.
    let lo = values.iter().fold(0f32, |m, &v| m.min(v));
    let hi = values.iter().fold(0f32, |m, &v| m.max(v));
    if hi - lo == 0.0 {
        q.fill(0);
        return (bf16::ZERO, 0);
    }
    let z_fit = (-lo * 15.0 / (hi - lo)).round() as i32;
    let mut best = (f32::INFINITY, bf16::ZERO, 0i32);
    let mut consider = |s: bf16, z: i32| {
        let (err, num, den) = q4_trial(isa, values, s.to_f32(), z);
        if err < best.0 {
            best = (err, s, z);
        }
        (num, den)
    };
    for z in (z_fit - 2).max(0)..=(z_fit + 2).min(15) {
        // The smallest scale that covers both ends with this zero point.
        let up = if z < 15 { hi / (15 - z) as f32 } else { 0.0 };
        let down = if z > 0 { -lo / z as f32 } else { 0.0 };
        let cover = up.max(down);
        if cover <= 0.0 {
            continue;
        }
        for step in 0..10 {
            let (num, den) = consider(bf16::from_f32(cover * (1.0 - 0.035 * step as f32)), z);
            if den > 0.0 && num > 0.0 {
                consider(bf16::from_f32(num / den), z);
            }
        }
    }
    let (_, s, z) = best;
    q4_codes(values, s.to_f32(), z, q);
    (s, z as u8)
}

#[cfg(test)]
mod tests;
