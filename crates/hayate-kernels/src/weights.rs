//! Borrowed views of weight matrices in their stored dtype.

use half::{bf16, f16};

/// Weight elements as stored on disk, not yet widened.
#[derive(Clone, Copy, Debug)]
pub enum WeightSlice<'a> {
    /// IEEE single precision.
    F32(&'a [f32]),
    /// bfloat16 bit patterns.
    Bf16(&'a [u16]),
    /// IEEE half precision bit patterns.
    F16(&'a [u16]),
}

impl WeightSlice<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            WeightSlice::F32(s) => s.len(),
            WeightSlice::Bf16(s) | WeightSlice::F16(s) => s.len(),
        }
    }

    /// Whether the slice has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per element.
    pub fn element_size(&self) -> usize {
        match self {
            WeightSlice::F32(_) => 4,
            WeightSlice::Bf16(_) | WeightSlice::F16(_) => 2,
        }
    }

    /// Element `i` widened to f32.
    pub fn get(&self, i: usize) -> f32 {
        match self {
            WeightSlice::F32(s) => s[i],
            WeightSlice::Bf16(s) => bf16::from_bits(s[i]).to_f32(),
            WeightSlice::F16(s) => f16::from_bits(s[i]).to_f32(),
        }
    }

    /// Widens `range` of the elements into `out` (same length).
    pub fn widen_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            WeightSlice::F32(s) => out.copy_from_slice(&s[start..end]),
            WeightSlice::Bf16(s) => {
                for (o, &b) in out.iter_mut().zip(&s[start..end]) {
                    *o = f32::from_bits((b as u32) << 16);
                }
            }
            WeightSlice::F16(s) => {
                for (o, &b) in out.iter_mut().zip(&s[start..end]) {
                    *o = f16::from_bits(b).to_f32();
                }
            }
        }
    }
}

/// A row-major matrix of `rows` x `cols` weights (`rows` outputs, `cols` inputs),
/// as a linear layer stores it.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    /// The elements, `rows * cols` of them.
    pub data: WeightSlice<'a>,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
}

impl<'a> MatRef<'a> {
    /// A view of `data` as `rows` x `cols`; `None` if the sizes disagree.
    pub fn new(data: WeightSlice<'a>, rows: usize, cols: usize) -> Option<Self> {
        (rows.checked_mul(cols)? == data.len()).then_some(MatRef { data, rows, cols })
    }

    /// Widens row `r` into `out` (length `cols`).
    pub fn widen_row(&self, r: usize, out: &mut [f32]) {
        self.data.widen_into(r * self.cols, out);
    }
}
